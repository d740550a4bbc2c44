"""The runner around a handler: progress, failure and refund, cancel (queued, processing, racing), requeue."""

import asyncio
import random

import pytest
from pydantic import Field

from gpu_jobs.runner import run_task_async
from lib import catalog
from lib.config import get_settings
from lib.reaper import reap
from tests.factories import balance, ledger, sql, task_row


class JobParams(catalog.Params):
    seconds: float = Field(0.5, ge=0, le=10)


@pytest.fixture
def job_models(monkeypatch):
    """把测试处理器登记进目录（真实的 runner 与 SQL 路径照常运行）"""
    for name in ("slow", "boom", "refuse", "quick", "flaky", "hang", "net_timeout", "nothing", "orphaned"):
        monkeypatch.setitem(
            catalog.CATALOG,
            f"test.{name}",
            catalog.ModelSpec(
                key=f"test.{name}",
                kind="image",
                title=name,
                params=JobParams,
                price=lambda p, a: 5,
                price_rule="5",
                handler=f"tests.job_handlers:{name}",
                timeout_s=1 if name == "hang" else 30 * catalog.MINUTES,
            ),
        )


async def until(condition, what: str, seconds: float = 30) -> None:
    """等到条件成立；超时则测试失败（不让一个早早失败的任务把整个测试套件挂住）"""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


async def create(client, user, name: str, **params) -> dict:
    resp = await client.post("/tasks", json={"model_key": f"test.{name}", "params": params}, headers=user.headers)
    assert resp.status_code == 201, resp.text
    return resp.json()["data"]


async def test_completed_task_has_result_asset_and_one_charge(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "quick")
    assert await run_task_async(task["id"]) == "completed"
    row = task_row(task["id"])
    assert row["status"] == "completed" and row["progress"] == 1 and row["attempts"] == 1
    assert row["result"]["width"] == 8 and row["result_url"]
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]
    assets = sql("select * from public.assets where source_task_id = %s", (task["id"],))
    assert len(assets) == 1 and assets[0]["status"] == "ready"
    fresh = (await client.get(f"/tasks/{task['id']}", headers=user.headers)).json()["data"]
    assert fresh["result_url"]


async def test_a_project_deleted_while_its_task_runs_keeps_the_result(client, make_user, job_models):
    """任务运行中删掉它的项目：结果照常交付（不属于任何项目），不是失败退款"""
    user = await make_user()
    project = (await client.post("/projects", json={"name": "p"}, headers=user.headers)).json()["data"]["id"]
    resp = await client.post(
        "/tasks",
        json={"model_key": "test.slow", "project_id": project, "params": {"seconds": 0.6}},
        headers=user.headers,
    )
    task = resp.json()["data"]
    job = asyncio.create_task(run_task_async(task["id"]))
    await until(lambda: task_row(task["id"])["progress"] > 0 or job.done(), "the job claimed the task")
    assert (await client.delete(f"/projects/{project}", headers=user.headers)).status_code == 200
    assert await job == "completed"
    [result] = sql("select project_id from public.assets where source_task_id = %s", (task["id"],))
    assert result["project_id"] is None
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_a_result_over_storages_size_limit_fails_clearly_and_is_refunded(
    client, make_user, job_models, monkeypatch
):
    """结果超过存储的文件大小上限：任何重试都存不进去，明说并退款（不是“意外失败”）"""
    sql(
        "insert into storage.buckets (id, name, public, file_size_limit) values ('tiny', 'tiny', false, 50)"
        " on conflict (id) do nothing"
    )
    monkeypatch.setattr(get_settings(), "storage_bucket", "tiny")
    user = await make_user()
    task = await create(client, user, "quick")  # an 8×8 PNG: more than 50 bytes
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"]["code"] == "output_too_large"
    assert "more than storage accepts" in row["error"]["message"] and "refunded" in row["error"]["message"]
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_a_job_over_its_whole_allowance_fails_as_timed_out_before_modal_kills_it(
    client, make_user, job_models, monkeypatch
):
    """处理器限时之外，下载输入、上传结果也有总时限：比 Modal 的函数超时先到，任务以 timeout 失败并退款"""
    monkeypatch.setattr(catalog, "IO_ALLOWANCE_S", -(30 * catalog.MINUTES) + 0.5)  # the whole job: 0.5 s
    user = await make_user()
    task = await create(client, user, "slow", seconds=3)
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"]["code"] == "timeout" and "refunded" in row["error"]["message"]
    assert "(moving its files included)" in row["error"]["message"]
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_lists_sign_result_urls_afresh_and_a_deleted_result_leaves_the_task_readable(
    client, make_user, job_models
):
    user = await make_user()
    task = await create(client, user, "quick")
    assert await run_task_async(task["id"]) == "completed"
    sql("update public.tasks set result_url = 'http://stale.example/expired' where id = %s", (task["id"],))
    [listed] = (await client.get("/tasks", headers=user.headers)).json()["data"]["items"]
    assert listed["result_url"].startswith("http") and "stale" not in listed["result_url"]
    assert (await client.get(listed["result_url"])).status_code == 200

    result_asset = task_row(task["id"])["result"]["asset_id"]
    assert (await client.delete(f"/assets/{result_asset}", headers=user.headers)).status_code == 200
    resp = await client.get(f"/tasks/{task['id']}", headers=user.headers)
    assert resp.status_code == 200 and resp.json()["data"]["result_url"] is None
    [listed] = (await client.get("/tasks", headers=user.headers)).json()["data"]["items"]
    assert listed["status"] == "completed" and listed["result_url"] is None
    resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert resp.status_code == 409 and "already completed" in resp.json()["error"]["message"]


