"""Request headers several routes share."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header

# Any text without control characters (a NUL cannot be stored), at most 200 characters.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Makes a retried request return the first one's result instead of doing it again.",
    ),
]
