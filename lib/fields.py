"""Field types shared by the API's request models and the catalog's params."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _storable(value: str) -> str:
    if "\x00" in value:  # Postgres text (and jsonb) cannot hold it: refused here, not as a database error
        raise ValueError("must not contain NUL (\\u0000) characters")
    return value


NUL_FREE = AfterValidator(_storable)  # list it after any StringConstraints, which apply to the str before it
Text = Annotated[str, NUL_FREE]
