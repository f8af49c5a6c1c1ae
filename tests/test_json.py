"""_json.loads gives what json.loads gives, for any JSON, however its long strings look."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atoma_images import _json

LONG = _json.LONG_STRING + 10

# Long strings of every kind that matters: plain base64 (cut out), and ones with quotes,
# backslashes, control characters or non-ASCII text (left to json).
long_plain = st.binary(min_size=LONG * 3 // 4, max_size=LONG).map(
    lambda raw: base64.b64encode(raw).decode()
)
long_tricky = st.tuples(
    st.sampled_from(['"', "\\", '\\"', "\\\\", "\n", "é", "\x00", "\u2028", "😀"]),
    st.integers(0, LONG),
).map(lambda t: "A" * t[1] + t[0] + "B" * (LONG - t[1]))
short_text = st.text(max_size=12)
leaf = st.none() | st.booleans() | st.integers() | short_text | long_plain | long_tricky
documents = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(short_text | long_plain, inner, max_size=4)
    ),
    max_leaves=8,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, st.booleans())
def test_any_document_parses_as_json_parses_it(document: Any, ascii_only: bool) -> None:
    body = json.dumps(document, ensure_ascii=ascii_only).encode()
    assert _json.loads(body) == json.loads(body)


def test_an_image_answer_is_restored_exactly() -> None:
    image = "data:image/png;base64," + base64.b64encode(os.urandom(300_000)).decode()
    answer = {
        "created": 1,
        "data": [{"url": None, "b64_json": image}, {"b64_json": image[22:], "x": 'a\\"b'}],
        "signature": "s",
    }
    body = json.dumps(answer).encode()
    cut = _json._cut_long_strings(body)
    assert cut is not None
    assert cut[1] == [image, image[22:]]  # both images cut out; the rest left to json
    assert len(cut[0]) < 300
    parsed = _json.loads(body)
    assert parsed == answer
    assert parsed["data"][0]["b64_json"] == image


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": "' + b"A" * LONG + b'"',  # unterminated object
        b'{"a": "' + b"A" * LONG,  # unterminated string
        b'{"a": "' + b"A" * LONG + b'" "b": 1}',  # missing comma
        b'{"a": "' + b"A" * LONG + b'", "b": tru}',
        b'{"a": "' + b"A" * LONG + b'"}\xff',  # not UTF-8 after the string
        b'{"a": "' + b"A" * LONG + b'\xff"}',  # not UTF-8 inside it
        b'["' + b"A" * LONG + b'"] trailing',
    ],
)
def test_what_json_refuses_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - json's and the codec's errors alike
        json.loads(body)
    with pytest.raises(ValueError):  # noqa: PT011
        _json.loads(body)


def test_the_error_message_is_about_the_body_itself() -> None:
    body = b'{"a": "' + b"A" * LONG + b'" "b": 1}'
    with pytest.raises(json.JSONDecodeError) as plain:
        json.loads(body)
    with pytest.raises(json.JSONDecodeError) as caught:
        _json.loads(body)
    assert caught.value.pos == plain.value.pos == LONG + 9  # not a position in the cut text
    assert caught.value.msg == plain.value.msg


def test_long_keys_and_lone_strings_take_the_plain_way() -> None:
    key = "K" * LONG
    for document in ({key: 1}, {"a": {key: [key]}}, key, [key, key]):
        body = json.dumps(document).encode()
        assert _json.loads(body) == document


def test_a_body_holding_our_placeholder_parses_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    # The marker is random, so a server cannot know it; were it known, a body holding a
    # placeholder would make the count of restored strings wrong, and the plain way decides.
    monkeypatch.setattr(_json.os, "urandom", bytes)  # a known marker
    marker = f"\x00atoma-images-{bytes(8).hex()}-"
    document = {"a": f"{marker}0", "b": "A" * LONG}
    body = json.dumps(document).encode()
    cut = _json._cut_long_strings(body)
    assert cut is not None
    assert json.dumps(f"{marker}0") in cut[0]  # our placeholder, beside the server's copy
    assert _json.loads(body) == document
