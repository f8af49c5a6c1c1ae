"""Confidential generation: the request travels encrypted to a node running in a TEE.

The flow, as the deployed proxy and nodes run it (docs/contract.md, "Confidential generation"):

1. ``POST /v1/nodes/lock`` ``{"model", "max_num_tokens"}`` locks a node for the call and
   returns its X25519 public key. For images the lock must cover ``n * W * H`` compute units
   (the proxy charges one unit per pixel); a smaller lock makes the call fail with 425.
2. A fresh X25519 key pair for every attempt. The shared secret goes through HKDF-SHA256
   (a 16-byte random salt, empty info) to a 32-byte AES-256-GCM key.
3. The JSON of the normal request is encrypted (12-byte random nonce, no associated data) and
   sent to ``POST /v1/confidential/images/generations`` with the public keys, the salt, the
   nonce, ``plaintext_body_hash`` = base64(BLAKE2b-256(plaintext)) and ``num_compute_units``.
4. The answer ``{ciphertext, nonce, response_hash?}`` is decrypted with the same key; the
   plaintext is the normal images response, and its BLAKE2b-256 must equal ``response_hash``.

AES-GCM authenticates the ciphertext, so a failed decryption means the answer was altered or
was not encrypted by the node the request was sealed for; the hash check then confirms the
node's own account of what it sent. Either failure is a `ResponseIntegrityError`.

`cryptography` is an optional extra, imported only when a confidential call is made.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from ._convert import invalid_response, parse_object, parse_response
from ._errors import (
    AmbiguousOutcomeError,
    APIConnectionError,
    APITimeoutError,
    AtomaImagesError,
    ExtraNotInstalledError,
    ResponseIntegrityError,
    ResponseValidationError,
)
from ._hooks import CallInfo
from ._models import ImageRequest, ImagesResponse
from ._usage import compute_units

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from yarl import URL

    from ._hooks import HookSet
    from ._retry import RetryPolicy
    from ._timeout import Timeout
    from ._transport import Answer, RequestProgress
    from ._usage import CallCost

    #: Sends one POST: (url, body, seconds it may take, largest body or None for the default,
    #: where to record how far a paid request got or None).
    Post = Callable[[URL, bytes, float, int | None, RequestProgress | None], Awaitable[Answer]]

__all__ = [
    "LOCK_PATH",
    "PATH",
    "NodeLock",
    "SealedRequest",
    "b64decode_text",
    "b64encode_text",
    "body_hash",
    "decrypt",
    "derive_key",
    "encrypt",
    "generate",
    "generate_once",
    "lock",
    "lock_body",
    "new_private_key",
    "parse_lock",
    "public_key_bytes",
    "require",
    "seal",
    "shared_secret",
]

LOCK_PATH = "nodes/lock"
PATH = "confidential/images/generations"
SALT_BYTES = 16
NONCE_BYTES = 12
KEY_BYTES = 32


def require(feature: str = "confidential=True") -> None:
    """Raise `ExtraNotInstalledError` unless the ``confidential`` extra is installed."""
    try:
        import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401, PLC0415
    except ImportError as exc:
        raise ExtraNotInstalledError(feature, "confidential", "cryptography") from exc


# -- the primitives, each one step of the contract (checked against known answers) -----------


def new_private_key() -> X25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (  # noqa: PLC0415
        X25519PrivateKey,
    )

    return X25519PrivateKey.generate()


def public_key_bytes(private_key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        Encoding,
        PublicFormat,
    )

    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def shared_secret(private_key: X25519PrivateKey, peer_public_key: bytes) -> bytes:
    """X25519 key agreement with the other side's raw 32-byte public key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (  # noqa: PLC0415
        X25519PublicKey,
    )

    return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))


def derive_key(secret: bytes, salt: bytes) -> bytes:
    """The AES-256-GCM key: HKDF-SHA256 of the shared secret, with ``salt`` and empty info."""
    from cryptography.hazmat.primitives.hashes import SHA256  # noqa: PLC0415
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: PLC0415

    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=salt, info=b"").derive(secret)


