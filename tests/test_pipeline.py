"""End to end with a real worker process: upload → probe → paid task → result download; a lost worker."""

import asyncio
import io
import os
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.factories import connect, dumps, ledger, task_row
from tests.media_factories import make_video


class SharedWorker:
    """本模块共用的真实 worker 进程（回收器每秒一轮）：可停下再启动"""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "REAPER_INTERVAL_SECONDS": "1"}
        with open(os.path.join(os.environ["SPOOL_HOME"], "worker.log"), "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lib.local", "worker"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture(scope="module")
def worker(live_server):
    """本模块专用的真实 worker 进程"""
    shared = SharedWorker()
    shared.start()
    yield shared
    shared.stop()


@pytest.fixture
def without_shared_worker(worker):
    """本测试期间停下共用的 worker（测试自己启动 worker），之后再启动它，给后面的测试用"""
    worker.stop()
    yield
    worker.start()


async def wait_for(check, seconds: float = 60, every: float = 0.2):
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(every)


def png_bytes(width: int, height: int) -> bytes:
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def upload_ready_image(client, user, width=48, height=32) -> dict:
    resp = await client.post(
        "/assets", files={"file": ("photo.png", png_bytes(width, height), "image/png")}, headers=user.headers
    )
    assert resp.status_code in (200, 201), resp.text
    asset_id = resp.json()["data"]["id"]

    async def ready():
        asset = (await client.get(f"/assets/{asset_id}", headers=user.headers)).json()["data"]
        return asset if asset["status"] != "pending" else None

    asset = await wait_for(ready)
    assert asset["status"] == "ready", asset
    return asset


async def wait_finished(client, user, task_id: str, seconds: float = 90) -> dict:
    async def finished():
        task = (await client.get(f"/tasks/{task_id}", headers=user.headers)).json()["data"]
        return task if task["status"] in ("completed", "failed", "canceled") else None

    return await wait_for(finished, seconds)


async def test_upload_upscale_download(client, make_user, worker):
    user = await make_user()
    asset = await upload_ready_image(client, user)
    assert (asset["width"], asset["height"]) == (48, 32)
    resp = await client.post(
        "/tasks",
        headers={**user.headers, "Idempotency-Key": "e2e-1"},
        json={"model_key": "image.upscale", "params": {"image_asset_id": asset["id"], "scale": 2, "format": "png"}},
    )
    assert resp.status_code == 201, resp.text
    task = await wait_finished(client, user, resp.json()["data"]["id"])
    assert task["status"] == "completed", task
    assert task["progress"] == 1
    async with httpx.AsyncClient() as http:
        download = await http.get(task["result_url"])
    assert download.status_code == 200
    assert Image.open(io.BytesIO(download.content)).size == (96, 64)
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]
    result_asset = (await client.get(f"/assets/{task['result']['asset_id']}", headers=user.headers)).json()["data"]
    assert result_asset["status"] == "ready" and result_asset["width"] == 96


async def test_non_image_renamed_png_is_rejected(client, make_user, worker):
    user = await make_user()
    resp = await client.post(
        "/assets", files={"file": ("fake.png", b"hello, I am text" * 100, "image/png")}, headers=user.headers
    )
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "validation_error"


async def test_lost_worker_task_is_requeued_and_completes(client, make_user, worker):
    user = await make_user()
    asset = await upload_ready_image(client, user)
    # In one transaction (so no live worker sees it queued): the task is created and charged, a
    # worker claims it, and that worker dies without a word: its heartbeat goes stale.
    with connect() as conn, conn.transaction():
        created = conn.execute(
            "select public.create_task(%s, 'image.upscale', %s::jsonb, 2, null, null, %s::uuid[], null) as r",
            (user.id, dumps({"image_asset_id": asset["id"], "scale": 2}), [asset["id"]]),
        ).fetchone()["r"]
        task_id = created["task"]["id"]
        conn.execute("select public.claim_task(%s)", (task_id,))
        conn.execute("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task_id,))
    task = await wait_finished(client, user, task_id)
    assert task["status"] == "completed"
    assert task_row(task_id)["attempts"] >= 2
    assert [e["kind"] for e in ledger(user.id, task_id)] == ["charge"]


@pytest.fixture
def start_worker():
    """在本测试中启动额外的 worker 进程；测试结束（无论成败）时全部停止"""
    started: list[subprocess.Popen] = []

    def start(**env) -> subprocess.Popen:
        log = open(os.path.join(os.environ["SPOOL_HOME"], "worker-kill.log"), "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "lib.local", "worker"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(15)


async def test_worker_killed_mid_task_is_requeued_and_completes(
    client, make_user, without_shared_worker, start_worker, tmp_path
):
    """真实的 worker 在处理中被 SIGKILL：回收器重新排队，另一个 worker 完成它，只扣一次费"""
    fast = {"TASK_STALL_SECONDS": "5", "REAPER_INTERVAL_SECONDS": "1"}
    first = start_worker(**fast)
    user = await make_user()
    video = make_video(tmp_path / "clip.mp4", 320, 240, frames=96, fps=24)
    resp = await client.post(
        "/assets", files={"file": ("clip.mp4", video.read_bytes(), "video/mp4")}, headers=user.headers
    )
    asset_id = resp.json()["data"]["id"]

    async def ready():
        asset = (await client.get(f"/assets/{asset_id}", headers=user.headers)).json()["data"]
        return asset if asset["status"] == "ready" else None

    await wait_for(ready)
    resp = await client.post(
        "/tasks",
        headers=user.headers,
        json={"model_key": "video.upscale", "params": {"video_asset_id": asset_id, "scale": 4}},
    )
    task_id = resp.json()["data"]["id"]

    async def processing():
        row = task_row(task_id)
        return row if row["status"] == "processing" and row["progress"] > 0 else None

    await wait_for(processing, every=0.05)
    first.kill()
    first.wait(10)
    start_worker(**fast)
    task = await wait_finished(client, user, task_id, seconds=120)
    assert task["status"] == "completed", task
    assert task_row(task_id)["attempts"] == 2
    assert [e["kind"] for e in ledger(user.id, task_id)] == ["charge"]
    assert task["result"]["width"] == 1280 and task["result"]["height"] == 960
