"""atoma-images: an async-first client for Atoma's OpenAI-compatible image generation API.

```python
with ImagesClient() as client:                     # key from $ATOMA_API_KEY
    client.generate("a lighthouse at dawn").images[0].save("lighthouse.png")

async with AsyncImagesClient() as client:          # for asyncio services
    result = await client.generate("a lighthouse at dawn")
```

Where this module fits, and why it is built so: docs/architecture.md.
"""

from __future__ import annotations

from typing import Any

from ._batch import Batch, BatchResult, BatchSummary, SyncBatch
from ._budget import Budget
from ._client import AsyncImagesClient
from ._dialect import Dialect
from ._discovery import Health, ModelInfo
from ._errors import (
    AmbiguousOutcomeError,
    AmbiguousTimeoutError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AtomaImagesError,
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    BudgetExceededError,
    BudgetUnavailableError,
    ClientClosedError,
    ExtraNotInstalledError,
    GatewayTimeoutError,
    InsufficientBalanceError,
    InternalServerError,
    InvalidRequestError,
    LockedError,
    NoImageError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RateLimitUnavailableError,
    RequestTooLargeError,
    ResponseIntegrityError,
    ResponseValidationError,
    ServerError,
    ServiceUnavailableError,
    StackUnavailableError,
    UnprocessableEntityError,
)
from ._hooks import (
    AttemptFinished,
    AttemptStarted,
    CallFinished,
    CallInfo,
    Hooks,
    LoggingHooks,
    RetryScheduled,
)
from ._limits import BudgetLike, Per, RateLimit, RateLimiter, Reservation
from ._models import GeneratedImage, ImageRequest, ImagesResponse
from ._retry import RetryPolicy
from ._sync import ImagesClient
from ._timeout import Timeout
from ._usage import Usage

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AmbiguousOutcomeError",
    "AmbiguousTimeoutError",
    "AsyncImagesClient",
    "AtomaImagesError",
    "AttemptFinished",
    "AttemptStarted",
    "AuthenticationError",
    "BadGatewayError",
    "BadRequestError",
    "Batch",
    "BatchResult",
    "BatchSummary",
    "Budget",
    "BudgetExceededError",
    "BudgetLike",
    "BudgetUnavailableError",
    "CallFinished",
    "CallInfo",
    "ClientClosedError",
    "Dialect",
    "ExtraNotInstalledError",
    "GatewayTimeoutError",
    "GeneratedImage",
    "Health",
    "Hooks",
    "ImageRequest",
    "ImagesClient",
    "ImagesResponse",
    "InsufficientBalanceError",
    "InternalServerError",
    "InvalidRequestError",
    "LockedError",
    "LoggingHooks",
    "ModelInfo",
    "NoImageError",
    "NotFoundError",
    "Per",
    "PermissionDeniedError",
    "RateLimit",
    "RateLimitError",
    "RateLimitUnavailableError",
    "RateLimiter",
    "RequestTooLargeError",
    "Reservation",
    "ResponseIntegrityError",
    "ResponseValidationError",
    "RetryPolicy",
    "RetryScheduled",
    "ServerError",
    "ServiceUnavailableError",
    "StackUnavailableError",
    "SyncBatch",
    "Timeout",
    "UnprocessableEntityError",
    "Usage",
]


def __getattr__(name: str) -> Any:
    # The version comes from the installed metadata, read only when someone asks.
    if name == "__version__":
        from ._version import package_version  # noqa: PLC0415

        return package_version()
    raise AttributeError(f"module 'atoma_images' has no attribute {name!r}")
