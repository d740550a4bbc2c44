"""video.interpolate: 2x/4x frame rate, same duration, audio kept.

``motion`` mode, all batched torch on the device:
1. dense motion both ways between consecutive frames (``estimate_flow``): coarse-to-fine block matching
   on a luma pyramid (cost volume of shifted differences, box-filtered, arg-min, parabolic sub-pixel,
   3x3 median), at most ~1024 px wide;
2. for each intermediate time t, the motion through each pixel of the new frame (``_motion_at``): two
   candidates, one followed along the forward flow and one along the backward flow; the one whose
   sampled pixels agree with their own flows (and with each other) wins;
3. both neighbours warped to t with ``grid_sample`` and blended with occlusion-aware weights: a neighbour
   whose flow at the sampled pixel disagrees with the chosen motion is occluded there and counts little;
4. where the two warped neighbours still disagree (motion beyond the search range), the pixel gives way to the
   cross-fade, which ghosts but never tears; a pair whose picture disagrees throughout is a scene cut, and
   its new frames repeat the nearer neighbour.

``blend`` mode is the plain cross-fade fallback.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from gpu_jobs.handlers import JobContext, OutputFile
from gpu_jobs.media import (
    batch_size_for,
    check_output_pixels,
    even,
    input_path,
    job_device,
    param,
    probe_file,
    require_kind,
    stream_video,
    video_output,
)
from lib.errors import InvalidInput

FLOW_MAX_SIDE = 1024  # motion is estimated on luma shrunk by a power of two to at most this
RADIUS = 2  # search radius per pyramid level, in that level's pixels
TAU = 1.0  # flow disagreement (flow pixels) at which a neighbour counts as occluded
# Luma disagreement (0..1) of the warped neighbours where motion starts, and ends, giving way to the cross-fade.
# Measured: at most 0.05 where motion is found (noise, occlusions); 0.5 and more where it is not.
MISMATCH = (0.1, 0.25)
# A pair whose warped neighbours disagree this much on average is a scene cut. Measured: two different scenes
# 0.07, a fade to 60% brightness 0.037, heavy noise (±20 levels) 0.018, ordinary motion 0.001-0.006.
CUT_MISMATCH = 0.045


def run(ctx: JobContext) -> list[OutputFile]:
    """视频插帧"""
    path = input_path(ctx, param(ctx.params, "video_asset_id"))
    factor = int(param(ctx.params, "factor", 2))
    mode = str(param(ctx.params, "mode", "motion"))
    if factor not in (2, 4):
        raise InvalidInput("factor must be 2 or 4.")
    if mode not in ("motion", "blend"):
        raise InvalidInput("mode must be motion or blend.")
    info = probe_file(path)
    require_kind(info, "video")
    width, height = even(info["width"]), even(info["height"])
    check_output_pixels(width, height, video=True)
    device = job_device(ctx)
    out = ctx.workdir / f"interpolated_{factor}x.mp4"
    batch = max(2, batch_size_for(width, height, device) // factor)

    def process(batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for frames in interpolate(batches, factor, mode):
            yield frames[..., :height, :width]

    ctx.progress(0.0, "Interpolating frames")
    frames = stream_video(
        path,
        out,
        process,
        info=info,
        out_size=(height, width),
        progress=ctx.progress,
        device=device,
        rate_factor=factor,
        batch_size=batch,
        message="Interpolating frames",
    )
    fps = info["fps"] * factor
    return [video_output(out, width, height, frames, fps, factor=factor, mode=mode)]


def interpolate(batches: Iterator[torch.Tensor], factor: int, mode: str = "motion") -> Iterator[torch.Tensor]:
    """逐批插帧：每个输入帧后跟 factor-1 个中间帧；最后一帧重复，使时长不变"""
    prev = None
    for x in batches:
        seq = x if prev is None else torch.cat([prev, x])
        if seq.shape[0] > 1:
            a, b = seq[:-1], seq[1:]
            times = [k / factor for k in range(1, factor)]
            mids = blend(a, b, times) if mode == "blend" else motion_interpolate(a, b, times)
            yield torch.stack([a, *mids], 1).flatten(0, 1)
        prev = seq[-1:]
    if prev is not None:
        yield prev.repeat(factor, 1, 1, 1)


def blend(a: torch.Tensor, b: torch.Tensor, times: list[float]) -> list[torch.Tensor]:
    """交叉淡化（无运动估计的后备方式）"""
    return [torch.lerp(a, b, t) for t in times]


def motion_interpolate(a: torch.Tensor, b: torch.Tensor, times: list[float]) -> list[torch.Tensor]:
    """运动补偿插帧：a、b 为相邻帧批次 (N, 3, H, W)，返回各时刻 t 的中间帧"""
    height, width = a.shape[-2:]
    shrink = 1  # a power of two, stopping before a very wide or tall frame's short side would vanish
    while max(height, width) / shrink > FLOW_MAX_SIDE and min(height, width) / shrink >= 32:
        shrink *= 2
    la, lb = _luma(a, shrink), _luma(b, shrink)
    fwd, bwd = estimate_flow(la, lb), estimate_flow(lb, la)
    out = []
    for t in times:
        u, w0, mismatch = _motion_at(la, lb, fwd, bwd, t)
        cut = mismatch.mean((1, 2, 3), keepdim=True) > CUT_MISMATCH
        fade = ((mismatch - MISMATCH[0]) / (MISMATCH[1] - MISMATCH[0])).clamp_(0, 1)
        if shrink > 1:
            u = F.interpolate(u, size=(height, width), mode="bilinear", align_corners=False) * shrink
            w0 = F.interpolate(w0, size=(height, width), mode="bilinear", align_corners=False)
            fade = F.interpolate(fade, size=(height, width), mode="bilinear", align_corners=False)
        frame = torch.lerp(warp(b.float(), (1 - t) * u), warp(a.float(), -t * u), w0)
        frame = torch.lerp(frame, torch.lerp(a.float(), b.float(), t), fade)
        frame = torch.where(cut, (a if t <= 0.5 else b).float(), frame)  # a cut: the nearer frame, the earlier on a tie
        out.append(frame.contiguous(memory_format=torch.channels_last))
    return out


def _luma(x: torch.Tensor, shrink: int) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1) / 255
    y = (x.float() * weights).sum(1, keepdim=True)
    return F.avg_pool2d(y, shrink) if shrink > 1 else y


def warp(x: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """按光流（像素）反向采样：out(p) = x(p + flow(p))"""
    h, w = flow.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow.device, dtype=flow.dtype),
        torch.arange(w, device=flow.device, dtype=flow.dtype),
        indexing="ij",
    )
    gx = (xs + flow[:, 0] + 0.5) * (2 / w) - 1
    gy = (ys + flow[:, 1] + 0.5) * (2 / h) - 1
    grid = torch.stack([gx, gy], -1).float()  # fp16 coordinates would be off by pixels on large frames
    return F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False).to(x.dtype)


def estimate_flow(a: torch.Tensor, b: torch.Tensor, levels: int | None = None) -> torch.Tensor:
    """由粗到细块匹配估计稠密光流 a→b：a(p) ≈ b(p + flow(p))，返回 (N, 2, H, W)"""
    pyramid = [(a, b)]
    while min(pyramid[-1][0].shape[-2:]) >= 16 and (levels is None or len(pyramid) < levels):
        pa, pb = pyramid[-1]
        pyramid.append((F.avg_pool2d(pa, 2), F.avg_pool2d(pb, 2)))
    flow = None
    for la, lb in reversed(pyramid):
        if flow is None:
            flow = la.new_zeros(la.shape[0], 2, *la.shape[-2:])
        else:
            flow = 2 * F.interpolate(flow, size=la.shape[-2:], mode="bilinear", align_corners=False)
        for _ in range(2):
            flow = _median3(flow + _match(la, warp(lb, flow)))
    return flow


def _match(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Best displacement of ``b`` for each pixel of ``a`` within ±RADIUS, sub-pixel."""
    r, size = RADIUS, 2 * RADIUS + 1
    n, _, h, w = a.shape
    padded = F.pad(b, (r, r, r, r), mode="replicate")
    shifts = [padded[:, :, dy : dy + h, dx : dx + w] for dy in range(size) for dx in range(size)]
    cost = _box_mean((torch.cat(shifts, 1) - a).abs(), 5)
    d = torch.arange(-r, r + 1, device=a.device, dtype=a.dtype)
    penalty = 1e-3 * (d.view(-1, 1) ** 2 + d.view(1, -1) ** 2).flatten()  # ties go to the smaller move
    cost = (cost + penalty.view(1, -1, 1, 1)).view(n, size, size, h, w)
    best = cost.flatten(1, 2).min(1, keepdim=True).indices  # on a CPU far faster than argmin over this dim
    iy, ix = best // size, best % size
    return torch.cat([ix + _parabola(cost, iy, ix, 2), iy + _parabola(cost, iy, ix, 1)], 1).to(a.dtype) - r


