"""A decoded frame as a screen shows it: turned and mirrored by its display matrix, in SDR BT.709 colours."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cache
from typing import Any, NamedTuple

import av
import av.filter
import numpy as np
from av.sidedata.sidedata import Type
from av.video.reformatter import VideoReformatter

log = logging.getLogger(__name__)
# FFmpeg's colour tags (AVColorTransferCharacteristic, AVColorPrimaries, AVColorSpace values)
HDR_TRANSFERS = {16, 18}  # SMPTE ST 2084 (PQ: HDR10, Dolby Vision), ARIB STD-B67 (HLG: phones' HDR video)
BT709, UNSPECIFIED, BT2020 = 1, 2, 9
SMPTE170M = 6  # BT.601, what players read untagged SD video as
LIMITED_RANGE, FULL_RANGE = 1, 2  # AVCOL_RANGE_MPEG, AVCOL_RANGE_JPEG
# The Y'CbCr matrices (AVColorSpace values) converted on the device, by their luma weights of red and blue (Kr, Kb)
MATRICES = {BT709: (0.2126, 0.0722), 4: (0.30, 0.11), 5: (0.299, 0.114), SMPTE170M: (0.299, 0.114), 7: (0.212, 0.087)}


class YCbCr(NamedTuple):
    """8 位 Y'CbCr 码值的编码：矩阵（红、蓝的亮度权重 Kr、Kb）与是否全范围"""

    kr: float = 0.2126
    kb: float = 0.0722
    full: bool = False


BT709_LIMITED = YCbCr()  # what the encoder tags its output with


def coding(frame: av.VideoFrame) -> YCbCr | None:
    """帧的 Y'CbCr 编码，若其矩阵与范围可在设备上精确换算；HDR、RGB、调色板与少见的矩阵 → None（交给 swscale）"""
    fmt = frame.format
    if fmt.is_rgb or fmt.has_palette or fmt.name.startswith("xyz"):
        return None
    if frame.color_trc in HDR_TRANSFERS or frame.color_primaries == BT2020:
        return None  # tone- and gamut-mapped by swscale
    if _grey(fmt):  # its luma, with neutral chroma; untagged grey is full range, as swscale reads it
        return YCbCr(full=frame.color_range != LIMITED_RANGE)
    # Two colour-difference planes: PyAV's is_chroma is false for unsubsampled ones (4:4:4, ProRes 4444).
    if sum(not (c.is_luma or c.is_alpha) for c in fmt.components) != 2:
        return None
    space = frame.colorspace
    if space == UNSPECIFIED:  # as players read it, and as sdr_options has swscale read it
        space = BT709 if frame.width >= 1280 or frame.height > 576 else SMPTE170M
    if space not in MATRICES:
        return None
    return YCbCr(*MATRICES[space], frame.color_range == FULL_RANGE or fmt.name.startswith("yuvj"))


def _grey(fmt: av.VideoFormat) -> bool:
    """只有亮度（可带 alpha）的像素格式：gray、gray10、ya8 等"""
    return all(c.is_luma or c.is_alpha for c in fmt.components)


@cache
def decoding(colour: YCbCr) -> np.ndarray:
    """(3, 4) 仿射矩阵：按 colour 编码的 8 位 Y、U、V 码值 → RGB（0..255），最后一列是偏移"""
    kr, kb = colour.kr, colour.kb
    kg = 1 - kr - kb
    to_rgb = np.array([[1, 0, 2 - 2 * kr], [1, -(2 - 2 * kb) * kb / kg, -(2 - 2 * kr) * kr / kg], [1, 2 - 2 * kb, 0]])
    luma, chroma, black = (255, 255, 0) if colour.full else (219, 224, 16)
    codes = np.diag([1 / luma, 1 / chroma, 1 / chroma])  # code values → Y' (0..1), Pb and Pr (±0.5)
    offset = -codes @ np.array([black, 128, 128])
    return 255 * to_rgb @ np.hstack([codes, offset[:, None]])