async def test_second_run_of_a_claimed_task_does_nothing(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "quick")
    assert await run_task_async(task["id"]) == "completed"
    assert await run_task_async(task["id"]) == "skipped"
    assert task_row(task["id"])["attempts"] == 1


async def test_handler_crash_fails_with_generic_message_and_refunds_once(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "boom")
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["status"] == "failed" and row["error"]["code"] == "processing_error"
    assert "secret" not in str(row["error"]) and "refunded" in row["error"]["message"]
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]
    assert balance(user.id) == 100


async def test_a_job_that_returns_no_result_fails_and_is_refunded(client, make_user, job_models):
    """处理器正常返回却没有 result 产出：不能收了钱却没有结果"""
    user = await make_user()
    task = await create(client, user, "nothing")
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"] == {
        "code": "processing_error",
        "message": "The job produced no result. Your credits were refunded.",
    }
    assert row["result"] is None and row["result_url"] is None
    assert sql("select id from public.assets where source_task_id = %s", (task["id"],)) == []
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"] and balance(user.id) == 100


async def test_an_account_deleted_while_its_task_saves_the_result_ends_the_job_quietly(
    client, make_user, job_models, monkeypatch
):
    """账号在上传结果时被删除（任务行随之级联删除）：不算意外失败，上传的文件删掉"""
    from gpu_jobs import runner
    from lib.storage import get_storage

    user = await make_user()
    task = await create(client, user, "quick")
    real_upload, uploaded = runner.upload_to_supabase, []

    async def upload_then_account_deleted(local, path, mime):
        await real_upload(local, path, mime)
        uploaded.append(path)
        sql("delete from auth.users where id = %s", (user.id,))

    monkeypatch.setattr(runner, "upload_to_supabase", upload_then_account_deleted)
    assert await run_task_async(task["id"]) == "canceled"
    assert task_row(task["id"]) is None
    assert len(uploaded) == 1 and not await get_storage().exists(path=uploaded[0])


async def test_an_account_deleted_before_its_task_fails_ends_the_job_quietly(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "orphaned")
    assert await run_task_async(task["id"]) == "canceled"
    assert task_row(task["id"]) is None


async def test_invalid_input_fails_with_the_reason(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "refuse")
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"] == {"code": "invalid_input", "message": "The file is not a picture we can read."}
    assert balance(user.id) == 100


