"""kling.text2video / kling.image2video: a provider task on the provider function — submit or resume, poll, re-host."""

from __future__ import annotations

from gpu_jobs.handlers import JobContext, OutputFile
from gpu_jobs.providers import ProviderError, cancelable_sleep, run_provider_job
from gpu_jobs.providers.kling import KlingProvider
from lib.config import get_settings


def run(ctx: JobContext) -> list[OutputFile]:
    """Kling 文生视频 / 图生视频：提交或恢复、轮询、下载并探测"""
    settings = get_settings()
    if not settings.kling_configured:  # the keys were removed after the task was paid for
        raise ProviderError("Kling is not available right now; your credits were refunded.")
    endpoint = "image2video" if getattr(ctx.params, "image_asset_id", None) else "text2video"
    with KlingProvider.from_settings(settings, endpoint=endpoint, sleep=cancelable_sleep(ctx)) as provider:
        return run_provider_job(
            ctx,
            provider,
            deadline_s=settings.kling_poll_deadline_seconds,
            interval_s=settings.kling_poll_interval_seconds,
        )
