"""The Modal deployment offline: the app's declarations, `api` and a job function run here, and the Modal
dispatcher with the SDK replaced at its boundary (what `Function.from_name` / `FunctionCall.from_id` return)."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import modal
import pytest

import modal_app
from gpu_jobs.runner import run_task_async
from lib import catalog, dispatch, modal_dispatch
from lib.config import get_settings
from lib.modal_dispatch import ModalDispatcher, function_for, function_name
from lib.reaper import reap
from lib.tasks import get_task_service
from tests.factories import ledger, make_asset, sql, task_row

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "av", "numpy", "PIL")


# ---------------------------------------------------------------- the app's declarations


def image_commands(image) -> list[str]:
    """The Dockerfile commands of an image and its bases, as Modal would send them (SDK internals, modal 1.6.4)."""
    from modal._image import _Image
    from modal._utils.async_utils import synchronizer

    def walk(img: _Image) -> list[str]:
        commands = [c for dep in img._deps() if isinstance(dep, _Image) for c in walk(dep)]
        cells = dict(zip(img._load.__code__.co_freevars, img._load.__closure__ or (), strict=True))
        build = cells["dockerfile_function"].cell_contents if "dockerfile_function" in cells else None
        return commands + (build("2025.06").commands if build else [])

    return walk(synchronizer._translate_in(image))


def pip_lines(image) -> list[str]:
    return [c for c in image_commands(image) if "pip install" in c]


def image_of(function) -> modal.Image:
    """函数部署时使用的镜像（SDK 内部，modal 1.6.4）"""
    from modal._utils.async_utils import synchronizer

    return synchronizer._translate_out(synchronizer._translate_in(function)._spec.image)


def test_import_needs_no_credentials_and_loads_no_torch(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # no Modal token, no ~/.modal.toml, no settings
    code = (
        "import sys, modal_app; print(modal_app.app.name, sorted(m for m in sys.modules"
        f" if m.split('.')[0] in {HEAVY!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["spool", "[]"]


def test_every_gpu_class_and_cpu_pool_has_one_job_function_with_its_limits():
    classes = [*catalog.GPU_CLASSES, *catalog.CPU_POOLS]
    names = [function_name(cls) for cls in classes]
    assert len(set(names)) == len(names) and not set(names) & set(modal_dispatch.RETIRED_FUNCTIONS)
    assert list(modal_app.JOB_FUNCTIONS) == list(modal_dispatch.job_functions()) == [*names, "run_cpu"]
    for cls in classes:
        info = modal_app.JOB_FUNCTIONS[function_name(cls)].info()
        models = [key for key in catalog.CATALOG if modal_dispatch.job_class(key) == cls]
        assert models, cls  # a class no model runs on would be deployed for nothing
        assert info.gpus == [(name, 1) for name in catalog.GPU_CLASSES.get(cls, [])]
        longest = max(catalog.CATALOG[key].timeout_s for key in models)
        assert info.timeout == longest + modal_app.IO_MARGIN_S  # the runner's limit first
        assert (info.cpu, info.memory_mib) == modal_app.RESOURCES[cls]  # not Modal's eighth of a core
        assert modal_app.job_options(cls)["max_containers"] == modal_app.MAX_CONTAINERS[cls]
        assert (modal_app.WEIGHTS_DIR in info.volumes) == (cls in catalog.GPU_CLASSES)
    for info in (f.info() for f in modal_app.JOB_FUNCTIONS.values()):
        assert info.max_retries == 2
        assert "modal.Secret.from_name('spool-supabase')" in info.secrets
        assert "modal.Secret.from_name('spool-settings')" in info.secrets
        assert "modal.Secret.from_name('spool-stripe')" not in info.secrets  # jobs never touch Stripe
        assert "Secret.from_dict([SPOOL_MODE, MODAL_APP_NAME])" in info.secrets
        assert info.schedule is None and info.web_info is None
    for key in catalog.CATALOG:
        assert function_for(key) in modal_app.JOB_FUNCTIONS
        assert function_for(key) not in modal_dispatch.RETIRED_FUNCTIONS
    assert function_for("image.upscale") == "run_gpu_small" and function_for("media.probe") == "run_probe"
    assert function_for("kling.text2video") == function_for("kling.image2video") == "run_provider"
    assert modal_app.CLOUD_ENV == {"SPOOL_MODE": "cloud", "MODAL_APP_NAME": "spool"}


def test_upload_checks_and_provider_jobs_have_capacity_fitting_their_work():
    """上传检查与外部提供方任务的容器上限、核数、内存与超时各按其活计：等提供方的任务只占一小部分核，且上限更高"""
    probe, provider = modal_app.run_probe.info(), modal_app.run_provider.info()
    caps = modal_app.MAX_CONTAINERS
    # More than the 20 containers all CPU jobs once shared, each on a fraction of a core: nearly all of a provider job
    # is waiting on the provider's API.
    assert caps["provider"] > 20
    assert provider.cpu < 1 and provider.memory_mib < 4 * 1024
    # An upload check is done in minutes, not the 58 a provider job may take, and has room to decode a frame of the
    # largest input (40 MP 10-bit 4:4:4 peaks near 0.85 GiB).
    assert probe.timeout < provider.timeout and probe.timeout <= 15 * 60
    assert probe.cpu >= 1 and probe.memory_mib >= 2 * 1024
    # The pools' containers and the API's connections stay under 80 % of a small plan's 200 pooler clients.
    api_clients = modal_app.API_MAX_CONTAINERS * get_settings().db_pool_max
    assert api_clients + sum(caps.values()) <= 160


@pytest.mark.filterwarnings("ignore:The run_cpu function is executing locally")
async def test_calls_spawned_on_the_retired_cpu_function_still_run_to_their_end(client, make_user, fake_modal):
    """拆分之前 spawn 到 run_cpu 的调用（排队的上传检查与 Kling 任务）部署后仍有函数接手，不会被 Modal 的超时打断"""
    from tests.test_assets import direct_upload, png_bytes

    assert modal_dispatch.RETIRED_FUNCTIONS == {"run_cpu": "provider"}
    retired = await modal_app.run_cpu.info.aio()
    cpu_models = [spec for spec in catalog.CATALOG.values() if spec.gpu is None]
    assert retired.timeout >= max(spec.timeout_s for spec in cpu_models) + modal_app.IO_MARGIN_S
    assert retired.gpus == [] and retired.max_retries == 2

    user = await make_user()
    resp = await direct_upload(client, user, png_bytes(12, 10))
    asset = resp.json()["data"]
    assert await asyncio.to_thread(modal_app.run_cpu.local, asset["probe_task_id"]) == "completed"
    ready = (await client.get(f"/assets/{asset['id']}", headers=user.headers)).json()["data"]
    assert ready["status"] == "ready" and (ready["width"], ready["height"]) == (12, 10)


def test_a_gpu_class_without_a_function_stops_the_deploy(tmp_path):
    code = "import lib.catalog as c; c.GPU_CLASSES['gpu-huge'] = ['B200']; import modal_app"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "declares no function for ['run_gpu_huge']" in out.stderr


def test_api_is_a_concurrent_web_function_and_the_reaper_runs_every_minute():
    api = modal_app.api.info()
    assert api.web_info is not None and api.concurrency_info.max_inputs == 100 and api.gpus == []
    assert api.concurrency_info.target_inputs == 30  # scales out before its connections are all taken
    for name in ("spool-settings", "spool-supabase", "spool-stripe", "spool-kling"):
        assert f"modal.Secret.from_name('{name}')" in api.secrets
    reaper = modal_app.reaper.info()
    assert reaper.schedule == "Period(minutes=1)" and reaper.gpus == []
    assert reaper.secrets == [
        "modal.Secret.from_name('spool-settings')",
        "modal.Secret.from_name('spool-supabase')",
        "Secret.from_dict([SPOOL_MODE, MODAL_APP_NAME])",
    ]


def test_web_image_installs_neither_torch_nor_av_and_pins_come_from_requirements():
    requirements = (ROOT / "requirements.txt").read_text()
    web = " ".join(pip_lines(modal_app.web_image))
    for package in ("torch", "av==", "numpy", "pillow"):
        assert package not in web
    for pin in modal_app.pinned(*modal_app.WEB_PACKAGES):
        assert pin in requirements and pin in web
    job = pip_lines(modal_app.job_image)
    torch_line = next(line for line in job if "torch==" in line)
    assert modal_app.pinned("torch")[0] in torch_line and f"--index-url {modal_app.TORCH_INDEX_URL}" in torch_line
    assert all(pin in " ".join(job) for pin in modal_app.pinned("av", "pillow", "numpy"))


def test_cpu_pools_run_on_an_image_without_torch_and_gpu_classes_on_the_cuda_one():
    """上传检查与外部提供方任务的容器不拉取、不导入 CUDA 版 torch（数 GB）：冷启动只需 PyAV、Pillow 与 numpy"""
    cpu = " ".join(pip_lines(modal_app.cpu_job_image))
    assert "torch" not in cpu and modal_app.TORCH_INDEX_URL not in cpu
    for pin in modal_app.pinned(*modal_app.WEB_PACKAGES, *modal_app.MEDIA_PACKAGES):
        assert pin in cpu
    for name, function in modal_app.JOB_FUNCTIONS.items():
        cls = modal_dispatch.job_functions()[name]
        expected = modal_app.job_image if cls in catalog.GPU_CLASSES else modal_app.cpu_job_image
        assert image_of(function) is expected, name
    assert {name for name, f in modal_app.JOB_FUNCTIONS.items() if image_of(f) is modal_app.cpu_job_image} == {
        "run_probe",
        "run_provider",
        "run_cpu",
    }


def required_keys(secret) -> list[str]:
    """Secret.from_name 要求服务端在部署时确认存在的键（SDK 内部，modal 1.6.4）"""
    from modal._utils.async_utils import synchronizer

    load = synchronizer._translate_in(secret)._load
    cells = dict(zip(load.__code__.co_freevars, load.__closure__ or (), strict=True))
    return list(cells["required_keys"].cell_contents)


def test_readme_secret_commands_give_every_key_the_deploy_requires():
    """`modal secret create --force` 会整体替换密钥，缺少必需键的密钥会让部署失败：README 的命令须给出全部必需键"""
    secrets = (modal_app.supabase_secret, modal_app.stripe_secret, modal_app.settings_secret, modal_app.kling_secret)
    required = {secret.name: required_keys(secret) for secret in secrets}
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    checked = []
    for line in readme.splitlines():
        command = line.lstrip("# ").removeprefix("modal secret create ")
        if command == line.lstrip("# "):
            continue
        words = [w for w in shlex.split(command, comments=True) if not w.startswith("--")]
        if words and words[0] in required:
            given = {word.split("=", 1)[0] for word in words[1:] if "=" in word}
            assert set(required[words[0]]) <= given, line
            checked.append(words[0])
    assert {"spool-supabase", "spool-settings"} <= set(checked) and checked.count("spool-stripe") == 2


def test_readme_function_table_matches_the_deployed_functions():
    """README 部署一节的函数表：每个函数的模型、GPU、核数、内存与超时都与 modal_app.py 一致"""
    from tests.test_readme import table_rows, ticked

    rows = table_rows((ROOT / "README.md").read_text(), "| function | what | hardware | timeout |")
    assert [ticked(row[0])[0] for row in rows] == ["api", *modal_app.JOB_FUNCTIONS, "reaper"]
    for name_cell, what, hardware, timeout in rows:
        name = ticked(name_cell)[0]
        info = getattr(modal_app, name).info()
        assert int(timeout.split()[0]) * 60 == info.timeout, name
        models = set(ticked(what))
        if models:
            assert models == {key for key in catalog.CATALOG if function_for(key) == name}, name
        gpus, _, resources = hardware.rpartition("; ")
        assert (gpus.split(", else ") if gpus else []) == [gpu for gpu, _ in info.gpus], name
        if resources == "CPU":
            assert info.cpu is None and info.memory_mib is None and not info.gpus, name
            continue
        cores, memory = resources.split(", ")
        assert float(cores.split()[0]) == info.cpu, name
        assert float(memory.split()[0]) * 1024 == info.memory_mib, name


# ---------------------------------------------------------------- running the app's functions here


async def test_api_local_answers_health_against_the_local_database(postgres):
    app = modal_app.api.local()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://modal.test") as c:
        resp = await c.get("/health")
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"] == {"status": "ok", "db": "ok"}


# ---------------------------------------------------------------- the Modal dispatcher, SDK faked at its boundary


class FakeModal:
    """Stands in for what `modal.Function.from_name` and `modal.FunctionCall.from_id` return."""

    def __init__(self) -> None:
        self.spawned: list[tuple[str, str, tuple]] = []
        self.canceled: list[str] = []
        self.cancel_options: list[dict] = []
        self.lookups = 0
        self.spawn_error: BaseException | None = None
        self.spawn_delay = 0.0
        self.while_spawning = None  # a coroutine function run (once) inside the next spawn, before it returns
        self.cancel_error: BaseException | None = None
        self.cancel_delay = 0.0
        self.ended: dict[str, BaseException | str] = {}  # calls that have ended: what .get() gives
        self.polls: list[str] = []
        self._ids = itertools.count(1)

    def from_name(self, app_name: str, name: str, **_) -> SimpleNamespace:
        self.lookups += 1

        async def spawn(*args):
            await asyncio.sleep(self.spawn_delay)
            if self.while_spawning is not None:
                hook, self.while_spawning = self.while_spawning, None
                await hook()
            if self.spawn_error is not None:
                raise self.spawn_error
            self.spawned.append((app_name, name, args))
            return SimpleNamespace(object_id=f"fc-{next(self._ids)}")  # no .get(): nobody waits on the job

        return SimpleNamespace(spawn=SimpleNamespace(aio=spawn))

    def from_id(self, call_id: str, **_) -> SimpleNamespace:
        async def cancel(**options):
            await asyncio.sleep(self.cancel_delay)
            if self.cancel_error is not None:
                raise self.cancel_error
            self.canceled.append(call_id)
            self.cancel_options.append(options)

        async def get(**_):  # timeout=0: a poll
            self.polls.append(call_id)
            outcome = self.ended.get(call_id)
            if outcome is None:  # still queued or running: Modal's poll raises Python's TimeoutError then
                raise TimeoutError()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return SimpleNamespace(cancel=SimpleNamespace(aio=cancel), get=SimpleNamespace(aio=get))


@pytest.fixture
def fake_modal(monkeypatch) -> FakeModal:
    """Modal SDK 边界替身 + 注入 ModalDispatcher（本地配置不变）"""
    fake = FakeModal()
    monkeypatch.setattr(modal.Function, "from_name", fake.from_name)
    monkeypatch.setattr(modal.FunctionCall, "from_id", fake.from_id)
    monkeypatch.setattr(dispatch, "_dispatcher", ModalDispatcher(app_name="spool"))
    return fake


@pytest.fixture
def gpu_job(monkeypatch) -> str:
    """一个在 gpu-large 上运行的测试模型（处理器写出 8×8 PNG；真实的 runner 与 SQL 路径）"""
    monkeypatch.setitem(
        catalog.CATALOG,
        "test.modal",
        catalog.ModelSpec(
            key="test.modal",
            kind="image",
            title="modal",
            params=catalog.Params,
            price=lambda p, a: 5,
            price_rule="5",
            handler="tests.job_handlers:quick",
            gpu="gpu-large",
        ),
    )
    return "test.modal"


async def create_task(client, user, model_key: str, params: dict | None = None) -> dict:
    resp = await client.post("/tasks", json={"model_key": model_key, "params": params or {}}, headers=user.headers)
    assert resp.status_code == 201, resp.text
    return resp.json()["data"]


async def test_spawn_stores_the_call_id_and_the_request_does_not_wait(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    task = await create_task(client, user, gpu_job)
    assert task["status"] == "queued"
    assert fake_modal.spawned == [("spool", "run_gpu_large", (task["id"],))]
    row = task_row(task["id"])
    assert row["call_id"] == "fc-1" and row["status"] == "queued" and row["message"] is None
    await create_task(client, user, gpu_job)
    assert len(fake_modal.spawned) == 2 and fake_modal.lookups == 1  # the function handle is looked up once


@pytest.fixture
def kling_keys():
    """Kling 已配置（只为能创建 Kling 任务；派发被替身接住，不会联系 Kling）"""
    from tests.test_kling import AK, KLING_ENV, SK, set_env

    saved = {name: os.environ.get(name) for name in KLING_ENV}
    set_env({"KLING_AI_ACCESS_KEY": AK, "KLING_AI_SECRET_KEY": SK})
    yield
    set_env(saved)


async def test_upload_checks_and_provider_jobs_are_spawned_on_functions_of_their_own(
    client, make_user, fake_modal, kling_keys
):
    """上传检查与 Kling 任务各排各的函数：Kling 任务占满容器时上传照样被检查，一个账户的上传也挤不掉付费的 Kling 任务"""
    from tests.test_assets import direct_upload, png_bytes

    user = await make_user()
    kling = await create_task(client, user, "kling.text2video", {"prompt": "a paper boat on a rainy street"})
    resp = await direct_upload(client, user, png_bytes())
    assert resp.status_code == 201, resp.text
    probe_task_id = resp.json()["data"]["probe_task_id"]
    spawned = {args[0]: name for _, name, args in fake_modal.spawned}
    assert spawned == {kling["id"]: "run_provider", probe_task_id: "run_probe"}


async def test_failed_spawn_leaves_the_task_queued_and_the_reaper_dispatches_it_again(
    client, make_user, fake_modal, gpu_job
):
    user = await make_user()
    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    task = await create_task(client, user, gpu_job)
    row = task_row(task["id"])
    assert row["status"] == "queued" and row["call_id"] is None and "retried" in row["message"]
    assert fake_modal.spawned == []

    fake_modal.spawn_error = None
    assert await reap() == {}  # too soon: a fresh task is left alone
    sql("update public.tasks set updated_at = now() - interval '5 minutes' where id = %s", (task["id"],))
    assert await reap() == {"redispatch": 1}
    assert fake_modal.spawned == [("spool", "run_gpu_large", (task["id"],))]
    assert task_row(task["id"])["call_id"] == "fc-1"

    # Two calls for one task (a retried spawn that had reached Modal after all): the claim runs it once.
    outcomes = await asyncio.gather(run_task_async(task["id"]), run_task_async(task["id"]))
    assert sorted(outcomes) == ["completed", "skipped"]
    assert task_row(task["id"])["attempts"] == 1
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_a_respawn_that_succeeds_clears_the_note_of_the_failed_spawn(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    task = await create_task(client, user, gpu_job)
    assert task_row(task["id"])["message"] == "Waiting for a worker (dispatch will be retried)."
    fake_modal.spawn_error = None
    sql("update public.tasks set updated_at = now() - interval '5 minutes' where id = %s", (task["id"],))
    assert await reap() == {"redispatch": 1}
    row = task_row(task["id"])
    assert row["status"] == "queued" and row["call_id"] == "fc-1" and row["message"] is None

    # A task requeued by the reaper keeps saying why once it is spawned again.
    sql("select * from public.claim_task(%s, 'fc-1')", (task["id"],))
    sql("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task["id"],))
    assert await reap() == {"requeued": 1}
    row = task_row(task["id"])
    assert row["call_id"] == "fc-2" and row["message"] == "The worker stopped responding; retrying."


async def test_a_call_waiting_in_modals_queue_keeps_its_place(client, make_user, fake_modal, gpu_job):
    """没有空闲 GPU 时调用在 Modal 队列里等：再 spawn 一次只会排到队尾（Modal 不会让排队的输入过期）"""
    user = await make_user()
    task = await create_task(client, user, gpu_job)  # fc-1, which no container has started yet
    sql("update public.tasks set updated_at = now() - interval '30 minutes' where id = %s", (task["id"],))
    assert await reap() == {"waiting_for_gpu": 1}
    assert fake_modal.polls == ["fc-1"] and fake_modal.canceled == [] and len(fake_modal.spawned) == 1
    row = task_row(task["id"])
    assert row["call_id"] == "fc-1" and row["message"] == "Waiting for a free worker"
    assert await reap() == {} and fake_modal.polls == ["fc-1"]  # asked about again in 20 minutes, not every pass


async def test_tasks_waiting_for_a_gpu_do_not_crowd_out_a_failed_spawn(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    waiting = [await create_task(client, user, gpu_job) for _ in range(3)]
    sql(
        "update public.tasks"
        " set updated_at = now() - interval '30 minutes', created_at = created_at - interval '1 hour'"
    )
    await reap()
    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    failed = await create_task(client, user, gpu_job)
    fake_modal.spawn_error = None
    sql("update public.tasks set updated_at = now() - interval '2 minutes' where id = %s", (failed["id"],))
    assert await reap() == {"redispatch": 1}
    assert task_row(failed["id"])["call_id"] is not None
    assert all(task_row(t["id"])["call_id"] in ("fc-1", "fc-2", "fc-3") for t in waiting)


async def test_modal_out_of_reach_is_no_reason_to_spawn_again(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    task = await create_task(client, user, gpu_job)
    fake_modal.ended["fc-1"] = modal.exception.ConnectionError("Modal is unreachable")
    sql("update public.tasks set updated_at = now() - interval '30 minutes' where id = %s", (task["id"],))
    assert await reap() == {"modal_unreachable": 1}
    assert len(fake_modal.spawned) == 1 and task_row(task["id"])["call_id"] == "fc-1"
    assert task_row(task["id"])["message"] is None  # it is not known to wait for a worker
    assert await reap() == {"modal_unreachable": 1} and fake_modal.polls == ["fc-1", "fc-1"]  # asked again next pass


@pytest.mark.parametrize(
    "ended", ["skipped", RuntimeError("the container crashed before its claim"), modal.exception.OutputExpiredError()]
)
async def test_a_call_that_ended_without_its_task_is_replaced(client, make_user, fake_modal, gpu_job, ended):
    user = await make_user()
    task = await create_task(client, user, gpu_job)
    fake_modal.ended["fc-1"] = ended
    sql("update public.tasks set updated_at = now() - interval '30 minutes' where id = %s", (task["id"],))
    assert await reap() == {"redispatch": 1}
    assert len(fake_modal.spawned) == 2 and task_row(task["id"])["call_id"] == "fc-2"


async def test_a_respawn_that_fails_after_its_call_ended_is_retried_a_minute_later(
    client, make_user, fake_modal, gpu_job
):
    user = await make_user()
    task = await create_task(client, user, gpu_job)
    fake_modal.ended["fc-1"] = "skipped"
    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    sql("update public.tasks set updated_at = now() - interval '30 minutes' where id = %s", (task["id"],))
    await reap()
    assert task_row(task["id"])["call_id"] is None  # the ended call is not kept as if it were live
    fake_modal.spawn_error = None
    sql("update public.tasks set updated_at = now() - interval '2 minutes' where id = %s", (task["id"],))
    assert await reap() == {"redispatch": 1}
    assert task_row(task["id"])["call_id"] == "fc-2"


async def test_a_reaper_pass_during_another_ones_spawn_leaves_the_task_to_it(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    task = await create_task(client, user, gpu_job)
    fake_modal.spawn_error = None
    sql("update public.tasks set updated_at = now() - interval '5 minutes' where id = %s", (task["id"],))
    overlapping = []
    fake_modal.while_spawning = lambda: reap_into(overlapping)  # a second pass starts meanwhile
    assert await reap() == {"redispatch": 1}
    assert overlapping == [{}]
    assert fake_modal.spawned == [("spool", "run_gpu_large", (task["id"],))]
    assert task_row(task["id"])["call_id"] == "fc-1"


async def test_a_task_two_passes_both_picked_is_spawned_by_one(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    tasks = [await create_task(client, user, gpu_job) for _ in range(2)]
    fake_modal.spawn_error = None
    sql("update public.tasks set updated_at = now() - interval '5 minutes'")
    overlapping = []
    fake_modal.while_spawning = lambda: reap_into(overlapping)  # while the first pass spawns its first task
    assert await reap() == {"redispatch": 2}  # picked before the second pass took the other one
    assert overlapping == [{"redispatch": 1}]
    assert sorted(args for _, _, args in fake_modal.spawned) == sorted((t["id"],) for t in tasks)
    assert {task_row(t["id"])["call_id"] for t in tasks} == {"fc-1", "fc-2"}


async def test_two_dispatches_of_a_task_at_once_spawn_it_once(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    task = await create_task(client, user, gpu_job)
    fake_modal.spawn_error, fake_modal.spawn_delay = None, 0.2
    service = get_task_service()
    await asyncio.gather(*(service.dispatch(task_id=task["id"], model_key=gpu_job) for _ in range(2)))
    assert fake_modal.spawned == [("spool", "run_gpu_large", (task["id"],))]
    row = task_row(task["id"])
    assert row["call_id"] == "fc-1" and row["dispatch_started_at"] is None


async def test_a_slow_spawn_by_the_api_is_not_repeated_by_the_reaper(client, make_user, fake_modal, gpu_job):
    overlapping = []

    async def late_reaper_pass():  # the API's spawn outlasts the reaper's patience
        sql("update public.tasks set updated_at = now() - interval '5 minutes'")
        await reap_into(overlapping)

    fake_modal.while_spawning = late_reaper_pass
    user = await make_user()
    task = await create_task(client, user, gpu_job)
    assert overlapping == [{}]
    assert fake_modal.spawned == [("spool", "run_gpu_large", (task["id"],))]
    assert task_row(task["id"])["call_id"] == "fc-1"


async def test_a_dispatcher_that_died_mid_spawn_holds_the_task_for_two_minutes(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    fake_modal.spawn_error = asyncio.CancelledError()  # the request's process went away during the spawn
    with pytest.raises(asyncio.CancelledError):
        await get_task_service().create_task(user_id=user.id, model_key=gpu_job, params={})
    fake_modal.spawn_error = None
    [task] = sql("select id::text from public.tasks where user_id = %s", (user.id,))
    sql("update public.tasks set updated_at = now() - interval '5 minutes' where id = %s", (task["id"],))
    assert await reap() == {} and fake_modal.spawned == []  # it may still be spawning
    sql(
        "update public.tasks set dispatch_started_at = dispatch_started_at - interval '121 seconds',"
        " queued_at = queued_at - interval '121 seconds' where id = %s",
        (task["id"],),
    )
    assert await reap() == {"redispatch": 1}
    assert fake_modal.spawned == [("spool", "run_gpu_large", (task["id"],))]


async def reap_into(results: list) -> None:
    results.append(await reap())


async def test_a_hanging_spawn_times_out_and_leaves_the_task_queued(
    client, make_user, fake_modal, gpu_job, monkeypatch
):
    monkeypatch.setattr(modal_dispatch, "SPAWN_TIMEOUT_S", 0.2)
    fake_modal.spawn_delay = 30
    user = await make_user()
    task = await asyncio.wait_for(create_task(client, user, gpu_job), 5)
    row = task_row(task["id"])
    assert row["status"] == "queued" and row["call_id"] is None
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_cancel_cancels_the_modal_call_and_refunds_once(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    task = await create_task(client, user, gpu_job)
    resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert resp.status_code == 200 and resp.json()["data"]["status"] == "canceled"
    assert fake_modal.canceled == ["fc-1"]
    assert fake_modal.cancel_options == [{"terminate_containers": True}]  # the container goes, not just the input
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_cancel_still_cancels_when_modal_refuses_or_there_is_no_call(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    fake_modal.cancel_error = ConnectionError("Modal is unreachable")
    task = await create_task(client, user, gpu_job)
    resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert resp.status_code == 200 and task_row(task["id"])["status"] == "canceled"

    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    never_spawned = await create_task(client, user, gpu_job)
    resp = await client.post(f"/tasks/{never_spawned['id']}/cancel", headers=user.headers)
    assert resp.status_code == 200 and fake_modal.canceled == []
    assert [e["kind"] for e in ledger(user.id, never_spawned["id"])] == ["charge", "refund"]


async def test_a_cancel_during_the_spawn_cancels_the_call_the_spawn_made(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    task = await create_task(client, user, gpu_job)
    fake_modal.spawn_error = None

    async def cancel_meanwhile():  # the user cancels after the dispatcher claimed the task, before its call id is kept
        resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
        assert resp.status_code == 200, resp.text

    fake_modal.while_spawning = cancel_meanwhile
    await get_task_service().dispatch(task_id=task["id"], model_key=gpu_job)  # the reaper's respawn: fc-1
    assert fake_modal.canceled == ["fc-1"]  # not left to wait for a GPU and start a container for nothing
    assert fake_modal.cancel_options == [{"terminate_containers": False}]
    row = task_row(task["id"])
    assert row["status"] == "canceled" and row["call_id"] is None
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]
    assert await run_task_async(task["id"], call_id="fc-1") == "skipped"  # had it started anyway: no work

    # A call that claimed its task before the spawn returned is the task's own: a cancel then reaches it as usual.
    other = await create_task(client, user, gpu_job)  # fc-2
    fake_modal.spawn_error = None
    sql("update public.tasks set call_id = null where id = %s", (other["id"],))

    async def claim_and_finish():
        sql("select * from public.claim_task(%s, 'fc-3')", (other["id"],))
        sql("select public.finish_task(%s, 'failed', null, null, null, null, null)", (other["id"],))

    fake_modal.while_spawning = claim_and_finish
    await get_task_service().dispatch(task_id=other["id"], model_key=gpu_job)
    assert fake_modal.canceled == ["fc-1"] and task_row(other["id"])["call_id"] == "fc-3"


async def test_the_call_that_claims_a_task_is_the_one_a_cancel_reaches(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    task = await create_task(client, user, gpu_job)  # spawned as fc-1
    claimed = sql("select * from public.claim_task(%s)", (task["id"],))[0]
    # Re-dispatched while the first call was starting: a failed re-spawn leaves the running task's words alone,
    # and a successful one does not take over its call id.
    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    await get_task_service().dispatch(task_id=task["id"], model_key=gpu_job)
    fake_modal.spawn_error = None
    await get_task_service().dispatch(task_id=task["id"], model_key=gpu_job)  # fc-2
    row = task_row(task["id"])
    assert row["status"] == "processing" and row["message"] is None and row["call_id"] == "fc-1"

    assert claimed["attempts"] == 1

    # The runner records the call it runs in: had the redundant call claimed the task, a cancel would reach it.
    other = await create_task(client, user, gpu_job)  # spawned as fc-3
    assert await run_task_async(other["id"], call_id="fc-claimer") == "completed"
    assert task_row(other["id"])["call_id"] == "fc-claimer"


async def test_modals_rerun_of_a_lost_container_takes_its_task_over_at_once(client, make_user, fake_modal, gpu_job):
    user = await make_user()
    task = await create_task(client, user, gpu_job)
    sql("select * from public.claim_task(%s, 'fc-1')", (task["id"],))  # the first container claimed it, then was lost
    assert await run_task_async(task["id"], call_id="fc-other") == "skipped"  # another call never takes it
    assert await run_task_async(task["id"], call_id="fc-1") == "completed"  # Modal's rerun of the same input
    row = task_row(task["id"])
    assert row["attempts"] == 2 and [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_a_call_that_lost_the_claim_does_not_take_the_task_from_the_one_that_won(
    client, make_user, fake_modal, gpu_job, monkeypatch
):
    from gpu_jobs import runner

    user = await make_user()
    task = await create_task(client, user, gpu_job)  # fc-1
    sql("update public.tasks set call_id = null where id = %s", (task["id"],))  # its spawn's answer was lost
    await get_task_service().dispatch(task_id=task["id"], model_key=gpu_job)  # a re-dispatch before it started: fc-2
    assert task_row(task["id"])["call_id"] == "fc-2"

    real_fetch_one = runner.db.fetch_one
    second: list[str] = []

    async def fetch_one(query, params=None):
        row = await real_fetch_one(query, params)
        if "claim_task" in query and not second:  # fc-2 starts just as fc-1's claim has committed
            second.append("started")
            second.append(await run_task_async(task["id"], call_id="fc-2"))
        return row

    monkeypatch.setattr(runner.db, "fetch_one", fetch_one)
    assert await run_task_async(task["id"], call_id="fc-1") == "completed"
    assert second == ["started", "skipped"]
    row = task_row(task["id"])
    assert row["attempts"] == 1 and row["call_id"] == "fc-1"
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_the_reaper_stops_the_call_of_a_task_it_requeues_or_fails_for_stalling(
    client, make_user, fake_modal, gpu_job
):
    """停滞的尝试（处理器卡住、与数据库断开）的容器被终止，不再占着 GPU 直到 Modal 的函数超时"""
    from lib.config import get_settings

    user = await make_user()
    task = await create_task(client, user, gpu_job)  # fc-1
    sql("select * from public.claim_task(%s, 'fc-1')", (task["id"],))
    sql("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task["id"],))
    assert await reap() == {"requeued": 1}
    assert fake_modal.canceled == ["fc-1"]
    assert fake_modal.cancel_options == [{"terminate_containers": True}]  # the container goes, not just the input
    assert task_row(task["id"])["call_id"] == "fc-2"  # the new attempt's call is left alone

    sql("select * from public.claim_task(%s, 'fc-2')", (task["id"],))
    sql(
        "update public.tasks set attempts = %s, heartbeat_at = now() - interval '1 hour' where id = %s",
        (get_settings().task_max_attempts, task["id"]),
    )
    assert await reap() == {"failed": 1}
    assert fake_modal.canceled == ["fc-1", "fc-2"]
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_a_stalled_task_is_requeued_and_spawned_again_when_modal_refuses_the_cancel(
    client, make_user, fake_modal, gpu_job, monkeypatch
):
    user = await make_user()
    task = await create_task(client, user, gpu_job)  # fc-1
    sql("select * from public.claim_task(%s, 'fc-1')", (task["id"],))
    sql("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task["id"],))
    fake_modal.cancel_error = modal.exception.ConnectionError("Modal is unreachable")
    assert await reap() == {"requeued": 1}
    row = task_row(task["id"])
    assert row["status"] == "queued" and row["call_id"] == "fc-2" and len(fake_modal.spawned) == 2

    # Modal answering no cancel at all: the pass stops waiting for the cancels and still spawns the task again.
    from lib import reaper

    monkeypatch.setattr(reaper, "CANCEL_BUDGET_S", 0.2)
    fake_modal.cancel_error, fake_modal.cancel_delay = None, 60
    sql("select * from public.claim_task(%s, 'fc-2')", (task["id"],))
    sql("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task["id"],))
    assert await asyncio.wait_for(reap(), 5) == {"requeued": 1}
    assert task_row(task["id"])["call_id"] == "fc-3" and fake_modal.canceled == []


async def test_a_task_that_expires_in_the_queue_has_its_waiting_call_canceled(client, make_user, fake_modal, gpu_job):
    """排队超时而失败退款的任务：仍在 Modal 队列里的调用被取消，不会在有 GPU 时为它白白启动容器"""
    user = await make_user()
    task = await create_task(client, user, gpu_job)  # fc-1, waiting for a GPU
    sql(
        "update public.tasks set queued_at = now() - interval '7 hours', updated_at = now() - interval '7 hours'"
        " where id = %s",
        (task["id"],),
    )
    assert await reap() == {"expired": 1}
    assert fake_modal.canceled == ["fc-1"] and fake_modal.polls == []
    row = task_row(task["id"])
    assert row["status"] == "failed" and row["error"]["code"] == "not_started"
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


async def test_a_task_is_created_even_when_noting_its_failed_dispatch_fails(
    client, make_user, fake_modal, gpu_job, monkeypatch
):
    import psycopg

    from lib import tasks as tasks_module

    real_execute = tasks_module.db.execute

    async def execute(query, params=None):
        if "set_task_dispatch" in query:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await real_execute(query, params)

    fake_modal.spawn_error = ConnectionError("Modal is unreachable")
    monkeypatch.setattr(tasks_module.db, "execute", execute)
    user = await make_user()
    task = await create_task(client, user, gpu_job)  # 201: created and charged once, the reaper dispatches it
    assert task_row(task["id"])["status"] == "queued"
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


@pytest.mark.filterwarnings("ignore:The run_gpu_small function is executing locally")
async def test_run_task_local_completes_a_real_upscale(client, make_user, fake_modal):
    """POST /tasks spawns `run_gpu_small`; running that function here completes the task against the local
    database and storage, as the Modal container would."""
    pytest.importorskip("gpu_jobs.handlers.image_upscale", reason="the image.upscale handler is not written yet")
    storage_module = pytest.importorskip("lib.storage", reason="lib/storage.py is not written yet")
    from PIL import Image

    user = await make_user()
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 120, 200)).save(buffer, format="PNG")
    path = f"{user.id}/uploads/in.png"
    await storage_module.get_storage().upload_bytes(path=path, data=buffer.getvalue(), content_type="image/png")
    asset = make_asset(user.id, width=24, height=16, path=path)

    task = await create_task(client, user, "image.upscale", {"image_asset_id": asset, "scale": 2})
    [(app_name, name, args)] = fake_modal.spawned
    assert (app_name, name) == ("spool", "run_gpu_small")

    status = await asyncio.to_thread(modal_app.JOB_FUNCTIONS[name].local, *args)
    assert status == "completed"
    row = task_row(task["id"])
    assert row["status"] == "completed" and row["progress"] == 1 and row["result_url"]
    assert (row["result"]["width"], row["result"]["height"]) == (48, 32)
    assert await storage_module.get_storage().exists(path=row["result"]["path"])
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


# Run in a fresh process where `import torch` fails, as it does on the CPU pools' image.
WITHOUT_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTorch())
import modal_app
print(modal_app.run_probe.local(sys.argv[1]), modal_app.run_provider.local(sys.argv[2]))
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""


@pytest.fixture
def fake_kling(tmp_path):
    """运行中的假 Kling，且配置指向它（轮询间隔极短）"""
    from tests.media_factories import make_video
    from tests.test_kling import serving_kling

    with serving_kling(make_video(tmp_path / "kling.mp4", 64, 48, frames=12)) as fake:
        yield fake


async def test_upload_checks_and_provider_jobs_run_where_torch_cannot_be_imported(
    client, make_user, fake_modal, fake_kling, tmp_path
):
    """run_probe 与 run_provider 在没有 torch 的镜像上运行：真实的视频上传检查（含海报）与 Kling 图生视频任务都完成"""
    from PIL import Image

    from lib.storage import get_storage
    from tests.media_factories import make_video

    user = await make_user()
    clip = make_video(tmp_path / "upload.mp4", 64, 48, frames=12)
    resp = await client.post(
        "/assets", files={"file": ("clip.mp4", clip.read_bytes(), "video/mp4")}, headers=user.headers
    )
    assert resp.status_code == 201, resp.text
    upload = resp.json()["data"]
    buffer = io.BytesIO()
    Image.new("RGB", (480, 360), (20, 120, 200)).save(buffer, "PNG")
    path = f"{user.id}/uploads/still.png"
    await get_storage().upload_bytes(path=path, data=buffer.getvalue(), content_type="image/png")
    still = make_asset(user.id, kind="image", width=480, height=360, path=path)
    kling = await create_task(client, user, "kling.image2video", {"image_asset_id": still, "prompt": "ripples"})
    spawned = {args[0]: name for _, name, args in fake_modal.spawned}
    assert spawned == {upload["probe_task_id"]: "run_probe", kling["id"]: "run_provider"}

    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", WITHOUT_TORCH, upload["probe_task_id"], kling["id"]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["completed completed", "[]"], out.stderr[-3000:]
    checked = (await client.get(f"/assets/{upload['id']}", headers=user.headers)).json()["data"]
    assert checked["status"] == "ready" and (checked["width"], checked["height"]) == (64, 48)
    poster = sql("select * from public.assets where source_task_id = %s", (upload["probe_task_id"],))
    assert [(a["kind"], a["mime"]) for a in poster] == [("image", "image/jpeg")]
    assert len(fake_kling.submits) == 1 and base64.b64decode(fake_kling.submits[0]["image"]) == buffer.getvalue()
    [video] = sql("select * from public.assets where source_task_id = %s", (kling["id"],))
    assert (video["kind"], video["width"], video["height"]) == ("video", 64, 48)


async def test_a_container_whose_timed_out_handler_still_runs_stops_taking_inputs_even_when_run_task_raises(
    client, make_user, monkeypatch
):
    """The database is out of reach when the timed-out task is failed: Modal retries the input, not on this GPU."""
    import psycopg
    from modal import experimental

    from gpu_jobs import runner
    from tests.test_runner import JobParams

    monkeypatch.setitem(
        catalog.CATALOG,
        "test.hang",
        catalog.ModelSpec(
            key="test.hang",
            kind="image",
            title="hang",
            params=JobParams,
            price=lambda p, a: 5,
            price_rule="5",
            handler="tests.job_handlers:hang",
            timeout_s=1,
        ),
    )
    user = await make_user()
    resp = await client.post("/tasks", json={"model_key": "test.hang", "params": {"seconds": 3}}, headers=user.headers)
    task = resp.json()["data"]

    async def unreachable(*args, **kwargs):
        raise psycopg.OperationalError("connection to server failed")

    stopped: list[bool] = []
    monkeypatch.setattr(runner, "_fail", unreachable)
    monkeypatch.setattr(modal, "current_function_call_id", lambda: "fc-hang")
    monkeypatch.setattr(experimental, "stop_fetching_inputs", lambda: stopped.append(True))
    with pytest.raises(psycopg.OperationalError):
        await asyncio.to_thread(modal_app.run_job, task["id"])
    assert runner.handler_still_running() and stopped == [True]
    assert runner.wait_for_handlers(5)
