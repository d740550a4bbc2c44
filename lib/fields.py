"""Field types shared by the API's request models and the catalog's params."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Strict


def unstorable(value: str) -> str | None:
    """文本存不进 Postgres 的原因（NUL、孤立代理项），可存为 None"""
    # Postgres text (and jsonb) can hold neither: refused here, not as a database error. A lone surrogate comes
    # from a client that cut a string inside an emoji's UTF-16 pair.
    if "\x00" in value:
        return "must not contain NUL (\\u0000) characters"
    try:
        value.encode()
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds half of a surrogate pair)"
    return None


def _storable(value: str) -> str:
    if reason := unstorable(value):
        raise ValueError(reason)
    return value


STORABLE = AfterValidator(_storable)  # list it after any StringConstraints, which apply to the str before it
Text = Annotated[str, STORABLE]
# A JSON number, not true/false nor "1" (pydantic's lax mode reads those as 1): a client bug shows as a 422.
Number = Annotated[float, Strict()]
Whole = Annotated[int, Strict()]


class RequestBody(BaseModel):
    """请求体的基类：未知字段是 422（拼错的字段名不会被悄悄忽略）"""

    model_config = ConfigDict(extra="forbid")
