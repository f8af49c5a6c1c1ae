from __future__ import annotations

import inspect
import re

import atoma_images
from atoma_images import (
    AmbiguousOutcomeError,
    AmbiguousTimeoutError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AtomaImagesError,
    InvalidRequestError,
    ResponseValidationError,
    ServerError,
    _errors,
)


def test_every_public_error_is_in_the_tree_and_in_the_docstring_drawing() -> None:
    doc = _errors.__doc__ or ""
    errors = [
        obj
        for obj in vars(atoma_images).values()
        if inspect.isclass(obj) and issubclass(obj, Exception)
    ]
    assert len(errors) >= 20
    for cls in errors:
        assert issubclass(cls, AtomaImagesError)
        drawn = re.search(rf"(^|── ){cls.__name__}\s", doc, re.MULTILINE)
        assert drawn, f"{cls.__name__} is missing from the drawing"


def test_branches_callers_rely_on() -> None:
    assert issubclass(InvalidRequestError, ValueError)
    assert issubclass(APITimeoutError, APIConnectionError)
    assert issubclass(AmbiguousTimeoutError, AmbiguousOutcomeError)
    assert issubclass(AmbiguousTimeoutError, APITimeoutError)
    assert issubclass(AmbiguousOutcomeError, APIConnectionError)
    assert not issubclass(ResponseValidationError, APIStatusError)
    assert issubclass(atoma_images.InternalServerError, ServerError)


def test_billing_flags() -> None:
    assert AmbiguousOutcomeError("x").may_have_been_billed
    assert AmbiguousTimeoutError("x").may_have_been_billed
    assert not APITimeoutError("x").may_have_been_billed
    assert not APIConnectionError("x").may_have_been_billed
    assert ResponseValidationError("x").may_have_been_billed


def test_all_is_sorted_and_complete() -> None:
    assert atoma_images.__all__ == sorted(atoma_images.__all__)
    for name in atoma_images.__all__:
        assert hasattr(atoma_images, name)
