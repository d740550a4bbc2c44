"""Database and Storage round trips and latency of the hot requests, with a network delay in front of both.

Run: .venv/bin/python bench/round_trips.py [--against REF] [--delay-ms 2] [--requests 50] [--rounds 2]
In the cloud the API reaches Postgres through Supavisor and Storage over HTTPS: every round trip is a network one
(about 1-5 ms to Postgres, tens of ms to Storage from Modal). This starts the embedded Postgres and the local server
(JWKS, Storage), puts a proxy that delays what the API sends by --delay-ms in front of Postgres and another in front
of the local server (SUPABASE_URL names it: Storage and the JWKS are reached through it), and counts round trips at
each (the turns: the API speaking again after the other side answered; one per HTTP request). Each request runs
--requests times, one at a time, through the API in a process of its own. With --against REF the same requests also
run against that revision of the code (a temporary git worktree) on the same database, without those of this
checkout's indexes (NEW_INDEXES) that the revision's migrations lack: before and after in one run, taking turns
(--rounds) so that the shared machine's drift falls on both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Indexes the revisions before these measurements lacked; dropped for --against, created again afterwards.
NEW_INDEXES = {
    "tasks_project_created_idx": "create index tasks_project_created_idx on public.tasks"
    " (project_id, created_at desc, id desc) where project_id is not null",
    "assets_project_created_idx": "create index assets_project_created_idx on public.assets"
    " (project_id, created_at desc, id desc) where project_id is not null",
    "tasks_user_active_idx": "create index tasks_user_active_idx on public.tasks"
    " (user_id, created_at desc, id desc) where status in ('queued', 'processing')",
}
HISTORY = 20_000  # tasks and assets of the measured user, spread over 50 projects
PAGE = 20  # the newest results and assets are in storage: the first page of each signs real files


class DelayProxy:
    """在 API 与 Postgres 之间转发：API 发出的字节延迟 delay 秒送达，并数往返次数"""

    def __init__(self, target: dict, delay: float):
        self.target, self.delay, self.turns = target, delay, 0

    async def _open_target(self):
        host, port = self.target.get("host") or "/tmp", int(self.target.get("port") or 5432)
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def handle(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await self._open_target()
        answered = True  # the startup message opens the first turn
        due: asyncio.Queue = asyncio.Queue()

        async def read_client():
            nonlocal answered
            while data := await client_reader.read(65536):
                if answered:
                    self.turns += 1
                    answered = False
                await due.put((time.perf_counter() + self.delay, data))
            await due.put((0.0, b""))

        async def deliver():  # in order, each chunk delay after it arrived: one delay per turn, not per chunk
            while True:
                at, data = await due.get()
                if not data:
                    server_writer.close()
                    return
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                server_writer.write(data)
                await server_writer.drain()

        async def answer():
            nonlocal answered
            while data := await server_reader.read(65536):
                answered = True
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        try:
            await asyncio.gather(read_client(), deliver(), answer())
        except (ConnectionError, OSError):
            pass


async def measure(args) -> list[dict]:
    """在本进程里通过 API 跑各个请求，返回每种请求的往返次数与延迟"""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    url = os.environ["SUPABASE_DB_URL"]
    proxy = DelayProxy(conninfo_to_dict(url), args.delay_ms / 1000)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    os.environ["SUPABASE_DB_URL"] = make_conninfo(url, host="127.0.0.1", port=str(port), sslmode="disable")
    # SUPABASE_URL names the Storage proxy's port (the local server's tokens carry it as their issuer).
    storage_proxy = DelayProxy({"host": "127.0.0.1", "port": args.server_port}, args.delay_ms / 1000)
    storage_server = await asyncio.start_server(
        storage_proxy.handle, "127.0.0.1", int(os.environ["SUPABASE_URL"].rsplit(":", 1)[1])
    )

    import httpx

    from functions.app import create_app
    from lib.config import get_settings

    get_settings.cache_clear()
    data = json.loads(args.data)
    headers = {"Authorization": f"Bearer {data['token']}"}
    body = {"model_key": "image.upscale", "params": {"image_asset_id": data["asset"], "scale": 2}}
    projects = iter(data["doomed"])
    cases = [
        ("GET /credits", lambda c: c.get("/credits", headers=headers)),
        ("GET /tasks/{id} (completed: result URL signed)", lambda c: c.get(f"/tasks/{data['task']}", headers=headers)),
        ("GET /tasks (20 of 20,000)", lambda c: c.get("/tasks", headers=headers)),
        (
            "GET /tasks?project_id= (empty project)",
            lambda c: c.get(f"/tasks?project_id={data['empty']}", headers=headers),
        ),
        ("GET /assets (20 of 20,000)", lambda c: c.get("/assets", headers=headers)),
        ("POST /tasks", lambda c: c.post("/tasks", json=body, headers=headers)),
        (
            "POST /tasks in a project",
            lambda c: c.post("/tasks", json={**body, "project_id": data["project"]}, headers=headers),
        ),
        ("DELETE /projects/{id}", lambda c: c.delete(f"/projects/{next(projects)}", headers=headers)),
    ]
    results = []
    app = create_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        for name, request in cases:
            latencies, turns, storage_turns = [], 0, 0
            for i in range(args.warmup + args.requests):
                before, storage_before, start = proxy.turns, storage_proxy.turns, time.perf_counter()
                resp = await request(client)
                assert resp.status_code < 300, resp.text
                if i >= args.warmup:
                    latencies.append(time.perf_counter() - start)
                    turns += proxy.turns - before
                    storage_turns += storage_proxy.turns - storage_before
            results.append(
                {
                    "case": name,
                    "round_trips": turns / args.requests,
                    "storage_round_trips": storage_turns / args.requests,
                    "p50_ms": statistics.median(latencies) * 1000,
                    "p90_ms": sorted(latencies)[int(0.9 * len(latencies))] * 1000,
                }
            )
    server.close()
    storage_server.close()
    return results


def seed(args, base: str, conn) -> dict:
    """建一个有长历史的用户（任务、资源、项目），返回它的令牌与各个 id"""
    import httpx

    user = httpx.post(f"{base}/dev/users", json={"email": f"bench-{uuid.uuid4().hex[:8]}@example.com"}).json()["data"]
    uid = user["user_id"]
    conn.execute("select public.grant_credits(%s, 100000000, 'adjustment', %s)", (uid, str(uuid.uuid4())))
    conn.execute(
        "insert into public.projects (user_id, name) select %s, 'p' || n from generate_series(1, 50) n", (uid,)
    )
    projects = [r[0] for r in conn.execute("select id from public.projects where user_id = %s order by name", (uid,))]
    conn.execute(
        "insert into public.assets (user_id, project_id, kind, bucket, path, mime, width, height, status, created_at)"
        " select %s, (%s::uuid[])[1 + n %% 50], 'image', 'media', %s || '/uploads/' || gen_random_uuid() || '.png',"
        " 'image/png', 512, 512, 'ready', now() - make_interval(secs => n) from generate_series(1, %s) n",
        (uid, projects, uid, HISTORY),
    )
    # Each task's result is one of those assets, as a completed task's is; dated ahead of the tasks the POST cases
    # create, so that every run's first page of tasks is these.
    conn.execute(
        "insert into public.tasks (user_id, project_id, model_key, params, status, cost, result, created_at)"
        " select %s, a.project_id, 'image.upscale', '{}', 'completed', 1,"
        " jsonb_build_object('asset_id', a.id, 'path', a.path), a.created_at + interval '1 day'"
        " from public.assets a where a.user_id = %s",
        (uid, uid),
    )
    newest = [
        r[0]
        for r in conn.execute(
            "select path from public.assets where user_id = %s order by created_at desc limit %s", (uid, PAGE)
        )
    ]
    key = os.environ["SUPABASE_SERVICE_ROLE_KEY"]
    for path in newest:  # straight to the local server, not through the measured proxy
        resp = httpx.post(
            f"{base}/storage/v1/object/media/{path}",
            content=b"\x89PNG\r\n\x1a\n",
            headers={"apikey": key, "Authorization": f"Bearer {key}", "Content-Type": "image/png"},
        )
        resp.raise_for_status()
    runs = 2 * args.rounds * (args.warmup + args.requests)  # a project to delete per DELETE, for each run
    conn.execute(
        "insert into public.projects (user_id, name) select %s, 'doomed' || n from generate_series(1, %s) n",
        (uid, runs),
    )
    doomed = [str(r[0]) for r in conn.execute("select id from public.projects where name like 'doomed%%'")]
    empty = conn.execute("insert into public.projects (user_id, name) values (%s, 'empty') returning id", (uid,))
    conn.execute("analyze public.tasks, public.assets, public.projects")
    task = conn.execute(
        "select id from public.tasks where user_id = %s order by created_at desc limit 1", (uid,)
    ).fetchone()[0]
    return {
        "token": user["access_token"],
        "asset": str(conn.execute("select id from public.assets where user_id = %s limit 1", (uid,)).fetchone()[0]),
        "task": str(task),
        "project": str(projects[0]),
        "empty": str(empty.fetchone()[0]),
        "doomed": doomed,
    }


def run_revision(args, code: Path, data: dict) -> list[dict]:
    """在独立进程里以 code 目录下的代码测量"""
    out = subprocess.run(
        [
            *(sys.executable, __file__, "--measure", "--code", str(code), "--data", json.dumps(data)),
            *("--delay-ms", str(args.delay_ms), "--requests", str(args.requests), "--warmup", str(args.warmup)),
            *("--server-port", str(args.server_port)),
        ],
        cwd=code,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(code)},
    )
    if out.returncode:
        raise SystemExit(f"measuring {code} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def lacking_indexes(revision: str) -> set[str]:
    """NEW_INDEXES 里该修订版的迁移还没有建的索引"""
    return {
        name
        for name in NEW_INDEXES
        if subprocess.run(["git", "grep", "-q", name, revision, "--", "supabase/migrations"], cwd=ROOT).returncode
    }


def set_new_indexes(conn, absent: set[str]) -> None:
    """去掉 absent 中的索引，建立其余的（--against 的修订版之前没有它们）"""
    for name, create in NEW_INDEXES.items():
        exists = conn.execute("select to_regclass(%s)", (f"public.{name}",)).fetchone()[0]
        if name not in absent and not exists:
            conn.execute(create)
        elif exists and name in absent:
            conn.execute(f"drop index public.{name}")
    conn.execute("analyze public.tasks, public.assets")


def measure_all(args, base: str, conn) -> list[tuple[str, list[dict]]]:
    """各修订版轮流测量 --rounds 轮（先 --against，再本检出），返回 [(标签, 结果)]"""
    data = seed(args, base, conn)
    revisions = [("this checkout", ROOT)]
    folder, lacking = None, set()
    if args.against:
        folder = tempfile.mkdtemp(prefix="spool-before-")
        before = Path(folder) / "code"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), args.against], check=True)
        revisions.insert(0, (args.against, before))
        lacking = lacking_indexes(args.against)
    figures = []
    try:
        runs = [(label, code) for _ in range(args.rounds) for label, code in revisions]
        share = len(data["doomed"]) // len(runs)
        for n, (label, code) in enumerate(runs):
            set_new_indexes(conn, absent=set() if code == ROOT else lacking)
            doomed = data["doomed"][n * share : (n + 1) * share]
            figures.append((label, run_revision(args, code, {**data, "doomed": doomed})))
    finally:
        set_new_indexes(conn, absent=set())
        if folder:
            subprocess.run(["git", "worktree", "remove", "--force", str(Path(folder) / "code")], check=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--against", help="a git revision to measure first, on the same database (before)")
    parser.add_argument("--delay-ms", type=float, default=2.0)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="each revision measured this many times, in turn")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--server-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        sys.path.insert(0, args.code)
        print(json.dumps(asyncio.run(measure(args))))
        return

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("SPOOL_HOME", tempfile.mkdtemp(prefix="spool-bench-"))
    import psycopg

    from lib.local import stack

    os.environ["SPOOL_PORT"] = str(stack.free_port())
    # The API reaches the local server through the measuring process's Storage proxy, on this port.
    os.environ["SUPABASE_URL"] = f"http://127.0.0.1:{stack.free_port()}"
    args.server_port = int(os.environ["SPOOL_PORT"])
    os.environ["MAX_ACTIVE_TASKS_PER_USER"] = "100000"
    os.environ["LOG_LEVEL"] = "WARNING"
    with stack.prepared():
        base = stack.local_base_url()
        server = stack.start_server(base)
        try:
            with psycopg.connect(os.environ["SUPABASE_DB_URL"], autocommit=True) as conn:
                figures = measure_all(args, base, conn)
        finally:
            server.terminate()
            server.wait(10)
    print(
        f"{args.requests} requests of each kind, one at a time, {args.delay_ms:g} ms added to each round trip to "
        f"Postgres and to Storage, {os.cpu_count()} CPUs; the user has {HISTORY:,} tasks and {HISTORY:,} assets"
        " in 50 projects"
    )
    print(f"{'request':<48} {'code':<14} {'round trips':>11} {'storage':>7} {'p50 ms':>7} {'p90 ms':>7}")
    for i, row in enumerate(figures[0][1]):
        for n, (label, results) in enumerate(figures):
            r = results[i]
            name = row["case"] if n == 0 else ""
            print(
                f"{name:<48} {label[:14]:<14} {r['round_trips']:>11.1f} {r.get('storage_round_trips', 0):>7.1f}"
                f" {r['p50_ms']:>7.1f} {r['p90_ms']:>7.1f}"
            )


if __name__ == "__main__":
    main()
