"""postgres_changes bindings of a join: event, schema, table, filter (`col=eq.v`, `col=in.(a,b)`, ...), binding ids.

Filters only narrow what a subscriber asked for; who may see a row is decided by
Postgres RLS in the feed, never here.
"""

from __future__ import annotations

import json
import math
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

EVENTS = ("*", "INSERT", "UPDATE", "DELETE")
OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "in", "is")


class BindingError(ValueError):
    """无效的订阅参数"""


@dataclass(frozen=True, slots=True)
class Condition:
    """一个过滤条件"""

    column: str
    op: str
    values: tuple[str, ...]
    negate: bool = False
    type: str = "text"  # the column's Postgres type, once the feed knows the table: values compare as that type

    def matches(self, row: dict | None) -> bool:
        """这一行是否满足条件"""
        if row is None or self.column not in row:
            return False
        value = row[self.column]
        if self.op == "is":
            result = _is(value, self.values[0])
        elif value is None:
            result = False
        elif self.op in ("eq", "in"):
            result = any(_compare(value, v, self.type) == 0 for v in self.values)
        elif self.op == "neq":
            result = _compare(value, self.values[0], self.type) != 0
        else:
            order = _compare(value, self.values[0], self.type)
            result = {"lt": order < 0, "lte": order <= 0, "gt": order > 0, "gte": order >= 0}[self.op]
        return result != self.negate


@dataclass(slots=True)
class Binding:
    """一个 postgres_changes 订阅"""

    id: int
    event: str
    schema: str
    table: str
    conditions: tuple[Condition, ...]
    params: dict = field(default_factory=dict)  # as the client sent it, echoed in the join reply
    problem: str | None = None  # why the cloud would not subscribe it, told after the join

    def wants(self, change_type: str, row: dict | None) -> bool:
        """该变更是否落在这个订阅里"""
        if self.event != "*" and self.event != change_type:
            return False
        return all(c.matches(row) for c in self.conditions)


def parse_bindings(raw: Any) -> list[Binding]:
    """解析 join 中的 config.postgres_changes"""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BindingError("postgres_changes must be a list")
    return [parse_binding(item) for item in raw]


def parse_binding(params: Any) -> Binding:
    """解析一个订阅"""
    if not isinstance(params, dict):
        raise BindingError("a postgres_changes binding must be an object")
    event = str(params.get("event") or "*").upper()
    if event not in EVENTS:
        raise BindingError(f"unknown event {params.get('event')!r}")
    schema = params.get("schema") or "public"
    table = params.get("table") or "*"
    if not isinstance(schema, str) or not isinstance(table, str):
        raise BindingError("schema and table must be strings")
    binding = Binding(binding_id(params), event, schema, table, (), dict(params))
    try:
        binding.conditions = _binding_conditions(params.get("filter"), table)
    except BindingError as exc:
        binding.problem = f"Error parsing `filter` params: {exc}"
    return binding


def _binding_conditions(filter_text: Any, table: str) -> tuple[Condition, ...]:
    conditions = parse_filter(filter_text) if filter_text else ()
    if conditions and table == "*":
        raise BindingError("a filter needs a table")
    return conditions


def binding_id(params: dict) -> int:
    """订阅 id：由参数决定（与 Supabase 相同，同样的订阅得到同样的 id），非零且 JS 可安全表示"""
    canonical = json.dumps({k: params.get(k) for k in ("event", "schema", "table", "filter")}, sort_keys=True)
    return (zlib.crc32(canonical.encode()) & 0x7FFFFFF) or 1


def parse_filter(text: str) -> tuple[Condition, ...]:
    """解析 PostgREST 风格的过滤串；逗号分隔的多个条件为 AND"""
    if not isinstance(text, str):
        raise BindingError("filter must be a string")
    return tuple(_parse_condition(part) for part in _split_top_level(text))


def _parse_condition(text: str) -> Condition:
    column, sep, rest = text.partition("=")
    if not sep or not column:
        raise BindingError(_parts(column))  # the cloud names the parts it found
    negate = rest.startswith("not.")
    if negate:
        rest = rest[4:]
    op, dot, value = rest.partition(".")
    if op not in OPERATORS or not dot:
        raise BindingError(_parts(op, value) if dot else _parts(op))
    if op == "in":
        if not (value.startswith("(") and value.endswith(")")):
            raise BindingError("`in` filter value must be wrapped by parentheses")
        values = tuple(_unquote(v) for v in _split_top_level(value[1:-1]))
    elif op == "is":
        if value.lower() not in ("null", "true", "false", "unknown"):
            raise BindingError(f"invalid filter {text!r}: is expects null, true or false")
        values = (value.lower(),)
    else:
        values = (_unquote(value),)
    return Condition(column.strip(), op, values, negate)


def _parts(*parts: str) -> str:
    return "[" + ", ".join(json.dumps(p, ensure_ascii=False) for p in parts) + "]"


def _split_top_level(text: str) -> list[str]:
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _unquote(value: str) -> str:
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _compare(value: Any, expected: str, type: str = "text") -> int:
    """把行中的 JSON 值与过滤串比较：按列的类型（uuid、时间、数字），其余按文本，如 Supabase 把过滤值转成列类型"""
    typed = _as_type(value, type), _as_type(expected, type)
    if None not in typed:
        return (typed[0] > typed[1]) - (typed[0] < typed[1])
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            other = float(expected)
        except ValueError:
            pass
        else:
            if not math.isnan(other):
                return (value > other) - (value < other)
    text = _as_text(value)
    return (text > expected) - (text < expected)


def _as_type(value: Any, type: str) -> Any:
    """A uuid or a time as comparable Python values; None for other types or what does not parse."""
    try:
        if type == "uuid":
            return uuid.UUID(str(value))
        if type in ("timestamptz", "timestamp", "date"):
            moment = datetime.fromisoformat(str(value))
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # the database's time zone is UTC
    except ValueError:
        pass
    return None


def _is(value: Any, expected: str) -> bool:
    if expected == "null":
        return value is None
    if expected == "unknown":
        return value is None
    return value is (expected == "true")
