"""Pixel ops in torch: separable Lanczos-3 resize (RGB or yuv420p planes), blur, unsharp mask, colour, PSNR."""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from gpu_jobs.media.device import work_dtype
from gpu_jobs.media.display import BT709_LIMITED, YCbCr, decoding

log = logging.getLogger(__name__)
MAX_PHASES = 16  # resize ratios whose reduced denominator exceeds this use a dense matrix
# Devices that upscale by shifted multiply-adds per phase (_upscale_taps); the others run a transposed conv.
# Measured on a CPU: 2-3x faster than torch's transposed conv. bench/media.py times the other way on each device.
UPSCALE_TAPS_ON = {"cpu"}


def to_device(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 批次 → 设备上的浮点（0..255）：NHWC 帧成 channels_last NCHW，扁平的 yuv420p 平面保持扁平"""
    frames = frames.to(device, non_blocking=True)
    if frames.ndim == 2:
        return frames.to(work_dtype(device))
    return frames.permute(0, 3, 1, 2).to(work_dtype(device))  # NHWC storage is channels_last NCHW


def to_uint8(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """浮点 NCHW（0..255）→ uint8 NHWC；inplace 时就地舍入（x 之后不可再用）"""
    # In place saves allocating (and on a CPU, page-faulting) a float copy of the batch: 20% of a CPU upscale.
    x = x.add_(0.5) if inplace else x.add(0.5)
    return x.clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# RGB (0..255) → BT.709 limited-range Y'CbCr code values, the colours the encoder tags its output with.
_KR, _KB = 0.2126, 0.0722
_KG = 1 - _KR - _KB
_RGB_TO_YUV709 = torch.tensor(
    [
        [_KR, _KG, _KB],
        [-_KR / (2 - 2 * _KB), -_KG / (2 - 2 * _KB), 0.5],
        [0.5, -_KG / (2 - 2 * _KR), -_KB / (2 - 2 * _KR)],
    ]
) * torch.tensor([[219 / 255], [224 / 255], [224 / 255]])
_YUV_OFFSET = (16.0, 128.0, 128.0)


def to_yuv420(x: torch.Tensor) -> torch.Tensor:
    """浮点 RGB NCHW（0..255，偶数尺寸）→ uint8 yuv420p 平面 (N, H·3/2, W)：BT.709 有限范围，色度取 2×2 均值"""
    n, _, h, w = x.shape
    x = x.float().clamp(0, 255)
    m = _RGB_TO_YUV709.to(x.device)
    out = torch.empty((n, h * w * 3 // 2), dtype=torch.uint8, device=x.device)
    luma = torch.einsum("c,nchw->nhw", m[0], x).add_(_YUV_OFFSET[0] + 0.5)  # + 0.5: round, then truncate
    out[:, : h * w] = luma.clamp_(0, 255).reshape(n, -1)
    # The conversion is linear: averaging RGB over each 2x2 block first gives the averaged chroma, 4x cheaper.
    chroma = torch.einsum("kc,nchw->nkhw", m[1:], F.avg_pool2d(x, 2)).add_(_YUV_OFFSET[1] + 0.5)
    out[:, h * w :] = chroma.clamp_(0, 255).reshape(n, -1)  # the U plane, then the V plane
    return out.view(n, h * 3 // 2, w)


@lru_cache(maxsize=16)
def _recoding(colour: YCbCr) -> np.ndarray:
    """(3, 4) affine map from Y, U, V code values in ``colour`` to BT.709 limited-range ones."""
    return _RGB_TO_YUV709.double().numpy() @ decoding(colour) + np.array([[0, 0, 0, o] for o in _YUV_OFFSET])


def _split(planes: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """扁平的 yuv420p 平面 (N, L) → 浮点的 Y (N, H, W) 与 U、V (N, 2, ⌈H/2⌉, ⌈W/2⌉)"""
    n, (h, w) = planes.shape[0], size
    return planes[:, : h * w].float().view(n, h, w), planes[:, h * w :].float().view(n, 2, -(-h // 2), -(-w // 2))


def yuv420_to_rgb(planes: torch.Tensor, size: tuple[int, int], colour: YCbCr = BT709_LIMITED) -> torch.Tensor:
    """扁平的 yuv420p 平面 (N, L)，码值按 colour 编码 → 浮点 RGB NCHW（0..255），按矩阵与范围精确换算"""
    h, w = size
    luma, chroma = _split(planes, size)
    m = decoding(colour)
    # The chroma's share of each channel, worked out at its own resolution, then given to each pixel of its 2x2
    # block, as swscale's fast path did: a frame taken back to 4:2:0 unchanged (to_yuv420's 2x2 mean, the
    # encoder's swscale) gets its chroma back exactly.
    share = torch.einsum("kc,nchw->nkhw", torch.from_numpy(m[:, 1:3]).float().to(chroma.device), chroma)
    share += torch.from_numpy(m[:, 3]).float().to(chroma.device).view(3, 1, 1)
    rgb = F.interpolate(share, scale_factor=2, mode="nearest")[..., :h, :w]
    rgb.add_(luma.unsqueeze(1), alpha=float(m[0, 0])).clamp_(0, 255)  # luma weighs the same in R, G and B
    return rgb.contiguous().to(planes.dtype)


def yuv420_to_bt709(planes: torch.Tensor, size: tuple[int, int], colour: YCbCr) -> torch.Tensor:
    """扁平的 yuv420p 平面 (N, L)，码值按 colour 编码 → BT.709 有限范围的码值（浮点，同形状）；已是 BT.709 → 原样"""
    if colour == BT709_LIMITED:
        return planes
    (n, length), (h, w) = planes.shape, size
    luma, chroma = _split(planes, size)
    m = _recoding(colour)
    out = torch.empty((n, length), dtype=torch.float32, device=planes.device)
    y = torch.mul(luma, float(m[0, 0]), out=out[:, : h * w].view(n, h, w)).add_(float(m[0, 3]))
    # Chroma takes in no luma, as both matrices code white as (1, 0, 0): the map's first column is (a, 0, 0).
    # Luma takes in the chroma: its share, worked out at the chroma's resolution, interpolated to the luma's.
    if np.abs(m[0, 1:3]).max() > 1e-9:  # a matrix change, not only a range change
        share = torch.einsum("c,nchw->nhw", torch.from_numpy(m[0, 1:3]).float().to(chroma.device), chroma)
        y.add_(F.interpolate(share[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0, :h, :w])
    mix = torch.from_numpy(m[1:, 1:3]).float().to(chroma.device)
    uv = torch.einsum("kc,nchw->nkhw", mix, chroma).add_(
        torch.from_numpy(m[1:, 3]).float().to(chroma.device).view(2, 1, 1)
    )
    out[:, h * w :] = uv.reshape(n, -1)
    return out.to(planes.dtype)


def _lanczos(x: torch.Tensor, a: int = 3) -> torch.Tensor:
    return torch.where(x.abs() < a, torch.sinc(x) * torch.sinc(x / a), torch.zeros_like(x))


class _Plan(NamedTuple):
    weights: torch.Tensor  # (phases, taps), or the dense (out, in) matrix when step == 0
    step: int  # M: input pixels advanced per group of phases
    phases: int  # L: output pixels per group
    pad: int  # taps start at input offset -pad
    fixes: list[tuple[int, torch.Tensor]]  # border runs (start, normalizer) to renormalize


@lru_cache(maxsize=64)
def _plan(in_size: int, out_size: int) -> _Plan:
    """Polyphase Lanczos-3 with Pillow's geometry: output pixel L*k+p reads input pixels M*k+d, d >= -pad."""
    ratio = Fraction(in_size, out_size)
    step, phases = ratio.numerator, ratio.denominator
    scale = max(float(ratio), 1.0)  # widen the kernel when shrinking: that is the antialiasing
    if phases > MAX_PHASES:  # an awkward ratio: a dense (out, in) matrix, rows normalized over the image
        centers = (torch.arange(out_size, dtype=torch.float64) + 0.5) * in_size / out_size - 0.5
        w = _lanczos((torch.arange(in_size, dtype=torch.float64)[None, :] - centers[:, None]) / scale)
        return _Plan((w / w.sum(1, keepdim=True)).float(), 0, 0, 0, [])
    centers = (torch.arange(phases, dtype=torch.float64) + 0.5) * step / phases - 0.5
    lo = math.floor(centers[0].item() - 3 * scale)
    hi = math.ceil(centers[-1].item() + 3 * scale)
    if step == 1:  # pure upscale: symmetric taps for the transposed conv
        lo, hi = min(lo, -hi), max(hi, -lo)
    else:  # the strided conv pads both sides by -lo: make that cover the right edge too
        lo = min(lo, in_size - 1 - hi - step * (-(-out_size // phases) - 1))
    d = torch.arange(lo, hi + 1, dtype=torch.float64)
    w = _lanczos((d[None, :] - centers[:, None]) / scale)
    plan = _Plan((w / w.sum(1, keepdim=True)).float(), step, phases, -lo, [])
    # Near the borders some taps fall outside the image: renormalize over those inside, as Pillow does.
    norm = _polyphase(torch.ones(1, 1, 1, in_size), plan, out_size, 3).flatten()
    bad = ((norm - 1).abs() > 1e-6).nonzero().flatten().tolist()
    plan.fixes.extend((run[0], norm[run[0] : run[-1] + 1]) for run in _runs(bad))
    return plan


def _polyphase(x: torch.Tensor, plan: _Plan, out_size: int, dim: int) -> torch.Tensor:
    """One separable pass along ``dim`` (3: width, 2: height) as a grouped (transposed) conv."""
    x = x.contiguous(memory_format=torch.channels_last)  # the fast conv layout on both CPU and CUDA
    w, step, phases, pad, _ = plan
    groups = x.shape[1]
    along = (lambda v, other=1: (other, v)) if dim == 3 else (lambda v, other=1: (v, other))
    shape = (1, 1, 1, -1) if dim == 3 else (1, 1, -1, 1)
    if step == 1:  # upscale: one transposed conv, whose stride interleaves the phases
        kernel = w.flip(1).t().reshape(shape).repeat(groups, 1, 1, 1).to(x)
        y = F.conv_transpose2d(x, kernel, stride=along(phases), padding=along(phases * pad, 0), groups=groups)
        return y.narrow(dim, 0, out_size)
    kernel = w.reshape(phases, *shape[1:]).repeat(groups, 1, 1, 1).to(x)
    y = F.conv2d(x, kernel, stride=along(step), padding=along(pad, 0), groups=groups)
    y = y.narrow(dim, 0, -(-out_size // phases))
    if phases > 1:  # a general ratio: interleave the phases
        n, _, h, wd = y.shape
        y = y.view(n, groups, phases, h, wd)
        if dim == 3:
            y = y.permute(0, 1, 3, 4, 2).reshape(n, groups, h, wd * phases)
        else:
            y = y.permute(0, 1, 3, 2, 4).reshape(n, groups, h * phases, wd)
    return y.narrow(dim, 0, out_size)


def _upscale_taps(x: torch.Tensor, plan: _Plan, dim: int) -> torch.Tensor:
    """An upscale pass as shifted multiply-adds per phase (only each phase's nonzero taps), on a CPU in strips
    of rows that stay in the cache."""
    x = x.contiguous()
    _, _, phases, pad, _ = plan
    size, height = x.shape[dim], x.shape[2]
    padded = F.pad(x, (pad, pad) if dim == 3 else (0, 0, pad, pad))
    out = x.new_empty((*x.shape[: dim + 1], phases, *x.shape[dim + 1 :]))  # the phase axis, to interleave
    taps = [[(k, v) for k, v in enumerate(row) if v] for row in plan.weights.tolist()]
    rows = height  # a GPU takes the whole batch at once; a CPU about 1 MB of float32 a strip
    if x.device.type == "cpu":
        rows = max(1, 2**18 // (x.shape[0] * x.shape[1] * padded.shape[3]))
    for top in range(0, height, rows):
        count = min(rows, height - top)
        src = padded.narrow(2, top, count if dim == 3 else count + 2 * pad)
        length = size if dim == 3 else count
        for phase, ((first, weight), *rest) in enumerate(taps):
            dst = out.narrow(2, top, count).select(dim + 1, phase)
            # Down the columns each output row is contiguous: accumulate in place. Along the rows the phases
            # interleave pixel by pixel: accumulate contiguously, then copy across once.
            if dim == 2:
                acc = torch.mul(src.narrow(dim, first, length), weight, out=dst)
            else:
                acc = src.narrow(dim, first, length) * weight
            for k, weight in rest:
                acc.add_(src.narrow(dim, k, length), alpha=weight)
            if dim == 3:
                dst.copy_(acc)
    return out.flatten(dim, dim + 1)  # a pure upscale: out_size is size * phases


@lru_cache(maxsize=64)
def _plan_on(in_size: int, out_size: int, device: torch.device, dtype: torch.dtype) -> _Plan:
    """The plan's tensors already on the device, so batches copy nothing from the host."""
    plan = _plan(in_size, out_size)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return plan._replace(weights=to(plan.weights), fixes=[(start, to(norm)) for start, norm in plan.fixes])


def _resize_axis(x: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    if x.shape[dim] == out_size:
        return x
    plan = _plan_on(x.shape[dim], out_size, x.device, x.dtype)
    if not plan.step:
        return x @ plan.weights.t() if dim == 3 else plan.weights @ x
    if plan.step == 1 and x.device.type in UPSCALE_TAPS_ON:
        y = _upscale_taps(x, plan, dim)
    else:
        y = _polyphase(x, plan, out_size, dim)
    for start, norm in plan.fixes:
        y.narrow(dim, start, norm.numel()).div_(norm.view((1, 1, -1) if dim == 3 else (1, -1, 1)))
    return y


def _runs(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Lanczos-3 缩放浮点 NCHW 张量到 (H, W)（缩小时抗锯齿）"""
    return _resize_axis(_resize_axis(x, size[1], 3), size[0], 2)


def resize_yuv420(planes: torch.Tensor, size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """缩放扁平的 yuv420p 平面 (N, L)，(H, W) → 偶数的 (H', W')，返回 (N, H'·3/2, W') 浮点码值"""
    n, (h, w), (oh, ow) = planes.shape[0], size, out_size
    ch, cw = -(-h // 2), -(-w // 2)
    out = torch.empty((n, oh * ow * 3 // 2), dtype=planes.dtype, device=planes.device)
    out[:, : oh * ow] = resize(planes[:, : h * w].view(n, 1, h, w), (oh, ow)).reshape(n, -1)
    # Chroma samples are taken as centred on their 2x2 blocks, as swscale converts and scales 4:2:0; against
    # FFmpeg's scale filter and a Pillow reference this matched better than H.264's left-sited convention.
    chroma = resize(planes[:, h * w :].view(n, 2, ch, cw), (oh // 2, ow // 2))
    out[:, oh * ow :] = chroma.reshape(n, -1)  # the U plane, then the V plane
    return out.view(n, oh * 3 // 2, ow)


def premultiply(x: torch.Tensor) -> torch.Tensor:
    """RGBA NCHW（0..255）的颜色乘以 alpha：缩放时透明像素的颜色不会渗进边缘"""
    return torch.cat([x[:, :3] * (x[:, 3:] / 255), x[:, 3:]], 1)


def unpremultiply(x: torch.Tensor) -> torch.Tensor:
    """premultiply 的逆（alpha 约为 0 处颜色取 0）"""
    # Divided by the alpha before clamping: where ringing lifts it over 255 the colour rang with it.
    alpha = x[:, 3:]
    rgb = torch.where(alpha >= 0.5, x[:, :3] * 255 / alpha.clamp_min(0.5), 0)
    return torch.cat([rgb, alpha.clamp(0, 255)], 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """可分离高斯模糊（边缘复制填充）"""
    radius = max(1, math.ceil(3 * sigma))
    g = torch.exp(-((torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2) / 2)
    g = (g / g.sum()).to(x)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def unsharp_mask(x: torch.Tensor, amount: float, sigma: float = 1.0) -> torch.Tensor:
    """USM 锐化：x + amount·(x − blur(x))"""
    if amount <= 0:
        return x
    return x + amount * (x - gaussian_blur(x, sigma))


def unsharp_mask_premultiplied(x: torch.Tensor, amount: float, sigma: float = 1.0) -> torch.Tensor:
    """预乘 RGBA 的 USM，返回非预乘 RGBA：颜色只与周围按 alpha 加权的均值比较（透明像素不算暗邻居），alpha 不锐化"""
    straight = unpremultiply(x)
    if amount <= 0:
        return straight
    # Blurred premultiplied colour over blurred alpha: the neighbours' colour, each as much as it is opaque.
    blurred = gaussian_blur(x, sigma)
    mean = torch.where(blurred[:, 3:] >= 0.5, unpremultiply(blurred)[:, :3], straight[:, :3])
    return torch.cat([straight[:, :3] + amount * (straight[:, :3] - mean), straight[:, 3:]], 1)


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """两幅 8 位图像的 PSNR（dB）"""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)
