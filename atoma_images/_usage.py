"""What calls cost: compute units, the client's running `Usage`, and each request's `CallCost`.

Atoma bills image generation per pixel: a request for ``n`` images of ``W x H`` costs
``n * W * H`` compute units (`compute_units`), charged on success, settled at zero for an
error status. A call that was sent but whose outcome is unknown may have been charged.

A budget (`BudgetLike`: a `Budget` in this process, a ``RedisBudget`` shared by replicas)
is checked before a call is sent: the call reserves its cost, and the reservation is kept
when the call succeeds or may have been billed, and given back when it failed without
reaching the server's billing. So many calls in flight at once can never spend more than the
budget, even if every one of them succeeds.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Sequence

import attrs

from ._budget import reserve_all, settle_quietly
from ._errors import AtomaImagesError, BudgetExceededError
from ._limits import BudgetLike, Reservation
from ._models import ImageRequest, ImagesResponse
from ._transport import RequestProgress

__all__ = [
    "CallCost",
    "Usage",
    "UsageMeter",
    "compute_units",
    "counted",
    "may_have_been_billed",
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
    # How far the paid request of the attempt under way got (`paid_request`).
    _request: RequestProgress | None = attrs.field(default=None, init=False, repr=False)
    # Whether any attempt began to send its paid request: one that never did was refused by
    # the client itself (a rate limit out of reach, a budget's retry), and is not a call.
    _began: bool = attrs.field(default=False, init=False, repr=False)

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

    def paid_request(self) -> RequestProgress:
        """Where the attempt under way has `Transport.post` record how far its paid request got.

        An attempt that ends with no error of ours (cancelled, or a bug) may have been billed
        only if that request may have been sent: on the client's own session, only once its
        headers went out; on a session passed in, as soon as it was begun. One that never
        began it (a confidential attempt cancelled while it locked a node) was not billed.
        """
        self._request = RequestProgress()
        self._began = True
        return self._request

    def attempt_failed(self, error: BaseException) -> bool:
        """Count an attempt that failed with ``error``; returns whether it may have been billed."""
        request, self._request = self._request, None
        billed = may_have_been_billed(error, request is not None and request.may_have_been_sent)
        if billed:
            self.maybe_billed_attempts += 1
        return billed

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

    async def close(
        self, response: ImagesResponse | None, meters: Sequence[UsageMeter]
    ) -> ImagesResponse | None:
        """The request ended with ``response``, or failed (None): count it in every meter,
        settle its budgets (what they need not keep goes back), and return the response with
        its cost. Once per request: the one place a request's outcome becomes compute units.

        The meters first: a second cancellation while a remote budget settles cannot keep
        the call from being counted (and an interrupted settle leaves units spent, never
        given back).
        """
        images = None if response is None else len(response.data)
        if response is not None or self._began:  # never begun: refused before sending
            for meter in meters:
                meter.count(self, images)
        await self.release_unspent(succeeded=response is not None)
        return None if response is None else attrs.evolve(response, compute_units=self.units)

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


async def counted(
    call: Awaitable[ImagesResponse], cost: CallCost, meters: Sequence[UsageMeter]
) -> ImagesResponse:
    """Await a call of one request, and close its cost (`CallCost.close`).

    The response says what it cost.
    """
    try:
        response = await call
    except BaseException:
        await cost.close(None, meters)
        raise
    return await cost.close(response, meters)  # type: ignore[return-value]  # one in, one out


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
