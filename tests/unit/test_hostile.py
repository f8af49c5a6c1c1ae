"""Whatever a server answers, the caller gets a response or one of our errors, never a crash.

The network layer hands (status, headers, body bytes) to the same network-free functions
used here, so these properties hold for every answer that comes over the wire.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from atoma_images import APIStatusError, ImagesResponse, ResponseValidationError
from atoma_images._convert import error_from_response, parse_response

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
# Bodies shaped like an images response, with any value in any place.
SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "created": JSON,
        "data": st.lists(
            st.fixed_dictionaries(
                {}, optional={"url": JSON, "b64_json": JSON, "revised_prompt": JSON}
            )
            | JSON,
            max_size=3,
        )
        | JSON,
        "signature": JSON,
    },
)
HEADERS = st.dictionaries(
    st.sampled_from(["x-request-id", "retry-after", "retry-after-ms", "content-type", "x-other"]),
    st.text(max_size=40),
    max_size=4,
)


def check_success_body(body: bytes) -> None:
    try:
        result = parse_response(200, CIMultiDict(), body)
    except ResponseValidationError as error:  # the one error allowed for a 2xx
        message = str(error)
    else:
        assert isinstance(result, ImagesResponse)
        for image in result.images:
            assert image.url is not None or image.b64_json is not None
        return
    assert message.startswith("invalid response (200)")
    assert len(message) < 2000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_as_a_200(body: bytes) -> None:
    check_success_body(body)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json_as_a_200(value: Any) -> None:
    check_success_body(json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(SHAPED)
def test_any_values_in_an_images_shaped_200(value: Any) -> None:
    check_success_body(json.dumps(value).encode())


@settings(max_examples=400, deadline=None)
@given(
    st.integers(min_value=300, max_value=599),
    st.binary(max_size=2000) | JSON.map(lambda v: json.dumps(v).encode()),
    HEADERS,
)
def test_any_error_status_and_body(status: int, body: bytes, headers: dict[str, str]) -> None:
    error = error_from_response(status, CIMultiDict(headers), body)
    assert isinstance(error, APIStatusError)
    assert error.status == status
    text = str(error)
    assert text.startswith(str(status))
    assert len(text) <= 500
    assert error.retry_after is None or error.retry_after >= 0


def base64_or_text(size: int) -> st.SearchStrategy[Any]:
    """What a base64 field may hold: base64 of any length, any text, or any JSON."""
    return st.binary(max_size=size).map(lambda b: base64.b64encode(b).decode()) | st.text() | JSON


LOCK_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "public_key": base64_or_text(40),
        "node_small_id": st.integers(min_value=0) | JSON,
        "stack_small_id": st.integers(min_value=0) | JSON,
        "stack_entry_digest": JSON,
    },
)
SEALED_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "ciphertext": base64_or_text(80),
        "nonce": base64_or_text(16),
        "response_hash": base64_or_text(40),
    },
)


@pytest.mark.skipif(
    importlib.util.find_spec("cryptography") is None,
    reason="needs the confidential extra: pip install 'atoma-images[confidential]'",
)
@settings(max_examples=300, deadline=None)
@given(LOCK_SHAPED | JSON, SEALED_SHAPED | JSON, st.integers(min_value=200, max_value=599))
def test_any_lock_or_sealed_answer(lock: Any, sealed: Any, status: int) -> None:
    from atoma_images._confidential import SealedRequest, parse_lock

    for parse, value in ((parse_lock, lock), (SealedRequest(body=b"", key=b"k" * 32).open, sealed)):
        try:
            parse(status, CIMultiDict(), json.dumps(value).encode(), None)
        except (ResponseValidationError, APIStatusError) as error:  # integrity errors included
            message = str(error)
        else:
            continue
        assert len(message) < 2000
