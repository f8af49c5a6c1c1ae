"""What calls cost: compute units, the client's running `Usage`, and spending caps (`Budget`).

Atoma bills image generation per pixel: a request for ``n`` images of ``W x H`` costs
``n * W * H`` compute units (`compute_units`), charged on success, settled at zero for an
error status. A call that was sent but whose outcome is unknown may have been charged.

A `Budget` is checked before a call is sent: the call reserves its cost, and the
reservation is kept when the call succeeds or may have been billed, and given back when it
failed without reaching the server's billing. So many calls in flight at once can never
spend more than the budget, even if every one of them succeeds.

Where this module fits, and why it is built so: docs/architecture.md.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Sequence

import attrs

from ._checks import check_whole_number
from ._errors import AtomaImagesError, BudgetExceededError, InvalidRequestError
from ._models import ImageRequest, ImagesResponse
from ._transport import RequestProgress

__all__ = [
    "Budget",
    "CallCost",
    "Usage",
    "UsageMeter",
    "compute_units",
    "may_have_been_billed",
    "reserve",
    "settle",
]


def compute_units(request: ImageRequest) -> int:
    """What the proxy charges for ``request``: one unit per pixel, ``n * W * H``."""
    return request.n * request.width * request.height


def may_have_been_billed(error: BaseException, sent: bool = True) -> bool:
    """Whether a call (or an attempt) that ended with ``error`` may have been charged.

    Our own errors say so themselves. Anything else (a cancellation, Ctrl-C, a bug) stopped
    it wherever it was: it may have been charged if its request may have been sent
    (``sent``; when unknown, True).
    """
    if isinstance(error, AtomaImagesError):
        return error.may_have_been_billed
    return sent


def _check_units(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    check_whole_number(attribute.name, value, 0)


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


@attrs.define
class CallCost:
    """What one generation call may cost, attempt by attempt, and what its budgets hold for it.

    One attempt's cost is reserved before the call is sent. An attempt that may have been
    billed (sent, outcome unknown) keeps its reservation, so a retry of it, which only
    ``RetryPolicy(retry_ambiguous=True)`` makes, reserves the cost again before it is sent:
    a budget never covers two possibly billed attempts with one reservation. The retry loop
    reports each failed attempt (`attempt_failed`) and asks before each retry (`before_retry`).
    """

    units: int
    budgets: tuple[Budget, ...]
    reservations: int = 1
    maybe_billed_attempts: int = 0
    # How far the paid request of the attempt under way got (`paid_request`).
    _request: RequestProgress | None = attrs.field(default=None, init=False, repr=False)

    @classmethod
    def reserve(cls, units: int, *budgets: Budget | None, requests: int = 1) -> list[CallCost]:
        """The cost of each of ``requests`` requests of ``units``, reserved all at once.

        A call Atoma carries as several requests (one per image) reserves them together
        before the first is sent, so it fits a budget whole or sends nothing.
        """
        held = tuple(reserve(units * requests, *budgets))
        return [cls(units, held) for _ in range(requests)]

    def paid_request(self) -> RequestProgress:
        """Where the attempt under way has `Sender.send` record how far its paid request got.

        An attempt that ends with no error of ours (cancelled, or a bug) may have been billed
        only if that request may have been sent: on the client's own session, only once its
        headers went out; on a session passed in, as soon as it was begun. One that never
        began it (a confidential attempt cancelled while it locked a node) was not billed.
        """
        self._request = RequestProgress()
        return self._request

    def attempt_failed(self, error: BaseException) -> bool:
        """Count an attempt that failed with ``error``; returns whether it may have been billed."""
        request, self._request = self._request, None
        billed = may_have_been_billed(error, request is not None and request.may_have_been_sent)
        if billed:
            self.maybe_billed_attempts += 1
        return billed

    def before_retry(self) -> None:
        """Reserve for the next attempt if every reservation so far may have been spent.

        Raises:
            BudgetExceededError: the retry does not fit; it is not sent.
        """
        if self.maybe_billed_attempts < self.reservations:
            return
        try:
            reserve(self.units, *self.budgets)
        except BudgetExceededError as error:
            raise BudgetExceededError(asked=error.asked, left=error.left, retry=True) from None
        self.reservations += 1

    def close(
        self, response: ImagesResponse | None, meters: Sequence[UsageMeter]
    ) -> ImagesResponse | None:
        """The request ended with ``response``, or failed (None): count it in every meter,
        give back what its budgets need not keep, and return the response with its cost.
        Once per request: the one place a request's outcome becomes compute units."""
        self.release_unspent(succeeded=response is not None)
        images = None if response is None else len(response.data)
        for meter in meters:
            meter.count(self, images)
        return None if response is None else attrs.evolve(response, compute_units=self.units)

    def release_unspent(self, succeeded: bool) -> None:
        """Give back the reservations that no billed or possibly billed attempt used."""
        spent = self.maybe_billed_attempts + (1 if succeeded else 0)
        for _ in range(self.reservations - spent):
            for budget in self.budgets:
                budget.release(self.units)
        self.reservations = spent


@attrs.frozen(kw_only=True)
class Usage:
    """What a client's generation calls have cost so far (a snapshot; see ``client.usage``).

    Calls refused before anything was sent (bad input, a budget) are not counted.

    Attributes:
        calls: generation requests that were sent, or tried to be (on Atoma, a call for
            ``n`` images is ``n`` requests of one image: its backend draws one per request).
        images: images received.
        compute_units: units billed, for the calls that succeeded.
        maybe_billed_calls: calls with an attempt whose outcome is unknown (sent, then no
            complete answer, cancelled after it may have been sent, or an unreadable
            success): they may have been billed
            for it (a call retried with ``retry_ambiguous=True`` can be one and succeed too).
        maybe_billed_compute_units: the units those attempts may have cost.
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


async def settle(
    call: Awaitable[ImagesResponse], cost: CallCost, meters: Sequence[UsageMeter]
) -> ImagesResponse:
    """Await a call of one request, and close its cost (`CallCost.close`).

    The response says what it cost.
    """
    try:
        response = await call
    except BaseException:
        cost.close(None, meters)
        raise
    return cost.close(response, meters)  # type: ignore[return-value]  # a response in, one out


@attrs.define
class UsageMeter:
    """A running `Usage` (a client's, or a batch's), updated as each call ends; readable from
    any thread."""

    _usage: Usage = attrs.field(factory=Usage, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    @property
    def usage(self) -> Usage:
        return self._usage

    def count(self, cost: CallCost, images: int | None) -> None:
        """Count a call that ended: with ``images`` images, or failed (None)."""
        succeeded, maybe_billed = images is not None, cost.maybe_billed_attempts
        with self._lock:
            usage = self._usage
            self._usage = Usage(
                calls=usage.calls + 1,
                images=usage.images + (images or 0),
                compute_units=usage.compute_units + (cost.units if succeeded else 0),
                maybe_billed_calls=usage.maybe_billed_calls + (1 if maybe_billed else 0),
                maybe_billed_compute_units=usage.maybe_billed_compute_units
                + maybe_billed * cost.units,
                unbilled_failures=usage.unbilled_failures + (0 if succeeded or maybe_billed else 1),
            )
