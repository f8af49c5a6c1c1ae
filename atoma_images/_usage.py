"""What calls cost: compute units, the client's running `Usage`, and spending caps (`Budget`).

Atoma bills image generation per pixel: a request for ``n`` images of ``W x H`` costs
``n * W * H`` compute units (`compute_units`), charged on success, settled at zero for an
error status. A call that was sent but whose outcome is unknown may have been charged.

A `Budget` is checked before a call is sent: the call reserves its cost, and the
reservation is kept when the call succeeds or may have been billed, and given back when it
failed without reaching the server's billing. So many calls in flight at once can never
spend more than the budget, even if every one of them succeeds.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Sequence

import attrs

from ._errors import AtomaImagesError, BudgetExceededError, InvalidRequestError
from ._models import ImageRequest, ImagesResponse

__all__ = ["Budget", "Usage", "UsageMeter", "compute_units", "may_have_been_billed", "reserve"]


def compute_units(request: ImageRequest) -> int:
    """What the proxy charges for ``request``: one unit per pixel, ``n * W * H``."""
    return request.n * request.width * request.height


def may_have_been_billed(error: BaseException) -> bool:
    """Whether a call that ended with ``error`` may have been charged.

    Our own errors say so themselves. Anything else (a cancellation, Ctrl-C, a bug) may have
    stopped the call after its request was sent, so it is counted as possibly billed.
    """
    if isinstance(error, AtomaImagesError):
        return error.may_have_been_billed
    return True


def _check_units(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    if type(value) is not int or value < 0:
        raise InvalidRequestError(attribute.name, value, "allowed: an integer >= 0")


@attrs.define(eq=False)
class Budget:
    """A cap on the compute units spent through a client, or through the calls given it.

    Pass one to a client (``AsyncImagesClient(budget=...)``) to cap everything it sends, or
    to one call (``generate(..., budget=...)``) to cap a group of calls, such as one user's
    of a bot. A call whose cost does not fit in what is left raises `BudgetExceededError`
    before anything is sent. Safe to share between threads and event loops.

    Attributes:
        max_compute_units: the most the calls may spend, in compute units (pixels).
    """

    max_compute_units: int = attrs.field(validator=_check_units)
    _used: int = attrs.field(default=0, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    @property
    def used(self) -> int:
        """Units spent, may have been spent, or reserved by the calls in flight."""
        return self._used

    @property
    def remaining(self) -> int:
        """Units still available to new calls."""
        return self.max_compute_units - self._used

    def reserve(self, units: int) -> None:
        """Set ``units`` aside for a call about to be sent.

        Raises:
            BudgetExceededError: ``units`` do not fit in what is left; nothing was reserved.
        """
        with self._lock:
            left = self.max_compute_units - self._used
            if units > left:
                raise BudgetExceededError(asked=units, left=left)
            self._used += units

    def release(self, units: int) -> None:
        """Give back a reservation: its call failed and was not billed."""
        with self._lock:
            self._used -= units


def check_budget(budget: object) -> Budget | None:
    """``budget`` if it is a `Budget` or None, else `InvalidRequestError` (client or call)."""
    if budget is not None and not isinstance(budget, Budget):
        raise InvalidRequestError("budget", budget, "allowed: a Budget or None")
    return budget


def reserve(units: int, *budgets: Budget | None) -> list[Budget]:
    """Reserve ``units`` in every budget given (each once), or in none.

    Returns:
        The budgets reserved in, to `Budget.release` if the call is not billed.

    Raises:
        BudgetExceededError: a budget has too little left; nothing stays reserved.
    """
    reserved: list[Budget] = []
    try:
        for budget in budgets:
            if budget is not None and budget not in reserved:
                budget.reserve(units)
                reserved.append(budget)
    except BudgetExceededError:
        for budget in reserved:
            budget.release(units)
        raise
    return reserved


@attrs.frozen(kw_only=True)
class Usage:
    """What a client's generation calls have cost so far (a snapshot; see ``client.usage``).

    Calls refused before anything was sent (bad input, a budget) are not counted.

    Attributes:
        calls: generation calls that were sent, or tried to be.
        images: images received.
        compute_units: units billed, for the calls that succeeded.
        maybe_billed_calls: calls whose outcome is unknown (sent, then no complete answer,
            cancelled, or an unreadable success): they may have been billed.
        maybe_billed_compute_units: the units those calls may have cost.
        unbilled_failures: calls that failed without being billed (an error status, or a
            failure before the request reached the server).
    """

    calls: int = 0
    images: int = 0
    compute_units: int = 0
    maybe_billed_calls: int = 0
    maybe_billed_compute_units: int = 0
    unbilled_failures: int = 0

    @property
    def max_compute_units(self) -> int:
        """The most the calls can have cost: billed plus maybe billed."""
        return self.compute_units + self.maybe_billed_compute_units


@attrs.define
class UsageMeter:
    """A client's running `Usage`, updated as each call ends; readable from any thread."""

    _usage: Usage = attrs.field(factory=Usage, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    @property
    def usage(self) -> Usage:
        return self._usage

    async def settle(
        self, call: Awaitable[ImagesResponse], units: int, reserved: Sequence[Budget]
    ) -> ImagesResponse:
        """Await a call whose ``units`` are ``reserved``; count it, and give them back only if
        it cannot have been billed. The response says what it cost."""
        try:
            response = await call
        except BaseException as error:
            self.failed(units, error)
            if not may_have_been_billed(error):
                for budget in reserved:
                    budget.release(units)
            raise
        self.succeeded(units, len(response.data))
        return attrs.evolve(response, compute_units=units)

    def succeeded(self, units: int, images: int) -> None:
        self._add(calls=1, images=images, compute_units=units)

    def failed(self, units: int, error: BaseException) -> None:
        if may_have_been_billed(error):
            self._add(calls=1, maybe_billed_calls=1, maybe_billed_compute_units=units)
        else:
            self._add(calls=1, unbilled_failures=1)

    def _add(self, **counts: int) -> None:
        with self._lock:
            usage = self._usage
            self._usage = attrs.evolve(
                usage, **{name: getattr(usage, name) + count for name, count in counts.items()}
            )
