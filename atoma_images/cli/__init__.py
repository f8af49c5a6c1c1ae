"""The command line: prompts in, image files out.

    atoma-images "a lighthouse at dawn" -n 2 --size 512x512 -o out/
    atoma-images --fake "a red fox"             # offline, against the built-in fake server
    atoma-images --prompts-file prompts.txt --concurrency 4 --json --max-compute-units 50000000
    atoma-images --check && atoma-images --list-models    # is the API up, with this key? models
    ATOMA_IMAGES_REDIS_URL=redis://cache:6379/0 atoma-images --prompts-file daily.txt \
        --max-compute-units 50000000 --budget-per day --budget-key nightly  # cron, many hosts

The key comes from ATOMA_API_KEY (or ATOMASDK_BEARER_AUTH). Saved paths go to stdout, one
per line (or one JSON object per prompt with --json); progress and errors go to stderr, and
a run that sent anything ends with the compute units it used (and may have used) there too,
even when Ctrl-C, SIGTERM or SIGHUP stops it.

Every option, the prompts file and the output directory are checked before anything is sent:
a generation is paid for, so none is made that cannot be kept. Every line shown goes through
`emit`, which escapes control characters: text from the server or from a prompts file never
drives the terminal (`_terminal`); where images go is `_saving`, what a run reports
`_report`. ``python -m atoma_images`` and the ``atoma-images`` script both run `main`.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

from atoma_images import _confidential
from atoma_images._batch import BatchResult
from atoma_images._budget import Budget
from atoma_images._client import AsyncImagesClient
from atoma_images._dialect import DIALECTS, plan
from atoma_images._errors import (
    AtomaImagesError,
    InvalidRequestError,
)
from atoma_images._limits import BudgetLike, RateLimit, RateLimiter
from atoma_images._models import DEFAULT_MODEL, ImageRequest, ImagesResponse
from atoma_images._retry import RetryPolicy
from atoma_images._timeout import Timeout
from atoma_images._version import package_version
from atoma_images.testing import FakeAtomaServer

from ._report import (
    EXIT_CODES,
    report_check,
    report_error,
    report_interrupted_saves,
    report_models,
    report_result,
)
from ._saving import SpareDirectory, keep_images, stem_for
from ._terminal import PrintableFormatter, Progress, emit, spent

__all__ = ["EXIT_CODES", "main"]

T = TypeVar("T")


class CommandLineError(Exception):
    """Options that cannot go together, or a file or directory they name is unusable.

    Shown as one line; the exit code is 2 (invalid input).
    """


def paid(result: BatchResult) -> ImagesResponse | None:
    """The billed images of a result: its response, or those a failed call brought back (on
    Atoma, the other requests of a call for several images)."""
    error = result.error
    return result.response or (error.partial if isinstance(error, AtomaImagesError) else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atoma-images",
        description="Generate images with the Atoma network and save them as files.",
        epilog="Exit codes: "
        + ", ".join(f"{code} {kind}" for kind, code in EXIT_CODES.items())
        + ". The API key comes from ATOMA_API_KEY or ATOMASDK_BEARER_AUTH.",
    )
    parser.add_argument("prompt", nargs="?", help="what to draw (or use --prompts-file)")
    parser.add_argument("-n", type=int, default=1, help="images per prompt, 1 to 10 (default 1)")
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT (default 1024x1024)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    parser.add_argument("-o", "--output-dir", default=".", help="where to save (default: here)")
    parser.add_argument(
        "--dialect",
        choices=DIALECTS,
        default="atoma",
        help="the server's API: atoma (default) or openai (OpenAI and servers like it)",
    )
    parser.add_argument(
        "--format",
        choices=["b64_json", "url"],
        help="with --dialect openai: ask for URLs or base64 (default: the server's choice); "
        "Atoma always answers base64, and refuses url",
    )
    parser.add_argument(
        "--base-url", help="API root ending in /v1 (default: ATOMA_BASE_URL or Atoma's)"
    )
    parser.add_argument("--timeout", type=float, help="seconds for each attempt")
    parser.add_argument(
        "--max-retries", type=int, help="retries after a failed attempt (default 2)"
    )
    parser.add_argument(
        "--confidential",
        action="store_true",
        help="encrypt the request for a TEE node (needs atoma-images[confidential])",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument(
        "--fake", action="store_true", help="use the built-in fake server (offline)"
    )
    parser.add_argument(
        "--prompts-file", type=Path, help="UTF-8, one prompt per line ('#' starts a comment)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="prompts in flight (default 4)")
    parser.add_argument(
        "--max-compute-units",
        type=int,
        help="spend at most this many compute units (n x width x height per prompt); a prompt "
        "that does not fit is not sent",
    )
    asks = parser.add_mutually_exclusive_group()
    asks.add_argument(
        "--list-models",
        action="store_true",
        help="print the models the API serves, one a line (one JSON object with --json), "
        "and generate nothing; image and chat models alike: the API does not say which is which",
    )
    asks.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if the API answers and accepts the key, else the exit code of what failed "
        "(for readiness probes and cron jobs); generates nothing",
    )
    parser.add_argument(
        "--budget-per",
        choices=("minute", "hour", "day", "month"),
        help="--max-compute-units is for each window of this length, aligned to UTC "
        "(default: for the whole run, or for ever in Redis)",
    )
    parser.add_argument(
        "--budget-key",
        default="atoma-images:cli",
        help=f"with ${REDIS_URL_VARIABLE}: the Redis key of the budget and the rate limit "
        "that every host using the same key shares (default atoma-images:cli)",
    )
    parser.add_argument(
        "--rate-limit",
        type=int,
        help=f"send at most this many requests in any second (shared through ${REDIS_URL_VARIABLE} "
        "when it is set)",
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def read_prompts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The prompt, or the prompts of --prompts-file (UTF-8, one a line, ``#`` comments).

    Raises:
        CommandLineError: the file cannot be read, is not UTF-8, or holds no prompt.
    """
    if (args.prompt is None) == (args.prompts_file is None):
        parser.error("give either a prompt or --prompts-file")
    if args.prompts_file is None:
        return [args.prompt]
    path: Path = args.prompts_file
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CommandLineError(f"cannot read --prompts-file {path}: {exc.strerror}") from exc
    # A byte order mark (Windows editors write one) is not part of the first prompt.
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = len(raw) - len(body) + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        raise CommandLineError(
            f"--prompts-file {path} is not UTF-8: byte 0x{raw[offset]:02x} at offset {offset} "
            f"(line {line})"
        ) from None
    # Universal newlines, as open() reads text: str.splitlines would also cut a prompt at a
    # form feed or U+2028.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    prompts = [line.strip() for line in lines]
    prompts = [prompt for prompt in prompts if prompt and not prompt.startswith("#")]
    if not prompts:
        raise CommandLineError(f"--prompts-file {path} has no prompts")
    return prompts