async def test_cancel_while_processing_stops_the_job(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "slow", seconds=5)
    job = asyncio.create_task(run_task_async(task["id"]))
    await until(lambda: task_row(task["id"])["progress"] >= 0.05 or job.done(), "the job made progress")
    resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert resp.status_code == 200
    assert await asyncio.wait_for(job, 5) == "canceled"
    row = task_row(task["id"])
    assert row["status"] == "canceled" and row["progress"] < 0.5
    assert sql("select id from public.assets where source_task_id = %s", (task["id"],)) == []
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_cancel_racing_completion_has_exactly_one_outcome(client, make_user, job_models):
    user = await make_user()
    for _ in range(8):
        task = await create(client, user, "quick")
        job = asyncio.create_task(run_task_async(task["id"]))
        await asyncio.sleep(random.uniform(0, 0.15))
        cancel = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
        outcome = await job
        row = task_row(task["id"])
        kinds = [e["kind"] for e in ledger(user.id, task["id"])]
        assets = sql("select id from public.assets where source_task_id = %s", (task["id"],))
        if row["status"] == "completed":  # the cancel came too late, and says so
            assert outcome == "completed" and cancel.status_code == 409
            assert kinds == ["charge"] and len(assets) == 1
        else:
            assert row["status"] == "canceled" and cancel.status_code == 200
            assert kinds == ["charge", "refund"] and assets == []