class Orientation(NamedTuple):
    """显示矩阵的轴对齐部分：显示的行是否为存储的列（转置），再上下、左右翻转"""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @classmethod
    def of(cls, frame: av.VideoFrame) -> Orientation:
        """读帧的显示矩阵（手机竖拍常为 ±90°，前置镜头可能镜像）"""
        try:
            data = frame.side_data.get(Type.DISPLAYMATRIX)
        except ValueError:  # side data this PyAV cannot name (FFmpeg 8's EXIF on MJPEG): the angle alone
            return _QUARTER_TURNS.get(round(frame.rotation) % 360, cls())
        if data is None:
            return cls()
        # FFmpeg's matrix | a b u | c d v | x y w |: a stored point (p, q) is shown at (a·p + c·q, b·p + d·q).
        a, b, _, c, d = (int(v) for v in np.frombuffer(bytes(data), dtype=np.int32)[:5])
        half = max(abs(a), abs(b), abs(c), abs(d)) / 2
        a, b, c, d = (0 if abs(v) < half else 1 if v > 0 else -1 for v in (a, b, c, d))
        if a and d and not (b or c):
            return cls(False, d < 0, a < 0)
        if b and c and not (a or d):
            return cls(True, b < 0, c < 0)
        return cls()  # a free rotation (not a quarter turn) is shown as stored

    @property
    def mirrored(self) -> bool:
        """显示时左右镜像（去掉镜像后余下的是纯旋转）"""
        return self.transpose ^ self.flip_rows ^ self.flip_cols

    @property
    def degrees(self) -> int:
        """镜像之外的逆时针旋转角度（0/90/180/270）"""
        proper = (self.transpose, self.flip_rows, self.flip_cols ^ self.mirrored)
        return {(False, True, True): 180, (True, True, False): 90, (True, False, True): 270}.get(proper, 0)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """把存储的 HWC 像素或 HW 平面变为显示的样子（numpy 视图，无逐像素 Python）"""
        if self.transpose:
            pixels = pixels.swapaxes(0, 1)
        if self.flip_rows:
            pixels = pixels[::-1]
        if self.flip_cols:
            pixels = pixels[:, ::-1]
        return pixels


# Counter-clockwise quarter turns without a mirror, for frames whose angle is all that can be read.
_QUARTER_TURNS = {
    90: Orientation(True, True, False),
    180: Orientation(False, True, True),
    270: Orientation(True, False, True),
}


def sdr_options(frame: av.VideoFrame) -> dict:
    """帧转换的 swscale 选项：按 SDR BT.709 显示器上的样子（HDR 色调/色域映射；未标注的高清按 BT.709）"""
    if frame.color_trc in HDR_TRANSFERS or frame.color_primaries == BT2020:
        return {"dst_color_trc": BT709, "dst_color_primaries": BT709}  # swscale tone- and gamut-maps
    if frame.colorspace == UNSPECIFIED and (frame.width >= 1280 or frame.height > 576):
        # Players read untagged HD video as BT.709; swscale's default, BT.601, would shift its colours.
        return {"src_colorspace": "ITU709"}
    return {}


