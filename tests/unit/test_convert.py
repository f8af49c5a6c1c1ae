from __future__ import annotations

import json
import time
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from atoma_images import (
    APIStatusError,
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    ImageRequest,
    InsufficientBalanceError,
    InternalServerError,
    LockedError,
    NoImageError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ResponseValidationError,
    ServerError,
    ServiceUnavailableError,
    StackUnavailableError,
    UnprocessableEntityError,
)
from atoma_images._convert import (
    converter,
    error_from_response,
    parse_response,
)
from atoma_images._dialect import encode
from atoma_images._retry_after import parse_retry_after

NO_HEADERS: CIMultiDict[str] = CIMultiDict()


def test_request_body_always_has_n_and_size_and_never_null() -> None:
    body = json.loads(encode("openai", ImageRequest(model="m", prompt="p")))
    assert body == {"model": "m", "prompt": "p", "n": 1, "size": "1024x1024"}
    full = ImageRequest(
        model="m",
        prompt="p",
        n=3,
        size="16x16",
        quality="hd",
        response_format="url",
        style="s",
        user="u",
    )
    assert json.loads(encode("openai", full)) == {
        "model": "m",
        "prompt": "p",
        "n": 3,
        "size": "16x16",
        "quality": "hd",
        "response_format": "url",
        "style": "s",
        "user": "u",
    }


def test_request_body_is_the_converters_dict_as_compact_json() -> None:
    request = ImageRequest(model="m", prompt='a "fox"', n=2, size="16x16", user="u")
    assert encode("openai", request) == (
        b'{"model":"m","prompt":"a \\"fox\\"","n":2,"size":"16x16","user":"u"}'
    )
    assert json.loads(encode("openai", request)) == converter().unstructure(request)
    # The defaults the proxy requires are sent even when left as they are.
    assert converter().unstructure(ImageRequest(model="m", prompt="p")) == {
        "model": "m",
        "prompt": "p",
        "n": 1,
        "size": "1024x1024",
    }


def test_request_body_keeps_unicode_as_utf8() -> None:
    body = encode("openai", ImageRequest(model="m", prompt="ein Fuchs 🦊 im Schnee"))
    assert "🦊".encode() in body
    assert json.loads(body)["prompt"] == "ein Fuchs 🦊 im Schnee"


def test_parse_accepts_every_image_form_and_keeps_unknown_keys() -> None:
    body = {
        "created": 1700000000,
        "data": [
            {"url": "https://x/1.png", "revised_prompt": "better"},
            {"url": None, "b64_json": "data:image/png;base64,aGk="},
            {"b64_json": "aGk=", "seed": 42},
        ],
        "signature": "sig",
        "response_hash": "hash",
    }
    headers = CIMultiDict({"X-Request-Id": "req-1"})
    response = parse_response(200, headers, json.dumps(body).encode())
    assert response.created == 1700000000
    assert [i.url for i in response.images] == ["https://x/1.png", None, None]
    assert response.images[0].revised_prompt == "better"
    assert response.images[1].decode() == b"hi"
    assert response.images[2].decode() == b"hi"
    assert response.images[2].extra == {"seed": 42}
    assert response.extra == {"signature": "sig", "response_hash": "hash"}
    assert response.request_id == "req-1"
    assert response.headers["x-request-id"] == "req-1"


@pytest.mark.parametrize("url", ["image-generation-1.png", "/files/1.png", "ftp://x/1.png"])
def test_an_answer_whose_image_is_a_file_name_is_no_image_and_keeps_the_answer(url: str) -> None:
    body = {"created": 1, "data": [{"b64_json": "aGk="}, {"url": url, "b64_json": None}]}
    with pytest.raises(NoImageError, match=r"data\[1\]: no image: no base64 data") as caught:
        parse_response(200, CIMultiDict({"X-Request-Id": "r"}), json.dumps(body).encode())
    error = caught.value
    assert isinstance(error, ResponseValidationError)
    assert error.may_have_been_billed  # the server answered with success: it billed
    assert [image.url for image in error.response.images] == [None, url]
    assert error.request_id == "r"
    # The image that did come back was billed with the rest: it is kept as partial.
    assert error.partial is not None
    assert [image.decode() for image in error.partial.images] == [b"hi"]


