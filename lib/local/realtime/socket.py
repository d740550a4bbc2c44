"""The websocket at /realtime/v1/websocket: one Phoenix socket per client, its channels, heartbeats and auth."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketState

from lib.config import get_settings
from lib.errors import ServiceUnavailable, Unauthorized
from lib.local.realtime.bindings import BindingError, parse_bindings
from lib.local.realtime.channels import (
    PROJECT_KEY_PREFIXES,
    Channel,
    Hub,
    TokenExpired,
    expiry_message,
    resolve_claims,
)
from lib.local.realtime.feed import ChangeFeed
from lib.local.realtime.protocol import (
    PHOENIX_TOPIC,
    TOPIC_PREFIX,
    VERSIONS,
    VSN_1,
    Frame,
    ProtocolError,
    decode,
    encode,
    reply,
    subtopic,
)

log = logging.getLogger("spool.local.realtime")

IDLE_TIMEOUT_S = 60.0  # Phoenix closes a socket that sent nothing (not even a heartbeat) for this long
READY_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0  # a client that reads nothing cannot take the close frame either
# Bytes a client may leave unread before it is dropped: as the cloud kills a socket's process past its
# heap limit (WEBSOCKET_MAX_HEAP_SIZE, 50 MB by default); the client reconnects and rejoins.
OUTBOX_LIMIT_BYTES = 50_000_000
CLOSE_TRY_AGAIN_LATER = 1013
MAX_CHANNELS_PER_CLIENT = 100  # the cloud's default (TENANT_MAX_CHANNELS_PER_CLIENT)


class LocalRealtime:
    """本地 Realtime 服务：频道注册表与变更流"""

    def __init__(self, db_url: str):
        self.hub = Hub()
        self.feed = ChangeFeed(self.hub, db_url)


_realtime: LocalRealtime | None = None


def get_realtime() -> LocalRealtime:
    """获取本进程的 Realtime 服务"""
    global _realtime
    if _realtime is None:
        _realtime = LocalRealtime(get_settings().supabase_db_url)
    return _realtime


@asynccontextmanager
async def lifespan(_app):
    """服务器停止时关闭变更流"""
    yield
    global _realtime
    if _realtime is not None:
        realtime, _realtime = _realtime, None
        await realtime.feed.stop()


router = APIRouter(tags=["Local"], lifespan=lifespan)


@router.websocket("/realtime/v1/websocket")
async def realtime_websocket(websocket: WebSocket):
    """Supabase Realtime 的本地子集（postgres_changes）"""
    vsn = websocket.query_params.get("vsn", VSN_1)
    if vsn not in VERSIONS:
        await websocket.close(code=1008, reason=f"unsupported vsn {vsn}")
        return
    await websocket.accept()
    await ClientConnection(websocket, vsn, websocket.query_params.get("apikey"), get_realtime()).serve()


class ClientConnection:
    """一个 websocket 客户端"""

    def __init__(self, websocket: WebSocket, vsn: str, apikey: str | None, realtime: LocalRealtime):
        self.ws = websocket
        self.vsn = vsn
        self.apikey = apikey
        self.realtime = realtime
        self.channels: dict[str, Channel] = {}
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.outbox_bytes = 0  # memory held by the queued frames
        self.dropped = False
        self._writer: asyncio.Task | None = None

    # -- outgoing ------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        """排队发送一帧（不阻塞；未读数据超过上限的客户端被断开）"""
        if self.dropped:
            return
        size = sys.getsizeof(text)
        if self.outbox_bytes + size > OUTBOX_LIMIT_BYTES:
            self._drop_slow_client()
            return
        self.outbox_bytes += size
        self.outbox.put_nowait(text)

    def _drop_slow_client(self) -> None:
        """断开读不过来的客户端并立即释放它的待发数据"""
        log.warning("realtime client left %s bytes unread; dropping it", self.outbox_bytes)
        self.dropped = True
        self.outbox = asyncio.Queue()
        self.outbox_bytes = 0
        if self._writer is not None:
            self._writer.cancel()

    def send(self, frame: Frame) -> None:
        """排队发送一条消息"""
        self.send_text(encode(frame, self.vsn))

    async def _write(self) -> None:
        while True:
            text = await self.outbox.get()
            self.outbox_bytes -= sys.getsizeof(text)
            await self.ws.send_text(text)

    # -- the connection ------------------------------------------------------------

    async def serve(self) -> None:
        """收发直到客户端离开、空闲超时或写不出去"""
        self._writer = asyncio.create_task(self._write())
        reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait({reader, self._writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, self._writer):
                task.cancel()
            for task in (reader, self._writer):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for channel in self.channels.values():
                self.realtime.hub.remove(channel)
            self.channels.clear()
            if self.ws.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.ws.close(CLOSE_TRY_AGAIN_LATER if self.dropped else 1000), CLOSE_TIMEOUT_S
                    )

    async def _read(self) -> None:
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), IDLE_TIMEOUT_S)
            except TimeoutError:
                log.info("realtime client sent nothing for %ss; closing", IDLE_TIMEOUT_S)
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                continue  # binary frames carry broadcasts, which this subset does not relay
            try:
                frame = decode(text, self.vsn)
            except ProtocolError as exc:
                log.debug("ignoring a malformed realtime frame: %s", exc)
                continue
            try:
                await self.handle(frame)
            except Exception:  # one bad frame must not close the socket and every channel on it
                log.exception("realtime frame %s on %s failed", frame.event, frame.topic)
                if frame.ref is not None:
                    self.send(reply(frame, "error", {"reason": "The message could not be handled."}))

    async def handle(self, frame: Frame) -> None:
        """处理一条客户端消息"""
        if frame.topic == PHOENIX_TOPIC:
            if frame.event == "heartbeat":
                self.send(reply(frame, "ok", {}))
            return
        if frame.event == "phx_join":
            await self.join(frame)
        elif frame.event == "phx_leave":
            channel = self.channels.get(frame.topic)
            self.drop(frame.topic)
            self.send(reply(frame, "ok", {}))
            if channel is not None:  # as Phoenix: a channel that was joined is then closed
                self.send(Frame(channel.topic, "phx_close", {}, channel.join_ref, channel.join_ref))
        elif frame.topic not in self.channels:
            self.send(reply(frame, "error", {"reason": "unmatched topic"}))
        elif frame.event == "access_token":
            await self.refresh_token(frame)
        elif frame.event in ("broadcast", "presence") and frame.ref is not None:
            # Not part of this subset: acknowledged, relayed to no one. Other events get no answer, as in the cloud.
            self.send(reply(frame, "ok", {}))

    # -- channels ------------------------------------------------------------------

    async def join(self, frame: Frame) -> None:
        """加入频道：校验令牌、解析订阅、回复 id，然后发 system 消息"""
        if refusal := self._join_refusal(frame.topic):
            self.send(reply(frame, "error", {"reason": refusal}))
            return
        self.drop(frame.topic)  # a rejoin replaces the old membership
        config = frame.payload.get("config") or {}
        if not isinstance(config, dict):
            self.send(reply(frame, "error", {"reason": "config must be an object"}))
            return
        try:
            claims = await resolve_claims(frame.payload.get("access_token") or self.apikey)
            bindings = parse_bindings(config.get("postgres_changes"))
        except TokenExpired as exc:
            self.send(reply(frame, "error", {"reason": f"InvalidJWTToken: {exc.message}"}))
            return
        except (Unauthorized, ServiceUnavailable, BindingError) as exc:
            self.send(reply(frame, "error", {"reason": getattr(exc, "message", str(exc))}))
            return
        feed = self.realtime.feed
        if bindings and not await feed.wait_ready(READY_TIMEOUT_S):
            self.send(reply(frame, "error", {"reason": "Realtime is not connected to the database yet."}))
            return
        problems = await feed.check_bindings(bindings) if bindings else []
        # As the cloud subscribes a channel's bindings in one transaction: one refused, none subscribed.
        subscribed = [] if problems else bindings
        channel = Channel(self, frame.topic, frame.join_ref or frame.ref, subscribed, claims)
        response = {"postgres_changes": [{**b.params, "id": b.id} for b in bindings]}
        self.send(reply(frame, "ok", response))
        self.channels[frame.topic] = channel
        self.realtime.hub.add(channel)
        self._schedule_expiry(channel)
        if bindings:
            status, message = ("error", "; ".join(problems)) if problems else ("ok", "Subscribed to PostgreSQL")
            self.system(channel, status, message, "postgres_changes")

    def _join_refusal(self, topic: str) -> str | None:
        """Supabase 在做任何检查之前就拒绝的加入：不是 realtime: 主题、没有频道名、频道过多"""
        if not topic.startswith(TOPIC_PREFIX):
            return "unmatched topic"
        if topic == TOPIC_PREFIX:
            return "TopicNameRequired: You must provide a topic name"
        if topic not in self.channels and len(self.channels) >= MAX_CHANNELS_PER_CLIENT:
            return "ChannelRateLimitReached: Too many channels"
        return None

    async def refresh_token(self, frame: Frame) -> None:
        """频道上的 access_token 刷新；无效则关闭频道；不是用户令牌（空、项目密钥）则不理会，如 Supabase"""
        channel = self.channels[frame.topic]
        token = frame.payload.get("access_token")
        if not isinstance(token, str) or token.startswith(PROJECT_KEY_PREFIXES):
            return
        try:
            channel.claims = await resolve_claims(token)
        except Unauthorized as exc:
            self.close_channel(channel, exc.message)
            return
        except ServiceUnavailable:  # the sign-in keys are out of reach for now: the token it has stays until it expires
            return
        self._schedule_expiry(channel)

    def drop(self, topic: str) -> None:
        """离开频道（不通知客户端）"""
        channel = self.channels.pop(topic, None)
        if channel is not None:
            self.realtime.hub.remove(channel)

    def close_channel(self, channel: Channel, reason: str) -> None:
        """服务器端关闭频道：system 错误，然后 phx_close"""
        if self.channels.get(channel.topic) is not channel:
            return
        self.system(channel, "error", reason, "system")
        self.send(Frame(channel.topic, "phx_close", {}, channel.join_ref, channel.join_ref))
        self.drop(channel.topic)

    def system(self, channel: Channel, status: str, message: str, extension: str) -> None:
        """发送 system 消息"""
        payload = {"status": status, "message": message, "extension": extension, "channel": subtopic(channel.topic)}
        self.send(Frame(channel.topic, "system", payload, None, channel.join_ref))

    def _schedule_expiry(self, channel: Channel) -> None:
        channel.cancel_expiry()
        exp = channel.claims.get("exp")
        if isinstance(exp, int | float):
            delay = max(0.0, exp - time.time())
            channel.expiry = asyncio.get_running_loop().call_later(delay, self._expire, channel)

    def _expire(self, channel: Channel) -> None:
        self.close_channel(channel, expiry_message(channel.claims["exp"]) or "Token has expired 0 seconds ago")
