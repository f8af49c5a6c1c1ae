"""load_json gives the same outcome with json and with orjson, on every body.

Each case runs through every back end installed; the ids say which ran ("[orjson-...]").
orjson is in the development environment, so both run there; CI also runs the suite
without it, and `test_without_orjson_the_standard_library_parses` hides it in a
subprocess, so the json path is also what the package itself uses in one run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atoma_images import _bounded_json
from atoma_images._bounded_json import (
    JSON_BACKEND,
    MAX_JSON_DEPTH,
    MAX_JSON_STRUCTURE,
    load_json,
)

HAS_ORJSON = importlib.util.find_spec("orjson") is not None
BACKENDS = ["json", "orjson"] if HAS_ORJSON else ["json"]


def outcome(body: bytes, backend: str) -> tuple[str, str]:
    """("value", its typed repr) or ("error", the message); never anything else."""
    try:
        value = load_json(body, backend)
    except ValueError as error:  # the one error load_json raises
        message = str(error)
        assert message.startswith("the body "), message
        assert len(message) < 400, message
        return "error", message
    return "value", typed(value)


def typed(value: Any) -> str:
    # repr tells 1 from 1.0 and True, and -0.0 from 0.0; dicts keep the body's key order.
    return repr(value)


def same_outcome(body: bytes) -> tuple[str, str]:
    """The outcome every back end gives ``body``; fails unless they agree."""
    outcomes = {backend: outcome(body, backend) for backend in BACKENDS}
    kinds = {kind for kind, _ in outcomes.values()}
    assert len(kinds) == 1, outcomes
    if kinds == {"value"}:
        assert len({detail for _, detail in outcomes.values()}) == 1, outcomes
    return outcomes["json"]


def test_the_backend_in_use_is_orjson_exactly_when_it_is_installed() -> None:
    expected = "orjson" if HAS_ORJSON else "json"
    assert expected == JSON_BACKEND


def test_without_orjson_the_standard_library_parses() -> None:
    # A fresh interpreter where `import orjson` fails, as it does without the extra, run
    # where it imports this copy of the package.
    script = (
        "import sys; sys.modules['orjson'] = None\n"
        "from atoma_images._bounded_json import JSON_BACKEND, __file__ as where\n"
        "from atoma_images._convert import parse_response\n"
        'answer = parse_response(200, {}, b\'{"created": 1, "data": [{"url": "https://u"}]}\')\n'
        "print(JSON_BACKEND, answer.images[0].url, where)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(_bounded_json.__file__).parent.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.split() == ["json", "https://u", _bounded_json.__file__]


# name: (body, what json.loads(body) gives, or what load_json gives instead)
VALUES: dict[str, tuple[bytes, Any]] = {
    "an images answer": (
        b'{"created": 1, "data": [{"url": null, "b64_json": "data:image/png;base64,aGk="}]}',
        {"created": 1, "data": [{"url": None, "b64_json": "data:image/png;base64,aGk="}]},
    ),
    "whitespace around": (
        b' \t\r\n{"a": [1, 2.5, -0, -0.0, true]} \n',
        {"a": [1, 2.5, 0, -0.0, True]},
    ),
    "escapes": (
        b'["\\"\\\\\\/\\b\\f\\n\\r\\t", "\\u00e9\\u20ac", "\\ud83e\\udd8a", "\\u0000"]',
        ['"\\/\b\f\n\r\t', "é€", "🦊", "\x00"],
    ),
    "raw UTF-8": ('["é€🦊", "\u2028\u2029", "\x7f"]'.encode(), ["é€🦊", "\u2028\u2029", "\x7f"]),
    "duplicate keys": (b'{"a": 1, "b": 2, "a": 3}', {"a": 3, "b": 2}),
    "64-bit integers": (
        b"[9223372036854775807, -9223372036854775808, 18446744073709551615]",
        [2**63 - 1, -(2**63), 2**64 - 1],
    ),
    # Beyond 64 bits, as orjson (and JavaScript) read them: json alone would give ints.
    "integers beyond 64 bits": (
        b"[18446744073709551616, -9223372036854775809, " + b"7" * 300 + b"]",
        [float(2**64), float(-(2**63) - 1), float("7" * 300)],
    ),
    "exponents": (
        b"[1e2, 1E-2, 2.5e+3, 1e-400, 5e-324, 1.7976931348623157e308]",
        [100.0, 0.01, 2500.0, 0.0, 5e-324, 1.7976931348623157e308],
    ),
    "a long string": (b'["' + b"A" * 100_000 + b'"]', ["A" * 100_000]),
    "a long key": (b'{"' + b"k" * 100_000 + b'": 1}', {"k" * 100_000: 1}),
    "nesting at the limit": (
        b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH,
        json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH),
    ),
    "a scalar": (b"42", 42),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VALUES))
def test_each_backend_reads_json_as_json_does(backend: str, name: str) -> None:
    body, expected = VALUES[name]
    assert outcome(body, backend) == ("value", typed(expected))
    same_outcome(body)


ERRORS = {
    # name: (body, a phrase the message must hold, whichever back end spoke)
    "a UTF-8 BOM": (b'\xef\xbb\xbf{"a": 1}', "not JSON"),
    "UTF-16": ('{"a": 1}'.encode("utf-16"), "not JSON"),
    "invalid UTF-8": (b'{"a": "\xff"}', "not JSON"),
    "an encoded surrogate": (b'{"a": "\xed\xa0\x80"}', "not JSON"),
    "a lone surrogate escape": (b'{"a": "\\ud800"}', "not JSON"),
    "a reversed surrogate pair": (b'["\\udc00\\ud800"]', "not JSON"),
    "a lone surrogate in a key": (b'{"\\udfff": 1}', "not JSON"),
    "a raw control character": (b'{"a": "x\x01y"}', "not JSON"),
    "a raw newline in a string": (b'{"a": "x\ny"}', "not JSON"),
    "NaN": (b"[NaN]", "not JSON"),
    "Infinity": (b'{"a": -Infinity}', "not JSON"),
    "1e400": (b'{"a": 1e400}', "not JSON"),
    "a 5000-digit integer": (b"[" + b"9" * 5000 + b"]", "not JSON"),
    "a million-digit integer": (b"[" + b"1" * 1_000_000 + b"]", "not JSON"),
    "empty": (b"", "not JSON"),
    "trailing data": (b'{"a": 1} x', "not JSON"),
    "a trailing comma": (b"[1,]", "not JSON"),
    "single quotes": (b"{'a': 1}", "not JSON"),
    "nesting one past the limit": (
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
        f"deeper than {MAX_JSON_DEPTH}",
    ),
    "objects nested past the limit": (
        b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1),
        f"deeper than {MAX_JSON_DEPTH}",
    ),
    # Past json's recursion limit and orjson's depth limit (1024), each says so its own way:
    # "deeper than 32 levels", or "not JSON (depth limit exceeded ...)".
    "nesting 1000 deep": (b"[" * 1000 + b"]" * 1000, "deeper than"),
    "nesting 1025 deep": (b"[" * 1025 + b"]" * 1025, "deeper than|depth limit"),
    "nesting 50000 deep, unclosed": (b"[" * 50_000, "deeper than|depth limit"),
    "too many items": (b"[" + b"[]," * MAX_JSON_STRUCTURE + b"[]]", "was not parsed"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ERRORS))
def test_each_backend_refuses_the_same_bodies_readably(backend: str, name: str) -> None:
    body, phrase = ERRORS[name]
    kind, message = outcome(body, backend)
    assert kind == "error", message
    assert any(words in message for words in phrase.split("|")), message
    same_outcome(body)


def test_the_structure_bound_is_exact_at_its_edge() -> None:
    # MAX_JSON_STRUCTURE '[', '{' and ',' in all (strings included) parse; one more does not.
    at_limit = b"[" + b"1," * (MAX_JSON_STRUCTURE - 1) + b"1]"
    assert same_outcome(at_limit)[0] == "value"
    assert same_outcome(b"[" + b"1," * MAX_JSON_STRUCTURE + b"1]")[0] == "error"
    in_a_string = b'["' + b"," * MAX_JSON_STRUCTURE + b'"]'
    kind, message = same_outcome(in_a_string)
    assert kind == "error"
    assert f"more than the {MAX_JSON_STRUCTURE} of" in message


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.booleans())
def test_any_document_reads_the_same(document: Any, ascii_only: bool) -> None:
    same_outcome(json.dumps(document, ensure_ascii=ascii_only).encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.data())
def test_any_damaged_document_reads_the_same(document: Any, data: st.DataObject) -> None:
    body = bytearray(json.dumps(document).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(body)))
        piece = data.draw(
            st.sampled_from(
                [
                    b"\xff",
                    b"\x00",
                    b"\\ud800",
                    b"[",
                    b"{",
                    b",",
                    b"]",
                    b'"',
                    b"1e999",
                    b"\xef\xbb\xbf",
                ]
            )
            | st.binary(max_size=3)
        )
        body[position:position] = piece
    same_outcome(bytes(body))


def test_floats_read_to_the_same_double() -> None:
    for text in ["0.1", "2.2250738585072014e-308", "4.9e-324", "1.7976931348623157e308", "0.3"]:
        assert same_outcome(f"[{text}]".encode()) == ("value", typed([float(text)]))