def check_options(args: argparse.Namespace) -> tuple[RetryPolicy | None, Timeout | None]:
    """Check what every prompt shares, once, before anything is sent or made.

    Returns:
        The retry policy and the timeout to give the client (None: the client's default).

    Raises:
        CommandLineError: options that cannot go together.
        InvalidRequestError: a value that is not accepted.
        ExtraNotInstalledError: --confidential without the extra.
    """
    if args.fake and args.base_url is not None:
        raise CommandLineError("--fake runs its own server: it cannot be used with --base-url")
    if args.concurrency < 1:
        raise InvalidRequestError("--concurrency", args.concurrency, "allowed: an integer >= 1")
    if args.max_compute_units is not None and args.max_compute_units < 0:
        raise InvalidRequestError(
            "--max-compute-units", args.max_compute_units, "allowed: an integer >= 0"
        )
    if args.budget_per is not None and args.max_compute_units is None:
        raise CommandLineError("--budget-per is the window of --max-compute-units: give both")
    if args.rate_limit is not None and args.rate_limit < 1:
        raise InvalidRequestError("--rate-limit", args.rate_limit, "allowed: an integer >= 1")
    # The library's own checks, made with a stand-in prompt (as AsyncImagesClient checks its
    # model): a bad -n or --size is one error line, not one per prompt. Each prompt is still
    # checked when it is sent.
    plan(
        args.dialect,
        ImageRequest(
            model=args.model, prompt="-", n=args.n, size=args.size, response_format=args.format
        ),
    )
    if args.confidential:
        _confidential.require("--confidential")
    retries = None if args.max_retries is None else RetryPolicy(max_retries=args.max_retries)
    timeout = None if args.timeout is None else Timeout.of(args.timeout)
    return retries, timeout


#: A Redis URL for the budget and the rate limit, shared by every host that runs the command
#: with the same --budget-key (scripts run from cron on several hosts).
REDIS_URL_VARIABLE = "ATOMA_IMAGES_REDIS_URL"


