"""Media I/O and shared torch ops for the media handlers.

- ``display``: a decoded frame as a screen shows it (turned and mirrored by its display matrix, SDR BT.709).
- ``probe``: what a file is (container, codecs, size, duration, fps, frames); refuses what we cannot use.
- ``images``: Pillow in and out, decompression bombs refused before pixels are decoded.
- ``ops``: separable Lanczos-3 resize (antialiased when shrinking), one pass per axis: a grouped conv, or on a
  CPU's upscale shifted multiply-adds; unsharp mask; colour conversions on the device (RGB → yuv420p, a video's
  Y'CbCr matrix and range → RGB or BT.709 limited range).
- ``video``: ``FrameReader`` / ``FrameWriter`` / ``stream_video``: decode thread → device batches → encode
  thread, bounded queues in between, so memory does not grow with the length of the video.
"""

from gpu_jobs.media.device import even, input_path, job_device, param, pick_device, work_dtype
from gpu_jobs.media.display import Display
from gpu_jobs.media.images import (
    IMAGE_MIME,
    load_image,
    open_image,
    probe_with_poster,
    rgb_colour_profile,
    save_image,
)
from gpu_jobs.media.ops import (
    gaussian_blur,
    premultiply,
    psnr,
    resize,
    resize_yuv420,
    to_device,
    to_uint8,
    to_yuv420,
    unpremultiply,
    unsharp_mask,
    unsharp_mask_premultiplied,
    yuv420_to_bt709,
    yuv420_to_rgb,
)
from gpu_jobs.media.probe import (
    check_input_pixels,
    check_output_pixels,
    check_video_limits,
    probe_file,
    require_kind,
)
from gpu_jobs.media.video import (
    BATCH_PIXELS,
    YUV_ON_DEVICE,
    FrameReader,
    FrameWriter,
    batch_size_for,
    encode_batches,
    stream_video,
    video_output,
)

__all__ = [
    "BATCH_PIXELS",
    "IMAGE_MIME",
    "YUV_ON_DEVICE",
    "Display",
    "FrameReader",
    "FrameWriter",
    "batch_size_for",
    "check_input_pixels",
    "check_output_pixels",
    "check_video_limits",
    "encode_batches",
    "even",
    "gaussian_blur",
    "input_path",
    "job_device",
    "load_image",
    "open_image",
    "param",
    "pick_device",
    "premultiply",
    "probe_file",
    "probe_with_poster",
    "psnr",
    "require_kind",
    "resize",
    "resize_yuv420",
    "rgb_colour_profile",
    "save_image",
    "stream_video",
    "to_device",
    "to_uint8",
    "to_yuv420",
    "unpremultiply",
    "unsharp_mask",
    "unsharp_mask_premultiplied",
    "video_output",
    "work_dtype",
    "yuv420_to_bt709",
    "yuv420_to_rgb",
]
