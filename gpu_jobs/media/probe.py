"""What a media file is, and the limits refused before any heavy work."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from fractions import Fraction
from itertools import chain, islice
from pathlib import Path
from typing import Any

import av
from PIL import Image, UnidentifiedImageError

from gpu_jobs.media.display import Orientation, deinterlaced
from lib.catalog import VIDEO_MAX_SIDE, a_kind
from lib.config import get_settings
from lib.errors import InvalidInput
from lib.media_types import SNIFF_BYTES, sniff

log = logging.getLogger(__name__)
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
STILL_DEMUXERS = {"gif", "apng", "webp"}  # FFmpeg's demuxers of picture formats that are not "<codec>_pipe"
STILL_CODECS = {"mjpeg": "JPEG", "png": "PNG", "apng": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP"}
MPEG_AUDIO_CODECS = {1: "mp1", 2: "mp2", 3: "mp3"}  # FFmpeg's codec for each layer of MPEG-1/2 audio
MAX_BAD_PACKETS = 1  # damaged video packets skipped before the file is refused (plus 1 in 50 of those read)


def check_input_pixels(width: int, height: int) -> None:
    """输入像素数超限时拒绝"""
    limit = get_settings().max_input_pixels
    if width * height > limit:
        raise InvalidInput(f"The input is {width}x{height} pixels; at most {limit:,} pixels are accepted.")


def check_output_pixels(width: int, height: int, *, video: bool = False) -> None:
    """输出像素数超限时拒绝；视频的边长也不能超过 H.264 的上限"""
    limit = get_settings().max_output_pixels
    if width * height > limit:
        raise InvalidInput(f"The output would be {width}x{height} pixels; at most {limit:,} are allowed.")
    if video and max(width, height) > VIDEO_MAX_SIDE:
        raise InvalidInput(
            f"The output would be {width}x{height} pixels; a video holds at most {VIDEO_MAX_SIDE:,} pixels a side."
        )


def check_video_limits(info: dict) -> None:
    """视频时长、帧数超限时拒绝"""
    settings = get_settings()
    # Frames first: a count stops at the limit, so the span of the frames counted says nothing.
    if (info.get("frame_count") or 0) > settings.max_video_frames:
        raise InvalidInput(f"The video has more than {settings.max_video_frames} frames, the most accepted.")
    if (info.get("duration_s") or 0) > settings.max_video_seconds:
        raise InvalidInput(
            f"The video is {info['duration_s']:.1f} s long; at most {settings.max_video_seconds:g} s are accepted."
        )


# ---------------------------------------------------------------- probe


def probe_file(path: str | Path) -> dict:
    """探测媒体文件信息"""
    return inspect_file(path)[0]


def inspect_file(path: str | Path, poster_side: int | None = None) -> tuple[dict, Image.Image | av.VideoFrame | None]:
    """探测媒体信息，并交回验证时解码的那一帧：视频的第一个关键帧；图片只在给出 poster_side 时（摆正，JPEG 缩小解码）"""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput("The file does not exist.")
    size = path.stat().st_size
    if size == 0:
        raise InvalidInput("The file is empty.")
    probed = _probe_image(path, poster_side)
    if probed is None:
        probed = _probe_video(path)
    probed[0]["bytes"] = size
    return probed


def _probe_image(path: Path, poster_side: int | None) -> tuple[dict, Image.Image | None] | None:
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        return None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # ValueError: a huge text chunk
        raise InvalidInput(f"The image could not be read: {reason(exc, path)}") from None
    with img:
        if img.format not in IMAGE_FORMATS:
            raise InvalidInput(f"Unsupported image format {img.format}.")
        width, height = img.size
        check_input_pixels(width, height)
        try:
            if exif_orientation(img) in (5, 6, 7, 8):  # EXIF orientation that turns the picture by 90°
                width, height = height, width
            # JPEG decodes at a reduced scale directly: 1/8 is enough to validate, a poster asks for more.
            img.draft("RGB", (poster_side, poster_side) if poster_side else (max(1, width // 8), max(1, height // 8)))
            img.load()
            poster = upright(img) if poster_side else None  # a copy: outlives the closed file
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidInput(f"The image is truncated or corrupt: {reason(exc, path)}") from None
        fmt = img.format.lower()
    info = {
        "kind": "image",
        "format": fmt,
        "mime": Image.MIME.get(fmt.upper(), f"image/{fmt}"),
        "width": width,
        "height": height,
        "rotation": None,
        "mirrored": None,
        "pixel_aspect": None,
        "video_codec": None,
        "audio_codec": None,
        "duration_s": None,
        "fps": None,
        "frame_count": 1,
        "has_audio": False,
    }
    return info, poster


def open_media(path: str | Path) -> Any:
    """打开输入媒体文件（元数据里无效的 UTF-8 被替换，不会让整个文件读不了）"""
    # Cameras write Latin-1 or Shift-JIS tags; PyAV decodes metadata strictly by default.
    return av.open(str(path), metadata_errors="replace")


def _probe_video(path: Path) -> tuple[dict, av.VideoFrame]:
    try:
        container = open_media(path)
    except av.FFmpegError as exc:
        raise InvalidInput(
            f"The file is not a readable image or video (corrupt, truncated or unsupported): {reason(exc, path)}"
        ) from None
    with container:
        name = container.format.name
        if name.endswith("_pipe") or name.startswith("image2") or name in STILL_DEMUXERS:
            # FFmpeg reads pictures Pillow does not (DPX, XWD, Radiance HDR; a PNG or a GIF Pillow refuses) as
            # "videos" of a frame or an animation: a picture it stays, and the message speaks of its format.
            stream = video_stream(container)
            codec = stream.codec_context.name if stream is not None and stream.codec_context is not None else ""
            kind = STILL_CODECS.get(codec) or name.removesuffix("_pipe").upper()
            if kind in IMAGE_FORMATS:  # one Pillow reads, but could not make sense of this one
                raise InvalidInput(f"The image is truncated or corrupt (its {kind} data could not be read).")
            raise InvalidInput(f"Unsupported image format {kind}; use PNG, JPEG, WebP or GIF.")
        audio = audio_stream(container)
        stream = video_stream(container)
        if stream is None:
            if container.streams.audio:  # cover art alone (an album's picture in an mp3) does not make it a video
                raise InvalidInput("The file is audio only; an image or a video is needed.")
            raise InvalidInput("The file holds no video or image stream.")
        ctx = stream.codec_context
        if ctx is None:
            raise InvalidInput("The video's codec is not one we can decode.")
        if not ctx.width or not ctx.height:
            raise InvalidInput(f"The video stream ({ctx.name}) has no frame size; the file is corrupt or unsupported.")
        check_input_pixels(ctx.width, ctx.height)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        limit_decoded_pixels(stream)
        try:  # decode the first frame shown: proves the stream decodes without reading the whole file
            # Not keyframes only: a clip cut without re-encoding starts on a keyframe its edit list hides, and the
            # first frame shown may come a whole keyframe interval later (or have no keyframe after it at all).
            decoded = _decoded(container, stream, path)
            first = next(decoded, None)
            if first is not None and first.interlaced_frame:  # the poster too: bwdif weaves it from the next frame
                first = next(deinterlaced(chain([first], islice(decoded, 1)), stream), first)
        except av.FFmpegError as exc:
            raise InvalidInput(
                f"The video could not be decoded (corrupt or unsupported {ctx.name}): {reason(exc, path)}"
            ) from None
        if first is None:
            raise InvalidInput(f"No frame of the video could be decoded (corrupt or unsupported {ctx.name}).")
        if container.duration:  # refuse an over-long file before reading through it
            check_video_limits({"duration_s": container.duration / av.time_base})
        indexed = "mp4" in container.format.name.split(",") and stream.frames and stream.duration and stream.time_base
        # MP4, MOV: an index promising frames; is the data all there (an upload cut short still opens)?
        shown_end = _check_tail(container, stream, first, fps) if indexed else None
        if indexed and _index_agrees(stream, fps):
            frames = stream.frames
            duration = float(stream.duration * stream.time_base)
            if shown_end is not None:  # B-frames of a variable rate: the index's decode times can end earlier
                duration = max(duration, float((shown_end - first.pts) * stream.time_base))
        else:  # any other header's count and length are only claims (and cost nothing to forge): count the packets
            frames, span = _count_packets(container, stream, fps, path)
            if span:  # with a variable rate frames / fps is far off
                duration = span
            elif fps:
                duration = frames / fps
            else:
                duration = container.duration / av.time_base if container.duration else None
        if not fps and duration:
            fps = frames / duration
        orientation = Orientation.of(first)
        info = {
            "kind": "video",
            "format": container.format.name,
            "mime": _container_mime(path, container.format.name),
            # As displayed: a phone's portrait clip is stored landscape with a 90° display rotation.
            "width": ctx.height if orientation.transpose else ctx.width,
            "height": ctx.width if orientation.transpose else ctx.height,
            "rotation": orientation.degrees,
            "mirrored": orientation.mirrored,
            # Anamorphic video (DV, some broadcast) has non-square pixels: shown pixel_aspect times as wide.
            "pixel_aspect": round(float(pixel_aspect(stream, orientation.transpose)), 6),
            "video_codec": ctx.codec.canonical_name,
            "audio_codec": audio_codec(container, audio) if audio else None,
            "duration_s": round(duration, 6) if duration else None,
            "fps": round(fps, 6) if fps else None,
            "frame_count": frames,
            "has_audio": audio is not None,
        }
    if not frames:
        raise InvalidInput("The video has no frames.")
    check_video_limits(info)
    return info, first


TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(img: Image.Image) -> int | None:
    """EXIF 方向（1–8）；没有或 EXIF 读不了 → None"""
    if img.format == "PNG":
        # Pillow decodes a PNG to find an eXIf chunk after its pixels. Damaged pixels must fail here, outside the
        # guard below: once a load has failed, the next one does nothing and the rest of the picture stays black.
        img.load()
    try:
        return img.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block is no reason to refuse the picture: shown as stored
        return None


def upright(img: Image.Image) -> Image.Image:
    """按 EXIF 方向摆正的副本：只转像素，不像 ImageOps.exif_transpose 那样重写 EXIF（损坏的 EXIF 重写不了）"""
    method = TRANSPOSES.get(exif_orientation(img))
    return img.transpose(method) if method is not None else img.copy()


class PacketDecoder:
    """逐包解码视频：少量损坏的包跳过（如 ffmpeg 命令），多了拒绝文件；探测与任务用同一条规则"""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.read = 0  # packets read so far
        self.damaged = 0
        self.shown = False  # a frame has decoded

    def decode(self, packet: Any) -> list[av.VideoFrame] | None:
        """一个包的帧；损坏而可跳过 → None；损坏过多 → av.InvalidDataError"""
        self.read += 1
        try:
            frames = packet.decode()
        except av.InvalidDataError as exc:  # damaged data, or a frame over the pixel limit (never decoded)
            if self.shown or packet.is_keyframe:
                # Before the first frame, a packet that is no keyframe is no damage: a clip cut between keyframes
                # without re-encoding (VP8/VP9 refuse the frames before its first keyframe, H.264 shows nothing for
                # them), and players start at that keyframe too.
                self.damaged += 1
                if self.damaged > MAX_BAD_PACKETS + self.read // 50:
                    raise
            log.warning("%s: skipped an undecodable video packet (%s)", self.path, exc)
            return None
        self.shown = self.shown or bool(frames)
        return frames


def _decoded(container: Any, stream: Any, path: Path) -> Iterator[av.VideoFrame]:
    """逐包解码视频流；跳过少量损坏的包（如任务所做）"""
    decoder = PacketDecoder(path)
    for packet in container.demux(stream):
        yield from decoder.decode(packet) or ()


def limit_decoded_pixels(stream: Any) -> None:
    """让解码器拒绝超过 MAX_INPUT_PIXELS 的帧：文件头只说第一帧的尺寸，之后的帧可以更大（解压炸弹）"""
    stream.codec_context.options = {**stream.codec_context.options, "max_pixels": str(get_settings().max_input_pixels)}


def reason(exc: BaseException, path: str | Path) -> str:
    """给用户看的错误原因：FFmpeg 的说明，或其他消息去掉工作目录里的文件路径"""
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return exc.strerror
    return str(exc).replace(f"'{path}'", "").replace(str(path), "").replace("  ", " ").strip() or type(exc).__name__


def pixel_aspect(stream: Any, transpose: bool = False) -> Fraction:
    """像素宽高比（显示时一个像素的宽/高；方形像素为 1），按显示方向（转置时取倒数）"""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    sar = Fraction(sar) if sar and sar > 0 else Fraction(1)
    return 1 / sar if transpose else sar


def audio_stream(container: Any) -> Any | None:
    """要保留的音轨：有解码器的音频流里标为默认（播放器放的）的那个，都没标则第一个；编码未知的音轨当作没有"""
    known = [s for s in container.streams.audio if s.codec_context is not None]
    default = av.stream.Disposition.default
    return next((s for s in known if s.disposition & default), known[0] if known else None)


def audio_codec(container: Any, stream: Any) -> str:
    """音轨的编码名；MP4 把 MPEG-1/2 音频一律标作 mp3，层（I、II、III）由第一个包的帧头分辨"""
    name = stream.codec_context.codec.canonical_name
    if name != "mp3":
        return name
    return MPEG_AUDIO_CODECS.get(_mpeg_audio_layer(_first_packet(container, stream)), name)


def _first_packet(container: Any, stream: Any) -> bytes:
    """流里第一个非空包的数据（读不出来 → 空）"""
    try:
        container.seek(0)
        return next((bytes(packet) for packet in container.demux(stream) if packet.size), b"")
    except av.FFmpegError:
        return b""


def _mpeg_audio_layer(data: bytes) -> int | None:
    """MPEG 音频帧头里的层（1、2 或 3）；不以帧头开始 → None"""
    if len(data) < 2 or data[0] != 0xFF or data[1] & 0xE0 != 0xE0:
        return None
    return {3: 1, 2: 2, 1: 3}.get(data[1] >> 1 & 3)


def video_stream(container: Any) -> Any | None:
    """视频的画面流：第一个不是附图（音频文件的封面）的视频流"""
    cover = av.stream.Disposition.attached_pic
    return next((s for s in container.streams.video if not s.disposition & cover), None)


def _check_tail(container: Any, stream: Any, first: av.VideoFrame, fps: float | None) -> int | None:
    """读索引里最后一个关键帧起的包（只解复用）：数据在文件里没有（截断）→ 拒绝；返回最后一帧显示结束的时刻

    An MP4 whose index comes first (a web download, a messenger video) still opens when its end is cut off: the
    index promises frames the file no longer holds, and they would silently go missing from the output.
    """
    start = stream.start_time or 0
    promised = start + stream.duration
    try:
        container.seek(promised, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError:
        return None  # no index to seek with: nothing to check against
    end = last = None
    try:
        for packet in container.demux(stream):
            # Frames an edit list trims off the end still come out, marked discard: the clip ends before them.
            if (
                packet.size
                and not packet.is_discard
                and packet.pts is not None
                and (last is None or packet.pts >= last)
            ):
                # The frame shown last ends the video: with B-frames a packet's duration is a decode-time step,
                # so a reordered frame's pts + duration can overshoot.
                last, end = packet.pts, packet.pts + (packet.duration or 0)
    except av.FFmpegError:  # the data ends inside a packet
        pass
    # A frame and a half: an index's own rounding passes, two frames missing do not.
    slack = max(1.5 / fps if fps else 0.0, 0.05) / stream.time_base
    if end is None or end < promised - slack:
        shown = max(0.0, float(((end or first.pts or 0) - start) * stream.time_base))
        raise InvalidInput(
            f"The video is truncated: its data ends at {shown:.1f} s of the "
            f"{float(stream.duration * stream.time_base):.1f} s it announces. Upload the whole file."
        )
    # An index that ends after the last frame starts says when it ends: with B-frames at a variable rate, that frame's
    # decode-time duration reaches past it (the MP4 this service writes, read again, is one).
    return end if last >= promised else promised


def _index_agrees(stream: Any, fps: float | None) -> bool:
    """MP4/MOV 索引的帧数与时长是否相符（分片文件的 moov 只记第一个片段，编辑列表会藏起一些帧）"""
    return bool(fps) and abs(stream.frames - float(stream.duration * stream.time_base) * fps) <= 1.5


def _count_packets(container: Any, stream: Any, fps: float | None, path: Path) -> tuple[int, float | None]:
    """Frames of a stream, and the time they span: its packets (shown ones: not empty, not discarded), demuxed."""
    try:
        container.seek(0)
    except av.FFmpegError:  # no keyframe in the index to rewind to (an AVI cut between keyframes): read it afresh
        with open_media(path) as fresh:
            return _packets_of(fresh, video_stream(fresh), fps)
    return _packets_of(container, stream, fps)


def _packets_of(container: Any, stream: Any, fps: float | None) -> tuple[int, float | None]:
    """从当前位置起数一个流的包（只解复用）：帧数，与它们跨越的时间（秒）"""
    limit = get_settings().max_video_frames
    frames, first, end = 0, None, None
    step = round(1 / fps / stream.time_base) if fps and stream.time_base else 0
    for packet in container.demux(stream):
        if not packet.size or packet.is_discard:  # an AVI's dropped frame; one an edit list hides
            continue
        frames += 1
        at = packet.pts if packet.pts is not None else packet.dts  # AVI: the frame's slot
        if at is not None:
            first = at if first is None else min(first, at)
            end = max(end or at, at + (packet.duration or step))
        if frames > limit:  # no need to read on: the video is refused anyway
            break
    span = float((end - first) * stream.time_base) if first is not None and stream.time_base else None
    return frames, span


def _container_mime(path: Path, format_name: str) -> str:
    """视频容器的 MIME：与上传时一样按文件开头判断（FFmpeg 把 MP4 与 QuickTime、Matroska 与 WebM 叫作同一种格式）"""
    with open(path, "rb") as file:
        media = sniff(file.read(SNIFF_BYTES))
    return media.mime if media is not None and media.kind == "video" else "video/" + _mime_subtype(format_name)


def _mime_subtype(format_name: str) -> str:
    names = format_name.split(",")
    known = (("mp4", "mp4"), ("mov", "quicktime"), ("matroska", "x-matroska"), ("webm", "webm"), ("avi", "x-msvideo"))
    for name, sub in known:
        if name in names:
            return sub
    return names[0]


def require_kind(info: dict, kind: str) -> None:
    """媒体类型不符时拒绝"""
    if info["kind"] != kind:
        raise InvalidInput(f"This task needs {a_kind(kind)}; the input is {a_kind(info['kind'])}.")
