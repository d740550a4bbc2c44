"""Handlers used by runner tests: slow, failing, refusing and quick jobs behind the real runner."""

from __future__ import annotations

import time

from gpu_jobs.handlers import JobContext, OutputFile
from lib.errors import InvalidInput, TransientError


def slow(ctx: JobContext) -> list[OutputFile]:
    """缓慢推进的任务（用于取消测试）"""
    steps = int(ctx.params.seconds / 0.02)
    for step in range(steps):
        ctx.progress(step / steps, f"step {step}")
        ctx.state["steps"] = step
        time.sleep(0.02)
    return quick(ctx)


def boom(ctx: JobContext) -> list[OutputFile]:
    raise RuntimeError("driver exploded: secret detail")


def refuse(ctx: JobContext) -> list[OutputFile]:
    raise InvalidInput("The file is not a picture we can read.")


def flaky(ctx: JobContext) -> list[OutputFile]:
    raise TransientError("storage is briefly unreachable")


def net_timeout(ctx: JobContext) -> list[OutputFile]:
    raise TimeoutError("timed out reading from the network")  # socket.timeout is this class too


def hang(ctx: JobContext) -> list[OutputFile]:
    """静默地卡住（不报告进度），直到 seconds 秒后才推进一次"""
    time.sleep(ctx.params.seconds)
    ctx.progress(0.5)
    return quick(ctx)


def nothing(ctx: JobContext) -> list[OutputFile]:
    """正常返回，却没有任何产出"""
    ctx.progress(1.0)
    return []


def orphaned(ctx: JobContext) -> list[OutputFile]:
    """任务所属的账号在运行中被删除（级联删掉任务行），随后拒绝输入"""
    from tests.factories import sql

    sql("delete from auth.users where id = (select user_id from public.tasks where id = %s)", (ctx.task_id,))
    raise InvalidInput("The file is not a picture we can read.")


def grind(ctx: JobContext) -> list[OutputFile]:
    """在原生代码（torch）里长时间计算的任务：每算 chunk 秒才报告一次进度"""
    import torch

    x = torch.rand(384, 384)
    ctx.progress(0.1, "grinding")
    deadline = time.monotonic() + ctx.params.seconds
    while time.monotonic() < deadline:
        chunk = time.monotonic() + ctx.params.chunk
        while time.monotonic() < chunk:
            x = torch.tanh(x @ x)  # releases the GIL while it computes
        ctx.progress(0.5, "grinding")
    return quick(ctx)


def phases(ctx: JobContext) -> list[OutputFile]:
    """像放大图片那样：最后一块算完，紧接着以同样的进度换一句说明（“正在保存”）"""
    ctx.progress(0.95, "Upscaling image")
    ctx.progress(0.95, "Saving image")
    return quick(ctx)


def quick(ctx: JobContext) -> list[OutputFile]:
    """写出一张 8×8 的 PNG"""
    from PIL import Image

    path = ctx.workdir / "out.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    ctx.progress(1.0)
    return [OutputFile(path=path, kind="image", mime="image/png", width=8, height=8)]
