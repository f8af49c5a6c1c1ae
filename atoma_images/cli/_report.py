"""What a command-line run reports: its exit codes, and each result or error, as lines or
as JSON records.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from atoma_images._discovery import Health, ModelInfo
from atoma_images._errors import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BudgetExceededError,
    ExtraNotInstalledError,
    InsufficientBalanceError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitError,
    ResponseValidationError,
)
from atoma_images._models import ImagesResponse

from ._terminal import emit

__all__ = [
    "EXIT_CODES",
    "exit_code",
    "report_check",
    "report_error",
    "report_interrupted_saves",
    "report_models",
    "report_result",
]


#: Exit codes, by what went wrong (documented in docs/guide-cli.md and README.md).
EXIT_CODES = {
    "ok": 0,
    "unexpected": 1,
    "invalid input": 2,
    "authentication": 3,
    "balance": 4,
    "rate limit": 5,
    "server": 6,
    "connection": 7,
    "invalid response": 8,
    "not saved": 9,
    # Stopped by a signal: the shell's 128 + its number (SIGHUP, SIGINT, SIGTERM).
    "hung up": 129,
    "interrupted": 130,
    "terminated": 143,
}


def exit_code(error: BaseException) -> int:
    """The exit code for an error: the first matching kind in EXIT_CODES."""
    if isinstance(error, ExtraNotInstalledError) or (
        isinstance(error, InvalidRequestError) and error.field != "api_key"
    ):
        kind = "invalid input"
    elif isinstance(error, (InvalidRequestError, AuthenticationError, PermissionDeniedError)):
        kind = "authentication"  # a missing key is an authentication problem too
    elif isinstance(error, (InsufficientBalanceError, BudgetExceededError)):
        kind = "balance"
    elif isinstance(error, RateLimitError):
        kind = "rate limit"
    elif isinstance(error, APIStatusError):
        kind = "server"
    elif isinstance(error, APIConnectionError):
        kind = "connection"
    elif isinstance(error, ResponseValidationError):  # ResponseIntegrityError too
        kind = "invalid response"
    else:
        kind = "unexpected"
    return EXIT_CODES[kind]


def report_interrupted_saves(
    unsaved: Sequence[tuple[str, ImagesResponse]],
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
) -> None:
    """Each billed result Ctrl-C kept from being saved, with its URLs: they may still serve."""
    for prompt, response in unsaved:
        problem = "interrupted before its images were saved"
        urls = [image.url for image in response.images if image.url]
        if urls:
            problem += "; their URLs: " + ", ".join(urls)
        report_result(response, [], prompt, args, problems=[problem], out=out, err=err)


def report_result(
    result: ImagesResponse,
    paths: list[Path],
    prompt: str,
    args: argparse.Namespace,
    *,
    problems: list[str],
    out: TextIO,
    err: TextIO,
) -> int:
    """Show where a paid result's images are, and why some are not where asked; its exit
    code.

    Printing never loses an image: if showing it fails (stdout full, a bug), stderr says
    where its images are, and the run goes on with the others.
    """
    try:
        _show_result(result, paths, prompt, args, problems=problems, out=out, err=err)
    except Exception as error:
        saved = f"saved as {', '.join(map(str, paths))}" if paths else "not saved"
        _unprinted(error, prompt, args, err, f"generated, billed and {saved}, but not reported")
        return EXIT_CODES["unexpected"]
    return EXIT_CODES["not saved"] if problems else EXIT_CODES["ok"]


def _show_result(
    result: ImagesResponse,
    paths: list[Path],
    prompt: str,
    args: argparse.Namespace,
    *,
    problems: list[str],
    out: TextIO,
    err: TextIO,
) -> None:
    message = ("generated and billed, but " + "; ".join(problems)) if problems else ""
    if message:
        emit(err, f"atoma-images: error{_echo(prompt, args)}: {message}")
    if args.json:
        record: dict[str, Any] = {
            "prompt": prompt,
            "created": result.created,
            "request_id": result.request_id,
            "files": [str(path) for path in paths],
            "urls": [image.url for image in result.images if image.url],
        }
        if message:
            record["error"] = {
                "type": "NotSaved",
                "message": message,
                "status": None,
                "exit_code": EXIT_CODES["not saved"],
            }
        emit(out, json.dumps(record))
    else:
        for path in paths:
            emit(out, str(path))


def report_error(
    error: BaseException, prompt: str | None, args: argparse.Namespace, out: TextIO, err: TextIO
) -> int:
    """Show why a prompt (or, with ``prompt`` None, the run) failed; its exit code. If
    showing it fails (stdout full, a bug), stderr says so, and the run goes on."""
    try:
        _show_error(error, prompt, args, out, err)
    except Exception as failure:
        _unprinted(failure, prompt, args, err, "its error was not reported in full")
    return exit_code(error)


def _show_error(
    error: BaseException, prompt: str | None, args: argparse.Namespace, out: TextIO, err: TextIO
) -> None:
    message = str(error)
    if isinstance(error, InvalidRequestError) and error.field == "api_key":
        message += ", or use --fake to try it offline"
    emit(err, f"atoma-images: error{_echo(prompt, args)}: {message}")
    if args.debug:
        emit(err, "".join(traceback.format_exception(error)).rstrip("\n"), keep_newlines=True)
    if args.json and prompt is not None:
        record = {
            "prompt": prompt,
            "error": {
                "type": type(error).__name__,
                "message": str(error),
                "status": getattr(error, "status", None),
                "exit_code": exit_code(error),
            },
        }
        emit(out, json.dumps(record))


def _unprinted(
    error: Exception, prompt: str | None, args: argparse.Namespace, err: TextIO, what: str
) -> None:
    """The line on stderr for a result whose report failed."""
    emit(err, f"atoma-images: error{_echo(prompt, args)}: {what} ({type(error).__name__}: {error})")


def _echo(prompt: str | None, args: argparse.Namespace) -> str:
    """The prompt, shortened, for an error line of a batch (where it says which one failed)."""
    if prompt is None or not args.prompts_file:
        return ""
    return f' ("{prompt if len(prompt) <= 40 else prompt[:39] + "…"}")'


def report_models(models: Sequence[ModelInfo], args: argparse.Namespace, out: TextIO) -> None:
    """--list-models: each model's id on a line, or with --json the object the API sent."""
    for model in models:
        if args.json:
            fields = {"id": model.id, "object": model.object, "created": model.created}
            emit(out, json.dumps({**model.extra, **fields, "owned_by": model.owned_by}))
        else:
            emit(out, model.id)


def report_check(
    base_url: str,
    health: Health | None,
    models: Sequence[ModelInfo],
    args: argparse.Namespace,
    out: TextIO,
) -> None:
    """--check passed: the API answered (``health``, None where it has no /health) and
    accepted the key (it listed ``models``)."""
    if args.json:
        said = None if health is None else health.message
        record = {"ok": True, "base_url": base_url, "health": said, "models": len(models)}
        emit(out, json.dumps(record))
        return
    said = "" if health is None or health.message is None else f" ({health.message!r})"
    served = f"{len(models)} model" + ("" if len(models) == 1 else "s")
    emit(out, f"ok: {base_url} answers{said} and accepts the key; it serves {served}")
