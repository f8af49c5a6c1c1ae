"""The client's one aiohttp session, and its life: made lazily in the loop, closed for good.

A session belongs to the event loop it was made in, so `ClientSession` binds to the loop
of the first call and refuses any other. Its state is explicit, as httpx keeps its own:
UNOPENED until the first call, OPENED, then CLOSED, which is final. A session passed in by the
caller is used as is and never closed here.
"""

from __future__ import annotations

import asyncio
import enum
import warnings

import aiohttp
import attrs

from ._errors import ClientClosedError
from ._transport import progress_trace

__all__ = ["SessionHolder", "State"]


class State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


@attrs.define
class SessionHolder:
    """Gives the running loop its session; `aclose` ends it.

    Args:
        owner: what to name in errors and warnings (the client's repr).
        max_connections: the size of the pool of a session made here.
        session: a session passed in by the caller, or None to make one on first use.
    """

    owner: str
    max_connections: int
    _session: aiohttp.ClientSession | None = attrs.field(default=None, alias="session")
    owns_session: bool = attrs.field(init=False)
    _loop: asyncio.AbstractEventLoop | None = attrs.field(init=False, default=None)
    state: State = attrs.field(init=False, default=State.UNOPENED)

    def __attrs_post_init__(self) -> None:
        self.owns_session = self._session is None

    @property
    def pool_size(self) -> int | None:
        """How many requests the pool sends to one host at once; None when it sets no limit.

        A session made here: ``max_connections``. One passed in: its connector's limits.
        """
        if self.owns_session:
            return self.max_connections
        connector = None if self._session is None else self._session.connector
        if connector is None:
            return None
        return min((n for n in (connector.limit, connector.limit_per_host) if n), default=None)

    def get(self) -> aiohttp.ClientSession:
        """The session for the running loop, made on first use."""
        if self.state is State.CLOSED:
            raise ClientClosedError(f"{self.owner} is closed; create a new client")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                raise RuntimeError(
                    f"{self.owner} is bound to the event loop it was first used in; an aiohttp "
                    "session cannot move between loops. Create one client per loop (or use "
                    "ImagesClient from synchronous code)."
                )
            self._loop = loop
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0),
                # Not trust_env=True: aiohttp would then read ~/.netrc and the proxy variables
                # in a worker thread on every request, and a .netrc entry for the API host
                # would clash with our Authorization header. The proxy variables are honoured
                # all the same (_transport.environment_proxy).
                trust_env=False,
                # Tells the transport whether a failed request had been sent (billing honesty).
                trace_configs=[progress_trace()],
            )
        elif session.closed:
            raise ClientClosedError("the aiohttp.ClientSession given to the client is closed")
        self.state = State.OPENED
        return session

    async def aclose(self) -> None:
        """Close a session made here (one passed in is left open). Safe to repeat."""
        self.state = State.CLOSED
        session, self._session = self._session, None
        if session is not None and self.owns_session and not session.closed:
            await session.close()

    def warn_if_open(self) -> None:
        """For a finaliser: warn (never close: that needs the loop, which may be gone)."""
        session = self._session
        if session is not None and self.owns_session and not session.closed:
            warnings.warn(
                f"unclosed {self.owner}: use 'async with' or 'await client.aclose()'",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
