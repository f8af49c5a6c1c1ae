"""How a request is written for each kind of server: Atoma's, or one that follows OpenAI's API.

The one home of the difference, network-free. A checked `ImageRequest` goes in; `plan`
refuses what the server cannot answer as asked and says how many requests carry it; `encode`
writes each body. Answers are read the same way in both dialects (`_convert.parse_response`).

**atoma** (the default): Atoma's proxy needs ``n`` and ``size`` and bills ``n * W * H`` from
them; its image backend, mistral.rs, reads neither: it draws one image per request, at
``width`` x ``height`` (each side rounded up to a multiple of 16), and takes only the
spellings ``"Url"`` and ``"B64Json"``, where ``Url`` answers a file name inside the backend's
container that nothing serves (docs/contract.md, "What the backend does with the body"). So
each image is its own request of
``{"model", "prompt", "n": 1, "size": "WxH", "width": W, "height": H, "response_format":
"B64Json"}``, and a size the backend would change is refused before anything is sent.

**openai**: ``size``, ``n`` and ``response_format`` as OpenAI's images API takes them
(``response_format`` left out when None: gpt-image models refuse it), one request.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import attrs

from ._convert import converter
from ._errors import InvalidRequestError
from ._models import ImageRequest

__all__ = ["DIALECTS", "Dialect", "check_dialect", "encode", "plan"]

Dialect = Literal["atoma", "openai"]
"""Which API a server speaks: ``"atoma"`` (Atoma's proxy and its mistral.rs backend, the
default) or ``"openai"`` (OpenAI's images API, and servers that follow it)."""
DIALECTS: tuple[Dialect, ...] = ("atoma", "openai")

#: mistral.rs's FLUX pipeline rounds each side up to a multiple of this.
ATOMA_SIDE_STEP = 16
#: What the backend's ``response_format`` enum calls base64 data (no serde renaming).
_ATOMA_B64 = "B64Json"
#: The body keys the client writes itself, per dialect: extra_body may not replace them.
_WRITTEN: dict[Dialect, frozenset[str]] = {
    "openai": frozenset(attrs.fields_dict(ImageRequest)) - {"extra_body"},
}
_WRITTEN["atoma"] = _WRITTEN["openai"] | {"width", "height"}


def check_dialect(value: object) -> Dialect:
    """``value`` if it names a dialect, else `InvalidRequestError`."""
    if type(value) is not str or value not in DIALECTS:
        raise InvalidRequestError(
            "dialect", value, "allowed: 'atoma' (Atoma's API) or 'openai' (OpenAI's images API)"
        )
    return value


def plan(dialect: Dialect, request: ImageRequest) -> tuple[ImageRequest, ...]:
    """The requests that carry ``request`` to a server of ``dialect``, each to `encode`.

    Atoma's backend draws one image per request, so ``n`` images are ``n`` requests of one.

    Raises:
        InvalidRequestError: the server cannot answer ``request`` as asked; nothing was sent.
    """
    _refuse_written_keys(dialect, request)
    if dialect == "openai":
        return (request,)
    if request.response_format == "url":
        raise InvalidRequestError(
            "response_format",
            "url",
            "allowed on Atoma: 'b64_json' or None (both give the image's bytes). Atoma's "
            "backend answers 'url' with a file name on the node's disk that nothing serves, "
            "after billing; save or decode the b64_json image instead",
        )
    for side, value in (("width", request.width), ("height", request.height)):
        if value % ATOMA_SIDE_STEP:
            raise InvalidRequestError("size", request.size, _nearest_sizes(request, side))
    if request.n == 1:
        return (request,)
    return (attrs.evolve(request, n=1),) * request.n


def encode(dialect: Dialect, request: ImageRequest) -> bytes:
    """The JSON body of one request `plan` made, as compact UTF-8 bytes; never a ``null``."""
    body: dict[str, Any] = converter().unstructure(request)
    if dialect == "atoma":
        body["width"], body["height"] = request.width, request.height
        body["response_format"] = _ATOMA_B64
    body.update(request.extra_body)
    # ImageRequest has checked every value (lone surrogates, extra_body), so it encodes.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _refuse_written_keys(dialect: Dialect, request: ImageRequest) -> None:
    written = _WRITTEN[dialect].intersection(request.extra_body)
    if written:
        name = min(written)
        how = "size='WIDTHxHEIGHT'" if name in ("width", "height") else f"{name}=..."
        raise InvalidRequestError(
            f"extra_body[{name!r}]",
            request.extra_body[name],
            f"allowed: keys the client does not write itself; set this one with {how}",
        )


def _nearest_sizes(request: ImageRequest, side: str) -> str:
    def down(value: int) -> int:
        return max(ATOMA_SIDE_STEP, value - value % ATOMA_SIDE_STEP)

    def up(value: int) -> int:
        return value + -value % ATOMA_SIDE_STEP

    w, h = request.width, request.height
    smaller, larger = f"{down(w)}x{down(h)}", f"{up(w)}x{up(h)}"
    nearest = f"'{larger}'" if smaller == larger else f"'{smaller}' or '{larger}'"
    return (
        f"allowed on Atoma: a width and a height that are multiples of {ATOMA_SIDE_STEP} "
        f"(this {side} is not). Its backend rounds each side up to one, so the image would "
        f"not be the size billed; the nearest sizes that work: {nearest}"
    )
