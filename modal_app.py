"""The Modal App, the registry of every deployable: images, secrets, the `api` web function, one job function
per GPU class and per CPU pool of the catalog, and the reaper on a schedule.

    modal deploy modal_app.py      # deploy (README "Deploy")
    modal run modal_app.py         # smoke test: the model → function map, then one reaper pass in the cloud

Importing this module needs no credentials and imports neither torch nor av: the web container imports it
before it serves its first request, and the job functions import the runner inside their bodies (torch only for a
handler that computes on the GPU: the CPU pools' image has none).
"""

from __future__ import annotations

import re
from pathlib import Path

import modal

from lib.catalog import CATALOG, GPU_CLASSES, IO_ALLOWANCE_S, MINUTES
from lib.config import get_settings
from lib.modal_dispatch import RETIRED_FUNCTIONS, function_for, job_class, job_functions

APP_NAME = get_settings().modal_app_name
app = modal.App(APP_NAME)

# ---------------------------------------------------------------- images
# Pins live in requirements.txt only; each image names the packages it needs.
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
PYTHON_VERSION = "3.11"
LOCAL_SOURCE = ("functions", "gpu_jobs", "lib")
WEB_PACKAGES = (
    "fastapi",
    "pydantic",
    "pydantic-settings",
    "email-validator",
    "python-multipart",
    "psycopg",
    "psycopg-pool",
    "pyjwt",
    "cryptography",
    "httpx",
    "storage3",
    "stripe",
)
MEDIA_PACKAGES = ("av", "pillow", "numpy")
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cu128"  # CUDA 12.8 builds of torch


def pinned(*names: str) -> list[str]:
    """按 requirements.txt 给出这些包的固定版本（版本只写在一处）"""
    if not modal.is_local():  # inside a container the images are already built; the names are not used
        return list(names)
    pins: dict[str, str] = {}
    for line in REQUIREMENTS.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            pins[re.split(r"[\[=<>~!;\s]", requirement, maxsplit=1)[0].lower()] = requirement
    missing = [name for name in names if name not in pins]
    if missing:
        raise RuntimeError(f"requirements.txt does not pin {', '.join(missing)}")
    return [pins[name] for name in names]


# The web image: the API and the reaper. No torch, av, numpy or Pillow, for a fast cold start.
web_image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .uv_pip_install(*pinned(*WEB_PACKAGES))
    .add_local_python_source(*LOCAL_SOURCE)
)
# The job image of the GPU classes: the runner and the handlers, with a CUDA build of torch and PyAV.
job_image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .uv_pip_install(*pinned("torch"), index_url=TORCH_INDEX_URL)
    .uv_pip_install(*pinned(*WEB_PACKAGES, *MEDIA_PACKAGES))
    .add_local_python_source(*LOCAL_SOURCE)
)
# The job image of the CPU pools: the runner, the upload checks and the provider jobs, which need PyAV, Pillow and
# numpy but no torch. Every upload waits for its check: a cold start here skips pulling and importing several GB.
cpu_job_image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .uv_pip_install(*pinned(*WEB_PACKAGES, *MEDIA_PACKAGES))
    .add_local_python_source(*LOCAL_SOURCE)
)

# ---------------------------------------------------------------- secrets, settings, volumes
supabase_secret = modal.Secret.from_name(
    "spool-supabase", required_keys=["SUPABASE_URL", "SUPABASE_DB_URL", "SUPABASE_SERVICE_ROLE_KEY"]
)
stripe_secret = modal.Secret.from_name("spool-stripe", required_keys=["STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"])
# The deployment's plain settings, the same for every function (e.g. TASK_STALL_SECONDS is read by the runner's
# heartbeat and by the reaper). Required: the browser app's origins and Checkout's return pages (defaults: localhost).
settings_secret = modal.Secret.from_name(
    "spool-settings",
    required_keys=["CORS_ORIGINS", "BILLING_ALLOWED_ORIGINS", "BILLING_SUCCESS_URL", "BILLING_CANCEL_URL"],
)
# Kling is optional: without KLING_AI_ACCESS_KEY / KLING_AI_SECRET_KEY its models report "unavailable".
kling_secret = modal.Secret.from_name("spool-kling", required_keys=[])

CLOUD_ENV = {"SPOOL_MODE": "cloud", "MODAL_APP_NAME": APP_NAME}

WEIGHTS_DIR = "/weights"  # model weights, for handlers that load a checkpoint
weights = modal.Volume.from_name("spool-weights", create_if_missing=True)

# ---------------------------------------------------------------- job functions
RETRIES = modal.Retries(max_retries=2, initial_delay=5.0, backoff_coefficient=2.0)
# Containers at once per class. Jobs hold one database connection each most of the time: with the API's 10 × 10,
# these stay under 80 % of a small Supabase plan's 200 pooler clients (see README, Scaling).
MAX_CONTAINERS = {"gpu-small": 10, "gpu-large": 4, "probe": 10, "provider": 30}
# CPU cores and memory (MiB) reserved per container. Modal's default is an eighth of a core and 128 MiB: decoding and
# x264 encoding run on the CPU beside the GPU (x264 scales with cores), and frame batches need room in host memory.
# An upload check decodes one frame of the largest input allowed (40 MP, under 1 GiB at its peak); a provider job
# mostly waits on the provider's API, and its peak (re-encoding a large input image) stays under 1.5 GiB.
RESOURCES = {
    "gpu-small": (4.0, 16 * 1024),
    "gpu-large": (8.0, 32 * 1024),
    "probe": (1.0, 2 * 1024),
    "provider": (0.25, 1536),
}
RETIRED_MAX_CONTAINERS = 10  # a retired function only runs out the calls spawned before it was retired
DEFAULT_TIMEOUT_S = 10 * MINUTES
# Downloading inputs and uploading outputs come on top of a handler's timeout_s (IO_ALLOWANCE_S): the runner's own
# limit must fire first, so the task fails with `timeout` and a refund instead of being killed and retried by Modal.
IO_MARGIN_S = IO_ALLOWANCE_S + 2 * MINUTES


