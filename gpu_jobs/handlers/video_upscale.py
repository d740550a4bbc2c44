"""video.upscale: every frame Lanczos-3 2x/4x, streamed decode → device → H.264, audio copied through.

Frames stay yuv420p from decoder to encoder (as FFmpeg's scale filter works): half the bytes and half the
arithmetic of RGB, and no colour conversion at either end for 8-bit BT.709 video.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gpu_jobs.handlers import JobContext, OutputFile
from gpu_jobs.media import (
    check_output_pixels,
    even,
    input_path,
    job_device,
    param,
    probe_file,
    require_kind,
    resize_yuv420,
    stream_video,
    video_output,
)
from lib.errors import InvalidInput


def run(ctx: JobContext) -> list[OutputFile]:
    """视频放大"""
    path = input_path(ctx, param(ctx.params, "video_asset_id"))
    scale = int(param(ctx.params, "scale", 2))
    if scale not in (2, 4):
        raise InvalidInput("scale must be 2 or 4.")
    info = probe_file(path)
    require_kind(info, "video")
    width, height = even(info["width"] * scale), even(info["height"] * scale)
    check_output_pixels(width, height, video=True)
    out = ctx.workdir / f"upscaled_{scale}x.mp4"

    def process(batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        return (resize_yuv420(x, (info["height"], info["width"]), (height, width)) for x in batches)

    ctx.progress(0.0, "Upscaling video")
    frames = stream_video(
        path,
        out,
        process,
        info=info,
        out_size=(height, width),
        progress=ctx.progress,
        device=job_device(ctx),
        planar=True,
        message="Upscaling video",
    )
    return [video_output(out, width, height, frames, info["fps"], scale=scale)]
