"""Phoenix channel frames as Supabase Realtime speaks them: JSON objects (vsn 1.0.0) or arrays (vsn 2.0.0)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

VSN_1 = "1.0.0"
VSN_2 = "2.0.0"
VERSIONS = (VSN_1, VSN_2)
PHOENIX_TOPIC = "phoenix"
TOPIC_PREFIX = "realtime:"


def dumps(value: Any) -> str:
    """紧凑 JSON 编码"""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class Frame:
    """一条 Phoenix 消息"""

    topic: str
    event: str
    payload: Any
    ref: str | None = None
    join_ref: str | None = None


class ProtocolError(ValueError):
    """无法解析的消息"""


def decode(text: str, vsn: str) -> Frame:
    """解析客户端发来的文本帧"""
    try:
        raw = json.loads(text)
    except ValueError:
        raise ProtocolError("not JSON") from None
    except RecursionError:
        raise ProtocolError("nested too deep") from None
    if vsn == VSN_2:
        if not isinstance(raw, list) or len(raw) != 5:
            raise ProtocolError("a 2.0.0 frame is [join_ref, ref, topic, event, payload]")
        join_ref, ref, topic, event, payload = raw
    else:
        if not isinstance(raw, dict):
            raise ProtocolError("a 1.0.0 frame is a JSON object")
        join_ref, ref, topic, event, payload = (raw.get(k) for k in ("join_ref", "ref", "topic", "event", "payload"))
    if not isinstance(topic, str) or not isinstance(event, str):
        raise ProtocolError("topic and event must be strings")
    return Frame(topic, event, payload if isinstance(payload, dict) else {}, _ref(ref), _ref(join_ref))


def _ref(value: Any) -> str | None:
    return None if value is None else str(value)


def encode(frame: Frame, vsn: str, *, payload_json: str | None = None) -> str:
    """把消息编码为文本帧（payload_json：已编码好的 payload，供扇出时复用）"""
    payload = payload_json if payload_json is not None else dumps(frame.payload)
    if vsn == VSN_2:
        return f"[{dumps(frame.join_ref)},{dumps(frame.ref)},{dumps(frame.topic)},{dumps(frame.event)},{payload}]"
    return (
        f'{{"topic":{dumps(frame.topic)},"event":{dumps(frame.event)},"payload":{payload},'
        f'"ref":{dumps(frame.ref)},"join_ref":{dumps(frame.join_ref)}}}'
    )


def reply(frame: Frame, status: str, response: dict) -> Frame:
    """对一条客户端消息的 phx_reply"""
    return Frame(frame.topic, "phx_reply", {"status": status, "response": response}, frame.ref, frame.join_ref)


def subtopic(topic: str) -> str:
    """去掉 realtime: 前缀的频道名"""
    return topic[len(TOPIC_PREFIX) :] if topic.startswith(TOPIC_PREFIX) else topic
