"""Still images: Pillow in (decompression bombs refused before decoding) and out."""

from __future__ import annotations

import io
import logging
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from gpu_jobs.media.display import Display
from gpu_jobs.media.probe import check_input_pixels, inspect_file, reason, upright
from lib.errors import InvalidInput

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
IMAGE_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Colour spaces no RGB output can carry a profile of, and the modes Pillow opens them in: converted to sRGB always.
PROFILED_MODES = {b"GRAY": ("L", "LA"), b"CMYK": ("CMYK",)}


def open_image(
    path: str | Path,
    *,
    keep_alpha: bool = False,
    background: tuple[int, int, int] = (0, 0, 0),
    srgb: bool = True,
) -> Image.Image:
    """打开图片（先检查像素数，再解码，按 EXIF 方向摆正）：RGB；有透明时铺在 background 上，或 keep_alpha 时为 RGBA

    With ``srgb`` the colours are converted from the picture's own RGB profile to sRGB, for outputs that carry no
    profile (video, posters, Kling's input); without it they stay as stored, for an output that keeps the profile.
    A grey or CMYK profile is applied either way: no RGB output can carry it.
    """
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InvalidInput(f"The image could not be read: {reason(exc, path)}") from None
    check_input_pixels(*img.size)
    profile = img.info.get("icc_profile")
    try:
        img = grey_or_cmyk_to_srgb(eight_bit(upright(img)), profile)
        img = img.convert("RGBA") if keep_alpha and img.has_transparency_data else flatten(img, background)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"The image is truncated or corrupt: {reason(exc, path)}") from None
    return to_srgb(img, profile) if srgb else img


def grey_or_cmyk_to_srgb(img: Image.Image, profile: bytes | None) -> Image.Image:
    """带灰度或 CMYK ICC 描述的图（黑白照片的 Gray Gamma 1.8、印刷稿的 CMYK）按描述转成 sRGB 的 RGB/RGBA；其他原样"""
    space = profile[16:20] if isinstance(profile, bytes) else None
    if img.mode not in PROFILED_MODES.get(space, ()):
        return img
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        colours = img.getchannel("L") if img.mode == "LA" else img
        rgb = ImageCms.profileToProfile(colours, source, _srgb(), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:  # a profile LittleCMS cannot use: as Pillow converts
        log.warning("%s colour profile not applied: %s", img.mode, exc)
        return img
    if img.mode == "LA":
        rgb.putalpha(img.getchannel("A"))
    return rgb


def to_srgb(img: Image.Image, profile: bytes | None) -> Image.Image:
    """RGB/RGBA 图按其 ICC 描述转到 sRGB（iPhone 照片是 Display P3：不转换就显得发灰）；无描述或非 RGB 描述 → 原样"""
    if not isinstance(profile, bytes) or profile[16:20] != b"RGB " or img.mode not in ("RGB", "RGBA"):
        return img
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        return ImageCms.profileToProfile(img, source, _srgb(), outputMode=img.mode)
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:  # a profile LittleCMS cannot use: colours as stored
        log.warning("colour profile not applied: %s", exc)
        return img


@cache
def _srgb():
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def eight_bit(img: Image.Image) -> Image.Image:
    """16 位、32 位整数与浮点灰度图按取值范围缩到 8 位（Pillow 的 convert 直接截断）；16 位 PNG 的透明色随之保留"""
    key = img.info.get("transparency")
    if img.mode == "RGB" and isinstance(key, tuple) and max(key) > 255:
        # A 16-bit PNG's pixels come out 8-bit (their high bytes) but its tRNS colour stays 16-bit: it matched none.
        img.info["transparency"] = tuple(value >> 8 for value in key)
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    values = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and isinstance(key, int)):
        grey = (values >> 8).astype(np.uint8)
        if not isinstance(key, int):
            return Image.fromarray(grey)
        alpha = np.where(values == key, 0, 255).astype(np.uint8)  # the tRNS grey, compared at 16 bits
        return Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    top = float(values.max(initial=0))
    if img.mode == "F":  # usually 0..1
        top = 1.0 if top <= 1.0 else 255.0
    else:  # a 16-bit PNG opens as "I"; wider integers are scaled by their own peak
        top = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    scaled = values.astype(np.float32) * np.float32(255 / top)
    return Image.fromarray(np.clip(scaled, 0, 255, out=scaled).round().astype(np.uint8))


def flatten(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """转 RGB，透明处铺上 background（直接丢掉 alpha 会露出透明像素里碰巧存着的颜色）"""
    if not img.has_transparency_data:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")


def load_image(path: str | Path, **options) -> torch.Tensor:
    """读取图片为 uint8 张量 (3, H, W)，或带透明度时 (4, H, W)（参数同 open_image）"""
    import torch  # here: the upload checks and Kling's input image use this module without torch

    return torch.from_numpy(np.array(open_image(path, **options))).permute(2, 0, 1)


def probe_with_poster(path: str | Path, max_side: int = 1280) -> tuple[dict, Image.Image]:
    """探测媒体并做海报：用探测时已解码的那一帧（图片本身，或视频第一个关键帧），不再解码第二次；长边不超过 max_side"""
    info, first = inspect_file(path, poster_side=max_side)
    if isinstance(first, av.VideoFrame):
        img = Image.fromarray(Display().rgb(first))
        if info["pixel_aspect"] != 1:  # anamorphic: the poster shows it as wide as a player does
            img = img.resize((max(1, round(img.width * info["pixel_aspect"])), img.height), Image.LANCZOS)
    else:
        profile = first.info.get("icc_profile")
        img = to_srgb(flatten(grey_or_cmyk_to_srgb(eight_bit(first), profile), (255, 255, 255)), profile)
    img.thumbnail((max_side, max_side), Image.LANCZOS)
    return info, img


def rgb_colour_profile(path: str | Path) -> bytes | None:
    """输入图片内嵌的 RGB 色彩描述（ICC；Display P3、Adobe RGB 的照片离了它会显得发灰）；没有或非 RGB → None"""
    try:
        with Image.open(path) as img:
            profile = img.info.get("icc_profile")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        return None
    # Bytes 16..20 of an ICC header name its colour space: a CMYK or grey profile does not describe our RGB output.
    return profile if isinstance(profile, bytes) and profile[16:20] == b"RGB " else None


def save_image(image: torch.Tensor, path: Path, fmt: str, icc_profile: bytes | None = None) -> None:
    """保存 uint8 张量 (3 或 4, H, W) 为 png/jpeg/webp（可带输入的 ICC 色彩描述）"""
    img = Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())
    options = {
        "png": {"compress_level": 6},
        "jpeg": {"quality": 95, "subsampling": 0},
        "webp": {"quality": 95},
    }
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    img.save(path, format=fmt.upper(), **options[fmt], **extra)
