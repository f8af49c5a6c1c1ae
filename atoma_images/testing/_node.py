"""The node side of confidential generation, played by the fake server.

A node in a TEE, in the flow of docs/contract.md ("The confidential variant"), holds an
X25519 key pair, grants single-use locks that expire, opens a sealed request (its lock, its
key, its hash and its compute units) and seals the answer. The proxy's part stays with
`FakeAtomaServer`: it reads the JSON body, checks the API key (after the body, before the
lock, as the proxy does) and knows which models have nodes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs
from aiohttp import web

from atoma_images import _confidential

from ._checks import HTTPTooEarly, parse_size, refusal

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = ["FakeConfidentialNode", "Sealed", "Tamper", "lock_request", "sealed_request", "tampered"]

Tamper = Literal["ciphertext", "response_hash"]

_NODE_SMALL_ID = 7
#: The base64 fields of a sealed request.
_SEALED_FIELDS = (
    "ciphertext",
    "nonce",
    "salt",
    "client_dh_public_key",
    "node_dh_public_key",
    "plaintext_body_hash",
)


def lock_request(body: Mapping[str, Any]) -> tuple[str, int]:
    """``(model, compute units)`` of a lock request; raises 400 for a field of the wrong type."""
    model, units = body.get("model"), body.get("max_num_tokens")
    if type(model) is not str:
        raise refusal(web.HTTPBadRequest, "Model field is required")
    if units is not None and (type(units) is not int or units < 0):
        raise refusal(web.HTTPBadRequest, "Invalid max_num_tokens field")
    return model, units or 0


@attrs.frozen(kw_only=True)
class Sealed:
    """A sealed request whose fields have the right types; nothing is decoded yet."""

    fields: Mapping[str, str]  # the base64 fields, by name
    stack: int
    units: int


def sealed_request(body: Mapping[str, Any]) -> Sealed:
    """The sealed request in ``body``; raises 400 for a field missing or of the wrong type."""
    for name in _SEALED_FIELDS:
        if type(body.get(name)) is not str:
            raise refusal(web.HTTPBadRequest, f"{name} field is required (a base64 string)")
    stack, units = body.get("stack_small_id"), body.get("num_compute_units")
    if type(stack) is not int or type(units) is not int:
        raise refusal(web.HTTPBadRequest, "stack_small_id and num_compute_units must be integers")
    return Sealed(fields={name: body[name] for name in _SEALED_FIELDS}, stack=stack, units=units)


@attrs.frozen
class _Lock:
    units: int
    expires: float  # on the monotonic clock


@attrs.define
class FakeConfidentialNode:
    """One confidential node: an X25519 key pair and the locks granted on it.

    Needs the ``confidential`` extra. Its methods raise aiohttp's HTTP exceptions carrying
    Atoma's error envelope for what the node refuses.
    """

    _private_key: X25519PrivateKey = attrs.field(
        init=False, factory=_confidential.new_private_key, repr=False
    )
    # stack_small_id -> its lock; the ids count up from 1, as the fake numbers them.
    _locks: dict[int, _Lock] = attrs.field(init=False, factory=dict)
    _stacks: int = attrs.field(init=False, default=0)

    @property
    def public_key(self) -> bytes:
        """The node's raw 32-byte X25519 public key."""
        return _confidential.public_key_bytes(self._private_key)

    def lock(self, units: int, *, ttl: float) -> dict[str, Any]:
        """Lock a new stack for ``units`` compute units, usable once within ``ttl`` seconds.

        Returns the body of the answer to ``POST /v1/nodes/lock``.
        """
        self._stacks += 1
        self._locks[self._stacks] = _Lock(units=units, expires=time.monotonic() + ttl)
        return {
            "public_key": _confidential.b64encode_text(self.public_key),
            "node_small_id": _NODE_SMALL_ID,
            "stack_small_id": self._stacks,
            "stack_entry_digest": None,
        }

    def open(self, sealed: Sealed) -> tuple[bytes, bytes]:
        """``(plaintext, key)``: the request inside ``sealed`` and the key for its answer.

        Uses up the lock named by ``sealed`` first, whatever follows, as a node does.
        """
        lock = self._locks.pop(sealed.stack, None)  # a lock serves one request
        if lock is None or time.monotonic() >= lock.expires:
            raise refusal(
                HTTPTooEarly, f"No usable lock for stack {sealed.stack} (unknown, used or expired)"
            )
        if sealed.units > lock.units:
            raise refusal(
                HTTPTooEarly,
                f"The lock covers {lock.units} compute units; {sealed.units} requested",
            )
        decoded: dict[str, bytes] = {}
        for name, text in sealed.fields.items():
            value = _confidential.b64decode_text(text)
            if value is None:
                raise refusal(web.HTTPBadRequest, f"{name} is not valid base64")
            decoded[name] = value
        if decoded["node_dh_public_key"] != self.public_key:
            raise refusal(web.HTTPBadRequest, "node_dh_public_key is not this node's key")
        from cryptography.exceptions import InvalidTag  # noqa: PLC0415

        try:
            secret = _confidential.shared_secret(self._private_key, decoded["client_dh_public_key"])
            key = _confidential.derive_key(secret, decoded["salt"])
            plaintext = _confidential.decrypt(key, decoded["nonce"], decoded["ciphertext"])
        except (ValueError, InvalidTag):  # a bad key, nonce or tag: the node cannot read it
            raise refusal(web.HTTPBadRequest, "Failed to decrypt the request") from None
        if _confidential.body_hash(plaintext) != sealed.fields["plaintext_body_hash"]:
            raise refusal(
                web.HTTPBadRequest, "plaintext_body_hash does not match the decrypted body"
            )
        pixels = _pixels(plaintext)
        if pixels is not None and sealed.units != pixels:
            raise refusal(
                web.HTTPBadRequest,
                f"num_compute_units must be n*W*H = {pixels}, got {sealed.units}",
            )
        return plaintext, key

    def seal(self, key: bytes, answer: bytes) -> bytes:
        """The JSON of the sealed answer: ``answer`` encrypted with ``key``, and its hash."""
        nonce = os.urandom(_confidential.NONCE_BYTES)
        digest = _confidential.body_hash(answer)
        b64 = _confidential.b64encode_text
        sealed = {
            "ciphertext": b64(_confidential.encrypt(key, nonce, answer)),
            "nonce": b64(nonce),
            "signature": b64(hashlib.sha256(digest.encode()).digest()),
            "response_hash": digest,
        }
        return json.dumps(sealed).encode()


def tampered(sealed_answer: bytes, how: Tamper) -> bytes:
    """``sealed_answer`` altered on its way: one bit of the ciphertext, or another body's hash."""
    sealed = json.loads(sealed_answer)
    if how == "ciphertext":
        data = bytearray(base64.b64decode(sealed["ciphertext"]))
        data[len(data) // 2] ^= 0x01
        sealed["ciphertext"] = _confidential.b64encode_text(bytes(data))
    else:
        sealed["response_hash"] = _confidential.body_hash(b"some other response")
    return json.dumps(sealed).encode()


def _pixels(plaintext: bytes) -> int | None:
    """n*W*H of a request body, or None if it is not a valid request (the normal checks say why)."""
    try:
        body = json.loads(plaintext)
    except ValueError:
        return None
    if type(body) is not dict or type(body.get("n")) is not int:
        return None
    dims = parse_size(body.get("size"))
    return None if dims is None else int(body["n"]) * dims[0] * dims[1]
