from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import attrs
import pytest

from atoma_images import (
    GeneratedImage,
    ImageRequest,
    ImagesResponse,
    InvalidRequestError,
    ResponseValidationError,
)
from atoma_images.testing import make_png

from helpers import INVALID
from pngcheck import png_size

VALID: dict[str, Any] = {"model": "m", "prompt": "a red fox"}

# (field, bad value, a phrase the message must contain)


@pytest.mark.parametrize(("field", "value", "phrase"), INVALID)
def test_invalid_request_names_field_value_and_what_is_allowed(
    field: str, value: object, phrase: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        ImageRequest(**{**VALID, field: value})
    error = info.value
    assert isinstance(error, ValueError)
    assert error.field == field
    assert error.value is value
    assert phrase in str(error)
    assert f"invalid {field}" in str(error)
    assert "allowed" in str(error)


def test_valid_request_keeps_defaults_and_exposes_dimensions() -> None:
    request = ImageRequest(**VALID, size="640x480")
    assert (request.n, request.width, request.height) == (1, 640, 480)
    assert ImageRequest(**VALID).size == "1024x1024"
    assert ImageRequest(**{**VALID, "prompt": "é" * 1000, "n": 10}).n == 10


def test_every_field_is_checked_by_its_own_attrs_validator() -> None:
    # One style, as Timeout and RetryPolicy: a validator per field, no post-init check.
    assert all(field.validator is not None for field in attrs.fields(ImageRequest))
    assert not hasattr(ImageRequest, "__attrs_post_init__")
    request = ImageRequest(**VALID)
    object.__setattr__(request, "n", 0)  # past the frozen class, to re-run its checks
    with pytest.raises(InvalidRequestError, match="invalid n"):
        attrs.validate(request)


@pytest.mark.parametrize("response_format", ["url", "b64_json", None])
def test_response_format_is_url_or_b64_json_or_left_out(response_format: Any) -> None:
    assert ImageRequest(**VALID, response_format=response_format).response_format == (
        response_format
    )


def test_decode_bare_base64_data_uri_and_wrapped_lines() -> None:
    png = make_png(5, 3, "x")
    bare = base64.b64encode(png).decode()
    assert GeneratedImage(b64_json=bare).decode() == png
    assert GeneratedImage(b64_json="data:image/png;base64," + bare).decode() == png
    wrapped = "\n".join(bare[i : i + 76] for i in range(0, len(bare), 76))
    assert GeneratedImage(b64_json=wrapped).decode() == png
    assert GeneratedImage(b64_json=bare.rstrip("=")).decode() == png


@pytest.mark.parametrize(
    "uri",
    [
        "DATA:image/PNG;BASE64,{}",
        "Data:Image/Png;Base64,{}",
        "data:image/png;charset=binary;base64,{}",
        "data:image/webp;base64,{}",
    ],
)
def test_decode_reads_a_data_uri_whatever_its_case(uri: str) -> None:
    # RFC 2397: the scheme, the media type and ";base64" are case-insensitive.
    png = make_png(4, 4, "case")
    assert GeneratedImage(b64_json=uri.format(base64.b64encode(png).decode())).decode() == png


@pytest.mark.parametrize(
    ("uri", "media_type"),
    [
        ("data:text/html;base64,PGgxPg==", "'text/html'"),
        ("DATA:Application/JSON;BASE64,e30=", "'application/json'"),
        ("data:;base64,aGk=", "'text/plain'"),  # RFC 2397's default media type
        ("data:imagepng;base64,aGk=", "'imagepng'"),
    ],
)
def test_decode_refuses_a_data_uri_of_something_else_than_an_image(
    uri: str, media_type: str
) -> None:
    with pytest.raises(ResponseValidationError, match=f"data URI of {media_type}, not of an image"):
        GeneratedImage(b64_json=uri).decode()


@pytest.mark.parametrize(
    "bad",
    [
        "not base64 at all!",
        "data:image/png,rawbytes",
        "data:image/png;base64",
        "data:image/png;base64;x,aGk=",
        "a",
        "aGk=\u00e9",
    ],
)
def test_decode_rejects_invalid_base64_clearly(bad: str) -> None:
    with pytest.raises(ResponseValidationError, match="base64"):
        GeneratedImage(b64_json=bad).decode()


def test_decode_of_a_url_only_image_points_to_download() -> None:
    image = GeneratedImage(url="https://cdn.example/x.png")
    with pytest.raises(ResponseValidationError, match=r"download|b64_json"):
        image.decode()


def test_save_writes_decoded_png(tmp_path: Path) -> None:
    png = make_png(7, 9, "save")
    path = GeneratedImage(b64_json=base64.b64encode(png).decode()).save(tmp_path / "a.png")
    assert path == tmp_path / "a.png"
    assert png_size(path) == (7, 9)


def test_repr_shows_only_a_short_prefix_of_base64() -> None:
    data = base64.b64encode(make_png(64, 64, "r")).decode()
    text = repr(GeneratedImage(b64_json=data))
    assert data[:24] in text
    assert data not in text
    assert len(text) < 150
    assert f"({len(data)} chars)" in text


def test_images_is_data() -> None:
    images = (GeneratedImage(url="u"),)
    response = ImagesResponse(created=1, data=images)
    assert response.images is response.data is images
