"""How long a server asks a client to wait: ``Retry-After`` (RFC 9110) and ``retry-after-ms``.

Read as the RFCs write them, not as ``float()`` would: see `parse_retry_after`
(docs/architecture.md, the module map).
"""

from __future__ import annotations

import datetime
import email.utils
import time
from collections.abc import Mapping

__all__ = ["parse_retry_after"]


# The longest wait a server can name, in seconds: RFC 9111 (section 1.2.2) has a cache
# treat a delta-seconds too large to count as 2**31, and so does this client.
_LONGEST_DELAY = float(2**31)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After``, or None.

    ``Retry-After`` is delta-seconds, digits only, or an HTTP-date (RFC 9110, section
    10.2.3): not float()'s ``1e3``, ``inf``, ``1_000`` or `` 5 ``. ``retry-after-ms`` (an
    OpenAI convention) is digits with an optional fraction. No value is longer than 2**31 s.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        whole, dot, fraction = millis.partition(".")
        if _digits(whole) and (not dot or _digits(fraction)):
            return min(float(millis) / 1000, _LONGEST_DELAY)
    value = headers.get("retry-after")
    if value is None:
        return None
    if _digits(value):
        return min(float(value), _LONGEST_DELAY)  # float: no digit limit; too many is inf
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT even when it says -0000
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def _digits(text: str) -> bool:
    # isdigit() alone also takes '²' and Arabic-Indic digits.
    return text.isascii() and text.isdigit()
