"""Media I/O and shared torch ops for the media handlers.

- ``display``: a decoded frame as a screen shows it (turned and mirrored by its display matrix, SDR BT.709).
- ``probe``: what a file is (container, codecs, size, duration, fps, frames); refuses what we cannot use.
- ``images``: Pillow in and out, decompression bombs refused before pixels are decoded.
- ``ops``: separable Lanczos-3 resize (antialiased when shrinking), one pass per axis: a grouped conv, or on a
  CPU's upscale shifted multiply-adds; unsharp mask; colour conversions on the device (RGB → yuv420p, a video's
  Y'CbCr matrix and range → RGB or BT.709 limited range).
- ``video``: ``FrameReader`` / ``FrameWriter`` / ``stream_video``: decode thread → device batches → encode
  thread, bounded queues in between, so memory does not grow with the length of the video.

Names load on first use, each from its module: the upload checks and the provider jobs (``probe``, ``images``,
``display``) run on an image without torch, which loads only with ``ops``, ``video``, or a call that makes tensors
(``pick_device``, ``job_device``, ``work_dtype``, ``load_image``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "device": ("even", "input_path", "job_device", "param", "pick_device", "work_dtype"),
    "display": ("Display",),
    "images": ("IMAGE_MIME", "load_image", "open_image", "probe_with_poster", "rgb_colour_profile", "save_image"),
    "ops": (
        "gaussian_blur",
        "premultiply",
        "psnr",
        "resize",
        "resize_yuv420",
        "to_device",
        "to_uint8",
        "to_yuv420",
        "unpremultiply",
        "unsharp_mask",
        "unsharp_mask_premultiplied",
        "yuv420_to_bt709",
        "yuv420_to_rgb",
    ),
    "probe": ("check_input_pixels", "check_output_pixels", "check_video_limits", "probe_file", "require_kind"),
    "video": (
        "BATCH_PIXELS",
        "YUV_ON_DEVICE",
        "FrameReader",
        "FrameWriter",
        "batch_size_for",
        "encode_batches",
        "stream_video",
        "video_output",
    ),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """按需从所在模块载入名字（或子模块），载入后缓存在包上"""
    if name in _EXPORTS:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
