from __future__ import annotations

import asyncio
import base64
import os
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
from aiohttp import web

from atoma_images import (
    APIStatusError,
    AsyncImagesClient,
    GeneratedImage,
    ImagesClient,
    ImagesResponse,
    InvalidRequestError,
    NotFoundError,
    ResponseValidationError,
)
from atoma_images._convert import parse_response
from atoma_images._files import image_extension, write_new_images
from atoma_images.testing import FakeAtomaServer, make_png

from helpers import API_KEY, serving
from pngcheck import png_size

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 20
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8


def test_extension_from_magic_bytes() -> None:
    assert image_extension(make_png(1, 1)) == "png"
    assert image_extension(JPEG) == "jpeg"
    assert image_extension(WEBP) == "webp"
    assert image_extension(b"GIF89a") == "bin"
    assert image_extension(b"") == "bin"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_save_all_names_files_after_their_bytes(tmp_path: Path) -> None:
    response = ImagesResponse(
        created=1,
        data=(
            GeneratedImage(b64_json=b64(make_png(4, 3))),
            GeneratedImage(b64_json="data:image/jpeg;base64," + b64(JPEG)),
            GeneratedImage(b64_json=b64(WEBP)),
        ),
    )
    paths = response.save_all(tmp_path / "new" / "dir", stem="fox")
    assert [p.name for p in paths] == ["fox-1.png", "fox-2.jpeg", "fox-3.webp"]
    assert png_size(paths[0]) == (4, 3)
    assert paths[1].read_bytes() == JPEG


def test_save_all_refuses_url_images_with_a_pointer(tmp_path: Path) -> None:
    response = ImagesResponse(created=1, data=(GeneratedImage(url="https://x/y.png"),))
    with pytest.raises(ResponseValidationError, match=r"client\.save_all"):
        response.save_all(tmp_path)
    assert not any(os.scandir(tmp_path))


def test_new_images_never_overwrite_a_file_and_take_the_next_free_name(tmp_path: Path) -> None:
    (tmp_path / "fox-1.png").write_bytes(b"another run's")
    (tmp_path / "fox_2-2.jpeg").write_bytes(b"another program's")
    paths = write_new_images([make_png(1, 1), JPEG], tmp_path, "fox")
    assert [p.name for p in paths] == ["fox_2-1.png", "fox_3-2.jpeg"]
    assert (tmp_path / "fox-1.png").read_bytes() == b"another run's"
    assert (tmp_path / "fox_2-2.jpeg").read_bytes() == b"another program's"
    assert paths[1].read_bytes() == JPEG


@pytest.mark.parametrize("stem", ["", "a/b", "../up"])
def test_save_all_stem_must_be_a_plain_name(tmp_path: Path, stem: str) -> None:
    response = ImagesResponse(created=1, data=(GeneratedImage(b64_json=b64(JPEG)),))
    with pytest.raises(ValueError, match="stem"):
        response.save_all(tmp_path, stem=stem)


async def test_download_url_images_with_the_key_on_the_same_origin(
    url_client: AsyncImagesClient, url_server: FakeAtomaServer, tmp_path: Path
) -> None:
    client, server = url_client, url_server
    result = await client.generate("fox", n=2, size="20x10", response_format="url")
    data = await client.download(result.images[0])
    assert png_size(data) == (20, 10)
    (get,) = [r for r in server.requests if r.method == "GET"]
    assert get.headers["Authorization"] == f"Bearer {API_KEY}"
    paths = await client.save_all(result, tmp_path, stem="fox")
    assert [png_size(p) for p in paths] == [(20, 10), (20, 10)]