async def shared_limits(
    args: argparse.Namespace, stack: contextlib.AsyncExitStack
) -> tuple[BudgetLike | None, RateLimiter | None]:
    """The run's budget and rate limit: in Redis when ``$ATOMA_IMAGES_REDIS_URL`` is set
    (closed with ``stack``), else in this process.

    Raises:
        ExtraNotInstalledError: the variable is set without the ``redis`` extra.
    """
    url = os.environ.get(REDIS_URL_VARIABLE)
    wanted = args.max_compute_units is not None or args.rate_limit is not None
    if not url or not wanted:
        budget = None
        if args.max_compute_units is not None:
            budget = Budget(args.max_compute_units, per=args.budget_per)
        rate = None if args.rate_limit is None else RateLimit(args.rate_limit, per="second")
        return budget, rate
    from atoma_images import redis  # noqa: PLC0415 - the extra is imported only when it is asked for

    shared_budget = shared_rate = None
    if args.max_compute_units is not None:
        shared_budget = redis.RedisBudget(
            url, key=args.budget_key, max_compute_units=args.max_compute_units, per=args.budget_per
        )
        stack.push_async_callback(shared_budget.aclose)
    if args.rate_limit is not None:
        shared_rate = redis.RedisRateLimit(
            url, key=f"{args.budget_key}:rate", requests=args.rate_limit, per="second"
        )
        stack.push_async_callback(shared_rate.aclose)
    return shared_budget, shared_rate


