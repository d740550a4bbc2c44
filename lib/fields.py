"""Field types shared by the API's request models and the catalog's params."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Strict, StringConstraints, model_validator
from pydantic_core import PydanticCustomError


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


def text_up_to(max_length: int) -> Any:
    """可存储、至多 max_length 个字符的文本（可放进 `| None` 与路径参数）"""
    # Field(max_length=...) on `Text | None` or beside Path() lands after the validator, where pydantic can only
    # say "Value should have at most N items after validation": here the length is the string's own.
    return Annotated[str, StringConstraints(max_length=max_length), STORABLE]


# A JSON number, not true/false nor "1" (pydantic's lax mode reads those as 1): a client bug shows as a 422.
Number = Annotated[float, Strict()]
Whole = Annotated[int, Strict()]


# More unknown fields than this are no typo: they are refused as one error. One error each made a 1 MiB body of
# tens of thousands of them cost the API half a second of work and a 5 MB answer.
MAX_UNKNOWN_FIELDS = 20


class RequestBody(BaseModel):
    """请求体的基类：未知字段是 422（拼错的字段名不会被悄悄忽略）"""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_fields(cls, data: Any) -> Any:
        """未知字段过多时整体拒绝，只报一条错误"""
        if isinstance(data, dict) and len(data) > len(cls.model_fields) + MAX_UNKNOWN_FIELDS:
            unknown = sum(1 for key in data if key not in cls.model_fields)
            if unknown > MAX_UNKNOWN_FIELDS:
                count = {"count": f"{unknown:,}"}
                raise PydanticCustomError("too_many_fields", "{count} fields it does not take", count)
        return data
