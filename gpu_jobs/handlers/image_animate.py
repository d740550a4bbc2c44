"""image.animate: a still turned into a clip by an eased virtual camera (zoom, pan, Ken Burns).

Every frame is one affine window onto the picture, sampled sub-pixel with ``grid_sample`` (bicubic), in
batches of frames on the device; the picture is first shrunk with Lanczos to about the detail the
frames can show, so the sampling never aliases.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction

import torch
import torch.nn.functional as F

from gpu_jobs.handlers import JobContext, OutputFile
from gpu_jobs.media import (
    FrameWriter,
    batch_size_for,
    check_output_pixels,
    encode_batches,
    even,
    input_path,
    job_device,
    load_image,
    param,
    probe_file,
    require_kind,
    resize,
    video_output,
    work_dtype,
)
from lib.errors import InvalidInput

ASPECTS = {"16:9": Fraction(16, 9), "9:16": Fraction(9, 16), "1:1": Fraction(1)}
MOTIONS = ("zoom_in", "zoom_out", "pan_left", "pan_right", "pan_up", "pan_down", "ken_burns")
ZOOM = 1.25  # how far zoom_in/zoom_out go
PAN_ZOOM = 1.2  # pans look through a window this much smaller than the picture, and travel its slack


def run(ctx: JobContext) -> list[OutputFile]:
    """图片生成运镜视频"""
    path = input_path(ctx, param(ctx.params, "image_asset_id"))
    motion = str(param(ctx.params, "motion", "ken_burns"))
    duration = float(param(ctx.params, "duration", 5))
    fps = int(param(ctx.params, "fps", 30))
    aspect = str(param(ctx.params, "aspect_ratio", "16:9"))
    short = int(param(ctx.params, "resolution", 720))
    if motion not in MOTIONS:
        raise InvalidInput(f"motion must be one of {', '.join(MOTIONS)}.")
    if not 2 <= duration <= 10:
        raise InvalidInput("duration must be between 2 and 10 seconds.")
    if fps not in (24, 30):
        raise InvalidInput("fps must be 24 or 30.")
    if aspect not in ASPECTS:
        raise InvalidInput("aspect_ratio must be 16:9, 9:16 or 1:1.")
    if not 128 <= short <= 4320:
        raise InvalidInput("resolution (the short side) must be between 128 and 4320.")
    width, height = frame_size(ASPECTS[aspect], short)
    check_output_pixels(width, height, video=True)
    require_kind(probe_file(path), "image")
    device = job_device(ctx)
    frames = round(duration * fps)
    out = ctx.workdir / f"animated_{motion}.mp4"
    source = prepare_source(load_image(path), ASPECTS[aspect], width, device)
    ctx.progress(0.02, "Animating image")
    done = 0

    def after_batch() -> None:
        ctx.progress(done / frames, "Animating image")

    def batches() -> Iterator[torch.Tensor]:
        nonlocal done
        step = batch_size_for(width, height, device)
        for start in range(0, frames, step):
            count = min(step, frames - start)
            done = start + count  # reported once this batch is with the encoder
            yield render(source, camera(motion, start, count, frames), width, height)

    with FrameWriter(out, width, height, fps) as writer:
        encode_batches(batches(), writer, after_batch)
    return [video_output(out, width, height, frames, fps, motion=motion, aspect_ratio=aspect)]


def frame_size(aspect: Fraction, short: int) -> tuple[int, int]:
    """由宽高比和短边求偶数帧尺寸 (W, H)"""
    long = round(short * max(aspect, 1 / aspect) / 2) * 2
    short = even(short)
    return (long, short) if aspect >= 1 else (short, long)


def prepare_source(image: torch.Tensor, aspect: Fraction, width: int, device: torch.device) -> torch.Tensor:
    """裁成目标宽高比（居中，不拉伸），并用 Lanczos 缩到画面所需的细节，返回设备上的 (1, 3, h, w)"""
    _, h, w = image.shape
    if w / h > aspect:
        cw, ch = round(h * aspect), h
    else:
        cw, ch = w, round(w / aspect)
    # Shrink by a simple ratio (cheap polyphase) to no less than the most zoomed-in frame shows.
    ratio = Fraction(cw, max(1, round(width * max(ZOOM, 1.3)))).limit_denominator(8)
    if ratio > 1:
        cw, ch = cw // ratio.numerator * ratio.numerator, ch // ratio.numerator * ratio.numerator
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    x = image[:, y0 : y0 + ch, x0 : x0 + cw].to(device)[None].to(work_dtype(device))
    if ratio > 1:
        x = resize(x, (int(ch / ratio), int(cw / ratio)))
    return x.float().contiguous()  # sampled in fp32: fp16 coordinates would make the motion jitter


def _ease(t: torch.Tensor) -> torch.Tensor:
    return t * t * (3 - 2 * t)  # smoothstep: starts and stops gently


def camera(motion: str, start: int, count: int, total: int) -> torch.Tensor:
    """第 start..start+count 帧的相机：每行 (zoom, 中心 x, 中心 y)，中心以画面半宽为单位"""
    t = _ease(torch.arange(start, start + count, dtype=torch.float64) / max(1, total - 1))
    zero = torch.zeros_like(t)
    if motion in ("zoom_in", "zoom_out"):
        zoom = 1 + (ZOOM - 1) * (t if motion == "zoom_in" else 1 - t)
        return torch.stack([zoom, zero, zero], 1)
    if motion == "ken_burns":
        zoom = 1 + 0.3 * t
        drift = (t - 0.5) * (1 - 1 / zoom)  # within the slack the zoom leaves
        return torch.stack([zoom, drift, 0.6 * drift], 1)
    slack = 1 - 1 / PAN_ZOOM
    sweep = slack * (1 - 2 * t)  # from +slack to -slack
    zoom = torch.full_like(t, PAN_ZOOM)
    x, y = {
        "pan_left": (sweep, zero),
        "pan_right": (-sweep, zero),
        "pan_up": (zero, sweep),
        "pan_down": (zero, -sweep),
    }[motion]
    return torch.stack([zoom, x, y], 1)


def render(source: torch.Tensor, cams: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """按相机参数批量渲染帧：grid_sample 双三次，亚像素"""
    n = cams.shape[0]
    zoom, cx, cy = cams.to(torch.float32).unbind(1)
    # The source is cropped and shrunk in whole pixels, so its shape misses the frame's by up to a few percent:
    # the window narrows (sub-pixel) on the side that has too much, never stretching the picture.
    excess = source.shape[-1] * height / (source.shape[-2] * width)
    kx, ky = (1 / excess, 1.0) if excess > 1 else (1.0, excess)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = kx / zoom, ky / zoom
    theta[:, 0, 2], theta[:, 1, 2] = kx * cx, ky * cy
    grid = F.affine_grid(theta.to(source.device), [n, 3, height, width], align_corners=False)
    frames = F.grid_sample(
        source.expand(n, -1, -1, -1), grid, mode="bicubic", padding_mode="border", align_corners=False
    )
    return frames.contiguous(memory_format=torch.channels_last)
