"""The shape of a chat bot, without a bot library.

Messages arrive on a queue. One shared client serves every user; each user has at most one
generation running; "/cancel" cancels that user's generation; the image bytes go back as
the reply. Plug `ImageBot.handle` into your chat library's message callback and `send`
into its reply call.

    python examples/bot.py      # a short scripted conversation against the fake server
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable

from atoma_images import AsyncImagesClient, AtomaImagesError
from atoma_images.testing import FakeAtomaServer

Send = Callable[[str, "bytes | str"], Awaitable[None]]


class ImageBot:
    """``/imagine <prompt>`` and ``/cancel``, one generation per user at a time."""

    def __init__(self, client: AsyncImagesClient, send: Send) -> None:
        self._client = client
        self._send = send
        self._jobs: dict[str, asyncio.Task[None]] = {}

    async def handle(self, user: str, text: str) -> None:
        command, _, prompt = text.partition(" ")
        job = self._jobs.get(user)
        if command == "/imagine":
            if job is not None:
                await self._send(user, "busy: one image at a time (send /cancel to stop it)")
            else:
                self._jobs[user] = asyncio.create_task(self._imagine(user, prompt))
        elif command == "/cancel":
            if job is None:
                await self._send(user, "nothing to cancel")
            else:
                job.cancel()
        else:
            await self._send(user, "commands: /imagine <prompt>, /cancel")

    async def _imagine(self, user: str, prompt: str) -> None:
        try:
            result = await self._client.generate(prompt, size="512x512")
            image = await self._client.download(result.images[0])
        except asyncio.CancelledError:
            await self._send(user, "cancelled")
            raise
        except AtomaImagesError as error:
            await self._send(user, f"sorry, that failed: {error}")
        else:
            await self._send(user, image)
        finally:
            del self._jobs[user]

    async def run(self, inbox: asyncio.Queue[tuple[str, str] | None]) -> None:
        """Handle messages until ``None`` arrives, then wait for the generations in flight."""
        while (message := await inbox.get()) is not None:
            await self.handle(*message)
        await asyncio.gather(*self._jobs.values(), return_exceptions=True)


async def demo() -> None:
    async def send(user: str, reply: bytes | str) -> None:
        if isinstance(reply, bytes):
            kind = "PNG" if reply.startswith(b"\x89PNG") else "data"
            reply = f"{len(reply):,} bytes of {kind}"
        print(f"bot -> {user}: {reply}", flush=True)

    async with contextlib.AsyncExitStack() as stack:
        if os.environ.get("ATOMA_API_KEY") or os.environ.get("ATOMASDK_BEARER_AUTH"):
            client = AsyncImagesClient()
        else:
            server = await stack.enter_async_context(FakeAtomaServer(latency=0.5))
            print(f"No ATOMA_API_KEY set: using the fake server at {server.base_url}")
            client = AsyncImagesClient("fake-key", base_url=server.base_url)
        bot = ImageBot(await stack.enter_async_context(client), send)
        inbox: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        running = asyncio.create_task(bot.run(inbox))
        for user, text in [
            ("alice", "/imagine a red fox in the snow"),
            ("bob", "/imagine an owl at night"),
            ("alice", "/imagine a second one"),
            ("bob", "/cancel"),
        ]:
            print(f"{user} -> bot: {text}", flush=True)
            await inbox.put((user, text))
            await asyncio.sleep(0.05)
        await inbox.put(None)
        await running


if __name__ == "__main__":
    asyncio.run(demo())