def test_an_answer_with_more_images_than_a_request_can_ask_for_is_refused() -> None:
    ten = {"created": 1, "data": [{"url": f"https://x/{i}"} for i in range(10)]}
    assert len(parse_response(200, NO_HEADERS, json.dumps(ten).encode()).images) == 10
    eleven = {"created": 1, "data": [{"url": f"https://x/{i}"} for i in range(11)]}
    with pytest.raises(ResponseValidationError, match=r"data: expected at most 10 images, got 11"):
        parse_response(200, NO_HEADERS, json.dumps(eleven).encode())


def test_large_base64_is_kept_as_the_same_string_the_parser_made() -> None:
    payload = "A" * 2_000_000
    response = parse_response(
        200, NO_HEADERS, json.dumps({"created": 1, "data": [{"b64_json": payload}]}).encode()
    )
    assert response.images[0].b64_json == payload


@pytest.mark.parametrize(
    ("body", "phrases"),
    [
        (b"not json", ["not JSON"]),
        (b"<html><body>Oops</body></html>", ["not JSON", "<html>"]),
        (b"\xff\xfe\x00", ["not JSON"]),
        (b'\xef\xbb\xbf{"created": 1, "data": []}', ["not JSON", "BOM"]),
        (b'{"created": 1, "data": [], "x": NaN}', ["not JSON", "NaN"]),
        (b'{"created": 1e400, "data": []}', ["not JSON"]),
        (b'{"created": 1, "data": [{"url": "\\ud800"}]}', ["not JSON"]),
        (b'{"created": 1, "data": [' + b"[" * 500 + b"]" * 500 + b"]}", ["deeper than 32"]),
        (b'{"created": 1, "data": [' + b"[]," * 70_000 + b"[]]}", ["more than the 65536"]),
        (b"[]", ["JSON object"]),
        (b'"text"', ["JSON object"]),
        (b"{}", ["created: required field missing", "data: required field missing"]),
        (b'{"created": 1}', ["data: required field missing"]),
        (b'{"created": "1", "data": []}', ["created: expected an integer, got str"]),
        (b'{"created": 1.5, "data": []}', ["created: expected an integer, got float"]),
        (b'{"created": true, "data": []}', ["created: expected an integer, got bool"]),
        (b'{"created": 1, "data": {}}', ["data: expected a list, got dict"]),
        (b'{"created": 1, "data": "x"}', ["data: expected a list, got str"]),
        (b'{"created": 1, "data": [3]}', ["data[0]: expected an object, got int"]),
        (b'{"created": 1, "data": [{}]}', ["data[0]: no image: neither base64 data nor a URL"]),
        (
            b'{"created": 1, "data": [{"url": null, "b64_json": null}]}',
            ["data[0]: no image: neither"],
        ),
        (
            b'{"created": 1, "data": [{"url": 5}]}',
            ["data[0].url: expected a string or null, got int"],
        ),
        (
            b'{"created": 1, "data": [{"url": "u"}, {"b64_json": ["x"]}]}',
            ["data[1].b64_json: expected a string"],
        ),
        (
            b'{"created": 1, "data": [{"url": "u", "revised_prompt": 1}]}',
            ["data[0].revised_prompt"],
        ),
    ],
)
def test_malformed_success_bodies_name_the_path(body: bytes, phrases: list[str]) -> None:
    with pytest.raises(ResponseValidationError) as info:
        parse_response(200, CIMultiDict({"x-request-id": "r9"}), body)
    error = info.value
    for phrase in phrases:
        assert phrase in str(error)
    assert error.status == 200
    assert error.request_id == "r9"
    assert error.body_excerpt == body[:200].decode("utf-8", "replace")
    assert error.may_have_been_billed


# Deeper than json's recursion limit and orjson's depth limit, under the structure bound.
DEEP = [
    b"[" * 60_000 + b"]" * 60_000,
    b'{"a":' * 30_000 + b"1" + b"}" * 30_000,
    b'{"error": {"message": ' + b"[" * 60_000 + b"]" * 60_000 + b"}}",
]


@pytest.mark.parametrize("body", DEEP)
def test_deep_nesting_is_a_validation_error_for_a_success(body: bytes) -> None:
    with pytest.raises(ResponseValidationError, match=r"deeper than|depth limit") as info:
        parse_response(200, CIMultiDict({"x-request-id": "r"}), body)
    assert info.value.request_id == "r"


