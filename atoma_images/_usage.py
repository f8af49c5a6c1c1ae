"""What calls cost: compute units, the client's running `Usage`, and each request's `CallCost`.

Atoma bills image generation per pixel: a request for ``n`` images of ``W x H`` costs
``n * W * H`` compute units (`compute_units`), charged on success, settled at zero for an
error status. A call that was sent but whose outcome is unknown may have been charged.

A budget (`BudgetLike`: a `Budget` in this process, a ``RedisBudget`` shared by replicas)
is checked before a call is sent: the call reserves its cost, and the reservation is kept
when the call succeeds or may have been billed, and given back when it failed without
reaching the server's billing. So many calls in flight at once can never spend more than the
budget, even if every one of them succeeds.

Where this module fits, and why it is built so: docs/architecture.md.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Sequence

import attrs

from ._budget import reserve_all, settle_quietly
from ._errors import AtomaImagesError, BudgetExceededError
from ._limits import BudgetLike, Reservation
from ._models import ImageRequest, ImagesResponse

__all__ = [
    "CallCost",
    "Usage",
    "UsageMeter",
    "compute_units",
    "may_have_been_billed",
    "settle",
]


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


@attrs.define
class CallCost:
    """What one generation request may cost, attempt by attempt, and what its budgets hold
    for it (`BudgetLike`: in this process, in Redis, or in a store of the user's own).

    One attempt's cost is reserved before the call is sent. An attempt that may have been
    billed (sent, outcome unknown) keeps its reservation, so a retry of it, which only
    ``RetryPolicy(retry_ambiguous=True)`` makes, reserves the cost again before it is sent:
    a budget never covers two possibly billed attempts with one reservation. The retry loop
    reports each failed attempt (`attempt_failed`) and asks before each retry (`before_retry`).

    Attributes:
        held: one entry per reservation (the first, then each retry's), each the
            `Reservation` of every budget.
    """

    units: int
    budgets: tuple[BudgetLike, ...]
    held: list[tuple[Reservation, ...]]
    maybe_billed_attempts: int = 0

    @property
    def reservations(self) -> int:
        """How many attempts' costs the budgets hold for this request."""
        return len(self.held)

    @classmethod
    async def reserve(
        cls, units: int, *budgets: BudgetLike | None, requests: int = 1
    ) -> list[CallCost]:
        """The cost of each of ``requests`` requests of ``units``, reserved all at once.

        A call Atoma carries as several requests (one per image) reserves them together
        before the first is sent, so it fits a budget whole or sends nothing; each request
        then settles its own share.
        """
        held = await reserve_all(units * requests, budgets)
        owners = tuple(budget for budget, _ in held)
        share = tuple(attrs.evolve(reservation, units=units) for _, reservation in held)
        return [cls(units, owners, [share]) for _ in range(requests)]

    def attempt_failed(self, error: BaseException) -> None:
        if may_have_been_billed(error):
            self.maybe_billed_attempts += 1

    async def before_retry(self) -> None:
        """Reserve for the next attempt if every reservation so far may have been spent.

        Raises:
            BudgetExceededError: the retry does not fit; it is not sent.
            BudgetUnavailableError: a budget could not be asked; the retry is not sent.
        """
        if self.maybe_billed_attempts < self.reservations:
            return
        try:
            held = await reserve_all(self.units, self.budgets)
        except BudgetExceededError as error:
            raise BudgetExceededError(
                asked=error.asked, left=error.left, retry=True, resets_at=error.resets_at
            ) from None
        self.held.append(tuple(reservation for _, reservation in held))

    async def finish(self, images: int | None, meters: Sequence[UsageMeter]) -> None:
        """The request ended with ``images`` images, or failed (None): count it in every
        meter and settle its budgets (what they need not keep goes back). Once per request.

        The meters first: a second cancellation while a remote budget settles cannot keep
        the call from being counted (and an interrupted settle leaves units spent, never
        given back).
        """
        for meter in meters:
            meter.count(self, images)
        await self.release_unspent(succeeded=images is not None)

    async def release_unspent(self, succeeded: bool) -> None:
        """Settle every reservation: those a billed or possibly billed attempt used stay
        spent, the others (the latest) are given back, each to its own window."""
        spent = self.maybe_billed_attempts + (1 if succeeded else 0)
        held, self.held = self.held, self.held[:spent]
        for index, reservations in enumerate(held):
            for budget, reservation in zip(self.budgets, reservations, strict=True):
                kept = reservation.units if index < spent else 0
                await settle_quietly(budget, reservation, kept)


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
            complete answer, cancelled, or an unreadable success): they may have been billed
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
    """Await a call; count it in every meter, and give back what its budgets need not keep.

    The response says what it cost. The one place a call's outcome becomes compute units.
    """
    try:
        response = await call
    except BaseException:
        await cost.finish(None, meters)
        raise
    await cost.finish(len(response.data), meters)
    return attrs.evolve(response, compute_units=cost.units)


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
