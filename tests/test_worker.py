"""The local worker: a restart hands its running task back without using up an attempt, and exits cleanly."""

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys

import pytest
from pydantic import Field

from lib import catalog
from lib.config import get_settings
from tests.factories import ledger, task_row


class WorkerJobParams(catalog.Params):
    seconds: float = Field(1, ge=0, le=60)
    chunk: float = Field(2, ge=0, le=60)  # grind: seconds of computing between progress calls


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
    for name in ("slow", "grind"):
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
async def running_worker(**options):
    """在本进程里运行一个真实的 LocalWorker；离开时停止它（它把仍在运行的任务放回队列）"""
    from lib.local.worker import LocalWorker

    worker = LocalWorker(**options)
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


async def test_a_retried_task_shows_its_new_attempts_progress(client, make_user, worker_models):
    """重试从头开始，进度也从 0 开始：不会停在上一次尝试的 90% 直到新尝试超过它"""
    from lib import db

    user = await make_user()
    task = await create(client, user, "slow", seconds=1)
    max_attempts = get_settings().task_max_attempts
    requeues = [
        "select public.release_task(%s, %s, 'The worker restarted; resuming.') as s",
        f"select public.requeue_task(%s, %s, {max_attempts}, 'A temporary problem interrupted the job.') as s",
    ]
    for requeue in requeues:
        claimed = await db.fetch_one("select * from public.claim_task(%s)", (task["id"],))
        await db.fetch_one("select * from public.report_task_progress(%s, %s, 0.9)", (task["id"], claimed["attempts"]))
        assert await db.fetch_one(requeue, (task["id"], claimed["attempts"])) == {"s": "queued"}
        assert task_row(task["id"])["progress"] == 0  # queued again: nothing of the new attempt is done
        claimed = await db.fetch_one("select * from public.claim_task(%s)", (task["id"],))
        assert claimed["progress"] == 0
        await db.fetch_one("select * from public.report_task_progress(%s, %s, 0.25)", (task["id"], claimed["attempts"]))
        assert task_row(task["id"])["progress"] == 0.25
        await db.fetch_one(requeue, (task["id"], claimed["attempts"]))


WORKER = (
    "from lib import catalog\n"
    "from tests.test_worker import spec\n"
    "catalog.CATALOG['test.grind'] = spec('grind')\n"
    "from lib.local import worker\n"
    "worker.STOP_SECONDS = 1\n"
    "from lib.local.__main__ import main\n"
    "main(['worker'])\n"
)


