"""A decoded frame as a screen shows it: upright by its display matrix, in SDR BT.709 colours."""

from __future__ import annotations

import logging

import av
import numpy as np
from av.video.reformatter import VideoReformatter

log = logging.getLogger(__name__)
# FFmpeg's colour tags (AVColorTransferCharacteristic, AVColorPrimaries, AVColorSpace values)
HDR_TRANSFERS = {16, 18}  # SMPTE ST 2084 (PQ: HDR10, Dolby Vision), ARIB STD-B67 (HLG: phones' HDR video)
BT709, UNSPECIFIED, BT2020 = 1, 2, 9


def quarter_turns(frame: av.VideoFrame) -> int:
    """帧的显示矩阵要求的逆时针四分之一圈数（手机竖拍视频常带 ±90°）"""
    return round((frame.rotation or 0) / 90) % 4


def upright(pixels: np.ndarray, turns: int) -> np.ndarray:
    """按显示矩阵把 HWC 像素转正（np.rot90 视图，无逐像素 Python）"""
    return np.rot90(pixels, turns) if turns else pixels


def sdr_options(frame: av.VideoFrame) -> dict:
    """帧转 RGB 的 swscale 选项：按 SDR BT.709 显示器上的样子（HDR 色调/色域映射；未标注的高清按 BT.709）"""
    if frame.color_trc in HDR_TRANSFERS or frame.color_primaries == BT2020:
        return {"dst_color_trc": BT709, "dst_color_primaries": BT709}  # swscale tone- and gamut-maps
    if frame.colorspace == UNSPECIFIED and (frame.width >= 1280 or frame.height > 576):
        # Players read untagged HD video as BT.709; swscale's default, BT.601, would shift its colours.
        return {"src_colorspace": "ITU709"}
    return {}


class DisplayRGB:
    """把一个视频的帧逐一转成显示时的 uint8 RGB（HWC）：SDR BT.709 颜色，按显示矩阵转正"""

    def __init__(self) -> None:
        # One swscale context for the whole video: setting up HDR mapping costs about a second on a CPU.
        self._reformatter = VideoReformatter()
        self._colour: dict | None = None
        self.turns = 0

    def __call__(self, frame: av.VideoFrame, width: int | None = None, height: int | None = None) -> np.ndarray:
        if self._colour is None:  # the first frame decides, for the whole video
            self.turns, self._colour = quarter_turns(frame), sdr_options(frame)
            try:
                return self(frame, width, height)
            except av.FFmpegError as exc:
                if not self._colour:
                    raise
                # A tag combination swscale cannot map (it answers EOPNOTSUPP): decoded unmapped, not refused.
                log.warning(
                    "colours (trc %s, primaries %s) not mapped: %s", frame.color_trc, frame.color_primaries, exc
                )
                self._colour = {}
        rgb = self._reformatter.reformat(frame, width, height, "rgb24", **self._colour)
        return upright(rgb.to_ndarray(), self.turns)