def encrypt(key: bytes, nonce: bytes, plaintext: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    return AESGCM(key).encrypt(nonce, plaintext, None)


def decrypt(key: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    """The plaintext; raises ``cryptography.exceptions.InvalidTag`` if it was altered."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    return AESGCM(key).decrypt(nonce, ciphertext, None)


def body_hash(data: bytes) -> str:
    """base64(BLAKE2b-256(data)), the form of ``plaintext_body_hash`` and ``response_hash``."""
    return b64encode_text(hashlib.blake2b(data, digest_size=32).digest())


def b64encode_text(data: bytes) -> str:
    """Standard base64, as every byte field of the confidential flow is sent."""
    return base64.b64encode(data).decode("ascii")


def b64decode_text(text: str) -> bytes | None:
    """The bytes of a standard base64 field, or None if it is not valid base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# -- one attempt: lock, seal, open -----------------------------------------------------------

#: The lock answer is a few small fields; more than this of it is not read.
_MAX_LOCK_ANSWER = 2**20


async def generate(  # noqa: PLR0917 - the parts of one confidential call, in order
    post: Post,
    base_url: URL,
    request: ImageRequest,
    plaintext: bytes,
    limits: Timeout,
    policy: RetryPolicy,
    hooks: HookSet,
    cost: CallCost,
) -> ImagesResponse:
    """A confidential call: `generate_once` in the policy's attempt loop.

    Raises `ExtraNotInstalledError` (nothing sent) without the ``confidential`` extra.
    """
    require()

    async def attempt(remaining: float) -> ImagesResponse:
        seconds = limits.attempt_seconds(remaining)
        return await generate_once(post, base_url, request, plaintext, seconds, cost.paid_request())

    url = base_url / PATH
    return await policy.run(
        attempt, hooks, lambda: CallInfo.of("generate_confidential", "POST", url, request), cost
    )


async def generate_once(  # noqa: PLR0917 - the parts of one attempt, in order
    post: Post,
    base_url: URL,
    request: ImageRequest,
    plaintext: bytes,
    seconds: float,
    progress: RequestProgress | None = None,
) -> ImagesResponse:
    """One confidential attempt: lock a node, seal the request for it, open its answer.

    The two exchanges share the attempt's ``seconds``. Every attempt takes a fresh lock, so
    a 425 (the lock was not usable) is retried with a new one. ``progress`` records how far
    the sealed request, the paid one, got (the lock bills nothing).
    """
    started = time.monotonic()
    sealed = seal(plaintext, request, await lock(post, base_url, request, seconds))
    url = base_url / PATH
    left = seconds - (time.monotonic() - started)
    answer = await post(url, sealed.body, left, None, progress)
    return sealed.open(answer.status, answer.headers, answer.body, url)


async def lock(post: Post, base_url: URL, request: ImageRequest, seconds: float) -> NodeLock:
    """Lock a node for ``request`` (``POST /v1/nodes/lock``), or raise why not.

    A lock bills nothing (the sealed request is what is billed), so no failure of it may
    have been billed: one whose answer was lost after it was sent is a failure before the
    generation was sent (`APIConnectionError`, `APITimeoutError`), retried as one.
    """
    url = base_url / LOCK_PATH
    try:
        answer = await post(url, lock_body(request), seconds, _MAX_LOCK_ANSWER, None)
        return parse_lock(answer.status, answer.headers, answer.body, url)
    except AmbiguousOutcomeError as error:
        kind = APITimeoutError if isinstance(error, APITimeoutError) else APIConnectionError
        raise kind(
            f"the node lock request to {url.host} got no complete answer; a lock bills "
            "nothing and the generation was not sent, so nothing was billed",
            url=str(url),
        ) from error
    except AtomaImagesError as error:  # refused, or an unusable answer: nothing billed
        error.may_have_been_billed = False
        raise


def lock_body(request: ImageRequest) -> bytes:
    """The body of the lock request: enough compute units for every pixel asked for."""
    return json.dumps(
        {"model": request.model, "max_num_tokens": compute_units(request)}, separators=(",", ":")
    ).encode()


@attrs.frozen(kw_only=True)
class NodeLock:
    """A node locked for one confidential request (``POST /v1/nodes/lock``)."""

    public_key: str
    node_small_id: int
    stack_small_id: int
    stack_entry_digest: str | None = None


def parse_lock(status: int, headers: Mapping[str, str], body: bytes, url: object) -> NodeLock:
    """The lock from the answer to ``POST /v1/nodes/lock``, or the error it stands for."""
    lock = parse_object(status, headers, body, url, NodeLock)
    key = b64decode_text(lock.public_key)
    if key is None or len(key) != KEY_BYTES:
        raise invalid_response(
            f"public_key: expected the base64 of a {KEY_BYTES}-byte X25519 key, "
            f"got {lock.public_key[:60]!r}",
            status,
            headers,
            body,
        )
    return lock


@attrs.frozen(kw_only=True)
class SealedResponse:
    """The encrypted answer of a confidential request."""

    ciphertext: str
    nonce: str
    response_hash: str | None = None
    signature: str | None = None


@attrs.frozen(kw_only=True)
class SealedRequest:
    """One encrypted request, and the key that opens its answer."""

    body: bytes
    key: bytes = attrs.field(repr=False)

    def open(
        self, status: int, headers: Mapping[str, str], body: bytes, url: object
    ) -> ImagesResponse:
        """The images response inside the answer, or the error the answer stands for.

        Errors come back in clear, like any other call's (parse_object raises them).
        """
        sealed = parse_object(status, headers, body, url, SealedResponse)
        request_id = headers.get("x-request-id")

        def rejected(problem: str) -> ResponseIntegrityError:
            return ResponseIntegrityError(
                f"confidential answer rejected: {problem}",
                status=status,
                headers=headers,
                request_id=request_id,
            )

        nonce, ciphertext = b64decode_text(sealed.nonce), b64decode_text(sealed.ciphertext)
        if nonce is None or len(nonce) != NONCE_BYTES:
            raise rejected(f"nonce: expected the base64 of {NONCE_BYTES} bytes")
        if ciphertext is None:
            raise rejected("ciphertext: not valid base64")
        from cryptography.exceptions import InvalidTag  # noqa: PLC0415

        try:
            plaintext = decrypt(self.key, nonce, ciphertext)
        except InvalidTag:
            raise rejected(
                "the ciphertext failed authentication: it was altered on its way, or was not "
                "encrypted by the node this request was sealed for"
            ) from None
        # The GCM tag already proves who wrote it; a node that sends a hash must agree with it.
        if sealed.response_hash is not None and sealed.response_hash != body_hash(plaintext):
            raise rejected("response_hash does not match the BLAKE2b-256 of the decrypted response")
        return parse_response(status, headers, plaintext, url)


def seal(
    plaintext: bytes,
    request: ImageRequest,
    lock: NodeLock,
    *,
    private_key: X25519PrivateKey | None = None,
    salt: bytes | None = None,
    nonce: bytes | None = None,
) -> SealedRequest:
    """Encrypt ``plaintext`` (the request's JSON) for the locked node.

    ``private_key``, ``salt`` and ``nonce`` are fresh random values unless given (the
    known-answer test gives them).
    """
    private_key = new_private_key() if private_key is None else private_key
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    try:
        secret = shared_secret(private_key, base64.b64decode(lock.public_key))
    except ValueError as exc:  # a low-order point: no shared secret can come of it
        raise ResponseValidationError(
            f"public_key: the node's key cannot be used for X25519 key agreement ({exc})"
        ) from exc
    key = derive_key(secret, salt)
    body = {
        "ciphertext": b64encode_text(encrypt(key, nonce, plaintext)),
        "stack_small_id": lock.stack_small_id,
        "nonce": b64encode_text(nonce),
        "salt": b64encode_text(salt),
        "client_dh_public_key": b64encode_text(public_key_bytes(private_key)),
        "node_dh_public_key": lock.public_key,
        "plaintext_body_hash": body_hash(plaintext),
        "model_name": request.model,
        "num_compute_units": compute_units(request),
    }
    return SealedRequest(body=json.dumps(body, separators=(",", ":")).encode(), key=key)
