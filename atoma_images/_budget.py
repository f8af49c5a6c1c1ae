"""`Budget`, the in-process `BudgetLike`, and the client's side of any budget: reserving in
several at once (`reserve_all`) and settling a reservation without ever losing a call's
result to a store that failed (`settle_quietly`).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial

import attrs

from ._checks import check_whole_number
from ._errors import (
    AtomaImagesError,
    BudgetExceededError,
    BudgetUnavailableError,
    InvalidRequestError,
)
from ._limits import BudgetLike, Per, Reservation, check_per, utc, window_of

__all__ = ["Budget", "check_budget", "reserve_all", "settle_quietly"]

logger = logging.getLogger("atoma_images")

_WINDOWS = ("minute", "hour", "day", "month")


def _check_units(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    check_whole_number(attribute.name, value, 0)


def _check_per(_: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    check_per("per", value, allow_none=True, allowed=_WINDOWS)


@attrs.define(eq=False)
class Budget:
    """A cap on the compute units spent through a client, or through the calls given it.

    Pass one to a client (``AsyncImagesClient(budget=...)``) to cap everything it sends, or
    to one call (``generate(..., budget=...)``) to cap a group of calls, such as one user's
    of a bot. A call whose cost does not fit in what is left raises `BudgetExceededError`
    before anything is sent. Safe to share between threads and event loops.

    With ``per``, the cap holds for each window of that length, fixed and aligned to UTC:
    ``Budget(max_compute_units=..., per="day")`` is full again at 00:00 UTC. A call reserves
    in the window it starts in, and what it gives back goes to that window. Without ``per``
    (the default), the cap holds for the budget's lifetime. It lives in this process; for
    replicas sharing one, see `atoma_images.redis.RedisBudget`.

    Attributes:
        max_compute_units: the most the calls may spend, in compute units (pixels), in each
            window (or in all).
        per: ``"minute"``, ``"hour"``, ``"day"``, ``"month"``, or None (no window).
        clock: the time, in seconds since the epoch (tests pass their own).
    """

    max_compute_units: int = attrs.field(validator=_check_units)
    per: Per | None = attrs.field(default=None, validator=_check_per)
    clock: Callable[[], float] = attrs.field(default=time.time, repr=False)
    _window: int | None = attrs.field(default=None, init=False)
    _used: int = attrs.field(default=0, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    @property
    def used(self) -> int:
        """Units spent, may have been spent, or reserved by the calls in flight (in the
        current window)."""
        with self._lock:
            return self._used if self._current()[0] == self._window else 0

    @property
    def remaining(self) -> int:
        """Units still available to new calls (in the current window, until `resets_at`).

        A property, read at once; `atoma_images.redis.RedisBudget.remaining` is a coroutine
        (it asks Redis)."""
        return self.max_compute_units - self.used

    @property
    def resets_at(self) -> datetime.datetime | None:
        """When the current window ends and the budget is full again (UTC), or None
        without ``per``."""
        return utc(self._current()[1])

    def _current(self) -> tuple[int | None, int | None]:
        return (None, None) if self.per is None else window_of(self.per, self.clock())

    async def reserve(self, units: int) -> Reservation:
        """Set ``units`` aside for requests about to be sent (see `BudgetLike.reserve`)."""
        with self._lock:
            window, end = self._current()
            if window is not None and (self._window is None or window > self._window):
                self._window, self._used = window, 0  # a new window starts full
            left = self.max_compute_units - self._used
            if units > left:
                raise BudgetExceededError(asked=units, left=left, resets_at=utc(end))
            self._used += units
            return Reservation(units, window, utc(end))

    async def settle(self, reservation: Reservation, spent: int) -> None:
        """Give back what a request did not spend (see `BudgetLike.settle`)."""
        with self._lock:
            if reservation.window == self._window:  # an ended window is not refilled
                self._used -= reservation.units - spent


def check_budget(budget: object) -> BudgetLike | None:
    """``budget`` if it is a `BudgetLike` or None, else `InvalidRequestError` (client or call)."""
    if budget is not None and not isinstance(budget, BudgetLike):
        raise InvalidRequestError(
            "budget", budget, "allowed: a Budget, a RedisBudget, another BudgetLike, or None"
        )
    return budget


async def _ask(budget: BudgetLike, units: int) -> Reservation:
    try:
        return await budget.reserve(units)
    except AtomaImagesError:
        raise
    except Exception as error:  # a store of the user's own: refused as unavailable
        raise BudgetUnavailableError(
            f"the budget {budget!r} could not be checked: {type(error).__name__}"
        ) from error


#: Give-backs of reservations whose caller was cancelled, kept until they end.
_giving_back: set[asyncio.Task[None]] = set()


async def _reserve(budget: BudgetLike, units: int) -> Reservation:
    """`BudgetLike.reserve`, shielded: a caller cancelled while a store is asked (a
    timeout) does not cancel the step half-way, where the store may set the units aside
    with nobody left to give them back. The step ends, and what it set aside is given back
    (nothing was sent)."""
    asking = asyncio.ensure_future(_ask(budget, units))
    try:
        return await asyncio.shield(asking)
    except asyncio.CancelledError:
        asking.add_done_callback(partial(_give_back, budget))
        raise


def _give_back(budget: BudgetLike, asking: asyncio.Future[Reservation]) -> None:
    if asking.cancelled() or asking.exception() is not None:
        return  # nothing was set aside, or it cannot be known: it stays spent
    task = asyncio.ensure_future(settle_quietly(budget, asking.result(), 0))
    _giving_back.add(task)
    task.add_done_callback(_giving_back.discard)


async def reserve_all(
    units: int, budgets: Iterable[BudgetLike | None]
) -> tuple[tuple[BudgetLike, Reservation], ...]:
    """Reserve ``units`` in every budget given (each once), or in none.

    Raises:
        BudgetExceededError, BudgetUnavailableError: a budget has too little left, or could
            not be asked; what the others had reserved is given back.
    """
    held: list[tuple[BudgetLike, Reservation]] = []
    try:
        for budget in budgets:
            if budget is not None and all(budget is not other for other, _ in held):
                held.append((budget, await _reserve(budget, units)))
    except BaseException:  # cancellation too: nothing was sent, so nothing was spent
        for budget, reservation in held:
            await settle_quietly(budget, reservation, 0)
        raise
    return tuple(held)


async def settle_quietly(budget: BudgetLike, reservation: Reservation, spent: int) -> None:
    """`BudgetLike.settle`, and a failure of it logged: the units it could not give back
    stay spent (the budget errs on the safe side), and the call goes on."""
    try:
        await budget.settle(reservation, spent)
    except Exception:
        logger.warning(
            "atoma-images: the budget %r could not be settled; %d compute units it could have "
            "given back stay counted as spent",
            budget,
            reservation.units - spent,
            exc_info=True,
        )
