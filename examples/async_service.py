"""An aiohttp.web service: ``POST /imagine {"prompt": "..."}`` answers with the PNG.

    python examples/async_service.py [--host 127.0.0.1] [--port 8080]
    curl -s -X POST localhost:8080/imagine -d '{"prompt": "a red fox"}' -o fox.png

One AsyncImagesClient is created at startup and closed at cleanup (``cleanup_ctx``) and
shared by every request: one connection pool for the whole service. Without ATOMA_API_KEY the
service starts the package's fake server and uses that.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator

from aiohttp import web

from atoma_images import AsyncImagesClient, AtomaImagesError, InvalidRequestError, RateLimitError
from atoma_images.testing import FakeAtomaServer

CLIENT = web.AppKey("client", AsyncImagesClient)


async def images_client(app: web.Application) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        if os.environ.get("ATOMA_API_KEY") or os.environ.get("ATOMASDK_BEARER_AUTH"):
            client = AsyncImagesClient()
        else:
            server = await stack.enter_async_context(FakeAtomaServer())
            print(f"No ATOMA_API_KEY set: using the fake server at {server.base_url}", flush=True)
            client = AsyncImagesClient("fake-key", base_url=server.base_url)
        app[CLIENT] = await stack.enter_async_context(client)
        yield  # the service runs here; leaving the stack closes the client (and fake server)


async def imagine(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "send a JSON object"}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"error": "send a JSON object"}, status=400)
    client = request.app[CLIENT]
    try:
        result = await client.generate(body.get("prompt"), size=body.get("size", "512x512"))
        png = await client.download(result.images[0])
    except InvalidRequestError as error:
        return web.json_response({"error": str(error)}, status=400)
    except RateLimitError as error:
        headers = {"Retry-After": str(round(error.retry_after))} if error.retry_after else {}
        return web.json_response({"error": str(error)}, status=429, headers=headers)
    except AtomaImagesError as error:
        return web.json_response({"error": str(error)}, status=502)
    return web.Response(body=png, content_type="image/png")


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(images_client)
    app.router.add_post("/imagine", imagine)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    options = parser.parse_args()
    web.run_app(make_app(), host=options.host, port=options.port)