async def test_stalled_task_is_requeued_then_failed_after_max_attempts(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "quick")
    max_attempts = get_settings().task_max_attempts
    for attempt in range(1, max_attempts + 1):
        claimed = sql("select * from public.claim_task(%s)", (task["id"],))
        assert claimed and claimed[0]["attempts"] == attempt
        sql("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task["id"],))
        await reap()
        expected = "queued" if attempt < max_attempts else "failed"
        assert task_row(task["id"])["status"] == expected
    row = task_row(task["id"])
    assert row["error"]["code"] == "worker_lost"
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_reaper_passes_at_the_same_time_all_succeed_and_refund_each_task_once(client, make_user, job_models):
    """Several workers each run the reaper: passes that overlap, refunding the same users, must not deadlock."""
    import threading

    import psycopg

    users = [await make_user() for _ in range(10)]
    with psycopg.connect(get_settings().supabase_db_url, autocommit=True) as conn:
        for index in range(300):
            conn.execute(
                "select public.create_task(%s, 'test.quick', '{}', 1, null, null, '{}', null)",
                (users[index % len(users)].id,),
            )
        conn.execute(
            "update public.tasks set status = 'processing', attempts = %s,"
            " heartbeat_at = now() - interval '1 hour' - random() * interval '1 minute'",
            (get_settings().task_max_attempts,),
        )
    barrier = threading.Barrier(6)
    errors: list[Exception] = []

    def one_pass() -> None:
        with psycopg.connect(get_settings().supabase_db_url, autocommit=True) as conn:
            barrier.wait()
            try:
                conn.execute("select * from public.reap_tasks(30, %s, 15)", (get_settings().task_max_attempts,))
            except psycopg.Error as exc:
                errors.append(exc)

    await asyncio.gather(*[asyncio.to_thread(one_pass) for _ in range(6)])
    assert errors == []
    assert sql("select status, count(*) as n from public.tasks group by status") == [{"status": "failed", "n": 300}]
    assert all(balance(user.id) == 100 for user in users)


async def test_stale_worker_cannot_finish_after_requeue(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "slow", seconds=1)
    first = asyncio.create_task(run_task_async(task["id"]))
    await until(lambda: task_row(task["id"])["status"] == "processing", "the first worker claimed the task")
    # The reaper thinks the first worker died (as the reaper does it) and another worker claims the task.
    assert sql("select public.requeue_task(%s, 1, 3, 'stalled') as r", (task["id"],)) == [{"r": "queued"}]
    assert await run_task_async(task["id"]) == "completed"
    assert await first == "lost"
    assert len(sql("select id from public.assets where source_task_id = %s", (task["id"],))) == 1
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_task_never_started_is_failed_and_refunded(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "quick")
    sql(
        "update public.tasks set created_at = now() - interval '7 hours', queued_at = now() - interval '7 hours'"
        " where id = %s",
        (task["id"],),
    )
    assert (await reap()).get("expired") == 1
    row = task_row(task["id"])
    assert row["status"] == "failed" and row["error"]["code"] == "not_started"
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_an_old_task_requeued_after_a_stall_keeps_its_retries(client, make_user, job_models):
    """The queue timeout counts from the requeue, not from the task's creation."""
    user = await make_user()
    task = await create(client, user, "quick")
    sql("update public.tasks set created_at = now() - interval '7 hours' where id = %s", (task["id"],))
    sql("select * from public.claim_task(%s)", (task["id"],))
    sql("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task["id"],))
    assert await reap() == {"requeued": 1}
    assert task_row(task["id"])["status"] == "queued"
    sql("update public.tasks set queued_at = now() - interval '7 hours' where id = %s", (task["id"],))
    assert (await reap()).get("expired") == 1  # no worker took it up again, for the whole timeout
    row = task_row(task["id"])
    assert (row["status"], row["message"]) == ("failed", "Not restarted in time.")
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_temporary_trouble_requeues_then_fails_with_its_own_message(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "flaky")
    max_attempts = get_settings().task_max_attempts
    for attempt in range(1, max_attempts + 1):
        expected = "queued" if attempt < max_attempts else "failed"
        assert await run_task_async(task["id"]) == expected
    row = task_row(task["id"])
    message = f"A temporary problem stopped the job {max_attempts} times; your credits were refunded."
    assert row["error"] == {"code": "attempts_exhausted", "message": message} and row["message"] == message
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_a_database_blip_while_saving_requeues_instead_of_failing(client, make_user, job_models, monkeypatch):
    import psycopg

    from gpu_jobs import runner

    user = await make_user()
    task = await create(client, user, "quick")

    async def blip(*args, **kwargs):
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "create_asset_record", blip)
        assert await run_task_async(task["id"]) == "queued"
    assert await run_task_async(task["id"]) == "completed"
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


def saving_transaction(monkeypatch, faulty) -> None:
    """只让第一个事务（保存结果的那个）换成 faulty；之后的照常"""
    from lib import db

    real, calls = db.transaction, []

    def transaction():
        calls.append(1)
        return faulty(real) if len(calls) == 1 else real()

    monkeypatch.setattr(db, "transaction", transaction)


SAVED_UNANSWERED = "the database committed the result but its answer was lost"


async def test_a_commit_whose_answer_is_lost_keeps_the_completed_result(
    client, make_user, job_models, monkeypatch, caplog
):
    """The database committed completed, but the connection died before saying so: the result must stay."""
    from contextlib import asynccontextmanager

    import psycopg

    from lib.storage import get_storage

    user = await make_user()
    task = await create(client, user, "quick")

    @asynccontextmanager
    async def answer_lost(real_transaction):
        async with real_transaction() as conn:
            yield conn
        raise psycopg.OperationalError("server closed the connection unexpectedly")  # after COMMIT

    saving_transaction(monkeypatch, answer_lost)
    assert await run_task_async(task["id"]) == "completed"
    assert SAVED_UNANSWERED in caplog.text
    row = task_row(task["id"])
    assert row["status"] == "completed"
    assert await get_storage().info(path=row["result"]["path"]) is not None
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_a_commit_still_landing_when_its_answer_is_lost_keeps_the_completed_result(
    client, make_user, job_models, monkeypatch, caplog
):
    """The connection died after COMMIT was sent, and the database finishes committing a moment later: the runner
    must not read the task before that, take it for unsaved and remove the result the task then points to."""
    from contextlib import asynccontextmanager

    import psycopg

    from lib import db
    from lib.storage import get_storage

    user = await make_user()
    task = await create(client, user, "quick")
    landing: list[asyncio.Task] = []

    @asynccontextmanager
    async def commit_lands_late(real_transaction):
        conn = await psycopg.AsyncConnection.connect(get_settings().supabase_db_url, **db.connect_kwargs())
        await conn.execute("begin")
        try:
            yield conn
        except BaseException:
            await conn.execute("rollback")
            await conn.close()
            raise

        async def commit() -> None:
            await asyncio.sleep(0.5)
            await conn.execute("commit")
            await conn.close()

        landing.append(asyncio.create_task(commit()))
        raise psycopg.OperationalError("server closed the connection unexpectedly")  # COMMIT sent, no answer

    saving_transaction(monkeypatch, commit_lands_late)
    assert await run_task_async(task["id"]) == "completed"
    assert SAVED_UNANSWERED in caplog.text  # it waited for the commit instead of reading the task before it landed
    await asyncio.gather(*landing)
    row = task_row(task["id"])
    assert row["status"] == "completed"
    [asset] = sql("select path from public.assets where source_task_id = %s", (task["id"],))
    assert row["result"]["path"] == asset["path"]
    assert await get_storage().info(path=asset["path"]) is not None
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_a_handler_over_its_time_limit_is_stopped_and_refunded(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "hang", seconds=3)  # its model allows 1 s
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"]["code"] == "timeout" and "took longer than 1 min" in row["error"]["message"]
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]
    assert sql("select id from public.assets where source_task_id = %s", (task["id"],)) == []


