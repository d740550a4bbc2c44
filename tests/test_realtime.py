"""Local Realtime with the official clients: task progress, credit balance, RLS, restarts, dropped connections."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import uuid
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
import websockets
from psycopg.rows import dict_row
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from starlette.websockets import WebSocketState

from lib.local.stack import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
JS_DIR = ROOT / "tests" / "realtime_js"
WAIT_S = 10.0


# -- helpers ---------------------------------------------------------------------------


class Subscription:
    """一个官方 Python 客户端的订阅：收到的变更与订阅状态"""

    def __init__(self, url: str, token: str, client: AsyncRealtimeClient | None = None, **client_options):
        self.client = client or AsyncRealtimeClient(url, token, **client_options)
        self.changes: asyncio.Queue = asyncio.Queue()
        self.states: list[RealtimeSubscribeStates] = []
        self.errors: list[str] = []
        self.subscribed = asyncio.Event()

    def _on_state(self, state, error):
        self.states.append(state)
        if error is not None:
            self.errors.append(str(error))
        if state == RealtimeSubscribeStates.SUBSCRIBED:
            self.subscribed.set()

    async def subscribe(self, topic: str, *bindings: dict, expect_ok: bool = True) -> Subscription:
        channel = self.client.channel(topic)
        # A change committed before the subscription (the user's own signup, just before) can still reach it when
        # the feed runs a little behind, as in the cloud, where subscriptions are matched as the WAL is read:
        # each test sees only what it does after subscribing.
        since = datetime.now(UTC) - timedelta(milliseconds=1)  # commit times are cut to the millisecond

        def received(change: dict) -> None:
            committed = datetime.fromisoformat(change["data"]["commit_timestamp"].replace("Z", "+00:00"))
            if committed >= since:
                self.changes.put_nowait(change)

        for binding in bindings:
            channel.on_postgres_changes(callback=received, **binding)
        await channel.subscribe(self._on_state)
        if expect_ok:
            assert self.states[-1] == RealtimeSubscribeStates.SUBSCRIBED, (self.states, self.errors)
        self.channel = channel
        return self

    async def next(self, wait_s: float = WAIT_S) -> dict:
        return await asyncio.wait_for(self.changes.get(), wait_s)

    async def none_within(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self.changes.empty(), self.changes.get_nowait()

    async def close(self):
        self.client.auto_reconnect = False
        await self.client.close()


@pytest.fixture
def realtime_url(live_server) -> str:
    return f"{live_server}/realtime/v1"


@pytest.fixture
async def subscriptions():
    opened: list[Subscription] = []

    def make(url: str, token: str, **options) -> Subscription:
        sub = Subscription(url, token, **options)
        opened.append(sub)
        return sub

    yield make
    for sub in opened:
        await sub.close()


def create_task(conn, user_id: str, cost: int = 10) -> str:
    row = conn.execute(
        "select public.create_task(%s, 'image.upscale', '{}'::jsonb, %s, null, null, '{}', null) as r", (user_id, cost)
    ).fetchone()
    return row["r"]["task"]["id"]


def run_task(conn, task_id: str, steps=(0.25, 0.5, 0.75)) -> None:
    attempt = conn.execute("select attempts from public.claim_task(%s)", (task_id,)).fetchone()["attempts"]
    for progress in steps:
        conn.execute(
            "select * from public.report_task_progress(%s::uuid, %s::int, %s::real, %s::text)",
            (task_id, attempt, progress, "step"),
        )
    conn.execute("select public.finish_task(%s, 'completed', '{\"ok\": true}'::jsonb)", (task_id,))


def fail_task(conn, task_id: str) -> None:
    conn.execute("select * from public.claim_task(%s)", (task_id,))
    conn.execute("select public.finish_task(%s, 'failed', null, null, '{\"code\": \"boom\"}'::jsonb)", (task_id,))


# -- tasks -----------------------------------------------------------------------------


async def test_owner_receives_every_status_change_in_order(realtime_url, make_user, db_conn, subscriptions):
    a = await make_user()
    task_id = create_task(db_conn, a.id)
    sub = await subscriptions(realtime_url, a.token).subscribe(
        f"task:{task_id}", {"event": "*", "table": "tasks", "schema": "public", "filter": f"id=eq.{task_id}"}
    )
    run_task(db_conn, task_id)

    seen = []
    while not seen or seen[-1]["data"]["record"]["status"] != "completed":
        seen.append(await sub.next())
    statuses = [m["data"]["record"]["status"] for m in seen]
    progress = [m["data"]["record"]["progress"] for m in seen]
    assert statuses == ["processing"] * 4 + ["completed"]
    assert progress == sorted(progress) and progress[-1] == 1
    first = seen[0]
    assert first["ids"] == [sub.channel.postgres_changes_callbacks[0].id]
    data = first["data"]
    assert (data["schema"], data["table"], data["type"], data["errors"]) == ("public", "tasks", "UPDATE", None)
    assert data["old_record"]["status"] == "queued"  # REPLICA IDENTITY FULL: the whole old row
    assert data["record"]["id"] == task_id and data["record"]["user_id"] == a.id
    assert {"name": "progress", "type": "float4"} in data["columns"]
    assert data["commit_timestamp"].endswith("Z")
    await sub.none_within(0.3)


async def test_insert_and_in_filter(realtime_url, make_user, db_conn, subscriptions):
    a = await make_user()
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "mine",
        {"event": "INSERT", "table": "tasks", "filter": f"user_id=eq.{a.id}"},
        {"event": "UPDATE", "table": "tasks", "filter": "status=in.(completed,failed)"},
    )
    insert_id, update_id = (cb.id for cb in sub.channel.postgres_changes_callbacks)
    task_id = create_task(db_conn, a.id)
    inserted = await sub.next()
    assert inserted["data"]["type"] == "INSERT" and inserted["ids"] == [insert_id]
    assert "old_record" not in inserted["data"]
    run_task(db_conn, task_id)
    finished = await sub.next()
    assert finished["ids"] == [update_id] and finished["data"]["record"]["status"] == "completed"
    await sub.none_within(0.3)


async def test_filter_values_compare_as_the_columns_type(realtime_url, make_user, db_conn, subscriptions):
    """As Supabase casts a filter's value to the column's type: an upper-case uuid, a time written with a space."""
    a = await make_user()
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "typed",
        {"event": "INSERT", "table": "tasks", "filter": f"user_id=eq.{a.id.upper()}"},
        {"event": "INSERT", "table": "tasks", "filter": f"created_at=lt.{tomorrow}"},
    )
    create_task(db_conn, a.id)
    change = await sub.next()  # one message, naming every binding it matched
    assert sorted(change["ids"]) == sorted(cb.id for cb in sub.channel.postgres_changes_callbacks)


async def test_other_users_rows_are_never_delivered(realtime_url, make_user, db_conn, subscriptions):
    a, b = await make_user(), await make_user()
    sub_b = await subscriptions(realtime_url, b.token).subscribe(
        "all-tasks", {"event": "INSERT", "table": "tasks"}, {"event": "UPDATE", "table": "tasks"}
    )
    run_task(db_conn, create_task(db_conn, a.id))
    await sub_b.none_within(1.0)

    # B's subscription works: B's own task arrives, and only B's.
    own = create_task(db_conn, b.id)
    assert (await sub_b.next())["data"]["record"]["id"] == own
    await sub_b.none_within(0.3)


async def test_deletes_are_not_published(realtime_url, make_user, db_conn, subscriptions):
    """Rows go away only with their account, and a gone row cannot be checked against RLS: no subscriber, not even
    its owner or one whose filter would match the old values, hears of a deletion."""
    a, b = await make_user(), await make_user()
    anything = await subscriptions(realtime_url, b.token).subscribe("all", {"event": "*", "table": "tasks"})
    probing = await subscriptions(realtime_url, b.token).subscribe(
        "probe", {"event": "DELETE", "table": "tasks", "filter": f"user_id=eq.{a.id}"}
    )
    theirs, own = create_task(db_conn, a.id), create_task(db_conn, b.id)
    assert (await anything.next())["data"]["record"]["id"] == own  # the insert it may see
    db_conn.execute("delete from public.tasks where id = any(%s::uuid[])", ([theirs, own],))
    db_conn.execute("delete from auth.users where id = %s", (a.id,))
    await anything.none_within(0.5)
    await probing.none_within(0.1)


async def test_anon_hears_nothing(live_server, make_user, db_conn):
    """A socket without a token is anon: it may join, but no table is readable to it."""
    a = await make_user()
    url = live_server.replace("http", "ws") + "/realtime/v1/websocket?vsn=2.0.0"
    async with websockets.connect(url) as ws:
        binding = {"event": "*", "schema": "public", "table": "tasks"}
        await ws.send(json.dumps(["1", "1", "realtime:anon", "phx_join", {"config": {"postgres_changes": [binding]}}]))
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))[4]["status"] == "ok"
        task = create_task(db_conn, a.id)
        db_conn.execute("delete from public.tasks where id = %s", (task,))
        with pytest.raises(TimeoutError):
            while True:  # only system messages may come
                message = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                assert message[3] != "postgres_changes", message


@pytest.mark.parametrize(
    ("filter_text", "reason"),
    [
        ("id=eq.undefined", 'invalid input syntax for type uuid: "undefined"'),
        ("progress=gt.half", 'invalid input syntax for type real: "half"'),
        (f"id=in.({','.join(str(uuid.uuid4()) for _ in range(101))})", "too many values for `in` filter. Maximum 100"),
    ],
)
async def test_filters_the_cloud_refuses_are_refused(live_server, make_user, filter_text, reason):
    a = await make_user()
    url = live_server.replace("http", "ws") + f"/realtime/v1/websocket?vsn=2.0.0&apikey={a.token}"
    async with websockets.connect(url) as ws:
        binding = {"event": "UPDATE", "schema": "public", "table": "tasks", "filter": filter_text}
        await ws.send(json.dumps(["1", "1", "realtime:f", "phx_join", {"config": {"postgres_changes": [binding]}}]))
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))[4]["status"] == "ok"  # then, as the cloud:
        *_, event, payload = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        assert (event, payload["status"], payload["extension"]) == ("system", "error", "postgres_changes")
        assert reason in payload["message"]


async def test_an_in_filter_of_a_hundred_values_is_taken(realtime_url, make_user, db_conn, subscriptions):
    a = await make_user()
    task_id = create_task(db_conn, a.id)
    ids = ",".join([task_id, *(str(uuid.uuid4()) for _ in range(99))])
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "hundred", {"event": "UPDATE", "table": "tasks", "filter": f"id=in.({ids})"}
    )
    run_task(db_conn, task_id, steps=())
    assert (await sub.next())["data"]["record"]["id"] == task_id


async def test_invalid_or_expired_token_is_refused_and_gets_no_data(realtime_url, make_user, db_conn, subscriptions):
    from lib.local.stack import local_issuer

    a = await make_user()
    expired = local_issuer().mint(a.id, a.email, seconds=-3600)
    forged = a.token[:-4] + ("AAAA" if not a.token.endswith("AAAA") else "BBBB")
    subs = []
    for token in ("not-a-token", expired, forged):
        sub = await subscriptions(realtime_url, token).subscribe(
            f"bad:{token[-6:]}", {"event": "*", "table": "tasks"}, expect_ok=False
        )
        assert sub.states[0] == RealtimeSubscribeStates.CHANNEL_ERROR, sub.states
        subs.append(sub)
    run_task(db_conn, create_task(db_conn, a.id))
    for sub in subs:
        await sub.none_within(0.3)


async def test_raw_socket_rejects_bad_token_without_data(live_server, make_user, db_conn):
    a = await make_user()
    url = live_server.replace("http", "ws") + "/realtime/v1/websocket?vsn=1.0.0"
    async with websockets.connect(url) as ws:
        join = {"config": {"postgres_changes": [{"event": "*", "schema": "public", "table": "tasks"}]}}
        await ws.send(
            json.dumps(
                {
                    "topic": "realtime:x",
                    "event": "phx_join",
                    "ref": "1",
                    "join_ref": "1",
                    "payload": {**join, "access_token": "bad"},
                }
            )
        )
        msg = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        assert msg["event"] == "phx_reply" and msg["payload"]["status"] == "error"
        run_task(db_conn, create_task(db_conn, a.id))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 1.0)


async def test_vsn_2_array_frames_heartbeat_and_leave(live_server, make_user, db_conn):
    a = await make_user()
    url = live_server.replace("http", "ws") + f"/realtime/v1/websocket?vsn=2.0.0&apikey={a.token}"
    async with websockets.connect(url) as ws:

        async def recv():
            return json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))

        await ws.send(json.dumps([None, "1", "phoenix", "heartbeat", {}]))
        assert await recv() == [None, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}]
        binding = {"event": "UPDATE", "schema": "public", "table": "credit_accounts"}
        await ws.send(json.dumps(["2", "2", "realtime:c", "phx_join", {"config": {"postgres_changes": [binding]}}]))
        join_ref, ref, topic, event, payload = await recv()
        assert (join_ref, ref, topic, event, payload["status"]) == ("2", "2", "realtime:c", "phx_reply", "ok")
        [server_binding] = payload["response"]["postgres_changes"]
        assert server_binding == {**binding, "id": server_binding["id"]}
        system = await recv()
        assert system[2:4] == ["realtime:c", "system"] and system[4]["message"] == "Subscribed to PostgreSQL"
        create_task(db_conn, a.id)
        change = await recv()
        while change[4]["data"]["record"]["balance"] == 100:  # the signup grant, delivered late by a busy feed
            change = await recv()
        assert change[1] is None and change[3] == "postgres_changes"
        assert change[4]["ids"] == [server_binding["id"]] and change[4]["data"]["record"]["balance"] == 90
        await ws.send(json.dumps(["2", "3", "realtime:c", "phx_leave", {}]))
        assert (await recv())[3:] == ["phx_reply", {"status": "ok", "response": {}}]
        # As Phoenix closes a channel that left: phx_close under the join's ref, after the reply.
        assert await recv() == ["2", "2", "realtime:c", "phx_close", {}]
        await ws.send(json.dumps(["5", "5", "realtime:never-joined", "phx_leave", {}]))
        assert await recv() == ["5", "5", "realtime:never-joined", "phx_reply", {"status": "ok", "response": {}}]
        task = create_task(db_conn, a.id)
        db_conn.execute("delete from public.tasks where id = %s", (task,))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 1.0)


async def test_broadcast_and_presence_are_acknowledged_and_other_events_ignored(live_server, make_user):
    """如 Supabase：broadcast 与 presence 得到回复，不认识的事件不回复（客户端等到超时），socket 照常"""
    a = await make_user()
    url = live_server.replace("http", "ws") + f"/realtime/v1/websocket?vsn=2.0.0&apikey={a.token}"
    async with websockets.connect(url) as ws:

        async def recv():
            return json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))

        await ws.send(json.dumps(["1", "1", "realtime:e", "phx_join", {"config": {"broadcast": {"ack": True}}}]))
        assert (await recv())[4]["status"] == "ok"
        ok = {"status": "ok", "response": {}}
        broadcast = {"type": "broadcast", "event": "hi", "payload": {}}
        await ws.send(json.dumps(["1", "2", "realtime:e", "broadcast", broadcast]))
        assert await recv() == ["1", "2", "realtime:e", "phx_reply", ok]
        track = {"type": "presence", "event": "track", "payload": {}}
        await ws.send(json.dumps(["1", "3", "realtime:e", "presence", track]))
        assert await recv() == ["1", "3", "realtime:e", "phx_reply", ok]
        await ws.send(json.dumps(["1", "4", "realtime:e", "no_such_event", {}]))
        await ws.send(json.dumps([None, "5", "phoenix", "heartbeat", {}]))
        assert await recv() == [None, "5", "phoenix", "phx_reply", ok]  # nothing came for ref 4


async def test_many_filtered_joins_at_once_share_one_database_connection(live_server, make_user):
    a = await make_user()
    url = live_server.replace("http", "ws") + f"/realtime/v1/websocket?vsn=2.0.0&apikey={a.token}"
    binding = {"event": "UPDATE", "schema": "public", "table": "tasks", "filter": f"user_id=eq.{a.id}"}

    async def join(n: int) -> str:
        async with websockets.connect(url) as ws:
            await ws.send(
                json.dumps(["1", "1", f"realtime:t{n}", "phx_join", {"config": {"postgres_changes": [binding]}}])
            )
            while (frame := json.loads(await asyncio.wait_for(ws.recv(), 30)))[3] != "system":
                assert frame[4]["status"] == "ok", frame
            return frame[4]["message"]

    messages = await asyncio.gather(*(join(n) for n in range(150)))  # more than Postgres takes connections
    assert set(messages) == {"Subscribed to PostgreSQL"}


async def test_a_malformed_join_is_refused_and_the_socket_lives_on(live_server, make_user, db_conn):
    a = await make_user()
    url = live_server.replace("http", "ws") + f"/realtime/v1/websocket?vsn=2.0.0&apikey={a.token}"
    async with websockets.connect(url) as ws:

        async def recv():
            return json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))

        binding = {"event": "UPDATE", "schema": "public", "table": "credit_accounts"}
        await ws.send(json.dumps(["1", "1", "realtime:ok", "phx_join", {"config": {"postgres_changes": [binding]}}]))
        assert (await recv())[4]["status"] == "ok"
        assert (await recv())[3] == "system"
        for ref, payload in (("2", {"config": "oops"}), ("3", {"access_token": 12345})):
            await ws.send(json.dumps([ref, ref, f"realtime:bad{ref}", "phx_join", payload]))
            answer = await recv()
            assert (answer[1], answer[3], answer[4]["status"]) == (ref, "phx_reply", "error")
        await ws.send("[" * 100_000)  # nested too deep for any JSON parser
        await ws.send(json.dumps([None, "4", "phoenix", "heartbeat", {}]))
        assert (await recv())[1:4] == ["4", "phoenix", "phx_reply"]
        create_task(db_conn, a.id)  # the channel joined first still gets its changes
        change = await recv()
        assert change[2:4] == ["realtime:ok", "postgres_changes"]


async def test_joins_the_cloud_refuses_before_any_check(live_server, make_user):
    a = await make_user()
    url = live_server.replace("http", "ws") + f"/realtime/v1/websocket?vsn=2.0.0&apikey={a.token}"
    async with websockets.connect(url) as ws:

        async def join(ref: int, topic: str) -> dict:
            await ws.send(json.dumps([str(ref), str(ref), topic, "phx_join", {"config": {}}]))
            answer = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert answer[1] == str(ref), answer
            return answer[4]

        assert await join(1, "tasks") == {"status": "error", "response": {"reason": "unmatched topic"}}
        refused = await join(2, "realtime:")
        assert refused["response"]["reason"] == "TopicNameRequired: You must provide a topic name"
        for n in range(100):
            assert (await join(10 + n, f"realtime:c{n}"))["status"] == "ok"
        refused = await join(200, "realtime:one-more")
        assert refused == {"status": "error", "response": {"reason": "ChannelRateLimitReached: Too many channels"}}
        assert (await join(201, "realtime:c0"))["status"] == "ok"  # a rejoin is not one more


async def test_large_rows_arrive_whole(realtime_url, make_user, db_conn, subscriptions):
    a = await make_user()
    task_id = create_task(db_conn, a.id)
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "big", {"event": "UPDATE", "table": "tasks", "filter": f"id=eq.{task_id}"}
    )
    big = {"frames": ["x" * 100] * 2000}  # ~200 kB, far beyond NOTIFY's 8000 bytes
    db_conn.execute("update public.tasks set result = %s where id = %s", (json.dumps(big), task_id))
    assert (await sub.next())["data"]["record"]["result"] == big


async def test_a_row_over_the_limit_in_bytes_loses_its_big_fields(realtime_url, make_user, db_conn, subscriptions):
    a = await make_user()
    task_id = create_task(db_conn, a.id)
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "big", {"event": "UPDATE", "table": "tasks", "filter": f"id=eq.{task_id}"}
    )
    big = {"text": "日" * 500_000}  # half a million characters, 1.5 MB in UTF-8
    db_conn.execute("update public.tasks set result = %s where id = %s", (json.dumps(big), task_id))
    data = (await sub.next())["data"]
    assert data["errors"] == ["Error 413: Payload Too Large"]
    assert "result" not in data["record"] and data["record"]["id"] == task_id


async def test_refreshed_invalid_token_closes_the_channel(realtime_url, make_user, db_conn, subscriptions):
    a = await make_user()
    sub = await subscriptions(realtime_url, a.token).subscribe("t", {"event": "*", "table": "credit_accounts"})
    await sub.client.set_auth("garbage")
    for _ in range(100):
        if RealtimeSubscribeStates.CLOSED in sub.states:
            break
        await asyncio.sleep(0.05)
    assert RealtimeSubscribeStates.CLOSED in sub.states
    create_task(db_conn, a.id)
    await sub.none_within(0.5)


# -- credits ---------------------------------------------------------------------------


async def test_credit_balance_follows_charge_and_refund(realtime_url, make_user, db_conn, subscriptions):
    a, b = await make_user(), await make_user()
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "credits", {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"}
    )
    task_id = create_task(db_conn, a.id, cost=10)
    create_task(db_conn, b.id, cost=10)
    charged = await sub.next()
    assert charged["data"]["record"]["balance"] == 90 and charged["data"]["old_record"]["balance"] == 100
    fail_task(db_conn, task_id)
    refunded = await sub.next()
    assert refunded["data"]["record"]["balance"] == 100
    await sub.none_within(0.3)


# -- failures --------------------------------------------------------------------------


async def test_feed_survives_a_dropped_database_connection(realtime_url, make_user, db_conn, subscriptions):
    a = await make_user()
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "credits", {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"}
    )
    killed = db_conn.execute(
        "select count(pg_terminate_backend(pid)) as n from pg_stat_activity"
        " where application_name like 'spool-realtime-%%'"
    ).fetchone()["n"]
    assert killed >= 2
    create_task(db_conn, a.id, cost=10)  # committed while the feed may still be reconnecting
    assert (await sub.next(wait_s=15))["data"]["record"]["balance"] == 90
    create_task(db_conn, a.id, cost=10)
    assert (await sub.next())["data"]["record"]["balance"] == 80


@contextmanager
def visibility_check_wrapped(conn, before: str):
    """把 feed 的可见性检查换成先执行 before（plpgsql 语句）再调原函数的版本，之后恢复原函数"""
    conn.execute("alter function realtime_local.visible_rows(jsonb) rename to visible_rows_intact")
    conn.execute(
        f"""create function realtime_local.visible_rows(p_checks jsonb) returns table (check_no int, item jsonb)
        language plpgsql as $$
        begin
          {before}
          return query select * from realtime_local.visible_rows_intact(p_checks);
        end $$"""
    )
    try:
        yield
    finally:
        conn.execute("drop function realtime_local.visible_rows(jsonb)")
        conn.execute("alter function realtime_local.visible_rows_intact(jsonb) rename to visible_rows")


@contextmanager
def visibility_check_dies_once(conn):
    """让 feed 的下一次可见性检查断开它自己的数据库连接（一次），之后恢复原函数"""
    conn.execute("create sequence realtime_local.visible_rows_calls")
    dies_once = """if nextval('realtime_local.visible_rows_calls') = 1 then
            perform pg_terminate_backend(pg_backend_pid());
            perform pg_sleep(5);
          end if;"""
    try:
        with visibility_check_wrapped(conn, dies_once):
            yield
    finally:
        conn.execute("drop sequence realtime_local.visible_rows_calls")


def visibility_check_is_slow(conn, seconds: float):
    """让 feed 的可见性检查每次先等待 seconds 秒，之后恢复原函数"""
    return visibility_check_wrapped(conn, f"perform pg_sleep({seconds});")


async def test_a_change_checked_while_the_token_is_refreshed_arrives(realtime_url, make_user, db_conn, subscriptions):
    from lib.local.stack import local_issuer

    a = await make_user()
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "credits", {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"}
    )
    with visibility_check_is_slow(db_conn, 1.5):
        create_task(db_conn, a.id, cost=10)
        await asyncio.sleep(0.5)  # the feed is checking it
        await sub.client.set_auth(local_issuer().mint(a.id, a.email))
        assert (await sub.next())["data"]["record"]["balance"] == 90


async def test_a_change_checked_while_its_channel_is_left_is_not_sent(live_server, make_user, db_conn):
    a = await make_user()
    url = live_server.replace("http", "ws") + f"/realtime/v1/websocket?vsn=2.0.0&apikey={a.token}"
    async with websockets.connect(url) as ws:

        async def recv():
            return json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))

        binding = {"event": "UPDATE", "schema": "public", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"}
        await ws.send(json.dumps(["1", "1", "realtime:c", "phx_join", {"config": {"postgres_changes": [binding]}}]))
        assert (await recv())[4]["status"] == "ok"
        assert (await recv())[3] == "system"
        with visibility_check_is_slow(db_conn, 1.5):
            create_task(db_conn, a.id, cost=10)
            await asyncio.sleep(0.5)  # the feed is checking it
            await ws.send(json.dumps(["1", "2", "realtime:c", "phx_leave", {}]))
            assert (await recv())[3:] == ["phx_reply", {"status": "ok", "response": {}}]
            assert (await recv())[3] == "phx_close"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 2.0)


async def test_a_change_whose_delivery_lost_the_database_arrives_after_reconnecting(
    realtime_url, make_user, db_conn, subscriptions
):
    a = await make_user()
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "credits", {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"}
    )
    with visibility_check_dies_once(db_conn):
        create_task(db_conn, a.id, cost=10)
        assert (await sub.next(wait_s=15))["data"]["record"]["balance"] == 90
    create_task(db_conn, a.id, cost=10)
    assert (await sub.next())["data"]["record"]["balance"] == 80


async def test_a_change_committed_out_of_order_while_the_feed_was_away_arrives(
    realtime_url, make_user, db_conn, postgres, subscriptions
):
    a, b = await make_user(), await make_user()
    sub_a = await subscriptions(realtime_url, a.token).subscribe(
        "credits-a", {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"}
    )
    sub_b = await subscriptions(realtime_url, b.token).subscribe(
        "credits-b", {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{b.id}"}
    )
    with psycopg.connect(postgres, row_factory=dict_row) as slow:
        create_task(slow, a.id, cost=10)  # its change is numbered now and committed last
        create_task(db_conn, b.id, cost=10)
        assert (await sub_b.next())["data"]["record"]["balance"] == 90
        db_conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name like 'spool-realtime-%%'"
        )
        while db_conn.execute(
            "select count(*) as n from pg_stat_activity where application_name = 'spool-realtime-listen'"
        ).fetchone()["n"]:
            await asyncio.sleep(0.01)
        slow.commit()  # nobody listens: only the catch-up can find it
    assert (await sub_a.next(wait_s=20))["data"]["record"]["balance"] == 90


async def test_client_reconnects_after_a_server_restart(live_server, make_user, db_conn, subscriptions, tmp_path):
    a = await make_user()
    port = free_port()
    base, env = f"http://127.0.0.1:{port}", {"SPOOL_PORT": str(port)}
    proc = await asyncio.to_thread(start_server, base, env=env, log_path=tmp_path / "server.log")
    try:
        sub = await subscriptions(
            f"http://127.0.0.1:{port}/realtime/v1", a.token, max_retries=10, initial_backoff=0.5
        ).subscribe("credits", {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"})
        create_task(db_conn, a.id, cost=10)
        assert (await sub.next())["data"]["record"]["balance"] == 90

        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        sub.subscribed.clear()
        proc = await asyncio.to_thread(start_server, base, env=env, log_path=tmp_path / "server.log")
        await asyncio.wait_for(sub.subscribed.wait(), 30)  # the client rejoined on its own

        create_task(db_conn, a.id, cost=10)
        assert (await sub.next())["data"]["record"]["balance"] == 80
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- bindings the cloud refuses --------------------------------------------------------


@pytest.mark.parametrize(
    ("filter_text", "reason"),
    [
        ("id=like.x", "Error parsing `filter` params"),
        ("id", "Error parsing `filter` params"),
        ("id=in.1,2", "`in` filter value must be wrapped by parentheses"),
    ],
)
async def test_a_malformed_filter_is_answered_after_the_join(live_server, make_user, filter_text, reason):
    """As the cloud: the join succeeds, then a system message with status error names the filter's problem."""
    a = await make_user()
    url = live_server.replace("http", "ws") + f"/realtime/v1/websocket?vsn=2.0.0&apikey={a.token}"
    async with websockets.connect(url) as ws:
        binding = {"event": "UPDATE", "schema": "public", "table": "tasks", "filter": filter_text}
        await ws.send(json.dumps(["1", "1", "realtime:f", "phx_join", {"config": {"postgres_changes": [binding]}}]))
        answer = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        assert answer[4]["status"] == "ok", answer
        assert answer[4]["response"]["postgres_changes"][0]["filter"] == filter_text
        *_, event, payload = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        assert (event, payload["status"], payload["extension"]) == ("system", "error", "postgres_changes")
        assert reason in payload["message"]


