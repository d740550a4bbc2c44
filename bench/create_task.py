"""POST /tasks throughput and latency against the API under uvicorn, next to the database's own ceiling.

Run: .venv/bin/python bench/create_task.py [--requests 400]
Starts the embedded Postgres and the API (uvicorn, one process) on a free port. For each concurrency
(1, 16, 64) it creates tasks through HTTP (auth, validation, pricing, the create_task SQL call, dispatch)
and, in the same run, the same number of single-row insert transactions straight through psycopg: the
ceiling POST /tasks sits on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(n: int, concurrency: int, one) -> tuple[float, list[float]]:
    """以给定并发执行 n 次操作，返回 (每秒次数, 各次延迟)"""
    latencies: list[float] = []
    queue = iter(range(n))

    async def lane():
        for i in queue:
            start = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*[lane() for _ in range(concurrency)])
    return n / (time.perf_counter() - start), latencies


async def main_async(args) -> None:
    import aiohttp  # a light load generator: httpx's client costs more CPU than the server it measures
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    from lib.config import get_settings

    settings = get_settings()
    base = f"http://127.0.0.1:{settings.spool_port}"
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(base_url=base, connector=connector) as http:
        for _ in range(200):
            try:
                async with http.get("/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        # One user per lane: a user's own creates serialize on their credit account's row lock, by design.
        users = []
        with psycopg.connect(settings.supabase_db_url, autocommit=True) as conn:
            for _ in range(64):
                async with http.post("/dev/users", json={"email": f"bench-{uuid.uuid4().hex[:8]}@example.com"}) as r:
                    data = (await r.json())["data"]
                user_id, token = data["user_id"], data["access_token"]
                conn.execute(
                    "select public.grant_credits(%s, 100000000, 'adjustment', %s)", (user_id, str(uuid.uuid4()))
                )
                asset = conn.execute(
                    "insert into public.assets (user_id, kind, bucket, path, mime, width, height, status)"
                    " values (%s, 'image', 'media', %s, 'image/png', 512, 512, 'ready') returning id",
                    (user_id, f"{user_id}/bench.png"),
                ).fetchone()[0]
                users.append(
                    (
                        {"Authorization": f"Bearer {token}"},
                        {"model_key": "image.upscale", "params": {"image_asset_id": str(asset), "scale": 2}},
                    )
                )
            conn.execute(
                "create table if not exists bench_rows (id uuid primary key, user_id uuid, params jsonb,"
                " created_at timestamptz default now())"
            )
        user_id = None

        async def create(i):
            headers, body = users[i % len(users)]
            async with http.post("/tasks", json=body, headers={**headers, "Idempotency-Key": uuid.uuid4().hex}) as r:
                assert r.status == 201, await r.text()

        pool = AsyncConnectionPool(
            settings.supabase_db_url,
            min_size=10,
            max_size=10,
            open=False,
            kwargs={"autocommit": True, "prepare_threshold": None},
        )
        await pool.open()

        async def insert(i):
            async with pool.connection() as conn:
                await conn.execute(
                    "insert into bench_rows (id, user_id, params) values (%s, %s, %s)",
                    (uuid.uuid4(), user_id, '{"scale": 2}'),
                )  # same row shape, no RLS/auth

        async def health(i):
            async with http.get("/health") as r:
                assert r.status == 200, await r.text()

        print(
            f"POST /tasks vs single-row insert transactions, {args.requests} each, "
            f"{os.cpu_count()} CPUs, API: 1 uvicorn process, load from this process (aiohttp); "
            "inserts through a 10-connection pool, 10 lanes at most (the API's own pool size)"
        )
        print("also: GET /health (one SELECT through the same HTTP stack) as the HTTP floor")
        print(
            f"{'concurrency':>11} {'tasks/s':>8} {'p50 ms':>7} {'p99 ms':>7} | {'insert tx/s':>11} "
            f"{'p50 ms':>7} {'p99 ms':>7} | {'tasks/ceiling':>13} | {'/health req/s':>13}"
        )
        for concurrency in (1, 16, 64):
            await run_load(20, concurrency, create)  # warm-up
            api_rate, api_lat = await run_load(args.requests, concurrency, create)
            db_rate, db_lat = await run_load(args.requests, min(concurrency, 10), insert)
            health_rate, _ = await run_load(args.requests, concurrency, health)
            print(
                f"{concurrency:>11} {api_rate:>8.0f} {statistics.median(api_lat) * 1000:>7.1f} "
                f"{percentile(api_lat, 0.99) * 1000:>7.1f} | {db_rate:>11.0f} "
                f"{statistics.median(db_lat) * 1000:>7.1f} {percentile(db_lat, 0.99) * 1000:>7.1f} | "
                f"{api_rate / db_rate:>13.0%} | {health_rate:>13.0f}"
            )
            # Active-task limits: finish what was created so the next round is not refused.
            async with pool.connection() as conn:
                await conn.execute("update public.tasks set status = 'canceled' where status = 'queued'")
        async with pool.connection() as conn:
            await conn.execute("drop table bench_rows")
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    os.environ.setdefault("SPOOL_HOME", tempfile.mkdtemp(prefix="spool-bench-"))
    from lib.local import stack

    os.environ["SPOOL_PORT"] = str(stack.free_port())
    os.environ["MAX_ACTIVE_TASKS_PER_USER"] = "100000"
    os.environ["LOG_LEVEL"] = "WARNING"
    with stack.prepared():
        server = stack.start_server(stack.local_base_url())
        try:
            asyncio.run(main_async(args))
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