async def test_a_hung_handler_does_not_hold_the_job_after_its_time_limit(client, make_user, job_models):
    """run_task (Modal's entry) returns at the limit; the abandoned thread is reported so the container can go."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    user = await make_user()
    task = await create(client, user, "hang", seconds=5)  # its model allows 1 s
    code = (
        "from lib import catalog; from tests.test_runner import JobParams\n"
        "catalog.CATALOG['test.hang'] = catalog.ModelSpec(key='test.hang', kind='image', title='hang',"
        " params=JobParams, price=lambda p, a: 5, price_rule='5', handler='tests.job_handlers:hang', timeout_s=1)\n"
        "from gpu_jobs.runner import handler_still_running, run_task\n"
        f"print(run_task({task['id']!r}), handler_still_running())\n"
    )
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["failed", "True"]  # returned while the handler still slept
    assert task_row(task["id"])["error"]["code"] == "timeout"
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_a_superseded_attempt_still_uploading_leaves_the_winners_result_alone(
    client, make_user, job_models, monkeypatch
):
    from gpu_jobs import runner
    from lib.storage import get_storage

    user = await make_user()
    task = await create(client, user, "quick")
    real_upload, in_upload, release = runner.upload_to_supabase, asyncio.Event(), asyncio.Event()

    async def slow_first_upload(local, path, mime):
        await real_upload(local, path, mime)
        if not in_upload.is_set():  # attempt 1 is still uploading when the reaper hands the task on
            in_upload.set()
            await release.wait()

    monkeypatch.setattr(runner, "upload_to_supabase", slow_first_upload)
    first = asyncio.create_task(run_task_async(task["id"]))
    await in_upload.wait()
    sql("update public.tasks set status = 'queued' where id = %s", (task["id"],))
    assert await run_task_async(task["id"]) == "completed"
    release.set()
    assert await first == "canceled"  # its finish changed nothing: outputs discarded
    [asset] = sql("select path from public.assets where source_task_id = %s", (task["id"],))
    assert "/2/" in asset["path"]
    assert await get_storage().info(path=asset["path"]) is not None


async def leave_partial_upload(task: dict, user) -> str:
    """模拟第 1 次尝试在上传中途被杀：存储里留下一个没有资源行的文件"""
    from lib.storage import get_storage

    sql("select * from public.claim_task(%s)", (task["id"],))
    path = f"{user.id}/tasks/{task['id']}/1/result-0.png"
    await get_storage().upload_bytes(path=path, data=b"\x89PNG half", content_type="image/png")
    sql("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task["id"],))
    return path


async def test_a_killed_attempts_partial_upload_is_removed_when_a_retry_completes(client, make_user, job_models):
    from lib.storage import get_storage

    user = await make_user()
    task = await create(client, user, "quick")
    stray = await leave_partial_upload(task, user)
    assert await reap() == {"requeued": 1}
    assert await run_task_async(task["id"]) == "completed"
    assert await get_storage().info(path=stray) is None
    [asset] = sql("select path from public.assets where source_task_id = %s", (task["id"],))
    assert "/2/" in asset["path"] and await get_storage().info(path=asset["path"]) is not None


async def test_a_killed_attempts_partial_upload_is_removed_when_the_reaper_gives_up(client, make_user, job_models):
    from lib.storage import get_storage

    user = await make_user()
    task = await create(client, user, "quick")
    stray = await leave_partial_upload(task, user)
    sql("update public.tasks set attempts = %s where id = %s", (get_settings().task_max_attempts, task["id"]))
    assert await reap() == {"failed": 1}
    assert await get_storage().info(path=stray) is None


async def test_a_killed_attempts_partial_upload_is_removed_on_cancel(client, make_user, job_models):
    from lib.storage import get_storage

    user = await make_user()
    task = await create(client, user, "quick")
    stray = await leave_partial_upload(task, user)
    assert await reap() == {"requeued": 1}
    resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert resp.status_code == 200 and resp.json()["data"]["status"] == "canceled"
    assert await get_storage().info(path=stray) is None


async def test_corrupt_video_fails_as_invalid_input_and_is_refunded(client, make_user):
    """真实处理器拒绝损坏的媒体：任务失败（invalid_input）并只退款一次"""
    from lib.storage import get_storage
    from tests.factories import make_asset

    user = await make_user()
    path = f"{user.id}/uploads/broken.mp4"
    await get_storage().upload_bytes(
        path=path, data=b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 500, content_type="video/mp4"
    )
    asset = make_asset(user.id, kind="video", width=64, height=48, duration_s=2, fps=24, path=path)
    resp = await client.post(
        "/tasks", json={"model_key": "video.upscale", "params": {"video_asset_id": asset}}, headers=user.headers
    )
    task = resp.json()["data"]
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"]["code"] == "invalid_input" and row["error"]["message"]
    assert "/tmp" not in row["error"]["message"] and "spool-" not in row["error"]["message"]  # no worker paths
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]
    assert balance(user.id) == 100


async def test_missing_input_file_fails_as_invalid_input(client, make_user):
    from tests.factories import make_asset

    user = await make_user()
    asset = make_asset(user.id, width=64, height=48)  # a row whose object was never stored
    resp = await client.post(
        "/tasks", json={"model_key": "image.upscale", "params": {"image_asset_id": asset}}, headers=user.headers
    )
    task = resp.json()["data"]
    assert await run_task_async(task["id"]) == "failed"
    assert task_row(task["id"])["error"] == {
        "code": "invalid_input",
        "message": "An input file of this task is missing from storage.",
    }
    assert balance(user.id) == 100


async def test_a_timeout_inside_the_handler_is_temporary_not_the_time_limit(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "net_timeout")
    assert await run_task_async(task["id"]) == "queued"
    row = task_row(task["id"])
    assert row["error"] is None and "temporary problem" in row["message"]


async def test_a_blip_while_saying_saving_keeps_the_finished_result(client, make_user, job_models, monkeypatch):
    import psycopg

    from gpu_jobs import runner

    real = runner.update_task_status

    async def blip_at_saving(task_id, attempt, *, progress=None, message=None):
        if message == "Saving the result":
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await real(task_id, attempt, progress=progress, message=message)

    monkeypatch.setattr(runner, "update_task_status", blip_at_saving)
    user = await make_user()
    task = await create(client, user, "quick")
    assert await run_task_async(task["id"]) == "completed"
    assert task_row(task["id"])["attempts"] == 1


async def test_a_task_whose_params_no_longer_validate_fails_in_words_and_is_refunded(client, make_user, job_models):
    user = await make_user()
    task = await create(client, user, "quick")
    sql('update public.tasks set params = \'{"seconds": "soon"}\' where id = %s', (task["id"],))
    assert await run_task_async(task["id"]) == "failed"
    error = task_row(task["id"])["error"]
    assert error["code"] == "invalid_input" and "no longer suit" in error["message"]
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_a_queued_task_of_a_model_a_deploy_removed_is_refunded_at_its_next_dispatch(
    client, make_user, job_models, monkeypatch
):
    user = await make_user()
    task = await create(client, user, "quick")
    monkeypatch.delitem(catalog.CATALOG, "test.quick")
    sql("update public.tasks set updated_at = now() - interval '10 minutes' where id = %s", (task["id"],))
    await reap()
    row = task_row(task["id"])
    assert row["status"] == "failed" and row["error"]["code"] == "model_unavailable"
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"] and balance(user.id) == 100


async def test_the_result_is_signed_before_the_completing_transaction_opens(client, make_user, job_models, monkeypatch):
    """A storage call inside the transaction would hold a pooled connection (and the task's row lock) while it waits."""
    from contextlib import asynccontextmanager

    from lib import db
    from lib.storage import get_storage

    storage, open_transactions, signed_inside = get_storage(), [], []
    real_transaction, real_sign = db.transaction, storage.create_signed_url

    @asynccontextmanager
    async def tracked_transaction():
        open_transactions.append(1)
        try:
            async with real_transaction() as conn:
                yield conn
        finally:
            open_transactions.pop()

    async def tracked_sign(**kwargs):
        signed_inside.append(bool(open_transactions))
        return await real_sign(**kwargs)

    monkeypatch.setattr(db, "transaction", tracked_transaction)
    monkeypatch.setattr(storage, "create_signed_url", tracked_sign)
    user = await make_user()
    task = await create(client, user, "quick")
    assert await run_task_async(task["id"]) == "completed"
    assert signed_inside == [False] and task_row(task["id"])["result_url"]


def past_leftover_grace(task_id: str) -> None:
    """让任务的遗留文件清扫到期（此时它的任何尝试都不可能还在上传）"""
    sql("update public.task_output_sweeps set due_at = due_at - interval '1 day' where task_id = %s", (task_id,))


async def test_a_file_a_canceled_job_uploaded_as_it_was_stopped_is_removed_later(client, make_user, job_models):
    """Modal stops a canceled job's container: an upload that lands after the cancel looked is removed by the reaper."""
    from gpu_jobs import runner
    from lib.storage import get_storage

    user = await make_user()
    task = await create(client, user, "quick")
    uploading, canceled, landed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    real_upload = runner.upload_to_supabase

    async def stopped_after_upload(local, path, mime):
        uploading.set()
        await canceled.wait()
        await real_upload(local, path, mime)
        landed.set()
        await asyncio.Event().wait()  # its container is gone: nothing after the upload runs

    runner.upload_to_supabase = stopped_after_upload
    job = asyncio.create_task(run_task_async(task["id"]))
    try:
        await asyncio.wait_for(uploading.wait(), 30)
        resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
        assert resp.status_code == 200 and resp.json()["data"]["status"] == "canceled"
        canceled.set()
        await asyncio.wait_for(landed.wait(), 30)
        [stray] = await get_storage().list_files(prefix=f"{user.id}/tasks/{task['id']}")
        assert await reap() == {}  # an attempt may still be uploading: not yet
        assert await get_storage().info(path=stray) is not None
        past_leftover_grace(task["id"])
        assert await reap() == {"task_leftover_files": 1}
        assert await get_storage().info(path=stray) is None
        assert sql("select * from public.task_output_sweeps where task_id = %s", (task["id"],)) == []
        assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]
    finally:
        runner.upload_to_supabase = real_upload
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)


