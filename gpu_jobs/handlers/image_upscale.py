"""image.upscale: Lanczos-3 2x/4x with an optional unsharp mask, tiled so any size fits in memory.

Transparency is kept for PNG and WebP (resized premultiplied, so no dark fringe); a JPEG gets a white background.
"""

from __future__ import annotations

import math

import torch

from gpu_jobs.handlers import JobContext, OutputFile
from gpu_jobs.media import (
    IMAGE_MIME,
    check_output_pixels,
    input_path,
    job_device,
    load_image,
    param,
    premultiply,
    probe_file,
    require_kind,
    resize,
    rgb_colour_profile,
    save_image,
    to_uint8,
    unsharp_mask,
    unsharp_mask_premultiplied,
    work_dtype,
)
from lib.catalog import check_image_side
from lib.errors import InvalidInput

TILE = {"cpu": 1024, "cuda": 2048}  # input pixels per tile side


def run(ctx: JobContext) -> list[OutputFile]:
    """图片放大"""
    path = input_path(ctx, param(ctx.params, "image_asset_id"))
    scale = int(param(ctx.params, "scale", 2))
    sharpen = float(param(ctx.params, "sharpen", 0.0))
    fmt = str(param(ctx.params, "format", "png")).lower()
    if scale not in (2, 4):
        raise InvalidInput("scale must be 2 or 4.")
    if not 0 <= sharpen <= 1:
        raise InvalidInput("sharpen must be between 0 and 1.")
    if fmt not in IMAGE_MIME:
        raise InvalidInput("format must be png, jpeg or webp.")
    info = probe_file(path)
    require_kind(info, "image")
    check_output_pixels(info["width"] * scale, info["height"] * scale)
    check_image_side(info["width"] * scale, info["height"] * scale, fmt)
    ctx.progress(0.05, "Upscaling image")
    image = load_image(path, keep_alpha=fmt != "jpeg", background=(255, 255, 255), srgb=False)  # profile kept
    image = upscale_image(image, scale, sharpen, job_device(ctx), progress=ctx.progress)
    out = ctx.workdir / f"upscaled_{scale}x.{'jpg' if fmt == 'jpeg' else fmt}"
    ctx.progress(0.95, "Saving image")
    save_image(image, out, fmt, icc_profile=rgb_colour_profile(path))  # the picture's colours, as the input's
    _, height, width = image.shape
    return [
        OutputFile(
            path=out,
            kind="image",
            mime=IMAGE_MIME[fmt],
            width=width,
            height=height,
            metadata={"scale": scale, "sharpen": sharpen, "alpha": image.shape[0] == 4},
        )
    ]


def upscale_image(
    image: torch.Tensor,
    scale: int,
    sharpen: float,
    device: torch.device,
    *,
    tile: int | None = None,
    progress=None,
) -> torch.Tensor:
    """放大 uint8 (3 或 4, H, W) 图片（分块处理，块间有重叠，结果与整图处理一致）"""
    channels, height, width = image.shape
    tile = tile or TILE.get(device.type, TILE["cpu"])
    sigma = 0.5 * scale  # blur width of the unsharp mask, in output pixels
    # Each tile reads this much context: the Lanczos taps (4 input pixels) plus the blur's reach.
    margin = 4 + math.ceil(3 * sigma / scale) + 1
    out = torch.empty((channels, height * scale, width * scale), dtype=torch.uint8)
    tiles = [(y, x) for y in range(0, height, tile) for x in range(0, width, tile)]
    for i, (y0, x0) in enumerate(tiles):
        y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
        ya, xa, yb, xb = (
            max(0, y0 - margin),
            max(0, x0 - margin),
            min(height, y1 + margin),
            min(width, x1 + margin),
        )
        patch = image[:, ya:yb, xa:xb].to(device, non_blocking=True)[None].to(work_dtype(device))
        if channels == 4:  # resized premultiplied, and only the colour sharpened
            up = resize(premultiply(patch.float()), ((yb - ya) * scale, (xb - xa) * scale))
            up = unsharp_mask_premultiplied(up, sharpen, sigma)
        else:
            up = unsharp_mask(resize(patch, ((yb - ya) * scale, (xb - xa) * scale)), sharpen, sigma)
        up = up[..., (y0 - ya) * scale : (y1 - ya) * scale, (x0 - xa) * scale : (x1 - xa) * scale]
        out[:, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = to_uint8(up)[0].permute(2, 0, 1).cpu()
        if progress is not None and len(tiles) > 1:
            progress(0.05 + 0.9 * (i + 1) / len(tiles), "Upscaling image")
    return out