def _box_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """size×size 窗口均值，边缘只计图内像素（同 avg_pool2d(count_include_pad=False)，在 CPU 上快十几倍）"""
    kernel = x.new_full((x.shape[1], 1, size, size), 1 / size**2)
    total = F.conv2d(x.contiguous(memory_format=torch.channels_last), kernel, padding=size // 2, groups=x.shape[1])
    inside = F.conv2d(x.new_ones(1, 1, *x.shape[-2:]), kernel[:1], padding=size // 2)
    return total / inside


def _length(v: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) 向量场的长度 (N, 1, H, W)（norm(dim=1) 在 CPU 上慢百倍）"""
    return torch.hypot(v[:, :1], v[:, 1:])


def _parabola(cost: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor, axis: int) -> torch.Tensor:
    """Sub-pixel offset of the minimum along one axis (1: y, 2: x) from the costs beside it."""
    size = cost.shape[1]
    idx = ix if axis == 2 else iy

    def at(offset: int) -> torch.Tensor:
        j = (idx + offset).clamp(0, size - 1)
        y, x = (iy, j) if axis == 2 else (j, ix)
        return cost.flatten(1, 2).gather(1, y * size + x)

    left, mid, right = at(-1), at(0), at(1)
    curve = left - 2 * mid + right
    inside = (idx > 0) & (idx < size - 1) & (curve > 1e-6)
    return torch.where(inside, 0.5 * (left - right) / curve.clamp_min(1e-6), 0).clamp(-0.5, 0.5)


# Paeth's median-of-9 network: 19 compare-exchanges, after which index 4 holds the median. As elementwise
# min/max over whole planes it is 9x faster on a CPU than torch.median over unfolded 3x3 patches.
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3))
_MEDIAN9 += ((5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def _median3(flow: torch.Tensor) -> torch.Tensor:
    """3×3 中值滤波（边缘复制）"""
    h, w = flow.shape[-2:]
    padded = F.pad(flow, (1, 1, 1, 1), mode="replicate")
    v = [padded[..., dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    for i, j in _MEDIAN9:
        v[i], v[j] = torch.minimum(v[i], v[j]), torch.maximum(v[i], v[j])
    return v[4]


def _motion_at(la, lb, fwd, bwd, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Motion u through each pixel of the frame at time t (a→b, pixels), the weight of frame a, and how far the
    two neighbours, warped along u, still disagree (luma, 0..1, 3x3 mean).

    The pixel p of the new frame shows a(p - t·u) and b(p + (1-t)·u).
    """
    candidates = []
    for flow, sign, step in ((fwd, 1, -t), (bwd, -1, 1 - t)):
        u = sign * flow
        for _ in range(3):  # fixed point: the motion of the pixel that lands on p at time t
            u = sign * warp(flow, step * u)
        candidates.append(u)
    scored = []
    for u in candidates:
        err_a = _length(warp(fwd, -t * u) - u)  # a's own motion agrees with u?
        err_b = _length(warp(bwd, (1 - t) * u) + u)
        photo = (warp(la, -t * u) - warp(lb, (1 - t) * u)).abs()
        photo = F.avg_pool2d(photo, 3, stride=1, padding=1, count_include_pad=False)
        score = (err_a / TAU).clamp(max=1) + (err_b / TAU).clamp(max=1) + 4 * photo
        scored.append((score, u, err_a, err_b, photo))
    (s0, u0, ea0, eb0, p0), (s1, u1, ea1, eb1, p1) = scored
    pick = s0 <= s1
    u = torch.where(pick, u0, u1)
    err_a, err_b = torch.where(pick, ea0, ea1), torch.where(pick, eb0, eb1)
    wa = (1 - t) * (torch.exp(-((err_a / TAU) ** 2)) + 1e-3)
    wb = t * (torch.exp(-((err_b / TAU) ** 2)) + 1e-3)
    return u, wa / (wa + wb), torch.where(pick, p0, p1)