async def test_leftovers_storage_refused_to_remove_are_removed_by_a_later_pass(
    client, make_user, job_models, monkeypatch
):
    from lib.storage import StorageError, StorageService, get_storage

    user = await make_user()
    task = await create(client, user, "quick")
    stray = await leave_partial_upload(task, user)
    sql("update public.tasks set attempts = %s where id = %s", (get_settings().task_max_attempts, task["id"]))

    async def refused(self, *, paths, user_id=None):
        raise StorageError("Storage could not remove files.", status=503)

    with monkeypatch.context() as patch:
        patch.setattr(StorageService, "remove", refused)
        assert await reap() == {"failed": 1}  # gives up on the task; its leftover stays for now
        past_leftover_grace(task["id"])
        assert await reap() == {}  # still refused: kept for a later pass
    assert await get_storage().info(path=stray) is not None
    assert await reap() == {}  # taken a moment ago: waits its turn again
    past_leftover_grace(task["id"])
    assert await reap() == {"task_leftover_files": 1}
    assert await get_storage().info(path=stray) is None
    assert sql("select * from public.task_output_sweeps where task_id = %s", (task["id"],)) == []
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_a_task_completed_by_its_first_attempt_leaves_nothing_to_sweep(client, make_user, job_models):
    from lib.storage import get_storage

    user = await make_user()
    task = await create(client, user, "quick")
    assert await run_task_async(task["id"]) == "completed"
    assert sql("select * from public.task_output_sweeps where task_id = %s", (task["id"],)) == []
    [asset] = sql("select path from public.assets where source_task_id = %s", (task["id"],))
    retried = await create(client, user, "flaky")
    assert await run_task_async(retried["id"]) == "queued"
    assert sql("select * from public.task_output_sweeps where task_id = %s", (retried["id"],)) == []  # not ended
    resp = await client.post(f"/tasks/{retried['id']}/cancel", headers=user.headers)
    assert resp.status_code == 200
    past_leftover_grace(retried["id"])
    assert await reap() == {}  # nothing was left: swept, and forgotten
    assert sql("select * from public.task_output_sweeps") == []
    assert await get_storage().info(path=asset["path"]) is not None