@pytest.mark.parametrize("status", [400, 429, 500, 502])
@pytest.mark.parametrize("body", DEEP)
def test_deep_nesting_is_the_status_error_for_an_error_status(status: int, body: bytes) -> None:
    with pytest.raises(APIStatusError) as info:
        parse_response(status, NO_HEADERS, body)
    error = info.value
    assert error.status == status
    assert error.message == " ".join(body.decode().split())[:200]  # shown as the text it is
    assert len(str(error)) < 400


STATUS_CASES = [
    (400, "REQUEST_ERROR", BadRequestError),
    (400, "FIAT_PAYMENTS_ONLY", InsufficientBalanceError),
    (401, "AUTH_ERROR", AuthenticationError),
    (402, "BALANCE_ERROR", InsufficientBalanceError),
    (403, "FORBIDDEN", PermissionDeniedError),
    (404, "NOT_FOUND", NotFoundError),
    (413, "PAYLOAD_TOO_LARGE", RequestTooLargeError),
    (422, "UNPROCESSABLE", UnprocessableEntityError),
    (423, "LOCKED", LockedError),
    (425, "UNAVAILABLE_STACK", StackUnavailableError),
    (429, "TOO_MANY_REQUESTS", RateLimitError),
    (500, "INTERNAL_ERROR", InternalServerError),
    (502, "BAD_GATEWAY", BadGatewayError),
    (503, "SERVICE_UNAVAILABLE", ServiceUnavailableError),
    (504, "GATEWAY_TIMEOUT", ServerError),
    (507, "X", ServerError),
    (418, "TEAPOT", APIStatusError),
]


@pytest.mark.parametrize(("status", "code", "cls"), STATUS_CASES)
def test_error_envelope_gives_class_code_and_message(
    status: int, code: str, cls: type[APIStatusError]
) -> None:
    body = json.dumps({"error": {"code": code, "message": "what went wrong"}}).encode()
    error = error_from_response(status, CIMultiDict({"x-request-id": "abc"}), body, "http://h/v1")
    assert type(error) is cls or isinstance(error, cls)
    assert (error.status, error.code, error.message) == (status, code, "what went wrong")
    assert error.request_id == "abc"
    assert error.url == "http://h/v1"
    assert str(error).startswith(f"{status} ")
    assert f"({code}): what went wrong" in str(error)
    assert not error.may_have_been_billed


def test_str_reads_like_the_issue_example() -> None:
    body = b'{"error": {"code": "TOO_MANY_REQUESTS", "message": "Too many requests"}}'
    error = error_from_response(429, NO_HEADERS, body)
    assert str(error) == "429 Too Many Requests (TOO_MANY_REQUESTS): Too many requests"


@pytest.mark.parametrize(
    ("status", "body", "cls", "message"),
    [
        (502, b"", BadGatewayError, "empty body"),
        (503, b"   \n", ServiceUnavailableError, "empty body"),
        (
            415,
            b"Expected request with `Content-Type: application/json`",
            APIStatusError,
            "Content-Type",
        ),
        (
            502,
            b"<html><head><title>502 Bad Gateway</title></head><body><h1>nginx</h1></body></html>",
            BadGatewayError,
            "502 Bad Gateway",
        ),
        (
            500,
            b"<html><body><script>x()</script><p>Internal &amp; broken</p></body></html>",
            InternalServerError,
            "<p>Internal &amp; broken</p>",
        ),
        (401, b'{"error": "invalid key"}', AuthenticationError, "invalid key"),
        (422, b'{"detail": "bad size"}', UnprocessableEntityError, "bad size"),
        (400, b'{"error": {"message": 5}}', BadRequestError, '"message": 5'),
        (500, b"{broken json", InternalServerError, "{broken json"),
        (413, b"\xff" * 10, RequestTooLargeError, "\ufffd"),
    ],
)
def test_non_json_error_bodies_give_the_same_classes_readably(
    status: int, body: bytes, cls: type[APIStatusError], message: str
) -> None:
    error = error_from_response(status, NO_HEADERS, body)
    assert isinstance(error, cls)
    assert error.code is None or isinstance(error.code, str)
    assert message in error.message
    assert error.message.isprintable()
    assert len(str(error)) < 400


