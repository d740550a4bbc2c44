"""Media I/O and shared torch ops for the media handlers.

- ``probe_file``: what a file is (container, codecs, size, duration, fps, frames); refuses what we cannot use.
- ``load_image`` / ``save_image``: Pillow in and out, decompression bombs refused before pixels are decoded.
- ``resize``: separable Lanczos-3 (antialiased when shrinking) as two grouped conv passes.
- ``FrameReader`` / ``FrameWriter`` / ``stream_video``: decode thread → device batches → encode thread,
  bounded queues in between, so memory does not grow with the length of the video.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from gpu_jobs.handlers import OutputFile
from lib.config import get_settings
from lib.errors import InvalidInput

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
IMAGE_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_PHASES = 16  # resize ratios whose reduced denominator exceeds this use a dense matrix
MP4_COPY_AUDIO = {"aac", "mp3", "alac", "opus", "flac", "ac3", "eac3"}
# Output pixels per batch: bounds device memory whatever the frame size (on CPU small batches stay in cache).
BATCH_PIXELS = {"cpu": 4_000_000, "cuda": 64_000_000}
_END = object()


# ---------------------------------------------------------------- device and params


def pick_device() -> str:
    """选择计算设备"""
    return os.environ.get("SPOOL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def job_device(ctx: Any) -> torch.device:
    """任务使用的设备（SPOOL_DEVICE 优先，其次 ctx.device 中的 GPU）"""
    if os.environ.get("SPOOL_DEVICE"):
        return torch.device(os.environ["SPOOL_DEVICE"])
    device = getattr(ctx, "device", "cpu") or "cpu"
    return torch.device(device if device.startswith("cuda") else pick_device())


def work_dtype(device: torch.device) -> torch.dtype:
    """设备上的计算精度：CUDA 用 fp16，CPU 用 fp32"""
    return torch.float16 if device.type == "cuda" else torch.float32


def param(params: Any, name: str, default: Any = None) -> Any:
    """读取参数（pydantic 模型或字典）"""
    value = params.get(name, default) if isinstance(params, dict) else getattr(params, name, default)
    return default if value is None else value


def input_path(ctx: Any, asset_id: Any) -> Path:
    """取得已下载的输入文件路径"""
    path = ctx.inputs.get(str(asset_id)) if asset_id is not None else None
    if path is None:
        raise InvalidInput(f"Input asset {asset_id} was not provided.")
    return Path(path)


def even(n: float) -> int:
    """向下取偶数（至少 2）"""
    return max(2, int(n) // 2 * 2)


# ---------------------------------------------------------------- limits


def check_input_pixels(width: int, height: int) -> None:
    """输入像素数超限时拒绝"""
    limit = get_settings().max_input_pixels
    if width * height > limit:
        raise InvalidInput(f"The input is {width}x{height} pixels; at most {limit:,} pixels are accepted.")


def check_output_pixels(width: int, height: int) -> None:
    """输出像素数超限时拒绝"""
    limit = get_settings().max_output_pixels
    if width * height > limit:
        raise InvalidInput(f"The output would be {width}x{height} pixels; at most {limit:,} are allowed.")


def check_video_limits(info: dict) -> None:
    """视频时长、帧数超限时拒绝"""
    settings = get_settings()
    if (info.get("duration_s") or 0) > settings.max_video_seconds:
        raise InvalidInput(
            f"The video is {info['duration_s']:.1f} s long; at most {settings.max_video_seconds:g} s are accepted."
        )
    if (info.get("frame_count") or 0) > settings.max_video_frames:
        raise InvalidInput(
            f"The video has {info['frame_count']} frames; at most {settings.max_video_frames} are accepted."
        )


# ---------------------------------------------------------------- probe


def probe_file(path: str | Path) -> dict:
    """探测媒体文件信息"""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput("The file does not exist.")
    size = path.stat().st_size
    if size == 0:
        raise InvalidInput("The file is empty.")
    info = _probe_image(path)
    if info is None:
        info = _probe_video(path)
    info["bytes"] = size
    return info


def _probe_image(path: Path) -> dict | None:
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        return None
    except (OSError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"The image could not be read: {exc}") from None
    with img:
        if img.format not in IMAGE_FORMATS:
            raise InvalidInput(f"Unsupported image format {img.format}.")
        width, height = img.size
        check_input_pixels(width, height)
        try:
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation that turns the picture by 90°
                width, height = height, width
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # JPEG: 1/8 scale is enough to validate
            img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidInput(f"The image is truncated or corrupt: {exc}") from None
        fmt = img.format.lower()
    return {
        "kind": "image",
        "format": fmt,
        "mime": Image.MIME.get(fmt.upper(), f"image/{fmt}"),
        "width": width,
        "height": height,
        "video_codec": None,
        "audio_codec": None,
        "duration_s": None,
        "fps": None,
        "frame_count": 1,
        "has_audio": False,
    }


def _probe_video(path: Path) -> dict:
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise InvalidInput(
            f"The file is not a readable image or video (corrupt, truncated or unsupported): {exc}"
        ) from None
    with container:
        audio = container.streams.audio[0] if container.streams.audio else None
        if not container.streams.video:
            if audio is not None:
                raise InvalidInput("The file is audio only; an image or a video is needed.")
            raise InvalidInput("The file holds no video or image stream.")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if not ctx.width or not ctx.height:
            raise InvalidInput(f"The video stream ({ctx.name}) has no frame size; the file is corrupt or unsupported.")
        check_input_pixels(ctx.width, ctx.height)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        try:  # decode one keyframe: proves the stream is decodable without reading the whole file
            ctx.skip_frame = "NONKEY"
            next(container.decode(stream))
            ctx.skip_frame = "DEFAULT"
        except (av.FFmpegError, StopIteration) as exc:
            raise InvalidInput(f"The video could not be decoded (corrupt or unsupported {ctx.name}): {exc}") from None
        if container.duration:  # refuse an over-long file before reading through it
            check_video_limits({"duration_s": container.duration / av.time_base})
        frames = stream.frames or _count_packets(container, stream)
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif fps:
            duration = frames / fps
        else:
            duration = container.duration / av.time_base if container.duration else None
        if not fps and duration:
            fps = frames / duration
        info = {
            "kind": "video",
            "format": container.format.name,
            "mime": "video/" + _mime_subtype(container.format.name),
            "width": ctx.width,
            "height": ctx.height,
            "video_codec": ctx.codec.canonical_name,
            "audio_codec": audio.codec_context.codec.canonical_name if audio else None,
            "duration_s": round(duration, 6) if duration else None,
            "fps": round(fps, 6) if fps else None,
            "frame_count": frames,
            "has_audio": audio is not None,
        }
    if not frames:
        raise InvalidInput("The video has no frames.")
    check_video_limits(info)
    return info


def _count_packets(container: Any, stream: Any) -> int:
    """Frames of a stream whose header has no count: its packets, demuxed without decoding."""
    limit = get_settings().max_video_frames
    container.seek(0)
    frames = 0
    for packet in container.demux(stream):
        frames += bool(packet.size)
        if frames > limit:  # no need to read on: the video is refused anyway
            break
    return frames


def _mime_subtype(format_name: str) -> str:
    names = format_name.split(",")
    for name, sub in (("mp4", "mp4"), ("mov", "quicktime"), ("matroska", "x-matroska"), ("webm", "webm")):
        if name in names:
            return sub
    return names[0]


def require_kind(info: dict, kind: str) -> None:
    """媒体类型不符时拒绝"""
    if info["kind"] != kind:
        raise InvalidInput(f"This task needs {_article(kind)}; the input is {_article(info['kind'])}.")


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


# ---------------------------------------------------------------- images


def open_image(path: str | Path) -> Image.Image:
    """以 RGB 打开图片（先检查像素数，再解码，按 EXIF 方向摆正）"""
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise InvalidInput(f"The image could not be read: {exc}") from None
    check_input_pixels(*img.size)
    try:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"The image is truncated or corrupt: {exc}") from None


def load_image(path: str | Path) -> torch.Tensor:
    """读取图片为 uint8 张量 (3, H, W)"""
    return torch.from_numpy(np.array(open_image(path))).permute(2, 0, 1)


def poster_image(path: str | Path, info: dict, max_side: int = 1280) -> Image.Image:
    """海报帧：图片本身，或视频的第一个可解码关键帧（只解码关键帧），缩到长边不超过 max_side"""
    if info["kind"] == "image":
        with Image.open(path) as img:
            check_input_pixels(*img.size)
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale directly
            img = ImageOps.exif_transpose(img).convert("RGB")
    else:
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.codec_context.skip_frame = "NONKEY"
                img = next(container.decode(stream)).to_image()
        except (av.FFmpegError, StopIteration) as exc:
            raise InvalidInput(f"The video has no decodable keyframe: {exc}") from None
    img.thumbnail((max_side, max_side), Image.LANCZOS)
    return img


def save_image(image: torch.Tensor, path: Path, fmt: str) -> None:
    """保存 uint8 张量 (3, H, W) 为 png/jpeg/webp"""
    img = Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())
    options = {
        "png": {"compress_level": 6},
        "jpeg": {"quality": 95, "subsampling": 0},
        "webp": {"quality": 95},
    }
    img.save(path, format=fmt.upper(), **options[fmt])


# ---------------------------------------------------------------- pixel ops


def to_device(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC → 设备上的浮点 NCHW（channels_last，0..255）"""
    frames = frames.to(device, non_blocking=True)
    return frames.permute(0, 3, 1, 2).to(work_dtype(device))  # NHWC storage is channels_last NCHW


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """浮点 NCHW（0..255）→ uint8 NHWC"""
    return x.add(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


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
    x = x.contiguous(memory_format=torch.channels_last)  # the fast conv layout on both CPU and CUDA
    return _resize_axis(_resize_axis(x, size[1], 3), size[0], 2)


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


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """两幅 8 位图像的 PSNR（dB）"""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


# ---------------------------------------------------------------- streamed video


class _Worker:
    """A thread feeding or draining a bounded queue; stops promptly once ``stop`` is set."""

    def __init__(self, name: str, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        try:
            self.work()
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc
            self.stop.set()

    def work(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Any:
        while True:
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set() or not self.thread.is_alive():
                    return _END

    def shutdown(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)


class FrameReader(_Worker):
    """后台线程把视频解码为 uint8 NHWC 帧批次（有界队列）"""

    def __init__(self, path: str | Path, batch_size: int, *, pin: bool = False, depth: int = 3):
        super().__init__("spool-decode", depth)
        self.path, self.batch_size = str(path), batch_size
        self._pool: queue.Queue | None = None
        if pin:  # a ring of pinned buffers, reused once the device has copied them
            self._pool = queue.Queue()
        self.thread.start()

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._pool is None:
            return torch.empty(shape, dtype=torch.uint8)
        try:
            buf, event = self._pool.get_nowait()
            if buf.shape == shape:
                event.synchronize()
                return buf
        except queue.Empty:
            pass
        return torch.empty(shape, dtype=torch.uint8, pin_memory=True)

    def release(self, buf: torch.Tensor) -> None:
        """设备拷贝发起后归还固定内存缓冲区"""
        if self._pool is not None:
            event = torch.cuda.Event()
            event.record()
            self._pool.put((buf, event))

    def work(self) -> None:
        with av.open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            width, height = stream.codec_context.width, stream.codec_context.height
            buf, n = None, 0
            try:
                for frame in container.decode(stream):
                    if self.stop.is_set():
                        return
                    if buf is None:
                        buf, n = self._buffer((self.batch_size, height, width, 3)), 0
                    buf[n].numpy()[...] = frame.to_ndarray(format="rgb24", width=width, height=height)
                    n += 1
                    if n == self.batch_size:
                        if not self.put(buf):
                            return
                        buf = None
            except av.FFmpegError as exc:
                raise InvalidInput(f"The video could not be decoded: {exc}") from None
            if buf is not None and n:
                self.put(buf[:n])
        self.put(_END)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while (item := self.get()) is not _END:
            yield item
        if self.error is not None:
            raise self.error

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class FrameWriter(_Worker):
    """后台线程把 uint8 NHWC 帧批次编码为 H.264 MP4（yuv420p），可复制原视频音轨"""

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        rate: Fraction | float,
        *,
        audio_from: str | Path | None = None,
        time_base: Fraction | None = None,
        start_time: float = 0.0,
        crf: int = 18,
        preset: str = "veryfast",
        depth: int = 3,
    ):
        super().__init__("spool-encode", depth)
        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs even dimensions, got {width}x{height}")
        self.path, self.width, self.height = str(path), width, height
        self.rate = Fraction(rate).limit_denominator(1001000)
        # Keep the input's time base when every output frame time is a whole number of its ticks.
        self.time_base = time_base if time_base and (1 / self.rate / time_base).denominator == 1 else 1 / self.rate
        self.audio_from, self.start_time, self.crf, self.preset = audio_from, start_time, crf, preset
        self.frames_written = 0
        self._pending: tuple[float, Any] | None = None
        self.buffers: queue.Queue = queue.Queue()  # pinned host buffers the encoder is done with
        self.thread.start()

    def write(self, frames: torch.Tensor) -> None:
        """提交一批 uint8 NHWC 帧（CPU）"""
        if self.error is not None:
            raise self.error
        if not self.put(frames) and self.error is not None:
            raise self.error

    def close(self) -> None:
        """写完剩余帧并关闭文件"""
        self.put(_END)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.shutdown()
            Path(self.path).unlink(missing_ok=True)

    # -- the encode thread

    def _open(self, copy_audio: bool) -> tuple[Any, Any, Any, Any]:
        out = av.open(self.path, "w", format="mp4")
        try:
            video = out.add_stream("libx264", rate=self.rate)
            video.width, video.height, video.pix_fmt = self.width, self.height, "yuv420p"
            video.time_base = self.time_base
            video.codec_context.time_base = self.time_base
            video.options = {"crf": str(self.crf), "preset": self.preset}
            cc = video.codec_context
            cc.colorspace = cc.color_primaries = cc.color_trc = 1  # BT.709, as the conversion below
            cc.color_range = 1  # limited (MPEG) range
            src = audio = None
            if self.audio_from is not None:
                src = av.open(str(self.audio_from))
                if not src.streams.audio:
                    src.close()
                    src = None
                else:
                    in_audio = src.streams.audio[0]
                    if copy_audio:
                        audio = out.add_stream_from_template(in_audio)
                    else:
                        audio = out.add_stream("aac", rate=in_audio.codec_context.sample_rate or 48000)
                        audio.layout = in_audio.codec_context.layout
            out.start_encoding()
            return out, video, src, audio
        except BaseException:
            out.close()
            raise

    def work(self) -> None:
        copy = True
        if self.audio_from is not None:
            with av.open(str(self.audio_from)) as probe:
                a = probe.streams.audio
                copy = bool(a) and a[0].codec_context.codec.canonical_name in MP4_COPY_AUDIO
        try:
            out, video, src, audio = self._open(copy)
        except av.FFmpegError:
            if not copy:
                raise
            log.info("copying the audio into MP4 failed; transcoding it to AAC")
            copy = False
            out, video, src, audio = self._open(copy)
        audio_items = self._audio_items(src, audio, copy) if src is not None else iter(())
        try:
            while (batch := self.get()) is not _END:
                for frame in batch.numpy():
                    vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
                    vf = vf.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
                    vf.pts, vf.time_base = self._pts(self.frames_written), self.time_base
                    out.mux(video.encode(vf))
                    self.frames_written += 1
                if batch.is_pinned():
                    self.buffers.put(batch)
                self._mux_audio(out, audio_items, float(self.frames_written / self.rate))
            if self.stop.is_set():
                return
            out.mux(video.encode(None))
            self._mux_audio(out, audio_items, float(self.frames_written / self.rate), flush=True)
        finally:
            out.close()
            if src is not None:
                src.close()

    def _pts(self, index: int) -> int:
        return int(index / self.rate / self.time_base)

    def _audio_items(self, src: Any, audio: Any, copy: bool) -> Iterator[tuple[float, Any]]:
        """(seconds, packet) of the source's audio, copied or re-encoded, shifted to the video's zero."""
        in_audio = src.streams.audio[0]
        shift = round(self.start_time / in_audio.time_base) if in_audio.time_base else 0
        for packet in src.demux(in_audio):
            if copy:
                if packet.dts is None or not packet.size:
                    continue
                pts = packet.pts if packet.pts is not None else packet.dts
                packet.pts, packet.dts = pts - shift, packet.dts - shift
                packet.stream = audio
                yield float(packet.pts * packet.time_base), packet
                continue
            for frame in packet.decode():
                time = (frame.time or 0.0) - self.start_time
                frame.pts = None
                for out_packet in audio.encode(frame):
                    yield time, out_packet
        if not copy:
            for out_packet in audio.encode(None):
                yield math.inf, out_packet

    def _mux_audio(self, out: Any, items: Iterator, until: float, flush: bool = False) -> None:
        """Mux audio up to ``until`` seconds of video, keeping the file interleaved; none past its end."""
        while True:
            if self._pending is None:
                self._pending = next(items, None)
                if self._pending is None:
                    return
            time, packet = self._pending
            if time >= until and not flush:
                return
            if time < until or math.isinf(time):
                out.mux(packet)
            self._pending = None


def batch_size_for(width: int, height: int, device: torch.device) -> int:
    """按像素预算决定每批帧数"""
    return max(1, min(32, BATCH_PIXELS.get(device.type, BATCH_PIXELS["cpu"]) // (width * height)))


def stream_video(
    src: str | Path,
    dst: str | Path,
    process: Callable[[Iterator[torch.Tensor]], Iterable[torch.Tensor]],
    *,
    info: dict,
    out_size: tuple[int, int],
    progress: Callable[..., None],
    device: torch.device,
    rate_factor: int = 1,
    batch_size: int | None = None,
    message: str = "Processing video",
) -> int:
    """流式处理视频：解码线程 → 设备批处理 → 编码线程（音轨原样复制），返回写出的帧数

    ``process`` maps an iterator of float NCHW device batches (0..255) to an iterable of output batches
    of ``out_size`` (H, W); it may hold frames across batches (interpolation does).
    """
    with av.open(str(src)) as container:  # header only: timing facts the writer keeps
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(info["fps"]).limit_denominator(1001000)
        time_base, start = (
            stream.time_base,
            float(stream.start_time * stream.time_base) if stream.start_time else 0.0,
        )
    total = max(1, info.get("frame_count") or 1)
    batch_size = batch_size or batch_size_for(out_size[1], out_size[0], device)
    done = 0
    with (
        FrameReader(src, batch_size, pin=device.type == "cuda") as reader,
        FrameWriter(
            dst,
            out_size[1],
            out_size[0],
            rate * rate_factor,
            audio_from=src if info.get("has_audio") else None,
            time_base=time_base,
            start_time=start,
        ) as writer,
    ):

        def batches() -> Iterator[torch.Tensor]:
            nonlocal done
            for frames in reader:
                x = to_device(frames, device)
                reader.release(frames)
                done += frames.shape[0]
                yield x

        encode_batches(process(batches()), writer, lambda: progress(min(done / total, 1.0), message))
    return writer.frames_written


def encode_batches(batches: Iterable[torch.Tensor], writer: FrameWriter, after_batch: Callable[[], None]) -> None:
    """把设备上的浮点帧批次交给编码线程；每批之后调用 after_batch（进度/取消）"""
    for y in batches:
        frames = to_uint8(y)
        if frames.is_cuda:  # through a pinned buffer: the copy is fast and the encoder reads it in place
            host = _pinned_like(writer, frames)
            host.copy_(frames)
            frames = host
        else:
            frames = frames.cpu()
        writer.write(frames)
        after_batch()  # may raise TaskCanceled: the caller's with-blocks stop both threads


def _pinned_like(writer: FrameWriter, frames: torch.Tensor) -> torch.Tensor:
    try:
        buf = writer.buffers.get_nowait()
        if buf.shape == frames.shape:
            return buf
    except queue.Empty:
        pass
    return torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)


def video_output(path: Path, width: int, height: int, frames: int, fps: float, **metadata) -> OutputFile:
    """一个 H.264 MP4 产出（时长由帧数与帧率得出）"""
    return OutputFile(
        path=path,
        kind="video",
        mime="video/mp4",
        width=width,
        height=height,
        duration_s=frames / fps,
        fps=float(fps),
        metadata={"frames": frames, **metadata},
    )