async def test_one_refused_binding_leaves_the_channel_without_changes(realtime_url, make_user, db_conn, subscriptions):
    """As the cloud, which subscribes a channel's bindings all or none: its valid bindings deliver nothing either."""
    a = await make_user()
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "mixed",
        {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"},
        {"event": "UPDATE", "table": "tasks", "filter": "progress=lt.zzz"},
        expect_ok=False,
    )
    for _ in range(100):
        if sub.errors:
            break
        await asyncio.sleep(0.05)
    assert sub.states[:2] == [RealtimeSubscribeStates.SUBSCRIBED, RealtimeSubscribeStates.CHANNEL_ERROR], sub.states
    assert "invalid input syntax" in sub.errors[0]
    run_task(db_conn, create_task(db_conn, a.id))
    await sub.none_within(1.0)


# -- tokens ----------------------------------------------------------------------------


async def test_a_token_expired_seconds_ago_is_refused_at_join(realtime_url, make_user, db_conn, subscriptions):
    """Realtime allows no leeway on `exp`: the join is refused, never answered ok and closed afterwards."""
    from lib.local.stack import local_issuer

    a = await make_user()
    token = local_issuer().mint(a.id, a.email, seconds=-5)
    sub = await subscriptions(realtime_url, token).subscribe(
        "late", {"event": "*", "table": "credit_accounts"}, expect_ok=False
    )
    assert sub.states[0] == RealtimeSubscribeStates.CHANNEL_ERROR, sub.states
    assert json.loads(sub.errors[0])["reason"].startswith("InvalidJWTToken: Token has expired ")
    create_task(db_conn, a.id)
    await sub.none_within(0.5)


