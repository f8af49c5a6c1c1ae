"""One replica of a service, for tests/integration/test_redis.py: a process of its own that
fires calls at a fake server through a budget or a rate limit kept in Redis, and prints what
came of them.

    python tests/redis_replica.py BASE_URL REDIS_URL KEY CALLS budget UNITS
    python tests/redis_replica.py BASE_URL REDIS_URL KEY CALLS rate REQUESTS_PER_SECOND
"""

from __future__ import annotations

import asyncio
import json
import sys

from atoma_images import AsyncImagesClient, BudgetExceededError, RetryPolicy
from atoma_images.redis import RedisBudget, RedisRateLimit


async def main(base_url: str, redis_url: str, key: str, calls: int, kind: str, limit: int) -> None:
    budget = rate = None
    if kind == "budget":
        # A machine loaded by the rest of the suite can be slow to answer: the tests check
        # what is spent, not how fast Redis answers.
        budget = RedisBudget(redis_url, key=key, max_compute_units=limit, timeout=30)
    else:
        rate = RedisRateLimit(redis_url, key=key, requests=limit, per="second", timeout=30)
    async with AsyncImagesClient(
        "fake-key",
        base_url=base_url,
        budget=budget,
        rate_limit=rate,
        retries=RetryPolicy(max_retries=0),
    ) as client:
        print(json.dumps({"ready": True}), flush=True)
        outcomes = await asyncio.gather(
            *(client.generate(f"call {i}", size="16x16") for i in range(calls)),
            return_exceptions=True,
        )
    for store in (budget, rate):
        if store is not None:
            await store.aclose()
    print(
        json.dumps(
            {
                "images": sum(not isinstance(o, BaseException) for o in outcomes),
                "refused": sum(isinstance(o, BudgetExceededError) for o in outcomes),
                "other": [repr(o) for o in outcomes if isinstance(o, BaseException)
                          and not isinstance(o, BudgetExceededError)],
            }
        ),
        flush=True,
    )  # fmt: skip


if __name__ == "__main__":
    base_url, redis_url, key, calls, kind, limit = sys.argv[1:]
    asyncio.run(main(base_url, redis_url, key, int(calls), kind, int(limit)))
