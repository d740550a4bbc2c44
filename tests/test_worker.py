"""The local worker process: a restart hands its running task back without using up an attempt."""

import asyncio
import contextlib

import pytest
from pydantic import Field

from lib import catalog
from lib.config import get_settings
from tests.factories import ledger, task_row


class WorkerJobParams(catalog.Params):
    seconds: float = Field(1, ge=0, le=60)


def spec(name: str) -> catalog.ModelSpec:
    return catalog.ModelSpec(
        key=f"test.{name}",
        kind="image",
        title=name,
        params=WorkerJobParams,
        price=lambda p, a: 5,
        price_rule="5",
        handler=f"tests.job_handlers:{name}",
        timeout_s=30 * catalog.MINUTES,
    )


@pytest.fixture
def worker_models(monkeypatch):
    """把测试处理器登记进目录（真实的 worker、runner 与 SQL 路径照常运行）"""
    for name in ("slow",):
        monkeypatch.setitem(catalog.CATALOG, f"test.{name}", spec(name))


async def until(condition, what: str, seconds: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


def handler_running(task_id: str, attempt: int) -> bool:
    """这次认领（attempt）的处理器已报告过进度"""
    row = task_row(task_id)
    return row["status"] == "processing" and row["attempts"] == attempt and (row["message"] or "").startswith("step")


async def create(client, user, name: str, **params) -> dict:
    resp = await client.post("/tasks", json={"model_key": f"test.{name}", "params": params}, headers=user.headers)
    assert resp.status_code == 201, resp.text
    return resp.json()["data"]


@contextlib.asynccontextmanager
async def running_worker():
    """在本进程里运行一个真实的 LocalWorker；离开时停止它（它把仍在运行的任务放回队列）"""
    from lib.local.worker import LocalWorker

    worker = LocalWorker()
    job = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(job, 30)


async def test_worker_restarts_mid_task_do_not_use_up_its_attempts(client, make_user, worker_models):
    """worker 处理中被停止（重启）：任务回到队列，这次认领不计入尝试次数；重启再多也不会让任务失败"""
    user = await make_user()
    task = await create(client, user, "slow", seconds=1)
    restarts = get_settings().task_max_attempts + 1
    for restart in range(1, restarts + 1):
        async with running_worker():
            await until(lambda n=restart: handler_running(task["id"], n), "the handler of this claim made progress")
        row = task_row(task["id"])
        assert (row["status"], row["message"]) == ("queued", "The worker restarted; resuming.")
        assert (row["attempts"], row["released_attempts"]) == (restart, restart)  # each claim keeps its own number
    async with running_worker():
        await until(lambda: task_row(task["id"])["status"] in ("completed", "failed", "canceled"), "the task ended")
    row = task_row(task["id"])
    assert row["status"] == "completed" and row["attempts"] == restarts + 1
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_a_temporary_failure_after_restarts_still_gets_every_retry(client, make_user, worker_models):
    """重启归还的尝试不算：之后临时故障仍有完整的重试次数，失败消息只数真正用掉的尝试"""
    from lib import db

    user = await make_user()
    task = await create(client, user, "slow", seconds=1)
    max_attempts = get_settings().task_max_attempts
    for _ in range(2):  # two restarts
        claimed = await db.fetch_one("select * from public.claim_task(%s)", (task["id"],))
        assert await db.fetch_one(
            "select public.release_task(%s, %s, 'The worker restarted; resuming.') as s",
            (task["id"], claimed["attempts"]),
        ) == {"s": "queued"}
    for used in range(1, max_attempts + 1):
        claimed = await db.fetch_one("select * from public.claim_task(%s)", (task["id"],))
        status = await db.fetch_one(
            "select public.requeue_task(%s, %s, %s, 'A temporary problem interrupted the job; retrying.') as s",
            (task["id"], claimed["attempts"], max_attempts),
        )
        assert status == {"s": "queued" if used < max_attempts else "failed"}
    row = task_row(task["id"])
    assert row["error"]["message"] == (
        f"A temporary problem stopped the job {max_attempts} times; your credits were refunded."
    )