class Display:
    """把一个视频的帧逐一转成显示时的样子（SDR BT.709 颜色，按显示矩阵转向）：RGB 或 yuv420p 平面"""

    def __init__(self) -> None:
        # One swscale context for the whole video: setting up HDR mapping costs about a second on a CPU.
        self._reformatter = VideoReformatter()
        self._colour: dict | None = None
        self._coding: YCbCr | None = None
        self.orientation = Orientation()

    @property
    def colour(self) -> YCbCr:
        """yuv420 交出的平面的编码（第一帧之后确定）"""
        return self._coding or BT709_LIMITED

    def rgb(self, frame: av.VideoFrame, width: int | None = None, height: int | None = None) -> np.ndarray:
        """uint8 RGB (H, W, 3)；尺寸与视频不同的帧（录像中途改了分辨率）按比例放进 width×height，四周补黑"""
        self._first(frame)
        if self._coding is not None:  # as the video path converts it on the device (ops.yuv420_to_rgb)
            luma, *chroma = (p.astype(np.float32) for p in self.yuv420(frame, width, height))
            m = decoding(self._coding).astype(np.float32)
            rows, cols = luma.shape
            u, v = (c.repeat(2, 0).repeat(2, 1)[:rows, :cols] for c in chroma)  # as swscale's fast path upsamples
            rgb = np.stack([luma, u, v], -1) @ m[:, :3].T + m[:, 3]
            return (rgb + 0.5).clip(0, 255).astype(np.uint8)
        box = _box(frame, width, height)
        if box is None:
            rgb = self._convert(frame, width, height, "rgb24").to_ndarray()
        else:
            x, y, w, h = box
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[y : y + h, x : x + w] = self._convert(frame, w, h, "rgb24").to_ndarray()
        return self.orientation.apply(rgb)

    def yuv420(self, frame: av.VideoFrame, width: int | None = None, height: int | None = None) -> list[np.ndarray]:
        """Y、U、V 三个 uint8 平面（numpy 视图，用前拷贝），按 self.colour 编码；尺寸不同的帧同 rgb 补黑"""
        box = _box(frame, width, height)
        size = (width, height) if box is None else box[2:]
        self._first(frame)
        if self._coding is not None:
            # swscale changes only what it changes exactly (bit depth, chroma subsampling, size); the matrix and
            # range stay for the device to convert: swscale's fast paths are up to 3 levels off there, and its
            # exact ones cost 5-30 ms a 1080p frame in the decode thread.
            # swscale reads grey as full range whatever its tag: passed through as it is, read as tagged on the device.
            kept = "JPEG" if self._coding.full or _grey(frame.format) else "MPEG"
            converted = self._convert(frame, *size, "yuv420p", False, src_color_range=kept, dst_color_range=kept)
        else:
            converted = self._convert(frame, *size, "yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
        planes = [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in converted.planes]
        if box is not None:
            x, y, w, h = box
            canvas = [np.full((height, width), 0 if self.colour.full else 16, np.uint8)]  # black: U and V 128
            canvas += [np.full(((height + 1) // 2, (width + 1) // 2), 128, np.uint8) for _ in range(2)]
            canvas[0][y : y + h, x : x + w] = planes[0]
            for plane, picture in zip(canvas[1:], planes[1:], strict=True):
                plane[y // 2 : y // 2 + h // 2, x // 2 : x // 2 + w // 2] = picture
            planes = canvas
        return [self.orientation.apply(plane) for plane in planes]

    def _first(self, frame: av.VideoFrame) -> None:
        if self._colour is None:  # the first frame decides, for the whole video
            self.orientation, self._colour, self._coding = Orientation.of(frame), sdr_options(frame), coding(frame)

    def _convert(
        self, frame: av.VideoFrame, width: int | None, height: int | None, fmt: str, mapped: bool = True, **to
    ) -> av.VideoFrame:
        self._first(frame)  # sets the orientation on the first frame
        colour = self._colour if mapped else {}
        try:
            return self._reformatter.reformat(frame, width, height, fmt, **colour, **to)
        except av.FFmpegError as exc:
            if not colour:
                raise
            # A tag combination swscale cannot map (it answers EOPNOTSUPP): decoded unmapped, not refused.
            log.warning("colours (trc %s, primaries %s) not mapped: %s", frame.color_trc, frame.color_primaries, exc)
            self._colour = {}
        return self._reformatter.reformat(frame, width, height, fmt, **to)


def _box(frame: av.VideoFrame, width: int | None, height: int | None) -> tuple[int, int, int, int] | None:
    """尺寸与视频不同的帧在 width×height 里的位置 (x, y, w, h)：保持比例、居中、偶数对齐；尺寸相同 → None"""
    if width is None or height is None or (frame.width, frame.height) == (width, height):
        return None
    scale = min(width / frame.width, height / frame.height)
    w = min(width - width % 2, max(2, round(frame.width * scale / 2) * 2))
    h = min(height - height % 2, max(2, round(frame.height * scale / 2) * 2))
    return (width - w) // 4 * 2, (height - h) // 4 * 2, w, h


def deinterlaced(frames: Iterator[av.VideoFrame], stream: Any) -> Iterator[av.VideoFrame]:
    """隔行视频（摄像机、广播）逐帧去隔行（bwdif：每帧一帧，时间不变）；逐行视频原样通过"""
    graph = None
    for frame in frames:
        if graph is None and frame.interlaced_frame:  # the first interlaced frame decides; flagged ones only after
            graph = av.filter.Graph()
            source = graph.add_buffer(template=stream)
            bwdif = graph.add("bwdif", "mode=send_frame:parity=auto:deint=interlaced")
            source.link_to(bwdif)
            bwdif.link_to(graph.add("buffersink"))
            graph.configure()
        if graph is None:
            yield frame
            continue
        graph.push(frame)
        yield from _pulled(graph, stream)
    if graph is not None:
        graph.push(None)
        yield from _pulled(graph, stream)


def _pulled(graph: Any, stream: Any) -> Iterator[av.VideoFrame]:
    """取出滤镜图里已就绪的帧，时间换回流的时间基（bwdif 的时间基是它的一半）"""
    while True:
        try:
            frame = graph.pull()
        except (av.BlockingIOError, av.EOFError):
            return
        if frame.pts is not None and frame.time_base != stream.time_base:
            ratio = frame.time_base / stream.time_base
            frame.pts = round(frame.pts * ratio)
            frame.duration = round(frame.duration * ratio) if frame.duration else frame.duration
            frame.time_base = stream.time_base
        yield frame