async def test_a_token_expiring_on_an_open_channel_closes_it(realtime_url, make_user, db_conn, subscriptions):
    from lib.local.stack import local_issuer

    a = await make_user()
    token = local_issuer().mint(a.id, a.email, seconds=2)
    sub = await subscriptions(realtime_url, token).subscribe(
        "short", {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"}
    )
    for _ in range(100):
        if RealtimeSubscribeStates.CLOSED in sub.states:
            break
        await asyncio.sleep(0.05)
    assert sub.states[-2:] == [RealtimeSubscribeStates.CHANNEL_ERROR, RealtimeSubscribeStates.CLOSED], sub.states
    assert json.loads(sub.errors[-1])["message"].startswith("Token has expired ")
    assert json.loads(sub.errors[-1])["message"].endswith(" seconds ago")
    create_task(db_conn, a.id)
    await sub.none_within(0.5)


@pytest.mark.parametrize("token", [None, "sb_publishable_local"])
async def test_an_access_token_without_a_user_token_changes_nothing(
    realtime_url, make_user, db_conn, subscriptions, token
):
    """As the cloud: an access_token message carrying no token, or the project key, is ignored."""
    a = await make_user()
    sub = await subscriptions(realtime_url, a.token).subscribe(
        "keep", {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"}
    )
    await sub.client.set_auth(token)
    await asyncio.sleep(0.2)
    create_task(db_conn, a.id, cost=10)
    assert (await sub.next())["data"]["record"]["balance"] == 90
    assert RealtimeSubscribeStates.CLOSED not in sub.states


async def test_a_refreshed_token_of_another_user_changes_whose_rows_arrive(
    realtime_url, make_user, db_conn, subscriptions
):
    a, b = await make_user(), await make_user()
    sub = await subscriptions(realtime_url, a.token).subscribe("who", {"event": "UPDATE", "table": "credit_accounts"})
    await sub.client.set_auth(b.token)
    await asyncio.sleep(0.3)
    create_task(db_conn, a.id, cost=10)
    create_task(db_conn, b.id, cost=20)
    assert (await sub.next())["data"]["record"]["user_id"] == b.id
    await sub.none_within(0.5)


# -- filters, leave and rejoin ---------------------------------------------------------


FILTER_CASES = [  # the balance goes from 100 to 90
    ("eq.90", True),
    ("eq.91", False),
    ("neq.100", True),
    ("neq.90", False),
    ("lt.91", True),
    ("lt.90", False),
    ("lte.90", True),
    ("lte.89", False),
    ("gt.89", True),
    ("gt.90", False),
    ("gte.90", True),
    ("gte.91", False),
    ("in.(1,90)", True),
    ("in.(1,2)", False),
]


async def test_each_filter_operator(realtime_url, make_user, db_conn, subscriptions):
    a, b = await make_user(), await make_user()
    bindings = [{"event": "UPDATE", "table": "credit_accounts", "filter": f"balance={f}"} for f, _ in FILTER_CASES]
    sub = await subscriptions(realtime_url, a.token).subscribe("ops", *bindings)
    create_task(db_conn, b.id, cost=10)  # the same balance, another user's row: never delivered
    create_task(db_conn, a.id, cost=10)
    change = await sub.next()
    assert change["data"]["record"]["user_id"] == a.id
    matched = {
        cb.filter.removeprefix("balance=") for cb in sub.channel.postgres_changes_callbacks if cb.id in change["ids"]
    }
    assert matched == {f for f, hit in FILTER_CASES if hit}


async def test_leave_then_join_the_same_topic_again(realtime_url, make_user, db_conn, subscriptions):
    a = await make_user()
    binding = {"event": "UPDATE", "table": "credit_accounts", "filter": f"user_id=eq.{a.id}"}
    first = await subscriptions(realtime_url, a.token).subscribe("again", binding)
    await first.channel.unsubscribe()
    for _ in range(100):
        if RealtimeSubscribeStates.CLOSED in first.states:
            break
        await asyncio.sleep(0.05)
    create_task(db_conn, a.id, cost=10)
    await first.none_within(0.5)  # left: nothing more arrives

    second = Subscription(realtime_url, a.token, client=first.client)
    await second.subscribe("again", binding)  # the same socket, the same topic
    create_task(db_conn, a.id, cost=10)
    assert (await second.next())["data"]["record"]["balance"] == 80
    await first.none_within(0.1)


# -- a client that does not read -------------------------------------------------------


class _StuckWebSocket:
    """一个从不读取的客户端：发送永远阻塞"""

    application_state = WebSocketState.CONNECTED

    def __init__(self):
        self.closed_with = None

    async def receive(self):
        await asyncio.Event().wait()

    async def send_text(self, text):
        await asyncio.Event().wait()

    async def close(self, code=1000, reason=None):
        self.closed_with = code


async def test_a_client_that_does_not_read_is_dropped_once_its_outbox_holds_too_many_bytes():
    from lib.local.realtime.channels import Hub
    from lib.local.realtime.socket import OUTBOX_LIMIT_BYTES, ClientConnection

    ws = _StuckWebSocket()
    conn = ClientConnection(ws, "2.0.0", None, SimpleNamespace(hub=Hub()))
    serving = asyncio.create_task(conn.serve())
    await asyncio.sleep(0)
    frame = "x" * (1 << 20)  # a large row
    held = 0
    for _ in range(OUTBOX_LIMIT_BYTES // len(frame) + 10):
        conn.send_text(frame)
        held = max(held, conn.outbox_bytes)
    await asyncio.wait_for(serving, WAIT_S)  # dropped, as the cloud drops a socket over its memory limit
    assert held <= OUTBOX_LIMIT_BYTES
    assert conn.outbox_bytes == 0 and ws.closed_with == 1013


# -- the JavaScript client -------------------------------------------------------------


def _node_ready() -> bool:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return False
    if not (JS_DIR / "node_modules" / "@supabase" / "realtime-js").exists():
        # ci: exactly the versions package-lock.json pins, never a rewrite of it
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, timeout=180)
        if result.returncode != 0:
            return False
    return True


@asynccontextmanager
async def js_subscriber(live_server: str, token: str, task_id: str):
    """subscribe.mjs 的一个进程：next(kind) 读下一行该类的输出，set_auth 调用 client.setAuth"""
    if not await asyncio.to_thread(_node_ready):
        pytest.skip("node/npm or the @supabase/realtime-js package is not available")
    env = {**os.environ, "REALTIME_URL": f"{live_server}/realtime/v1", "ACCESS_TOKEN": token, "TASK_ID": task_id}
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        "node", "subscribe.mjs", cwd=JS_DIR, env=env, stdin=pipe, stdout=pipe, stderr=pipe
    )

    async def next(kind: str) -> dict:
        while True:
            raw = await asyncio.wait_for(proc.stdout.readline(), 20)
            if not raw:
                raise AssertionError("node exited: " + (await proc.stderr.read()).decode()[-2000:])
            line = json.loads(raw)
            if kind in line:
                return line

    async def set_auth(new_token: str | None) -> None:
        proc.stdin.write((json.dumps({"setAuth": new_token}) + "\n").encode())
        await proc.stdin.drain()

    try:
        yield SimpleNamespace(next=next, set_auth=set_auth)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()


async def test_supabase_realtime_js_receives_task_progress(live_server, make_user, db_conn):
    a = await make_user()
    task_id = create_task(db_conn, a.id)
    async with js_subscriber(live_server, a.token, task_id) as js:
        status = await js.next("status")
        assert status["status"] == "SUBSCRIBED", status
        assert status["vsn"] == "2.0.0"
        run_task(db_conn, task_id)
        changes = []
        while not changes or changes[-1]["new"]["status"] != "completed":
            changes.append((await js.next("change"))["change"])
        assert [c["eventType"] for c in changes] == ["UPDATE"] * 5
        progress = [c["new"]["progress"] for c in changes]
        assert progress == sorted(progress) and progress[-1] == 1
        assert changes[0]["old"]["status"] == "queued" and changes[0]["table"] == "tasks"


async def test_supabase_realtime_js_set_auth(live_server, make_user, db_conn):
    """setAuth with a fresh token keeps the channel; with the project key changes nothing; with a token that expires,
    the channel is closed with the cloud's system message."""
    from lib.local.stack import local_issuer

    a = await make_user()
    task_id = create_task(db_conn, a.id)
    async with js_subscriber(live_server, a.token, task_id) as js:
        assert (await js.next("status"))["status"] == "SUBSCRIBED"
        await js.set_auth(local_issuer().mint(a.id, a.email))
        await js.set_auth("sb_publishable_local")
        run_task(db_conn, task_id, steps=())
        assert (await js.next("change"))["change"]["new"]["status"] == "processing"
        await js.set_auth(local_issuer().mint(a.id, a.email, seconds=1))
        while (system := (await js.next("system"))["system"])["status"] == "ok":
            pass
        assert system["extension"] == "system" and system["message"].startswith("Token has expired")
        assert (await js.next("status"))["status"] == "CLOSED"


def test_the_change_log_prunes_itself_without_any_subscriber(db_conn):
    """Local only: the feed prunes changes once someone joined; a stack used with curl alone must not grow."""
    stale = db_conn.execute(
        "insert into realtime_local.changes (schema_name, table_name, type, record, committed_at)"
        " values ('public', 'tasks', 'INSERT', '{}', now() - interval '1 hour') returning id"
    ).fetchone()["id"]
    db_conn.execute(f"alter table realtime_local.changes alter column id restart with {(stale // 1000 + 1) * 1000}")
    db_conn.execute("insert into auth.users (id, email) values (gen_random_uuid(), 'prune@example.com')")
    # The new user's credit account (a published table) is change number 1000·k, which prunes.
    left = db_conn.execute("select count(*) as n from realtime_local.changes where id = %s", (stale,)).fetchone()
    assert left["n"] == 0


async def test_supabase_realtime_js_receives_each_new_message_of_a_job(live_server, make_user, db_conn, monkeypatch):
    """处理器换一句说明（如“Saving image”）时立即写出，即使距上次写入不足 0.5 s、进度也没有多 5 %"""
    from gpu_jobs.runner import run_task_async
    from lib import catalog

    spec = catalog.ModelSpec(
        key="test.phases",
        kind="image",
        title="phases",
        params=catalog.Params,
        price=lambda p, a: 5,
        price_rule="5",
        handler="tests.job_handlers:phases",
        timeout_s=60,
    )
    monkeypatch.setitem(catalog.CATALOG, spec.key, spec)
    a = await make_user()
    task_id = db_conn.execute(
        "select public.create_task(%s, 'test.phases', '{}'::jsonb, 5, null, null, '{}', null) as r", (a.id,)
    ).fetchone()["r"]["task"]["id"]
    async with js_subscriber(live_server, a.token, task_id) as js:
        assert (await js.next("status"))["status"] == "SUBSCRIBED"
        assert await run_task_async(task_id) == "completed"
        messages = []
        while not messages or messages[-1] != "Done":
            messages.append((await js.next("change"))["change"]["new"]["message"])
    assert "Saving image" in messages, messages
