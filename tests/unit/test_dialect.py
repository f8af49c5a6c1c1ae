"""How a request is written for each kind of server, without a socket."""

from __future__ import annotations

import json

import pytest

from atoma_images import ImageRequest, InvalidRequestError
from atoma_images._dialect import encode, plan


def test_atoma_writes_each_image_as_a_request_the_backend_draws() -> None:
    request = ImageRequest(model="m", prompt="p", n=3, size="64x32", user="u")
    parts = plan("atoma", request)
    assert len(parts) == 3
    assert all(part.n == 1 for part in parts)
    assert json.loads(encode("atoma", parts[0])) == {
        "model": "m",
        "prompt": "p",
        "n": 1,
        "size": "64x32",
        "user": "u",
        "width": 64,
        "height": 32,
        "response_format": "B64Json",
    }


def test_openai_writes_one_request_as_openai_reads_it() -> None:
    request = ImageRequest(model="m", prompt="p", n=3, size="64x32", extra_body={"seed": 1})
    (part,) = plan("openai", request)
    assert part is request
    assert json.loads(encode("openai", part)) == {
        "model": "m",
        "prompt": "p",
        "n": 3,
        "size": "64x32",
        "seed": 1,
    }


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"response_format": "url"}, "response_format"),
        ({"size": "1000x1024"}, "size"),
        ({"extra_body": {"height": 16}}, "extra_body['height']"),
    ],
)
def test_atoma_refuses_what_its_backend_cannot_answer_as_asked(
    fields: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        plan("atoma", ImageRequest(model="m", prompt="p", **fields))  # type: ignore[arg-type]
    assert caught.value.field == field


def test_openai_takes_width_and_height_as_extra_keys() -> None:
    request = ImageRequest(model="m", prompt="p", extra_body={"width": 16})
    assert json.loads(encode("openai", plan("openai", request)[0]))["width"] == 16
