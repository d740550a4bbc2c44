"""Local Realtime benchmark: commit-to-delivery latency and delivered messages/s, beside the bare LISTEN/NOTIFY floor.

    .venv/bin/python bench/realtime.py [--subscribers 1,200] [--writes 300] [--seconds 5] [--writers 4]

Starts its own embedded Postgres (temporary SPOOL_HOME) and local server, makes
one user per subscriber, one processing task per user, then drives
report_task_progress. Each subscriber is a raw Phoenix (vsn 1.0.0) websocket
subscribed to its own user's tasks (`user_id=eq.<id>`), and, as a second shape,
to all of `tasks` unfiltered, where RLS alone decides (one RLS lookup per
subscriber per batch). Latency is from just before the writing statement is sent
(autocommit, so it includes the commit) to the frame's arrival at the client.
After each phase it waits for the backlog; a message still missing after 5 s
without any arrival counts as undelivered (`delivered n/m`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def configure() -> None:
    from lib.local.stack import free_port

    os.environ.update(
        {
            "SPOOL_MODE": "local",
            "SPOOL_HOME": tempfile.mkdtemp(prefix="spool-bench-rt-"),
            "SPOOL_HOST": "127.0.0.1",
            "SPOOL_PORT": str(free_port()),
            "SIGNUP_CREDITS": "1000",
            "LOG_LEVEL": "WARNING",
            "STRIPE_SECRET_KEY": "sk_test_local",
            "STRIPE_WEBHOOK_SECRET": "whsec_test_local",
        }
    )
    for name in ("SUPABASE_URL", "SUPABASE_DB_URL", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_JWT_SECRET"):
        os.environ.pop(name, None)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, latencies: list[float], expected: int) -> str:
    ms = [v * 1000 for v in latencies]
    return (
        f"{name:<46} p50 {pct(ms, 0.5):6.2f} ms   p99 {pct(ms, 0.99):6.2f} ms   "
        f"mean {statistics.fmean(ms) if ms else float('nan'):6.2f} ms   delivered {len(ms)}/{expected}"
    )


class Subscriber:
    """一个原始 Phoenix websocket 订阅者，记录每条变更的到达时间"""

    def __init__(self, arrivals: dict[int, float]):
        self.arrivals = arrivals
        self.count = 0

    async def open(self, ws_url: str, token: str, binding: dict) -> None:
        import websockets

        self.ws = await websockets.connect(f"{ws_url}?apikey={token}&vsn=1.0.0", max_queue=None)
        join = {"config": {"postgres_changes": [binding]}, "access_token": token}
        await self.ws.send(json.dumps({"topic": "realtime:b", "event": "phx_join", "payload": join, "ref": "1"}))
        reply = json.loads(await self.ws.recv())
        assert reply["payload"]["status"] == "ok", reply
        system = json.loads(await self.ws.recv())
        assert system["payload"]["status"] == "ok", system
        self.reader = asyncio.create_task(self._read())
        self.beat = asyncio.create_task(self._heartbeat())

    async def _read(self) -> None:
        async for raw in self.ws:
            now = time.perf_counter()
            msg = json.loads(raw)
            if msg["event"] == "postgres_changes":
                self.count += 1
                self.arrivals.setdefault(int(msg["payload"]["data"]["record"]["message"]), now)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(20)
            await self.ws.send(json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": None}))

    async def close(self) -> None:
        self.beat.cancel()
        await self.ws.close()
        self.reader.cancel()


async def notify_floor(db_url: str, writes: int, interval: float) -> list[float]:
    """同一数据库上裸 LISTEN/NOTIFY 的往返（下限）"""
    import psycopg

    sent: dict[int, float] = {}
    latencies: list[float] = []
    async with (
        await psycopg.AsyncConnection.connect(db_url, autocommit=True) as listen,
        await psycopg.AsyncConnection.connect(db_url, autocommit=True) as write,
    ):
        await listen.execute("listen bench_floor")

        async def receive():
            async for n in listen.notifies(stop_after=writes, timeout=10):
                latencies.append(time.perf_counter() - sent[int(n.payload)])

        receiver = asyncio.create_task(receive())
        for seq in range(writes):
            sent[seq] = time.perf_counter()
            await write.execute("select pg_notify('bench_floor', %s)", (str(seq),))
            await asyncio.sleep(interval)
        await receiver
    return latencies


async def setup_users(base: str, db_url: str, n: int) -> list[dict]:
    """建用户、每人一个 processing 任务"""
    import httpx
    import psycopg

    users = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for i in range(n):
            resp = await http.post("/dev/users", json={"email": f"bench{i}-{time.time_ns()}@example.com"})
            users.append(resp.json()["data"])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        for user in users:
            cur = await conn.execute(
                "select (public.create_task(%s, 'image.upscale', '{}'::jsonb, 1, null, null, '{}', null))"
                "->'task'->>'id'",
                (user["user_id"],),
            )
            user["task_id"] = (await cur.fetchone())[0]
            await conn.execute("select public.claim_task(%s)", (user["task_id"],))
    return users


PROGRESS_SQL = "select current from public.report_task_progress(%s::uuid, 1, 0.5, %s)"


async def latency_phase(db_url: str, users: list[dict], arrivals: dict, writes: int, interval: float, seq0: int):
    """逐条写入（有间隔），测提交到送达的延迟"""
    import psycopg

    sent: dict[int, float] = {}
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        for i in range(writes):
            seq = seq0 + i
            task = users[i % len(users)]["task_id"]
            sent[seq] = time.perf_counter()
            await conn.execute(PROGRESS_SQL, (task, str(seq)))
            await asyncio.sleep(interval)
    await _drain(arrivals, sent)
    return [arrivals[s] - t for s, t in sent.items() if s in arrivals]


async def throughput_phase(db_url: str, users: list[dict], arrivals: dict, seconds: float, writers: int, seq0: int):
    """多个写入者尽快报告进度，测每秒送达条数"""
    import psycopg

    sent: dict[int, float] = {}
    counter = iter(range(seq0, seq0 + 10_000_000))
    stop = time.perf_counter() + seconds

    async def writer():
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            while time.perf_counter() < stop:
                seq = next(counter)
                sent[seq] = time.perf_counter()
                await conn.execute(PROGRESS_SQL, (random.choice(users)["task_id"], str(seq)))

    start = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    write_end = time.perf_counter()
    await _drain(arrivals, sent)
    got = [s for s in sent if s in arrivals]
    last = max((arrivals[s] for s in got), default=write_end)
    latencies = [arrivals[s] - sent[s] for s in got]
    return len(sent) / (write_end - start), len(got) / (last - start), latencies, len(sent)


async def _drain(arrivals: dict, sent: dict, quiet_s: float = 5.0, cap_s: float = 300.0) -> None:
    """等积压送完：全部到达，或 quiet_s 秒内没有新消息（其余算作丢失）"""
    deadline = time.perf_counter() + cap_s
    seen, last_new = len(arrivals), time.perf_counter()
    while time.perf_counter() < deadline and not all(s in arrivals for s in sent):
        await asyncio.sleep(0.05)
        if len(arrivals) != seen:
            seen, last_new = len(arrivals), time.perf_counter()
        elif time.perf_counter() - last_new > quiet_s:
            break


async def scenario(base, db_url, ws_url, users, n_subs, shape, args, seq0) -> int:
    arrivals: dict[int, float] = {}
    subs = []
    for user in users[:n_subs]:
        sub = Subscriber(arrivals)
        binding = {"event": "UPDATE", "schema": "public", "table": "tasks"}
        if shape == "own":
            binding["filter"] = f"user_id=eq.{user['user_id']}"
        await sub.open(ws_url, user["access_token"], binding)
        subs.append(sub)
    writing = users[:n_subs]
    what = "own rows (filter)" if shape == "own" else "all tasks (RLS only)"
    label = f"{n_subs} subscriber{'s' if n_subs > 1 else ''}, {what}"
    lat = await latency_phase(db_url, writing, arrivals, args.writes, args.interval, seq0)
    print(summary(f"{label}: latency", lat, args.writes))
    seq0 += args.writes
    write_rate, deliver_rate, load_lat, n = await throughput_phase(
        db_url, writing, arrivals, args.seconds, args.writers, seq0
    )
    print(summary(f"{label}: under load", load_lat, n))
    print(f"{'':<46} {write_rate:8.0f} progress writes/s   {deliver_rate:8.0f} delivered msgs/s")
    for sub in subs:
        await sub.close()
    return seq0 + n


async def run(args, base: str, db_url: str) -> None:
    counts = [int(n) for n in args.subscribers.split(",")]
    users = await setup_users(base, db_url, max(counts))
    ws_url = base.replace("http", "ws") + "/realtime/v1/websocket"
    print(
        f"cpus {os.cpu_count()}, Postgres + server + clients on one machine; paced writes every "
        f"{args.interval * 1000:.0f} ms, then {args.writers} writers for {args.seconds:.0f} s\n"
    )
    floor = await notify_floor(db_url, args.writes, args.interval)
    print(summary("floor: bare LISTEN/NOTIFY round trip", floor, args.writes))
    seq = 0
    for n in counts:
        for shape in ("own", "all") if n > 1 else ("own",):
            seq = await scenario(base, db_url, ws_url, users, n, shape, args, seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", default="1,200")
    parser.add_argument("--writes", type=int, default=300, help="paced writes for the latency figures")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between paced writes")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the throughput phase")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writing connections")
    args = parser.parse_args()
    configure()
    from lib.config import get_settings
    from lib.local import stack

    with stack.prepared():
        settings = get_settings()
        base = stack.local_base_url()
        server = stack.start_server(base, log_path=Path(settings.spool_home) / "server.log")
        try:
            asyncio.run(run(args, base, settings.supabase_db_url))
        finally:
            server.terminate()
            server.wait(15)


if __name__ == "__main__":
    main()