@pytest.mark.parametrize(
    ("page", "message"),
    [
        (
            "<html><title>502 Bad Gateway</title></html>",
            "<html><title>502 Bad Gateway</title></html>",
        ),
        ("<p>\n\t spread   out \r\n</p>", "<p> spread out </p>"),
        ("<p>" + " " * 70_000 + "far</p>", "<p> far</p>"),
        ("<p>" + "x" * 1000, "<p>" + "x" * 197),
        ("<p>&#" + "1" * 5000 + ";</p>", "<p>&#" + "1" * 195),
        ("\x1b[31mred\x1b[0m\x00\u200b", "\ufffd[31mred\ufffd[0m\ufffd\ufffd"),
    ],
)
def test_an_error_page_is_a_short_printable_excerpt_of_its_text(page: str, message: str) -> None:
    # Not parsed: a gateway's page is quoted as it is, whitespace folded, cut to 200
    # characters, and what a terminal would not print (an escape sequence) made U+FFFD.
    error = error_from_response(502, NO_HEADERS, page.encode())
    assert isinstance(error, BadGatewayError)
    assert error.message == message
    assert not error.envelope


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_error_body_gives_a_short_printable_message(text: str) -> None:
    error = error_from_response(502, NO_HEADERS, ("<" + text).encode("utf-8", "replace"))
    assert error.message.isprintable()
    assert 0 < len(error.message) <= 200


def test_huge_error_message_is_shortened_in_str_but_kept_in_body() -> None:
    text = "x" * 10_000
    error = error_from_response(500, NO_HEADERS, json.dumps({"error": {"message": text}}).encode())
    assert len(str(error)) < 400
    assert error.message == text
    assert error.body.count("x") == 10_000


def test_redirect_is_reported_with_its_location() -> None:
    error = error_from_response(307, CIMultiDict({"Location": "https://elsewhere/v1"}), b"")
    assert type(error) is APIStatusError
    assert "https://elsewhere/v1" in str(error)
    assert "base_url" in str(error)


def seconds(**headers: str) -> float | None:
    return parse_retry_after(CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()}))


def test_retry_after_in_all_its_forms() -> None:
    assert seconds(retry_after="2") == 2.0
    assert seconds(retry_after="0") == 0.0
    assert seconds(retry_after="0120") == 120.0
    assert seconds(retry_after_ms="250") == 0.25
    assert seconds(retry_after_ms="1500.5") == 1.5005
    assert seconds(retry_after_ms="250", retry_after="9") == 0.25
    assert seconds(retry_after_ms="nonsense", retry_after="9") == 9.0
    assert seconds() is None
    in_a_minute = formatdate(time.time() + 60, usegmt=True)
    assert 55 < (seconds(retry_after=in_a_minute) or 0) <= 60
    assert seconds(retry_after=formatdate(time.time() - 60, usegmt=True)) == 0.0
    # The two obsolete forms an HTTP-date may take (RFC 9110, section 5.6.7), both past.
    assert seconds(retry_after="Sunday, 06-Nov-94 08:49:37 GMT") == 0.0
    assert seconds(retry_after="Sun Nov  6 08:49:37 1994") == 0.0
    error = error_from_response(429, CIMultiDict({"Retry-After": "7"}), b"")
    assert isinstance(error, RateLimitError)
    assert error.retry_after == 7.0


# What float() reads and RFC 9110 does not: delta-seconds is 1*DIGIT, nothing else.
NOT_DELTA_SECONDS = [
    "1.5", "-1", "+5", " 5 ", "5 ", "1_000", "1e3", "1E3", "inf", "Infinity", "nan", "0x10",
    "\u0663", "\u00b2", "\uff15", "5s", "", "soon",
]  # fmt: skip


@pytest.mark.parametrize("value", NOT_DELTA_SECONDS)
def test_retry_after_is_digits_or_a_date_and_nothing_else(value: str) -> None:
    assert seconds(retry_after=value) is None
    # retry-after-ms allows a fraction, and nothing else either.
    if value != "1.5":
        assert seconds(retry_after_ms=value, retry_after="3") == 3.0
    for almost in ("5.", ".5", "1.2.3", "1,5", "1.5e3"):
        assert seconds(retry_after_ms=almost, retry_after="3") == 3.0


def test_a_delay_too_long_to_count_is_the_longest_delay() -> None:
    # As RFC 9111 (section 1.2.2) has caches treat a delta-seconds that overflows.
    assert seconds(retry_after="9" * 400) == 2**31
    assert seconds(retry_after_ms="9" * 400) == 2**31
    assert seconds(retry_after="4294967296") == 2**31
