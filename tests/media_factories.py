"""Small media files for tests, generated with PyAV, Pillow and numpy (no fixtures on disk)."""

from __future__ import annotations

import io
import itertools
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

SQUARE = 12  # side of the moving square, in pixels
SQUARE_COLOR = (250, 240, 40)


def pattern_frame(index: int, width: int, height: int, speed: float = 2.0) -> np.ndarray:
    """一帧测试画面：渐变背景 + 匀速右移的方块"""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frame = np.stack(
        [40 + 60 * xx / width, 50 + 80 * yy / height, np.full_like(xx, 90) + 20 * np.sin(xx / 5)], axis=-1
    ).astype(np.uint8)
    x0 = round(4 + speed * index) % max(1, width - SQUARE)
    y0 = (height - SQUARE) // 2
    frame[y0 : y0 + SQUARE, x0 : x0 + SQUARE] = SQUARE_COLOR
    return frame


def square_x(index: int, width: int, speed: float = 2.0) -> float:
    """第 index 帧方块的中心横坐标"""
    return round(4 + speed * index) % max(1, width - SQUARE) + (SQUARE - 1) / 2


def make_video(
    path: str | Path,
    width: int = 64,
    height: int = 48,
    frames: int = 24,
    fps: int | Fraction = 24,
    audio: bool = True,
    *,
    speed: float = 2.0,
    audio_codec: str = "aac",
    video_codec: str = "libx264",
    rotation: int = 0,
    mirror: str | None = None,
    fill: tuple[int, int, int] | None = None,
    colour_tags: dict[str, int] | None = None,
    times: list[float] | None = None,
    audio_start: float = 0.0,
    audio_rate: int = 44100,
    pixel_aspect: Fraction | None = None,
    frames_from: list[np.ndarray] | None = None,
    hold_last: float | None = None,
    audio_seconds: float | None = None,
    keyframe_every: int | None = None,
    pix_fmt: str | None = None,
) -> Path:
    """生成测试视频（移动方块或纯色 fill + 可选正弦波音轨）；rotation 为显示矩阵的逆时针角度（如手机竖拍的 -90）

    ``mirror`` ("h" or "v") adds a flip to the display matrix, applied after the rotation.

    ``colour_tags`` sets the stream's ``colorspace`` / ``color_trc`` / ``color_primaries`` (FFmpeg's values);
    ``times`` gives each frame's time in seconds, to the millisecond (a variable frame rate, as phones record).
    The audio (``audio_rate`` Hz) is silent for its first ``audio_start`` seconds, then a tone.
    ``pixel_aspect`` makes the pixels non-square (anamorphic video); ``frames_from`` gives the pictures themselves.
    ``hold_last`` (with ``times``) shows the last frame that many seconds, as a screen recording holds a still screen.
    ``audio_seconds`` makes the sound that long instead of as long as the picture.
    ``keyframe_every`` starts a new group of pictures (a keyframe) every that many frames.
    ``pix_fmt`` codes the frames in another pixel format (4:2:2, 10-bit, full-range yuvj420p).
    """
    path = Path(path)
    with av.open(str(path), "w") as out:
        video = out.add_stream(video_codec, rate=Fraction(fps))
        video.width, video.height = width, height
        video.pix_fmt = pix_fmt or ("yuvj420p" if video_codec == "mjpeg" else "yuv420p")
        if video_codec == "libx264":
            video.options = {"preset": "ultrafast", "crf": "12"}
        if keyframe_every:
            video.codec_context.gop_size = keyframe_every
        if pixel_aspect is not None:
            video.codec_context.sample_aspect_ratio = pixel_aspect
        if rotation or mirror:
            video.set_display_rotation(rotation, hflip=mirror == "h", vflip=mirror == "v")
        for name, value in (colour_tags or {}).items():
            setattr(video.codec_context, name, value)
        if times is not None:
            video.codec_context.time_base = Fraction(1, 1000)
        sound = _add_audio(out, audio_codec, audio_rate) if audio else None
        packets = []
        for i in range(frames):
            if frames_from is not None:
                pixels = frames_from[i]
            elif fill is None:
                pixels = pattern_frame(i, width, height, speed)
            else:
                pixels = np.full((height, width, 3), fill)
            frame = av.VideoFrame.from_ndarray(pixels.astype(np.uint8), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            packets += video.encode(frame)
        packets += video.encode(None)
        if hold_last:  # MP4 and Matroska end a track at its last packet's dts + duration (in ms here)
            packets[-1].duration = round((times[-1] + hold_last) * 1000) - (packets[-1].dts - packets[0].dts)
        for packet in packets:
            out.mux(packet)
        if sound is not None:
            end = times[-1] + (hold_last or 1 / float(fps)) if times else frames / float(fps)
            _write_sine(out, sound, audio_seconds or end, audio_start)
    return path


def make_growing_video(
    path: str | Path, small: tuple[int, int], large: tuple[int, int], frames: tuple[int, int] = (48, 4)
) -> Path:
    """Matroska H.264 whose first ``frames[0]`` frames are ``small``, the next ``frames[1]`` ``large``: the header
    tells only of the first size (the shape of a decompression bomb). Each part is raw H.264, parameter sets in band.
    """
    path = Path(path)
    with av.open(str(path), "w", format="matroska") as out:
        stream, index = None, 0
        for (width, height), count in zip((small, large), frames, strict=True):
            part = path.with_suffix(f".{width}x{height}.h264")
            with av.open(str(part), "w", format="h264") as raw:
                video = raw.add_stream("libx264", rate=24)
                video.width, video.height, video.pix_fmt = width, height, "yuv420p"
                video.options = {"preset": "ultrafast"}
                for i in range(count):
                    raw.mux(video.encode(av.VideoFrame.from_ndarray(pattern_frame(i, width, height), format="rgb24")))
                raw.mux(video.encode(None))
            with av.open(str(part)) as src:
                if stream is None:
                    stream = out.add_stream_from_template(src.streams.video[0])
                for packet in src.demux(video=0):
                    if packet.size:
                        packet.stream, packet.time_base = stream, Fraction(1, 24)
                        packet.pts = packet.dts = index
                        packet.duration = 1
                        index += 1
                        out.mux(packet)
    return path


def make_audio(path: str | Path, seconds: float = 1.0, codec: str = "mp3", *, cover: bool = False) -> Path:
    """生成纯音频文件；cover 时带一张封面图（附图视频流，如音乐文件的专辑封面）"""
    path = Path(path)
    with av.open(str(path), "w") as out:
        sound = _add_audio(out, codec)
        if cover:
            art = out.add_stream("mjpeg")
            art.width, art.height, art.pix_fmt = 32, 32, "yuvj420p"
            art.disposition = av.stream.Disposition.attached_pic
            out.start_encoding()
            jpeg = io.BytesIO()
            Image.new("RGB", (32, 32), (200, 30, 30)).save(jpeg, format="JPEG")
            packet = av.Packet(jpeg.getvalue())
            packet.stream, packet.pts, packet.dts = art, 0, 0
            out.mux(packet)
        _write_sine(out, sound, seconds)
    return path


def first_sound(path: str | Path) -> float | None:
    """音轨第一次发声的时刻（秒）"""
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            loud = np.flatnonzero(np.abs(frame.to_ndarray()).max(0) > 0.05)
            if loud.size:
                return float(frame.time + loud[0] / frame.sample_rate)
    return None


def make_image(path: str | Path, width: int = 64, height: int = 48, fmt: str = "PNG") -> Path:
    """生成测试图片（渐变 + 方块 + 噪声）"""
    rng = np.random.default_rng(0)
    pixels = pattern_frame(3, width, height).astype(np.int16) + rng.integers(-8, 9, (height, width, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, format=fmt)
    return Path(path)


def _add_audio(out, codec: str, rate: int = 44100):
    stream = out.add_stream(codec, rate=rate)
    stream.layout = "stereo"
    return stream


def _write_sine(out, stream, seconds: float, silent_for: float = 0.0) -> None:
    rate, size = stream.codec_context.sample_rate, 1152
    total = int(seconds * rate)
    for start in range(0, total, size):
        t = np.arange(start, min(start + size, total)) / rate
        wave = np.where(t >= silent_for, 0.3 * np.sin(2 * np.pi * 440 * t), 0).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, start
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def display_p3_profile() -> bytes:
    """A minimal ICC v2 RGB profile with Display P3's primaries (D50-adapted) and a 2.2 gamma, as iPhones tag photos.

    Pillow can make an sRGB profile but no wide-gamut one, so it is written here: header, tag table, tags.
    """
    primaries = {"rXYZ": (0.5151, 0.2412, -0.0011), "gXYZ": (0.2920, 0.6922, 0.0419), "bXYZ": (0.1571, 0.0666, 0.7841)}
    return _icc_profile(b"RGB ", b"Display P3 (test)", primaries, {"rTRC": 2.2, "gTRC": 2.2, "bTRC": 2.2})


def gray_profile(gamma: float) -> bytes:
    """A minimal ICC v2 grey profile of the given gamma, as black-and-white exports are tagged (Gray Gamma 1.8)."""
    return _icc_profile(b"GRAY", f"Gray Gamma {gamma:g} (test)".encode(), {}, {"kTRC": gamma})


def cmyk_profile() -> bytes:
    """A minimal ICC v2 CMYK profile, as print-ready JPEGs are tagged: a 2-point lookup table from ink to Lab.

    Its corners come from a simple ink model (paper a little darker than white; cyan, magenta, yellow and black
    inks that each let through part of the light), far from the naive 255 - C - K that Pillow applies without it.
    """
    paper, inks = (0.90, 0.90, 0.86), [(0.05, 0.45, 0.85), (0.85, 0.05, 0.35), (0.95, 0.85, 0.05), (0.03, 0.03, 0.03)]
    table = b""
    for corner in itertools.product((0, 1), repeat=4):  # the first channel varies slowest
        rgb = np.array(paper)
        for ink, on in zip(inks, corner, strict=True):
            rgb = rgb * np.array(ink) if on else rgb
        x, y, z = np.array([[0.4361, 0.3851, 0.1431], [0.2225, 0.7169, 0.0606], [0.0139, 0.0971, 0.7141]]) @ rgb
        f = [v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in (x / 0.9642, y, z / 0.8249)]
        lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
        encoded = (lab[0] * 65280 / 100, (lab[1] + 128) * 256, (lab[2] + 128) * 256)  # lut16's legacy Lab
        table += struct.pack(">3H", *(min(65535, max(0, round(v))) for v in encoded))
    identity = b"".join(struct.pack(">i", 65536 if row == col else 0) for row in range(3) for col in range(3))
    ramps = struct.pack(">2H", 0, 65535)
    a2b0 = (
        b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + identity + struct.pack(">2H", 2, 2) + ramps * 4 + table + ramps * 3
    )
    return _icc_profile(b"CMYK", b"CMYK ink (test)", {}, {}, tags={b"A2B0": a2b0}, device=b"prtr", pcs=b"Lab ")


def _icc_profile(
    space: bytes,
    name: bytes,
    primaries: dict,
    curves: dict,
    *,
    tags: dict | None = None,
    device: bytes = b"mntr",
    pcs: bytes = b"XYZ ",
) -> bytes:
    """header, tag table, tags: an ICC v2 profile of this colour space (a display's, unless ``device`` says other)"""

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    def gamma(g: float) -> bytes:
        return b"curv" + bytes(4) + struct.pack(">IH", 1, round(g * 256)) + bytes(2)

    name += b"\0"
    entries = [
        (b"desc", b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(4 + 4 + 2 + 1 + 67)),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        *((tag.encode(), xyz(*value)) for tag, value in primaries.items()),
        *((tag.encode(), gamma(value)) for tag, value in curves.items()),
        *(tags or {}).items(),
        (b"cprt", b"text" + bytes(4) + b"none\0"),
    ]
    offset, table, data = 128 + 4 + 12 * len(entries), b"", b""
    for signature, body in entries:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (
        struct.pack(">I", offset + len(data))
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + device
        + space
        + pcs
        + bytes(12)
        + b"acspAPPL"
        + bytes(24)
        + s15(0.9642)
        + s15(1.0)
        + s15(0.8249)
        + b"lcms"
        + bytes(44)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(entries)) + table + data
