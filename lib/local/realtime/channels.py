"""Joined channels, their subscribers' claims, and the registry the feed fans out from."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import jwt

from lib.auth import get_token_verifier
from lib.errors import Unauthorized
from lib.local.realtime.bindings import Binding

ANON_CLAIMS = {"role": "anon"}
PROJECT_KEY_PREFIXES = ("sb_publishable_", "sb_secret_")  # project API keys, not user tokens


class Outbox(Protocol):
    vsn: str

    def send_text(self, text: str) -> None: ...


class TokenExpired(Unauthorized):
    """令牌已过期（Realtime 对 exp 不留余量）"""


@dataclass(eq=False)
class Channel:
    """一个已加入的频道：连接、主题、订阅与订阅者的 claims"""

    conn: Outbox
    topic: str
    join_ref: str | None
    bindings: list[Binding]
    claims: dict
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)
    active: bool = True  # false once left or closed: a batch already in flight sends it nothing more

    @property
    def role(self) -> str:
        return "authenticated" if self.claims.get("role") == "authenticated" else "anon"

    @property
    def claims_json(self) -> str:
        return json.dumps(self.claims, sort_keys=True, separators=(",", ":"))

    def cancel_expiry(self) -> None:
        """取消令牌过期计时"""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None


async def resolve_claims(token: str | None) -> dict:
    """把 access_token 变成订阅者的 claims：用户令牌须通过校验；无令牌或项目密钥按 anon 处理"""
    if token is not None and not isinstance(token, str):
        raise Unauthorized("access_token must be a string.")
    if not token or token.startswith(PROJECT_KEY_PREFIXES):
        return dict(ANON_CLAIMS)
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise Unauthorized("Invalid access token.") from None
    if unverified.get("role") == "anon":
        # An anon key grants nothing beyond the anon role: keep none of its other claims.
        return dict(ANON_CLAIMS)
    if expired := expiry_message(unverified.get("exp")):
        raise TokenExpired(expired)  # Realtime allows no leeway on exp, unlike the API
    claims = await get_token_verifier().averify(token)
    if claims.get("role") != "authenticated":
        raise Unauthorized("Unsupported role in access token.")
    return claims


def expiry_message(exp) -> str | None:
    """令牌已过期时 Supabase Realtime 的说法；未过期（或没有数字 exp）则 None"""
    if not isinstance(exp, int | float) or isinstance(exp, bool) or exp > time.time():
        return None
    return f"Token has expired {int(time.time() - exp)} seconds ago"


class Hub:
    """按表索引的频道注册表"""

    def __init__(self):
        self._by_table: dict[tuple[str, str], set[Channel]] = defaultdict(set)

    def add(self, channel: Channel) -> None:
        """登记频道的全部订阅"""
        for key in self._keys(channel):
            self._by_table[key].add(channel)

    def remove(self, channel: Channel) -> None:
        """注销频道"""
        channel.active = False
        channel.cancel_expiry()
        for key in self._keys(channel):
            channels = self._by_table.get(key)
            if channels is not None:
                channels.discard(channel)
                if not channels:
                    del self._by_table[key]

    def channels_for(self, schema: str, table: str) -> Iterator[Channel]:
        """可能关心这张表变更的频道"""
        seen: set[int] = set()
        for key in ((schema, table), (schema, "*"), ("*", "*")):
            for channel in tuple(self._by_table.get(key, ())):
                if id(channel) not in seen:
                    seen.add(id(channel))
                    yield channel

    def __len__(self) -> int:
        return len({id(c) for channels in self._by_table.values() for c in channels})

    @staticmethod
    def _keys(channel: Channel) -> set[tuple[str, str]]:
        return {(b.schema, b.table) for b in channel.bindings}
