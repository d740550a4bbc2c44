"""Dispatch: hand a queued task to the job runner (local worker or Modal), behind one interface."""

from __future__ import annotations

import logging
from typing import Protocol

from lib.config import get_settings

log = logging.getLogger("spool.dispatch")


class Dispatcher(Protocol):
    async def dispatch(self, *, task_id: str, model_key: str) -> None: ...

    async def cancel(self, *, task_id: str, call_id: str | None, terminate: bool = True) -> None: ...

    async def call_pending(self, *, call_id: str) -> bool: ...


class LocalDispatcher:
    """本地调度：任务变为 queued 时数据库触发器已 NOTIFY 唤醒 worker，无需再做什么"""

    async def dispatch(self, *, task_id: str, model_key: str) -> None:
        """派发任务（本地：由触发器的 NOTIFY 完成）"""

    async def cancel(self, *, task_id: str, call_id: str | None, terminate: bool = True) -> None:
        """取消任务（本地：worker 在下一个进度点发现取消）"""

    async def call_pending(self, *, call_id: str) -> bool:
        """调用是否仍在排队或运行（本地没有调用）"""
        return False


_dispatcher: Dispatcher | None = None


def get_dispatcher() -> Dispatcher:
    """获取当前模式的调度器单例"""
    global _dispatcher
    if _dispatcher is None:
        if get_settings().is_local:
            _dispatcher = LocalDispatcher()
        else:
            from lib.modal_dispatch import ModalDispatcher

            _dispatcher = ModalDispatcher()
    return _dispatcher
