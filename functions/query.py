"""Query parameters several routes share: a filter sent empty (`?status=`) is the same as one left out."""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import BeforeValidator

T = TypeVar("T")


def _empty_is_unset(value: object) -> object:
    """空字符串当作没给"""
    return None if value == "" else value


# Browsers' URLSearchParams send a filter the page left blank as `?status=`: that filters nothing, it is no 422.
Filter = Annotated[T | None, BeforeValidator(_empty_is_unset)]
