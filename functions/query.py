"""Query parameters several routes share: a filter or page size sent empty (`?status=`, `?limit=`) is the same as
one left out, and a parameter a route takes may be given only once."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, TypeVar, get_origin

from fastapi import Query, Request
from pydantic import BeforeValidator
from pydantic_core import PydanticUseDefault

from lib.errors import InvalidInput

T = TypeVar("T")


def _empty_is_unset(value: object) -> object:
    """空字符串当作没给"""
    return None if value == "" else value


# Browsers' URLSearchParams send a filter the page left blank as `?status=`: that filters nothing, it is no 422.
Filter = Annotated[T | None, BeforeValidator(_empty_is_unset)]


def _empty_is_default(value: object) -> object:
    """空字符串当作没给（取默认值）"""
    if value == "":
        raise PydanticUseDefault()
    return value


def page_size(most: int) -> Any:
    """分页大小参数（1..most；空值取路由的默认值）"""
    # `?limit=` is the default page, not a 422. The validator goes after Query: before it, the OpenAPI schema
    # loses its minimum and maximum.
    return Annotated[int, Query(ge=1, le=most), BeforeValidator(_empty_is_default)]


async def given_once(request: Request) -> None:
    """路由接受的查询参数每个只能给一次（?status=a&status=b 不会悄悄只按最后一个过滤）→ 422"""
    route = request.scope.get("route")
    fields = getattr(getattr(route, "dependant", None), "query_params", [])
    # A list parameter (?id=a&id=b) is meant to be given many times.
    taken = {field.alias for field in fields if get_origin(field.field_info.annotation) not in (list, set, tuple)}
    counts = Counter(name for name, _ in request.query_params.multi_items() if name in taken)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise InvalidInput(
            "The request is not valid.",
            details=[{"field": f"query.{name}", "message": "given more than once"} for name in repeated],
        )