@pytest.mark.parametrize("point", ["load_task_state", "upload_to_supabase", "create_asset_record"])
@pytest.mark.parametrize("arrival", ["cancel", "reaper", "modal_rerun"])
async def test_whatever_arrives_at_each_step_the_task_ends_once_charged_once_and_leaves_no_stray_file(
    client, make_user, job_models, monkeypatch, point, arrival
):
    """在任务的每一步（输入已下载 / 产出已上传 / 资源行已写、尚未完成）停住时：取消、回收器接手或 Modal 重跑同一输入"""
    from gpu_jobs import runner
    from lib.storage import get_storage

    user = await make_user()
    task = await create(client, user, "quick")
    real, paused, resume = getattr(runner, point), asyncio.Event(), asyncio.Event()

    async def pause_once(*args, **kwargs):
        result = await real(*args, **kwargs)
        if not paused.is_set():
            paused.set()
            await resume.wait()
        return result

    monkeypatch.setattr(runner, point, pause_once)
    first = asyncio.create_task(run_task_async(task["id"], call_id="fc-first"))
    await asyncio.wait_for(paused.wait(), 30)
    if arrival == "cancel":
        resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
        assert resp.status_code == 200
    elif arrival == "reaper":  # the first runner is merely slow, but its heartbeat looks stale
        sql("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task["id"],))
        assert await reap() == {"requeued": 1}
        assert await run_task_async(task["id"], call_id="fc-second") == "completed"
    else:  # Modal runs the same input again while the first run still goes on
        assert await run_task_async(task["id"], call_id="fc-first") == "completed"
    resume.set()
    assert await asyncio.wait_for(first, 30) in ("canceled", "lost")  # the first run changes nothing
    row = task_row(task["id"])
    assets = sql("select path from public.assets where source_task_id = %s", (task["id"],))
    files = await get_storage().list_files(prefix=f"{user.id}/tasks/{task['id']}")
    assert sorted(files) == sorted(asset["path"] for asset in assets)
    if arrival == "cancel":
        assert (row["status"], row["message"], row["attempts"]) == ("canceled", "Canceled.", 1) and assets == []
        assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]
    else:
        assert (row["status"], row["progress"], row["message"], row["attempts"]) == ("completed", 1, "Done", 2)
        assert len(assets) == 1 and "/2/" in assets[0]["path"] and row["result"]["path"] == assets[0]["path"]
        assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]
