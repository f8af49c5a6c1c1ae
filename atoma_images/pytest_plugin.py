"""pytest fixtures for testing code that uses atoma-images, offline and without a key.

Installing the package registers them with pytest: nothing to configure. They live in the
top-level module ``_atoma_images_pytestplugin``, which pytest loads in every run of every
project that has the package installed, so that loading it imports neither ``atoma_images``
nor aiohttp; this module is their documented home.

```python
def test_my_thumbnailer(atoma_sync_client, atoma_server):
    make_thumbnail(atoma_sync_client, "a red fox")
    assert atoma_server.posts[0].json()["size"] == "256x256"
```

- ``atoma_server``: a running `FakeAtomaServer` (on its own thread), scriptable with
  ``atoma_server.enqueue(Reply(...))``;
- ``atoma_client``: an `AsyncImagesClient` bound to it, for async tests (pytest-asyncio,
  anyio or any runner that runs the test in an asyncio loop);
- ``atoma_sync_client``: an `ImagesClient` bound to it.

While a fixture is in use, retries skip their waits (`atoma_images.testing.set_testing`).
"""

from _atoma_images_pytestplugin import (
    ATOMA_TEST_KEY,
    atoma_client,
    atoma_server,
    atoma_sync_client,
)

__all__ = ["ATOMA_TEST_KEY", "atoma_client", "atoma_server", "atoma_sync_client"]