@pytest.fixture
def start_worker():
    """启动一个登记了测试处理器的 worker 进程；测试结束时仍在运行的被杀掉"""
    from tests.conftest import ROOT  # not at the top: the worker imports this module, and conftest sets a test home

    started: list[subprocess.Popen] = []

    def start(**env: str) -> subprocess.Popen:
        with open(os.path.join(os.environ["SPOOL_HOME"], "worker-signals.log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER], cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(15)


@pytest.mark.parametrize(
    ("sig", "chunk"),
    [
        (signal.SIGTERM, 0.5),  # the handler stops at its next progress call, within the wait
        (signal.SIGINT, 0.5),
        (signal.SIGTERM, 30),  # it would compute past the wait: the process ends without it
    ],
)
async def test_a_worker_stopped_mid_task_exits_cleanly_and_hands_the_task_back(
    client, make_user, worker_models, start_worker, sig, chunk
):
    """停止信号到来时处理器正在原生代码（torch）里计算：进程正常退出（不是 SIGABRT），任务回到队列且不计尝试"""
    user = await make_user()
    task = await create(client, user, "grind", seconds=60, chunk=chunk)
    proc = start_worker()
    await until(lambda: task_row(task["id"])["progress"] > 0.09, "the handler started")
    proc.send_signal(sig)
    assert await asyncio.to_thread(proc.wait, 60) == 0
    row = task_row(task["id"])
    assert (row["status"], row["message"]) == ("queued", "The worker restarted; resuming.")
    assert (row["attempts"], row["released_attempts"]) == (1, 1)
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_a_worker_started_in_place_of_a_killed_one_requeues_its_tasks_at_once(
    client, make_user, worker_models, start_worker, monkeypatch
):
    """worker 被 SIGKILL：接替它的 worker 一启动就把它认领的任务放回队列（不等心跳超时），别的 worker 的任务不动"""
    from lib import db

    monkeypatch.setattr(get_settings(), "task_stall_seconds", 3600)  # the reaper alone would wait an hour
    user = await make_user()
    task = await create(client, user, "grind", seconds=60, chunk=0.5)
    proc = start_worker(SPOOL_WORKER_ID="local-worker:dead")
    await until(lambda: task_row(task["id"])["progress"] > 0.09, "the handler started")
    assert task_row(task["id"])["call_id"] == "local-worker:dead"  # the claim names its worker
    proc.kill()
    await asyncio.to_thread(proc.wait, 30)

    max_attempts = get_settings().task_max_attempts
    worn = await create(client, user, "slow", seconds=1)  # the dead worker's too, on its last attempt
    sql_update = "update public.tasks set attempts = %s where id = %s"
    await db.execute(sql_update, (max_attempts - 1, worn["id"]))
    assert (await db.fetch_one("select * from public.claim_next_task(null, 'local-worker:dead')"))["id"]
    other = await create(client, user, "slow", seconds=1)  # a live worker's
    assert (await db.fetch_one("select * from public.claim_next_task(null, 'local-worker:alive')"))["id"]

    async with running_worker(lost_worker="local-worker:dead"):
        await until(lambda: task_row(task["id"])["attempts"] == 2, "the killed worker's task was claimed again")
        row = task_row(task["id"])
        assert row["status"] == "processing" and row["call_id"] != "local-worker:dead"
        worn_row = task_row(worn["id"])
        assert worn_row["status"] == "failed" and worn_row["error"]["code"] == "worker_lost"
        assert [e["kind"] for e in ledger(user.id, worn["id"])] == ["charge", "refund"]
        other_row = task_row(other["id"])
        assert (other_row["status"], other_row["attempts"], other_row["call_id"]) == (
            "processing",
            1,
            "local-worker:alive",
        )
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_the_reaper_requeues_a_local_workers_stalled_task_without_trying_to_cancel_a_call(
    client, make_user, worker_models, caplog
):
    """本地模式：停滞任务的 call_id 是 worker 的名字而非 Modal 调用：照样放回队列，取消什么也不做，不记警告"""
    import logging

    from lib import db
    from lib.reaper import reap

    user = await make_user()
    task = await create(client, user, "slow", seconds=1)
    assert (await db.fetch_one("select * from public.claim_next_task(null, 'local-worker:hung')"))["id"]
    await db.execute("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task["id"],))
    with caplog.at_level(logging.WARNING, logger="spool.reaper"):
        assert await reap() == {"requeued": 1}
    assert [r.getMessage() for r in caplog.records if r.name == "spool.reaper"] == []
    row = task_row(task["id"])
    assert (row["status"], row["call_id"], row["attempts"]) == ("queued", None, 1)


async def test_a_job_of_one_class_does_not_wait_behind_a_long_one_of_another(client, make_user, monkeypatch):
    """每类任务各有 WORKER_CONCURRENCY 个位置（同云端每类一个函数）：长的 provider 任务运行时，别类任务照样完成"""
    long_job = dataclasses.replace(spec("slow"), key="test.provider_slow", cpu_pool="provider")
    monkeypatch.setitem(catalog.CATALOG, "test.provider_slow", long_job)
    monkeypatch.setitem(catalog.CATALOG, "test.slow", spec("slow"))  # in the probe pool, as upload checks
    user = await make_user()
    waiting = await create(client, user, "provider_slow", seconds=60)
    async with running_worker(concurrency=1):
        await until(lambda: handler_running(waiting["id"], 1), "the long job runs")
        short = await create(client, user, "slow", seconds=0.2)
        await until(lambda: task_row(short["id"])["status"] == "completed", "the other class's job completed")
        assert task_row(waiting["id"])["status"] == "processing"  # still running beside it
    assert task_row(waiting["id"])["status"] == "queued"  # handed back when the worker stopped


def test_the_gpu_classes_share_one_local_class():
    """本地只有一块 GPU：所有 GPU 类别的模型同属一类，合起来 WORKER_CONCURRENCY 个；CPU 池各自一类"""
    from lib.local.worker import LocalWorker

    classes = LocalWorker().classes
    assert set(classes["gpu"]) == {key for key, spec in catalog.CATALOG.items() if spec.gpu}
    assert {spec.gpu for key, spec in catalog.CATALOG.items() if spec.gpu} == {"gpu-small", "gpu-large"}
    for pool in catalog.CPU_POOLS:
        assert set(classes[pool]) == {key for key, spec in catalog.CATALOG.items() if spec.job_class == pool}