def job_timeout(cls: str) -> int:
    """函数超时 = 其模型中最长的 timeout_s 加上传输余量"""
    longest = max((spec.timeout_s for key, spec in CATALOG.items() if job_class(key) == cls), default=DEFAULT_TIMEOUT_S)
    return longest + IO_MARGIN_S


def job_options(cls: str) -> dict:
    """一类任务函数的 Modal 参数（GPU 备选列表、超时、重试、并发上限、核数与内存、密钥）"""
    cpu, memory = RESOURCES.get(cls, RESOURCES["gpu-small"])
    options = {
        "image": job_image if cls in GPU_CLASSES else cpu_job_image,
        "secrets": [settings_secret, supabase_secret, kling_secret],
        "env": CLOUD_ENV,
        "timeout": job_timeout(cls),
        "retries": RETRIES,
        "max_containers": MAX_CONTAINERS.get(cls, 4),
        "cpu": cpu,
        "memory": memory,
    }
    if cls in GPU_CLASSES:
        options |= {"gpu": list(GPU_CLASSES[cls]), "volumes": {WEIGHTS_DIR: weights}}
    return options


def run_job(task_id: str) -> str:
    """在本容器内运行一个任务（认领保证同一任务不会同时运行两次）"""
    from gpu_jobs.runner import handler_still_running, run_task
    from lib.logs import configure_logging

    configure_logging(get_settings().log_level)
    try:
        return run_task(task_id, call_id=modal.current_function_call_id())
    finally:
        # A handler past its time limit holds the GPU: let this container go, also when run_task raised (Modal
        # would retry that input, maybe here).
        if handler_still_running():
            from modal import experimental

            experimental.stop_fetching_inputs()


@app.function(**job_options("gpu-small"))
def run_gpu_small(task_id: str) -> str:
    """在 gpu-small 类 GPU 上运行任务"""
    return run_job(task_id)


@app.function(**job_options("gpu-large"))
def run_gpu_large(task_id: str) -> str:
    """在 gpu-large 类 GPU 上运行任务"""
    return run_job(task_id)


@app.function(**job_options("probe"))
def run_probe(task_id: str) -> str:
    """在 CPU 上检查上传（每个上传都要等它，几秒一个）"""
    return run_job(task_id)


@app.function(**job_options("provider"))
def run_provider(task_id: str) -> str:
    """在 CPU 上运行外部提供方的任务（大部分时间在等提供方）"""
    return run_job(task_id)


@app.function(**job_options(RETIRED_FUNCTIONS["run_cpu"]) | {"max_containers": RETIRED_MAX_CONTAINERS})
def run_cpu(task_id: str) -> str:
    """退役：跑完拆分之前 spawn 到这里的调用（上传检查或外部提供方），不再接新任务"""
    return run_job(task_id)


JOB_FUNCTIONS = {
    "run_gpu_small": run_gpu_small,
    "run_gpu_large": run_gpu_large,
    "run_probe": run_probe,
    "run_provider": run_provider,
    "run_cpu": run_cpu,
}
_undeclared = (set(job_functions()) | {function_for(key) for key in CATALOG}) - set(JOB_FUNCTIONS)
if _undeclared:
    raise RuntimeError(f"modal_app.py declares no function for {sorted(_undeclared)}: add one per GPU class and pool")

# ---------------------------------------------------------------- web API and reaper

# Each api container holds up to DB_POOL_MAX database connections (10): 10 containers, 1,000 requests at once, stay
# with the job functions' one each under the 200 clients of a small Supabase plan's pooler (see README, Scaling).
API_MAX_CONTAINERS = 10


@app.function(
    image=web_image,
    secrets=[settings_secret, supabase_secret, stripe_secret, kling_secret],
    env=CLOUD_ENV,
    min_containers=0,
    max_containers=API_MAX_CONTAINERS,
    cpu=1.0,
    memory=1024,
)
# Up to 100 requests at once, but Modal adds a container past 30 (its 10 database connections are shared by all).
@modal.concurrent(max_inputs=100, target_inputs=30)
@modal.asgi_app()
def api():
    """HTTP API（FastAPI）；创建任务只 spawn，不等待 GPU"""
    from functions.app import create_app

    return create_app()


@app.function(
    image=web_image,
    secrets=[settings_secret, supabase_secret],
    env=CLOUD_ENV,
    schedule=modal.Period(minutes=1),
    timeout=2 * MINUTES,
    max_containers=1,
)
def reaper() -> dict[str, int]:
    """回收一轮：重新排队停滞的任务、失败并退款用尽次数或排队过久的任务、重新派发未派发的任务、清理遗留的文件"""
    import asyncio

    from lib import db
    from lib.logs import configure_logging
    from lib.reaper import reap

    configure_logging(get_settings().log_level)

    async def once() -> dict[str, int]:
        try:
            return await reap()
        finally:
            await db.close_pool()

    return asyncio.run(once())


@app.local_entrypoint()
def main() -> None:
    """冒烟测试：打印模型 → 函数映射，并在云端跑一轮回收"""
    for key, spec in CATALOG.items():
        print(f"{key:<20} → {function_for(key):<14} gpu={GPU_CLASSES.get(spec.gpu, 'cpu')}")
    print("reaper pass:", reaper.remote())