async def test_download_of_base64_images_needs_no_request(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    result = await client.generate("fox", size="16x16")
    assert png_size(await client.download(result.images[0])) == (16, 16)
    assert [r.method for r in server.requests] == ["POST"]


async def test_key_is_never_sent_to_another_origin(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    async with FakeAtomaServer(dialect="openai") as elsewhere:
        async with AsyncImagesClient(
            "elsewhere-key", base_url=elsewhere.base_url, dialect="openai"
        ) as other:
            foreign = (await other.generate("owl", size="6x6")).images[0]
        elsewhere.reset()
        assert png_size(await client.download(foreign)) == (6, 6)
        (get,) = elsewhere.requests
        assert "Authorization" not in get.headers
        assert API_KEY not in str(get.headers)


@pytest.fixture
async def redirecting() -> AsyncIterator[str]:
    """A server whose /files/hop redirects to an image on the fake server (another origin)."""

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.router.add_get("/files/hop", hop)
    async with serving(app) as root:
        yield root


async def test_redirect_to_another_origin_drops_the_key(
    url_client: AsyncImagesClient, url_server: FakeAtomaServer, redirecting: str
) -> None:
    server = url_server
    target = (await url_client.generate("fox", size="5x5", response_format="url")).images[0].url
    server.reset()
    # The redirecting host is the client's own origin, so the key goes there, not further.
    async with AsyncImagesClient(API_KEY, base_url=f"{redirecting}/v1") as images:
        data = await images.download(f"{redirecting}/files/hop?to={target}")
    assert png_size(data) == (5, 5)
    (get,) = server.requests
    assert "Authorization" not in get.headers


@pytest.mark.parametrize(
    "url",
    ["image-generation-0b7e.png", "file:///etc/passwd", "ftp://host/x.png", "", "http://"],
)
async def test_only_http_urls_are_fetched(
    client: AsyncImagesClient, server: FakeAtomaServer, url: str
) -> None:
    with pytest.raises(InvalidRequestError, match=r"http\(s\) URL") as info:
        await client.download(GeneratedImage(url=url))
    if url.startswith("image-generation"):
        assert "file name on the server's node" in str(info.value)
    assert server.requests == []


@pytest.fixture
async def with_credentials() -> AsyncIterator[str]:
    """A server whose generation answers with a URL holding ``user:s3cret@`` on its own origin,
    and whose /files/hop redirects to one; it counts the image requests it gets."""
    fetched: list[str] = []

    async def generations(request: web.Request) -> web.Response:
        await request.read()
        url = f"http://user:s3cret@{request.host}/files/fox.png"
        return web.json_response({"created": 1, "data": [{"url": url}]})

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://user:s3cret@{request.host}/files/fox.png")

    async def image(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(body=make_png(2, 2), content_type="image/png")

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/files/hop", hop)
    app.router.add_get("/files/fox.png", image)
    async with serving(app) as root:
        yield root
    assert fetched == []  # neither the key nor the URL's password went anywhere


async def test_a_url_with_a_password_is_a_typed_error_that_never_shows_it(
    with_credentials: str,
) -> None:
    async with AsyncImagesClient(
        API_KEY, base_url=f"{with_credentials}/v1", dialect="openai"
    ) as images:
        result = await images.generate("fox", size="2x2", response_format="url")
        with pytest.raises(InvalidRequestError, match="user:password") as info:
            await images.download(result.images[0])
    assert info.value.field == "image.url"
    assert "s3cret" not in f"{info.value} {info.value!r} {info.value.value!r}"


async def test_a_redirect_to_a_url_with_a_password_is_a_typed_error_that_never_shows_it(
    with_credentials: str,
) -> None:
    async with AsyncImagesClient(API_KEY, base_url=f"{with_credentials}/v1") as images:
        with pytest.raises(APIStatusError, match="user:password") as info:
            await images.download(f"{with_credentials}/files/hop")
    assert info.value.status == 302
    assert "s3cret" not in f"{info.value} {info.value!r} {info.value.headers!r}"


async def test_node_local_file_names_from_the_real_backend(tmp_path: Path) -> None:
    # Only a response parsed outside the client can hold one: generate() refuses it.
    result = parse_response(200, {}, b'{"created": 1, "data": [{"b64_json": "aGk="}]}')
    local = attrs.evolve(result, data=(GeneratedImage(url="image-generation-1.png"),))
    async with AsyncImagesClient("k", base_url="http://127.0.0.1:9/v1") as images:
        with pytest.raises(InvalidRequestError, match="file name on the server's node"):
            await images.save_all(local, tmp_path)
    assert not any(os.scandir(tmp_path))


async def test_expired_url_is_a_not_found_error(
    client: AsyncImagesClient, server: FakeAtomaServer
) -> None:
    with pytest.raises(NotFoundError):
        await client.download(server.base_url.replace("/v1", "/files/gone.png"))


@pytest.mark.parametrize("path", ["/big", "/sized"])
async def test_download_size_cap_holds_with_bounded_memory(endless: str, path: str) -> None:
    async with AsyncImagesClient("k", base_url=f"{endless}/v1") as images:
        tracemalloc.start()
        try:
            with pytest.raises(ResponseValidationError, match="max_bytes"):
                await images.download(endless + path, max_bytes=2**20)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 * 2**20


async def test_dropped_download_is_retried(server: FakeAtomaServer) -> None:
    attempts = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        if attempts == 1 and request.transport is not None:
            request.transport.close()  # a GET bills nothing: safe to try again
        return web.Response(body=make_png(3, 3), content_type="image/png")

    app = web.Application()
    app.router.add_get("/img", flaky)
    async with serving(app) as root, AsyncImagesClient("k", base_url=server.base_url) as images:
        assert png_size(await asyncio.wait_for(images.download(f"{root}/img"), 30)) == (3, 3)
    assert attempts == 2


def test_sync_client_has_the_same_helpers(threaded_server: FakeAtomaServer, tmp_path: Path) -> None:
    import inspect

    for name in ("download", "save_all"):
        assert inspect.signature(getattr(ImagesClient, name)) == inspect.signature(
            getattr(AsyncImagesClient, name)
        )
    with (
        FakeAtomaServer(api_key=API_KEY, dialect="openai") as url_server,
        ImagesClient(API_KEY, base_url=url_server.base_url, dialect="openai") as images,
    ):
        result = images.generate("fox", size="9x7", response_format="url")
        assert png_size(images.download(result.images[0])) == (9, 7)
        (path,) = images.save_all(result, tmp_path, stem="sync")
    assert path.name == "sync-1.png"
    assert png_size(path) == (9, 7)
