"""A fake Atoma image server, for our tests, your tests and offline demos.

```python
async with FakeAtomaServer() as server:
    async with AsyncImagesClient("any-key", base_url=server.base_url) as client:
        result = await client.generate("a red fox", size="64x64")
    assert len(server.posts) == 1
```

It behaves like the deployed service as docs/contract.md describes it, with its source for
each behaviour: the proxy's Bearer auth, JSON content type, ``model``, ``n`` and ``size``
required (and checked before the key), its error envelope ``{"error": {"code",
"message"}}`` and its ``n * W * H`` bill (``billed_compute_units``); the backend's one image
per request at ``width`` x ``height`` (1280 x 720 without them, rounded up to multiples of
16), its ``"Url"`` (a node-local file name) and ``"B64Json"`` (a data URI), and the node's
``signature`` / ``response_hash``. ``FakeAtomaServer(dialect="openai")`` answers as OpenAI's
images API instead. The images are real PNGs, the same for the same prompt.

Scripted answers replace the next requests' normal handling, in order::

    server.enqueue(Reply(status=429, headers={"Retry-After": "2"}), Reply(status=503))
    server.enqueue(Reply(fault="drop"))

``with FakeAtomaServer() as server:`` runs it on a background thread for synchronous code.

``FakeAtomaServer(confidential=True)`` also plays the node side of confidential generation
(needs the ``confidential`` extra): ``POST /v1/nodes/lock`` answers with a real X25519 key,
and ``POST /v1/confidential/images/generations`` decrypts the request, checks its hash and
its lock, and answers encrypted. ``Reply(tamper=...)`` alters such an answer on its way.

``set_testing(True)`` makes every client's retries skip their waits (the same attempts, no
sleeping), for a test suite that exercises retrying code; ``with set_testing(True):`` turns
it back off at the end. Off by default; the pytest plugin's fixtures turn it on.
"""

from atoma_images._testing_switch import TestingSetting, is_testing, set_testing

from ._faults import Reply
from ._png import make_png
from ._server import FakeAtomaServer, RecordedRequest

__all__ = [
    "FakeAtomaServer",
    "RecordedRequest",
    "Reply",
    "TestingSetting",
    "is_testing",
    "make_png",
    "set_testing",
]