def prepare_output_dir(directory: Path) -> None:
    """Make ``directory`` and prove a file can be created there, before any paid generation.

    Raises:
        CommandLineError: naming the directory and the system's reason.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".atoma-images-check-"):
            pass
    except FileExistsError as exc:  # mkdir with exist_ok=True: a file is in the way
        raise CommandLineError(
            f"cannot save images in {directory}: exists and is not a directory"
        ) from exc
    except OSError as exc:
        raise CommandLineError(f"cannot save images in {directory}: {exc.strerror}") from exc


async def generate_all(
    args: argparse.Namespace, prompts: list[str], progress: Progress, out: TextIO, err: TextIO
) -> int:
    retries, timeout = check_options(args)
    directory = Path(args.output_dir)
    spare = SpareDirectory()
    codes: list[int] = []
    # Billed results whose images Ctrl-C kept from being saved: (prompt, response).
    unsaved: list[tuple[str, ImagesResponse]] = []
    async with contextlib.AsyncExitStack() as stack:
        api_key, base_url = None, args.base_url
        if args.fake:
            server = await stack.enter_async_context(
                FakeAtomaServer(confidential=args.confidential, dialect=args.dialect)
            )
            api_key, base_url = "fake-key", server.base_url
        budget, rate_limit = await shared_limits(args, stack)
        client = await stack.enter_async_context(
            AsyncImagesClient(
                api_key,
                base_url=base_url,
                model=args.model,
                timeout=timeout,
                retries=retries,
                budget=budget,
                rate_limit=rate_limit,
                dialect=args.dialect,
            )
        )
        prepare_output_dir(directory)  # once the key is known to be there
        if args.fake:
            emit(err, f"Using the built-in fake server at {base_url}")
        batch = len(prompts) > 1

        async def handle(result: BatchResult) -> int:
            progress.clear()
            kept = paid(result)
            code = (
                EXIT_CODES["ok"] if kept is None else await keep(result.prompt, result.index, kept)
            )
            if result.error is None:
                return code
            failed = report_error(result.error, result.prompt, args, out, err)
            # Billed images that could not be kept matter more than why the others failed.
            return code if code == EXIT_CODES["not saved"] else failed

        async def keep(prompt: str, index: int, response: ImagesResponse) -> int:
            stem = stem_for(prompt, index if batch else None)
            try:
                paths, problems = await keep_images(client, response, directory, stem, spare)
            except asyncio.CancelledError:  # stopped (Ctrl-C, SIGTERM) while fetching its images
                unsaved.append((prompt, response))
                raise
            progress.clear()
            return report_result(response, paths, prompt, args, problems=problems, out=out, err=err)

        results = client.generate_many(
            prompts,
            concurrency=args.concurrency,
            n=args.n,
            size=args.size,
            response_format=args.format,
            confidential=args.confidential,
        )
        spinner = asyncio.create_task(progress.spin())
        try:
            async with results:
                async for result in results:
                    code = await handle(result)
                    # Counted once saved (not when the batch hands it over, as on_progress
                    # would), so Ctrl-C's count is of prompts whose images are kept.
                    progress.advance(results.summary.results, results.total)
                    if code != EXIT_CODES["ok"]:
                        codes.append(code)
        finally:
            # The batch has closed: what Ctrl-C cancelled after it may have been sent, and the
            # results it found ready but not yet handed out (a success among them was billed).
            summary = results.summary
            progress.in_flight = len(summary.cancelled_prompts)
            unsaved += [(r.prompt, kept) for r in summary.unclaimed if (kept := paid(r))]
            spinner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await spinner
            progress.clear()
            report_interrupted_saves(unsaved, args, out, err)
            progress.billed_unsaved = len(unsaved)
            progress.usage = client.usage
    return codes[0] if codes else EXIT_CODES["ok"]


async def ask_api(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """--list-models or --check: ask the API what it serves, or whether it is up and takes the
    key; nothing is generated, so nothing is billed."""
    retries, timeout = check_options(args)
    async with contextlib.AsyncExitStack() as stack:
        api_key, base_url = None, args.base_url
        if args.fake:
            server = await stack.enter_async_context(FakeAtomaServer(dialect=args.dialect))
            api_key, base_url = "fake-key", server.base_url
        client = await stack.enter_async_context(
            AsyncImagesClient(
                api_key, base_url=base_url, timeout=timeout, retries=retries, dialect=args.dialect
            )
        )
        if args.fake:
            emit(err, f"Using the built-in fake server at {base_url}")
        try:
            if args.list_models:
                report_models(await client.models(), args, out)
            else:
                # OpenAI's API has no /health; its models list proves it answers all the same.
                health = await client.health() if args.dialect == "atoma" else None
                report_check(client.base_url, health, await client.models(), args, out)
        except AtomaImagesError as error:
            return report_error(error, None, args, out, err)
    return EXIT_CODES["ok"]


#: The signals that stop a run as Ctrl-C does, each with its kind of exit in EXIT_CODES (the
#: shell's 128 + the signal's number): SIGTERM is what `timeout`, `docker stop`, systemd and
#: Kubernetes send, SIGHUP what a closed terminal or SSH session sends.
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
if sys.platform != "win32":
    STOP_SIGNALS[signal.SIGHUP] = "hung up"


class Stopped(Exception):
    """A stop signal cancelled the run: `signum` says which."""

    def __init__(self, signum: signal.Signals) -> None:
        super().__init__(signum.name)
        self.signum = signum


async def cancelled_by_signal(run: Coroutine[Any, Any, T]) -> T:
    """``await run``, a stop signal cancelling it, then raised as `Stopped`.

    The run unwinds as a cancellation, so it reports what was billed but not saved, and the
    usage line, whichever of `STOP_SIGNALS` stopped it (their default kills the process
    with no word). asyncio.run does this for Ctrl-C alone, and only from Python 3.11 on; on
    3.10 a Ctrl-C raises KeyboardInterrupt wherever the loop happens to be (between an
    ``async with``'s enter and exit, say), which can leave the loop unable to unwind the
    batch. A cancellation unwinds it cleanly.
    """
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum)
        if task is not None:
            task.cancel()

    installed: list[signal.Signals] = []
    for signum in STOP_SIGNALS:
        try:
            loop.add_signal_handler(signum, on_signal, signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, Windows
            break  # Ctrl-C is then Python's own KeyboardInterrupt
        installed.append(signum)
    try:
        return await run
    except asyncio.CancelledError:
        if received:
            raise Stopped(received[0]) from None
        raise
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PrintableFormatter("%(name)s: %(message)s"))
        logging.basicConfig(level=logging.DEBUG, handlers=[handler])
    else:
        # The CLI says what a Ctrl-C left billed itself; the library's warning would repeat it.
        logging.getLogger("atoma_images").addHandler(logging.NullHandler())
    asking = args.list_models or args.check
    if asking and (args.prompt is not None or args.prompts_file is not None):
        parser.error("--list-models and --check take no prompt")
    try:
        prompts = [] if asking else read_prompts(args, parser)
    except CommandLineError as error:
        emit(sys.stderr, f"atoma-images: error: {error}")
        return EXIT_CODES["invalid input"]
    progress = Progress(sys.stderr, len(prompts))
    try:
        run = (
            ask_api(args, sys.stdout, sys.stderr)
            if asking
            else generate_all(args, prompts, progress, sys.stdout, sys.stderr)
        )
        code = asyncio.run(cancelled_by_signal(run))
    except (KeyboardInterrupt, Stopped) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        progress.clear()
        emit(sys.stderr, progress.interrupted(None if signum == signal.SIGINT else signum.name))
        code = EXIT_CODES[STOP_SIGNALS[signum]]
    except CommandLineError as error:
        emit(sys.stderr, f"atoma-images: error: {error}")
        code = EXIT_CODES["invalid input"]
    except AtomaImagesError as error:  # raised before any prompt ran: bad key, option, ...
        code = report_error(error, None, args, sys.stdout, sys.stderr)
    # However the run ended, once it sent a request its user learns what that cost.
    if progress.usage.calls:
        emit(sys.stderr, spent(progress.usage))
    return code
