"""Media handlers called directly with a JobContext (no database): real files in, real files out."""

from __future__ import annotations

import io
import queue
import struct
import threading
import zlib
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gpu_jobs import media
from gpu_jobs.handlers import (
    JobContext,
    image_animate,
    image_upscale,
    media_probe,
    video_interpolate,
    video_upscale,
)
from gpu_jobs.media import display, ops
from gpu_jobs.media.probe import inspect_file
from lib.config import get_settings
from lib.errors import InvalidInput, TaskCanceled
from lib.media_types import sniff
from tests.media_factories import (
    _write_sine,
    cmyk_profile,
    display_p3_profile,
    first_sound,
    gray_profile,
    make_audio,
    make_growing_video,
    make_image,
    make_video,
    pattern_frame,
    square_x,
)


def make_ctx(workdir: Path, params, inputs: dict[str, Path], progress=None) -> JobContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return JobContext(
        task_id="task-1",
        params=params,
        inputs={key: Path(value) for key, value in inputs.items()},
        input_meta={},
        workdir=workdir,
        progress=progress or (lambda fraction, message=None: None),
    )


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def audio_codec(path: Path) -> str | None:
    with av.open(str(path)) as container:
        streams = container.streams.audio
        return streams[0].codec_context.codec.canonical_name if streams else None


def spool_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("spool-")]


@pytest.fixture
def limits(monkeypatch):
    """Override media limits through the environment, as in production."""

    def apply(**values):
        for name, value in values.items():
            monkeypatch.setenv(name.upper(), str(value))
        get_settings.cache_clear()

    yield apply
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("media") / "clip.mp4", 64, 48, frames=24, fps=24, audio=True)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("media") / "picture.png", 96, 64)


# ---------------------------------------------------------------- probe


def test_probe_video(clip):
    info = media.probe_file(clip)
    assert info["kind"] == "video" and info["mime"] == "video/mp4"
    assert (info["width"], info["height"], info["frame_count"]) == (64, 48, 24)
    assert info["fps"] == 24 and info["duration_s"] == pytest.approx(1.0, abs=1e-3)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["has_audio"]


@pytest.mark.parametrize(
    ("name", "codec", "mime"),
    [
        ("clip.mp4", "libx264", "video/mp4"),
        ("clip.mov", "libx264", "video/quicktime"),
        ("clip.mkv", "libx264", "video/x-matroska"),
        ("clip.webm", "libvpx-vp9", "video/webm"),
        ("clip.avi", "mjpeg", "video/x-msvideo"),
    ],
)
def test_probe_names_the_container_as_the_upload_does(tmp_path, name, codec, mime):
    """FFmpeg names MP4 and QuickTime, Matroska and WebM alike: the file's first bytes tell them apart."""
    path = make_video(tmp_path / name, frames=4, audio=False, video_codec=codec)
    assert media.probe_file(path)["mime"] == mime == sniff(path.read_bytes()[:64]).mime


def test_probe_counts_packets_when_the_container_has_no_frame_count(tmp_path):
    path = make_video(tmp_path / "clip.mkv", 64, 48, frames=10, fps=30, audio=True, audio_codec="mp3")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska keeps no count
    info = media.probe_file(path)
    assert info["frame_count"] == 10 and info["audio_codec"] == "mp3"
    assert info["duration_s"] == pytest.approx(10 / 30, abs=2e-3)


@pytest.mark.parametrize(("codec", "expected"), [("mp2", "mp2"), ("mp3", "mp3")])
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_probe_names_mpeg_audio_by_its_layer(tmp_path, suffix, codec, expected):
    """MP4 labels any MPEG-1 audio mp3: the probe names Layer II as what it is, as the video path tells it apart."""
    src = make_video(tmp_path / f"in{suffix}", frames=12, fps=24, audio_codec=codec)
    info = media.probe_file(src)
    assert info["audio_codec"] == expected and info["frame_count"] == 12


def test_an_avi_header_that_understates_its_length_is_not_believed(tmp_path):
    """AVI 的头部帧数与时长可以随意写：上限与价格按文件里真有的帧"""
    src = make_video(tmp_path / "long.avi", frames=96, fps=24, audio=False, video_codec="mpeg4")
    data = bytearray(src.read_bytes())
    struct.pack_into("<I", data, data.find(b"avih") + 8 + 16, 24)  # dwTotalFrames
    struct.pack_into("<I", data, data.find(b"strh") + 8 + 32, 24)  # dwLength
    forged = tmp_path / "forged.avi"
    forged.write_bytes(bytes(data))
    with av.open(str(forged)) as container:
        assert container.streams.video[0].frames == 24  # what the header claims
    info = media.probe_file(forged)
    assert info["frame_count"] == 96 and info["duration_s"] == pytest.approx(4.0, abs=1e-3)


def test_a_fragmented_mp4_is_probed_over_all_its_fragments(tmp_path):
    """moov 里只有第一个片段（movflags=frag_keyframe，录像机与直播录制常这样写）"""
    fragmented = tmp_path / "fragmented.mp4"
    with av.open(str(fragmented), "w", options={"movflags": "frag_keyframe"}) as out:
        stream = out.add_stream("libx264", rate=24, options={"preset": "ultrafast", "g": "24", "keyint_min": "24"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(96):  # a keyframe, so a fragment, each second
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pattern_frame(index, 64, 48), format="rgb24")))
        out.mux(stream.encode(None))
    with av.open(str(fragmented)) as container:
        assert container.streams.video[0].frames == 24  # the first fragment's
    info = media.probe_file(fragmented)
    assert info["frame_count"] == 96 and info["duration_s"] == pytest.approx(4.0, abs=0.05)


def test_decoding_stops_at_more_frames_than_the_probe_counted(tmp_path):
    """头部之外的后备：解码出的帧明显多于探测到的帧数时拒绝，而不是按少算的价钱处理下去"""
    src = make_video(tmp_path / "clip.mp4", frames=48, audio=False)
    with pytest.raises(InvalidInput, match="more frames than"):
        for _ in media.FrameReader(src, 8, max_frames=24):
            pass
    assert sum(len(batch) for batch in media.FrameReader(src, 8, max_frames=48)) == 48


def test_a_clip_cut_without_reencoding_is_probed_from_the_first_frame_it_shows(tmp_path):
    """`ffmpeg -ss … -c copy` keeps the frames before the cut back to the keyframe, hidden by an edit list."""
    shades = [np.full((48, 64, 3), 5 * i, np.uint8) for i in range(45)]
    src = make_video(tmp_path / "long.mp4", frames=45, fps=30, audio=False, frames_from=shades)  # one keyframe
    cut = tmp_path / "cut.mp4"
    with av.open(str(src)) as inp, av.open(str(cut), "w", format="mp4") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        step = round(1 / 30 / inp.streams.video[0].time_base)
        for packet in inp.demux(video=0):
            if packet.dts is not None:
                packet.pts, packet.dts, packet.stream = packet.pts - 4 * step, packet.dts - 4 * step, stream
                out.mux(packet)
    with av.open(str(cut)) as container:
        shown = [frame.to_ndarray(format="gray").mean() for frame in container.decode(video=0)]
    assert len(shown) == 41 and shown[0] == pytest.approx(20, abs=3)  # what players show: from frame 4
    info = media.probe_file(cut)  # was refused as corrupt: no keyframe after the cut
    assert info["duration_s"] == pytest.approx(41 / 30, abs=0.02) and info["frame_count"] == 41
    # Uploaded index first and cut short: the frames it promises are missing, counted or not.
    faststart = tmp_path / "faststart.mp4"
    with av.open(str(cut)) as inp, av.open(str(faststart), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(video=0):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = faststart.read_bytes()
    short = tmp_path / "short.mp4"
    short.write_bytes(data[: len(data) * 7 // 10])
    with pytest.raises(InvalidInput, match="truncated"):
        media.probe_file(short)
    [poster] = media_probe.run(make_ctx(tmp_path / "p", {"asset_id": "a"}, {"a": cut}))
    with Image.open(poster.path) as img:
        assert np.asarray(img.convert("L")).mean() == pytest.approx(20, abs=3)
    [out] = video_upscale.run(make_ctx(tmp_path / "u", {"video_asset_id": "v", "scale": 2}, {"v": cut}))
    assert len(frame_times(out.path)) == 41


@pytest.mark.parametrize("codec", ["libvpx", "libvpx-vp9"])
def test_a_webm_cut_between_keyframes_starts_at_its_first_keyframe(tmp_path, codec):
    """VP8/VP9 refuse the frames before the first keyframe of a clip cut without re-encoding: no damage, as players
    start at that keyframe too."""
    src = make_video(tmp_path / "long.webm", frames=48, fps=24, audio=False, video_codec=codec, keyframe_every=12)
    cut = _remux(src, tmp_path / "cut.webm", lambda packet, n: False if n <= 3 else None)
    with av.open(str(cut)) as container:
        assert not next(container.demux(video=0)).is_keyframe
    assert media.probe_file(cut)["kind"] == "video"
    [poster] = media_probe.run(make_ctx(tmp_path / "p", {"asset_id": "a"}, {"a": cut}))
    assert poster.kind == "image"
    [out] = video_upscale.run(make_ctx(tmp_path / "u", {"video_asset_id": "v", "scale": 2}, {"v": cut}))
    assert frame_times(out.path) == pytest.approx([i / 24 for i in range(36)], abs=1e-3)  # from the keyframe at 12


def test_pictures_pillow_cannot_read_are_refused_as_pictures_not_probed_as_videos(tmp_path):
    """FFmpeg 也读图片（APNG、GIF、按扩展名的 image2）：Pillow 读不了的图片不能变成“视频”，错误信息说图片的事"""
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    animated = tmp_path / "animated.png"
    frames[0].save(animated, save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = bytearray(animated.read_bytes())
    data[8 + 8 + 13] ^= 0xFF  # the IHDR chunk's CRC: Pillow refuses the file, FFmpeg's APNG demuxer does not
    bad_crc = tmp_path / "bad-crc.png"
    bad_crc.write_bytes(bytes(data))
    gif_header = tmp_path / "header-only.gif"
    gif_header.write_bytes(b"GIF89a\x10\x00\x10\x00\x00\x00\x00")
    lossless = tmp_path / "input-1.jpg"  # the worker names inputs by their extension: FFmpeg's image2 takes it
    with av.open(str(lossless), "w", format="image2pipe") as out:
        stream = out.add_stream("ljpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr24"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 100, np.uint8), format="bgr24")))
        out.mux(stream.encode(None))
    for path, message in (
        (bad_crc, "The image is truncated or corrupt (its PNG data could not be read)."),
        (gif_header, "The image is truncated or corrupt (its GIF data could not be read)."),
        (lossless, "The image is truncated or corrupt (its JPEG data could not be read)."),  # a lossless JPEG
    ):
        with pytest.raises(InvalidInput) as refused:
            media.probe_file(path)
        assert refused.value.message == message


def test_probe_image(tmp_path):
    info = media.probe_file(make_image(tmp_path / "a.jpg", 80, 60, "JPEG"))
    assert (info["kind"], info["format"], info["width"], info["height"]) == ("image", "jpeg", 80, 60)


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize(
    "kind",
    [
        "empty",
        "truncated_video",
        "truncated_png",
        "png_cut_in_its_header",
        "garbage",
        "audio_only",
        "audio_with_cover_art",
        "dpx_still",
    ],
)
def test_probe_refuses_unusable_files(tmp_path, clip, picture, kind):
    path = tmp_path / f"bad_{kind}"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated_video":
        _truncated(clip, path)
    elif kind == "truncated_png":
        _truncated(picture, path)
    elif kind == "png_cut_in_its_header":  # too short for Pillow to know it, FFmpeg still calls it a PNG
        path.write_bytes(picture.read_bytes()[:40])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "dpx_still":  # a still FFmpeg reads as a one-frame "video" and Pillow not at all
        path = tmp_path / "scan.dpx"
        with av.open(str(path), "w", format="image2") as out:
            stream = out.add_stream("dpx", rate=1)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pattern_frame(0, 64, 48), format="rgb24")))
            out.mux(stream.encode(None))
    else:
        path = make_audio(tmp_path / "tone.mp3", cover=kind == "audio_with_cover_art")
    with pytest.raises(InvalidInput) as err:
        media.probe_file(path)
    assert err.value.message  # a sentence for the user
    if kind.startswith("audio"):
        assert "audio only" in err.value.message
    if kind == "dpx_still":
        assert err.value.message.startswith("Unsupported image format DPX")
    if kind.startswith("truncated") or kind == "png_cut_in_its_header":
        assert "truncated" in err.value.message


def test_a_png_damaged_inside_its_pixel_data_is_refused_not_shown_black(tmp_path):
    """Bytes flipped halfway through a PNG's pixel data: Pillow cannot decode past them. The picture is refused,
    not probed, postered and upscaled with everything after the damage black."""
    whole = make_image(tmp_path / "whole.png", 256, 192)
    data = bytearray(whole.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(8)
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match="corrupt"):
        media.probe_file(damaged)
    with pytest.raises(InvalidInput, match="corrupt"):
        media.load_image(damaged)


def _index_first(src: Path, dst: Path) -> Path:
    """同样的 MP4，索引（moov）放在最前（网页下载、聊天软件里的视频）"""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    return dst


@pytest.mark.parametrize("kept", [0.5, 0.9])
def test_an_mp4_cut_short_behind_its_index_is_refused(tmp_path, kept):
    """索引在前的 MP4 截断后仍能打开：索引承诺的帧文件里没有了，要拒绝，而不是按 2 秒计费、交出 1 秒"""
    whole = _index_first(make_video(tmp_path / "a.mp4", frames=48), tmp_path / "whole.mp4")
    assert media.probe_file(whole)["duration_s"] == pytest.approx(2.0)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(InvalidInput, match="truncated"):
        media.probe_file(cut)


def test_sparse_variable_rate_video_with_b_frames_lasts_to_its_last_frame(tmp_path):
    """B 帧 + 稀疏的可变帧率：索引的解码时间比最后一帧的显示时间早结束，时长（计费、上限）要按显示算"""
    times = [0, 0.04, 0.08, 2.0, 2.04, 5.0, 5.04, 8.0, 8.04, 8.08, 9.6]
    path = tmp_path / "sparse.mp4"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.options = {"bf": "2", "preset": "ultrafast"}
        video.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, 64, 48), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    with av.open(str(path)) as container:  # the shape of the file: its index ends well before its last frame
        stream = container.streams.video[0]
        assert float(stream.duration * stream.time_base) < 9
    assert media.probe_file(path)["duration_s"] == pytest.approx(9.64, abs=0.01)


@pytest.mark.parametrize("handler", [video_upscale, video_interpolate])
def test_frames_larger_than_the_header_said_are_refused_undecoded(tmp_path, monkeypatch, handler):
    """A decompression bomb: a small first frame in the header, then frames over the pixel limit."""
    monkeypatch.setattr(get_settings(), "max_input_pixels", 100 * 100)
    src = make_growing_video(tmp_path / "bomb.mkv", (64, 48), (160, 120))
    assert media.probe_file(src)["width"] == 64  # the header passes
    params = {"video_asset_id": "v", "scale" if handler is video_upscale else "factor": 2}
    with pytest.raises(InvalidInput, match="could not be decoded"):
        handler.run(make_ctx(tmp_path / "w", params, {"v": src}))
    monkeypatch.setattr(get_settings(), "max_input_pixels", 200 * 200)  # within the limit, the same file is fine
    [out] = handler.run(make_ctx(tmp_path / "ok", params, {"v": src}))
    assert out.metadata["frames"] == 52 * (2 if handler is video_interpolate else 1)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims a huge size (a decompression bomb is refused before any pixel is decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 8000, 8000)  # 64 MP > 40 MP default
    with pytest.raises(InvalidInput, match="pixels"):
        media.probe_file(bomb)
    with pytest.raises(InvalidInput, match="pixels"):
        media.load_image(bomb)


def test_limits_from_settings(tmp_path, clip, picture, limits):
    limits(max_output_pixels=100 * 100)
    with pytest.raises(InvalidInput, match="output"):
        video_upscale.run(make_ctx(tmp_path, {"video_asset_id": "v", "scale": 2}, {"v": clip}))
    with pytest.raises(InvalidInput, match="output"):
        image_upscale.run(make_ctx(tmp_path, {"image_asset_id": "i", "scale": 4}, {"i": picture}))
    limits(max_output_pixels=33_177_600, max_input_pixels=1000)
    with pytest.raises(InvalidInput, match="pixels"):
        media.probe_file(clip)
    limits(max_input_pixels=40_000_000, max_video_seconds=0.5)
    with pytest.raises(InvalidInput, match="long"):
        media.probe_file(clip)
    limits(max_video_seconds=600, max_video_frames=10)
    with pytest.raises(InvalidInput, match="frames"):
        media.probe_file(clip)
    assert not list(tmp_path.glob("*.mp4"))  # refused before any work


# ---------------------------------------------------------------- resize


def natural_image(height: int = 192, width: int = 256) -> np.ndarray:
    """Smooth gradients, hard-edged shapes and sensor-like noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.stack([128 + 100 * np.sin(6 * xx + 3 * yy), 128 + 90 * np.cos(5 * yy - 2 * xx), 255 * xx * yy], -1)
    img[40:90, 60:140] = [200, 40, 60]
    img[((yy - 0.5) ** 2 + (xx - 0.7) ** 2) < 0.01] = [20, 220, 120]
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _ours(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    return media.to_uint8(media.resize(x, size))[0].numpy()


@pytest.mark.parametrize("factor", [2, 4])
def test_lanczos_is_at_least_as_good_as_pillow(factor):
    img = natural_image()
    h, w = img.shape[0] // factor, img.shape[1] // factor
    pil = Image.fromarray(img).resize((w, h), Image.LANCZOS).resize((w * factor, h * factor), Image.LANCZOS)
    ours = _ours(_ours(img, (h, w)), (h * factor, w * factor))
    assert media.psnr(ours, img) >= media.psnr(np.asarray(pil), img) - 0.05


def test_resize_matches_pillow_for_any_ratio():
    img = natural_image(60, 80)
    for size in [(30, 40), (45, 53), (120, 160), (97, 131)]:
        ref = np.asarray(Image.fromarray(img).resize(size[::-1], Image.LANCZOS))
        assert media.psnr(_ours(img, size), ref) > 40  # Pillow rounds between passes; we do not


@pytest.mark.parametrize("shape", [(2, 3, 37, 29), (1, 1, 301, 1999)])  # the tall one runs in several strips
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_upscale_by_multiply_adds_equals_the_transposed_conv(shape, factor, monkeypatch):
    """The multiply-adds (a CPU's way, in strips) give what the transposed conv (CUDA's way) gives, on either axis."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full fp32 convs on CUDA too
    x = torch.rand(shape, device=media.pick_device()) * 255
    for dim in (2, 3):
        size = x.shape[dim]
        plan = ops._plan(size, size * factor)
        taps = ops._upscale_taps(x, plan, dim)
        conv = ops._polyphase(x.contiguous(memory_format=torch.channels_last), plan, size * factor, dim)
        assert taps.shape == conv.shape and torch.allclose(taps, conv, atol=1e-3)


# ---------------------------------------------------------------- image.upscale


@pytest.mark.parametrize(("scale", "fmt", "mime"), [(2, "png", "image/png"), (4, "webp", "image/webp")])
def test_image_upscale(tmp_path, picture, scale, fmt, mime):
    params = SimpleNamespace(image_asset_id="i", scale=scale, sharpen=0.5, format=fmt)  # like a pydantic model
    [out] = image_upscale.run(make_ctx(tmp_path, params, {"i": picture}))
    assert (out.kind, out.mime, out.width, out.height) == ("image", mime, 96 * scale, 64 * scale)
    with Image.open(out.path) as img:
        assert img.size == (96 * scale, 64 * scale)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_image_upscale_keeps_the_colour_profile(tmp_path, fmt):
    """A Display P3 or Adobe RGB photo looks washed out without its profile; a CMYK one no longer applies."""
    from PIL import ImageCms

    rgb_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo = tmp_path / "photo.jpg"
    Image.fromarray(natural_image(48, 64)).save(photo, quality=95, icc_profile=rgb_profile)
    ctx = make_ctx(tmp_path / "w", {"image_asset_id": "i", "scale": 2, "format": fmt}, {"i": photo})
    [out] = image_upscale.run(ctx)
    with Image.open(out.path) as img:
        assert img.info.get("icc_profile") == rgb_profile

    cmyk = tmp_path / "print.jpg"
    Image.new("CMYK", (32, 24), (0, 50, 100, 0)).save(cmyk, icc_profile=rgb_profile[:16] + b"CMYK" + rgb_profile[20:])
    [out] = image_upscale.run(make_ctx(tmp_path / "c", {"image_asset_id": "i", "scale": 2, "format": fmt}, {"i": cmyk}))
    with Image.open(out.path) as img:
        assert not img.info.get("icc_profile")


@pytest.mark.parametrize(("scale", "sharpen"), [(2, 0.0), (2, 0.8), (4, 1.0)])
def test_tiled_upscale_equals_whole_image(picture, scale, sharpen):
    image = media.load_image(picture)
    device = media.job_device(SimpleNamespace(device="cpu"))
    whole = image_upscale.upscale_image(image, scale, sharpen, device, tile=4096)
    tiled = image_upscale.upscale_image(image, scale, sharpen, device, tile=23)
    assert (whole.int() - tiled.int()).abs().max() <= 1


@pytest.fixture
def logo(tmp_path) -> Path:
    """透明底上的红色圆（透明像素里存的是绿色：缩放时不该渗进边缘，铺底时不该露出来）"""
    yy, xx = np.mgrid[0:64, 0:64]
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[(yy - 32) ** 2 + (xx - 32) ** 2 < 20**2] = (230, 20, 20, 255)
    Image.fromarray(rgba).save(tmp_path / "logo.png")
    return tmp_path / "logo.png"


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_image_upscale_keeps_transparency_without_a_dark_fringe(tmp_path, logo, fmt):
    [out] = image_upscale.run(make_ctx(tmp_path / "w", {"image_asset_id": "i", "scale": 4, "format": fmt}, {"i": logo}))
    with Image.open(out.path) as img:
        assert img.mode == "RGBA" and img.size == (256, 256) and out.metadata["alpha"]
        pixels = np.asarray(img).astype(int)
    assert pixels[0, 0, 3] == 0 and pixels[128, 128, 3] == 255
    edge = (pixels[..., 3] > 24) & (pixels[..., 3] < 232)  # the anti-aliased rim of the circle
    assert edge.sum() > 100
    rim = pixels[edge][:, :3]  # resized as is, the rim would blend towards the transparent pixels' green
    if fmt == "png":
        assert np.abs(rim - (230, 20, 20)).max() <= 2
    else:  # lossy WebP
        assert rim[:, 0].min() >= 150


@pytest.mark.parametrize(("scale", "sharpen"), [(2, 0.0), (4, 0.0), (2, 1.0), (4, 0.5)])
def test_a_flat_coloured_logo_keeps_its_colour_to_the_rim(tmp_path, logo, scale, sharpen):
    """单色图标放大（及锐化）后边缘仍是原色：振铃让 alpha 超过 255 时不发亮，锐化时不把透明像素当暗邻居而镶黑边"""
    params = {"image_asset_id": "i", "scale": scale, "sharpen": sharpen}
    [out] = image_upscale.run(make_ctx(tmp_path / "w", params, {"i": logo}))
    with Image.open(out.path) as img:
        pixels = np.asarray(img).astype(int)
    visible = pixels[..., 3] >= 16
    assert np.abs(pixels[visible][:, :3] - (230, 20, 20)).max() <= 2


def test_image_upscale_puts_transparency_on_white_for_jpeg(tmp_path, logo):
    [out] = image_upscale.run(
        make_ctx(tmp_path / "w", {"image_asset_id": "i", "scale": 2, "format": "jpeg"}, {"i": logo})
    )
    with Image.open(out.path) as img:
        assert img.mode == "RGB" and not out.metadata["alpha"]
        corner, centre = np.asarray(img)[2, 2].astype(int), np.asarray(img)[64, 64].astype(int)
    assert corner.min() >= 250 and np.abs(centre - (230, 20, 20)).max() <= 12


def test_tiled_upscale_with_alpha_equals_whole_image(logo):
    image = media.load_image(logo, keep_alpha=True)
    device = media.job_device(SimpleNamespace(device="cpu"))
    whole = image_upscale.upscale_image(image, 2, 0.5, device, tile=4096)
    assert (
        image.shape[0] == 4
        and (whole.int() - image_upscale.upscale_image(image, 2, 0.5, device, tile=23).int()).abs().max() <= 1
    )


def test_poster_of_a_transparent_image_is_on_white(tmp_path, logo):
    [poster] = media_probe.run(make_ctx(tmp_path, {"asset_id": "a"}, {"a": logo}))
    with Image.open(poster.path) as img:
        assert np.asarray(img.convert("RGB"))[2, 2].min() >= 245


@pytest.mark.parametrize(
    ("name", "gradient"),
    [
        ("sixteen.png", lambda g: g.astype(np.uint16)),  # opens as "I;16"
        ("wide.tif", lambda g: g.astype(np.int32)),  # opens as "I"
        ("float.tif", lambda g: (g / 65535).astype(np.float32)),  # opens as "F", 0..1
    ],
)
def test_deep_grey_images_keep_their_tones(tmp_path, name, gradient):
    """Pillow's convert clips 16-bit and float greys to white or black; they are scaled to 8 bits instead."""
    path = tmp_path / name
    Image.fromarray(gradient(np.linspace(0, 65535, 48 * 64).reshape(48, 64))).save(path)
    [out] = image_upscale.run(make_ctx(tmp_path / "u", {"image_asset_id": "i", "scale": 2}, {"i": path}))
    [poster] = media_probe.run(make_ctx(tmp_path / "p", {"asset_id": "a"}, {"a": path}))
    for result in (out, poster):
        with Image.open(result.path) as img:
            pixels = np.asarray(img.convert("L"), dtype=np.float64)
        assert pixels.mean() == pytest.approx(127.5, abs=2) and pixels.min() < 10 and pixels.max() > 245


def test_image_upscale_refuses_a_result_too_wide_for_webp_before_the_work(tmp_path, monkeypatch):
    banner = make_image(tmp_path / "banner.png", 8200, 100)
    monkeypatch.setattr(image_upscale, "upscale_image", lambda *a, **k: pytest.fail("upscaled before refusing"))
    with pytest.raises(InvalidInput, match="WEBP holds at most 16,383"):
        image_upscale.run(make_ctx(tmp_path, {"image_asset_id": "i", "scale": 2, "format": "webp"}, {"i": banner}))


def test_video_upscale_refuses_a_result_wider_than_h264_takes_before_the_work(tmp_path):
    strip = make_video(tmp_path / "strip.mp4", 4200, 16, frames=2, audio=False)  # 4x → 16,800 px wide
    with pytest.raises(InvalidInput, match="16,384 pixels a side"):
        video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 4}, {"v": strip}))
    assert not list((tmp_path / "w").glob("*.mp4"))


def test_image_animate_shows_transparency_as_black(tmp_path, logo):
    params = {"image_asset_id": "i", "motion": "zoom_in", "duration": 2, "fps": 24, "resolution": 128}
    [out] = image_animate.run(make_ctx(tmp_path, params, {"i": logo}))
    corner = decode(out.path)[0][2, 2].astype(int)
    assert corner.max() <= 20  # black, not the green the transparent pixels hold


P3_RED = (200, 60, 30)  # stored in a Display P3 photo: shown as about (218, 37, 0) in sRGB


@pytest.fixture
def p3_photo(tmp_path) -> Path:
    path = tmp_path / "iphone.jpg"
    Image.new("RGB", (160, 120), P3_RED).save(path, quality=95, icc_profile=display_p3_profile())
    return path


def test_a_wide_gamut_photo_keeps_its_colours_in_a_clip_and_a_poster(tmp_path, p3_photo):
    """视频与海报不带色彩描述：Display P3 的照片要换算到 sRGB，否则颜色发灰（升分辨率保留描述，不换算）"""
    params = {"image_asset_id": "i", "motion": "zoom_in", "duration": 2, "fps": 24, "resolution": 128}
    [out] = image_animate.run(make_ctx(tmp_path / "a", params, {"i": p3_photo}))
    shown = first_frame_rgb(out.path, src_colorspace="ITU709")[64, 64].astype(int)
    assert shown[0] >= 212 and shown[1] <= 45 and shown[2] <= 12, shown
    _, poster = media.probe_with_poster(p3_photo)
    r, g, b = poster.getpixel((80, 60))
    assert r >= 212 and g <= 45 and b <= 12, (r, g, b)
    [upscaled] = image_upscale.run(make_ctx(tmp_path / "u", {"image_asset_id": "i", "scale": 2}, {"i": p3_photo}))
    with Image.open(upscaled.path) as img:  # the numbers as stored, with the profile that gives them meaning
        assert img.info["icc_profile"] == display_p3_profile()
        assert np.abs(np.asarray(img.convert("RGB"))[120, 160].astype(int) - P3_RED).max() <= 4


@pytest.mark.parametrize(
    ("mode", "stored", "profile"),
    [
        ("L", 128, gray_profile(1.8)),
        ("CMYK", (255, 0, 0, 0), cmyk_profile()),
        ("CMYK", (30, 90, 0, 60), cmyk_profile()),
    ],
    ids=["grey", "cmyk-cyan", "cmyk-mix"],
)
def test_a_grey_or_cmyk_photo_is_shown_as_its_profile_says(tmp_path, mode, stored, profile):
    """灰度描述（Gray Gamma 1.8）的黑白照片、CMYK 描述的印刷稿：RGB 输出带不了这种描述，所以三种输出都换算到 sRGB"""
    from PIL import ImageCms

    path = tmp_path / "print.jpg"
    Image.new(mode, (160, 120), stored).save(path, quality=95, icc_profile=profile)
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    shown = ImageCms.profileToProfile(Image.new(mode, (1, 1), stored), source, srgb, outputMode="RGB").getpixel((0, 0))
    naive = Image.new(mode, (1, 1), stored).convert("RGB").getpixel((0, 0))
    assert max(abs(a - b) for a, b in zip(shown, naive, strict=True)) >= 12  # the profile matters
    _, poster = media.probe_with_poster(path)
    params = {"image_asset_id": "i", "motion": "zoom_in", "duration": 2, "fps": 24, "resolution": 128}
    [clip] = image_animate.run(make_ctx(tmp_path / "a", params, {"i": path}))
    [upscaled] = image_upscale.run(make_ctx(tmp_path / "u", {"image_asset_id": "i", "scale": 2}, {"i": path}))
    with Image.open(upscaled.path) as img:
        assert img.info.get("icc_profile") is None
        big = img.convert("RGB").getpixel((160, 120))
    framed = tuple(int(v) for v in first_frame_rgb(clip.path, src_colorspace="ITU709")[64, 64])
    for got, slack in ((poster.getpixel((80, 60)), 3), (big, 3), (framed, 5)):
        assert all(abs(a - b) <= slack for a, b in zip(got, shown, strict=True)), (got, shown)


def png_16_bit(path: Path, colour_type: int, pixels: np.ndarray, transparent: tuple[int, ...]) -> Path:
    """16 位 PNG（0 灰度、2 RGB），tRNS 指定一个透明的取值（Pillow 写不了这种文件）"""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]  # (H, W, channels)
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    trns = struct.pack(f">{len(transparent)}H", *transparent)
    body = chunk(b"IHDR", header) + chunk(b"tRNS", trns) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.mark.parametrize("colour_type", [0, 2])
def test_a_16_bit_png_keeps_its_transparent_colour(tmp_path, colour_type):
    """16 位 PNG 的 tRNS：透明的那个取值在 8 位的图里也要透明（海报铺白，升分辨率保留透明）"""
    key, solid = (0x1234, 0xFF03, 0x0104), (0xC000, 0x2000, 0x2000)
    channels = 1 if colour_type == 0 else 3
    pixels = np.zeros((48, 64, channels), np.uint16)
    pixels[:, :32], pixels[:, 32:] = key[:channels], solid[:channels]
    path = png_16_bit(tmp_path / "sixteen.png", colour_type, pixels, key[:channels])
    _, poster = media.probe_with_poster(path)
    assert poster.getpixel((8, 24)) == (255, 255, 255)  # transparent: on white
    [out] = image_upscale.run(make_ctx(tmp_path / "u", {"image_asset_id": "i", "scale": 2}, {"i": path}))
    with Image.open(out.path) as img:
        assert img.mode in ("RGBA", "LA") and img.getpixel((16, 48))[-1] == 0 and img.getpixel((112, 48))[-1] == 255


def test_image_upscale_refuses_a_video(tmp_path, clip):
    with pytest.raises(InvalidInput, match="image"):
        image_upscale.run(make_ctx(tmp_path, {"image_asset_id": "i", "scale": 2}, {"i": clip}))


# ---------------------------------------------------------------- video.upscale


def test_video_upscale(tmp_path, clip):
    calls = []
    ctx = make_ctx(tmp_path, {"video_asset_id": "v", "scale": 2}, {"v": clip}, lambda f, m=None: calls.append(f))
    [out] = video_upscale.run(ctx)
    info = media.probe_file(out.path)
    assert (info["width"], info["height"], info["frame_count"], info["fps"]) == (128, 96, 24, 24)
    assert info["duration_s"] == pytest.approx(1.0, abs=1e-3) and out.duration_s == pytest.approx(1.0)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    with av.open(str(out.path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    assert calls == sorted(calls) and calls[-1] == 1.0
    # the picture survives the round trip: frame 5 against its exact 2x Lanczos
    ref = _ours(pattern_frame(5, 64, 48), (96, 128))
    assert media.psnr(decode(out.path)[5], ref) > 30
    assert not spool_threads()


def top_level_boxes(path: Path) -> list[str]:
    """MP4 顶层 box 的顺序"""
    boxes, data, at = [], path.read_bytes(), 0
    while at + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        size = struct.unpack(">Q", data[at + 8 : at + 16])[0] if size == 1 else size or len(data) - at
        boxes.append(kind.decode("latin-1"))
        at += size
    return boxes


@pytest.mark.parametrize(
    ("handler", "params", "source"),
    [
        (video_upscale, {"video_asset_id": "s", "scale": 2}, "clip"),
        (video_interpolate, {"video_asset_id": "s", "factor": 2, "mode": "blend"}, "clip"),
        (image_animate, {"image_asset_id": "s", "duration": 2, "resolution": 128}, "picture"),
    ],
)
def test_clips_start_playing_before_they_finish_downloading(tmp_path, request, handler, params, source):
    """The index (moov) comes before the frames (mdat): a browser plays the clip as it streams in."""
    [out] = handler.run(make_ctx(tmp_path, params, {"s": request.getfixturevalue(source)}))
    boxes = top_level_boxes(out.path)
    assert boxes.index("moov") < boxes.index("mdat")
    assert media.probe_file(out.path)["frame_count"] == len(decode(out.path))


def test_odd_sized_video_is_upscaled_and_interpolated(tmp_path):
    """H.264 cannot code 65x49 (FFV1 can): the chroma planes are 33x25, and outputs are cut to even sizes."""
    src = make_video(tmp_path / "odd.mkv", 65, 49, frames=6, fps=24, audio=False, video_codec="ffv1")
    [up] = video_upscale.run(make_ctx(tmp_path / "u", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert (up.width, up.height, media.probe_file(up.path)["frame_count"]) == (130, 98, 6)
    pillow = np.asarray(Image.fromarray(decode(src)[3]).resize((130, 98), Image.LANCZOS))
    assert media.psnr(decode(up.path)[3], pillow) > 30
    params = {"video_asset_id": "v", "factor": 2, "mode": "motion"}
    [smooth] = video_interpolate.run(make_ctx(tmp_path / "i", params, {"v": src}))
    assert (smooth.width, smooth.height, media.probe_file(smooth.path)["frame_count"]) == (64, 48, 12)


@pytest.mark.parametrize(("width", "height"), [(4096, 2), (4, 4096)])
def test_a_sliver_of_a_video_is_interpolated(tmp_path, width, height):
    """Motion is estimated on a shrunk copy of a wide frame; a sliver's short side must not shrink to nothing."""
    src = make_video(tmp_path / "sliver.mkv", width, height, frames=3, audio=False, video_codec="ffv1")
    [out] = video_interpolate.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "factor": 2}, {"v": src}))
    assert (out.width, out.height, out.metadata["frames"]) == (width, height, 6)


def test_video_upscale_is_at_least_as_good_as_pillow(tmp_path):
    """Against the truth (a sharp clip, shrunk 2x, coded losslessly), ours beats Pillow on the decoded RGB."""
    truth = [pattern_frame(i, 128, 96) for i in range(4)]
    src = tmp_path / "small.mp4"
    with av.open(str(src), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        stream.codec_context.colorspace, stream.codec_context.color_range = 1, 1
        for t in truth:
            small = av.VideoFrame.from_ndarray(np.asarray(Image.fromarray(t).resize((64, 48), Image.LANCZOS)))
            out.mux(stream.encode(small.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")))
        out.mux(stream.encode(None))
    pillow = [np.asarray(Image.fromarray(f).resize((128, 96), Image.LANCZOS)) for f in decode(src)]
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    ours = decode(out.path)  # after H.264 at crf 18, which Pillow's frames are spared: 32.8 against 31.8 dB here
    assert np.mean([media.psnr(o, t) for o, t in zip(ours, truth, strict=True)]) >= np.mean(
        [media.psnr(p, t) for p, t in zip(pillow, truth, strict=True)]
    )


def test_video_upscale_matches_ffmpegs_lanczos(tmp_path, clip):
    """The industry's reference for the same job: FFmpeg's scale filter (lanczos), through PyAV's filter graph."""
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        graph = av.filter.Graph()
        graph.link_nodes(
            graph.add_buffer(template=stream), graph.add("scale", "256:192:flags=lanczos"), graph.add("buffersink")
        )
        graph.configure()
        theirs = []
        for frame in container.decode(stream):
            graph.vpush(frame)
            theirs.append(graph.vpull().to_ndarray(format="rgb24"))
    [out] = video_upscale.run(make_ctx(tmp_path, {"video_asset_id": "v", "scale": 4}, {"v": clip}))
    assert np.mean([media.psnr(o, t) for o, t in zip(decode(out.path), theirs, strict=True)]) > 35


def test_yuv420_on_the_device_matches_swscale():
    """The GPU's RGB → yuv420p (BT.709, limited range) lands within one code value of FFmpeg's own.

    (On smooth pictures: at hard edges FFmpeg's chroma filter and our 2x2 average differ more.)"""
    yy, xx = np.mgrid[0:96, 0:128]
    img = np.stack([128 + 100 * np.sin(xx / 7), 128 + 90 * np.cos(yy / 5), 128 + 60 * np.sin((xx + yy) / 9)], -1)
    img = img.clip(0, 255).astype(np.uint8)
    ref = av.VideoFrame.from_ndarray(img, format="rgb24")
    ref = ref.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG").to_ndarray()
    x = torch.from_numpy(img)[None].permute(0, 3, 1, 2).float()
    ours = media.to_yuv420(torch.cat([x, x.flip(-1)]))
    assert ours.shape == (2, 144, 128) and ours.dtype == torch.uint8
    diff = np.abs(ours[0].numpy().astype(int) - ref)
    assert diff[:96].max() <= 1 and diff[96:].max() <= 1  # luma, then the U and V planes
    assert torch.equal(ours[1, :96], ours[0, :96].flip(-1))
    overshoot = x.clone()  # Lanczos rings past 0 and 255: clamped as RGB first, as to_uint8 does
    overshoot[0, :, :4, :4] = torch.tensor([-20.0, 300.0, 128.0]).view(3, 1, 1)
    clamped = overshoot.clamp(0, 255)
    assert torch.equal(media.to_yuv420(overshoot), media.to_yuv420(clamped))


@pytest.mark.parametrize(
    ("handler", "params"),
    [
        (video_interpolate, {"video_asset_id": "v", "factor": 2, "mode": "motion"}),
        (image_animate, {"image_asset_id": "v", "motion": "zoom_in", "duration": 2, "fps": 24, "resolution": 128}),
    ],
)
def test_rgb_handlers_with_yuv_made_on_the_device(tmp_path, clip, picture, monkeypatch, handler, params):
    """The CUDA path of the RGB handlers (frames turned to yuv420p before the copy back), run on this CPU."""
    src = picture if handler is image_animate else clip
    [rgb_out] = handler.run(make_ctx(tmp_path / "rgb", params, {"v": src}))
    monkeypatch.setattr(media.video, "YUV_ON_DEVICE", {"cpu", "cuda"})
    [yuv_out] = handler.run(make_ctx(tmp_path / "yuv", params, {"v": src}))
    ours, theirs = media.probe_file(yuv_out.path), media.probe_file(rgb_out.path)
    facts = ("width", "height", "frame_count", "fps", "has_audio")
    assert [ours[k] for k in facts] == [theirs[k] for k in facts]
    # The same pictures, up to how hard colour edges are averaged into 4:2:0 (2x2 mean here, swscale's filter there)
    assert min(media.psnr(a, b) for a, b in zip(decode(yuv_out.path), decode(rgb_out.path), strict=True)) > 35


@pytest.mark.parametrize(("suffix", "codec", "expected"), [(".mkv", "mp3", "mp3"), (".mov", "pcm_s16le", "aac")])
def test_video_upscale_keeps_other_audio(tmp_path, suffix, codec, expected):
    """mp3 is copied into the MP4; PCM cannot go into MP4 and is transcoded to AAC."""
    src = make_video(tmp_path / f"in{suffix}", 64, 48, frames=12, fps=24, audio_codec=codec)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    info = media.probe_file(out.path)
    assert info["frame_count"] == 12 and info["has_audio"] and audio_codec(out.path) == expected


@pytest.mark.parametrize(
    ("name", "codec", "rate"),
    [
        ("late.mov", "pcm_s16le", 44100),
        ("late.mkv", "pcm_s16le", 44100),  # Matroska leaves PCM's channel order unspecified ("2 channels")
        ("studio.mov", "pcm_s24le", 192000),  # a rate AAC does not take: resampled to 48 kHz
        ("late.mkv", "mp2", 44100),  # copied if MP4 took it; it does not
    ],
)
def test_transcoded_audio_stays_in_sync(tmp_path, name, codec, rate):
    """Audio that cannot be copied into MP4 is encoded to AAC, timed from the video's start as it was."""
    src = make_video(tmp_path / name, frames=12, fps=24, audio_codec=codec, audio_rate=rate, audio_start=0.3)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert audio_codec(out.path) == "aac"
    assert first_sound(out.path) == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize(
    ("suffix", "codec", "frames", "fps", "rate"),
    [
        (".mp4", "aac", 24, 24, 44100),  # copied
        (".mkv", "mp3", 17, 24, 44100),
        (".mkv", "flac", 20, 24, 44100),
        (".mp4", "aac", 50, 60, 8000),  # a packet (128 ms) longer than a frame
        (".mkv", "pcm_s16le", 17, 24, 44100),  # re-encoded
        (".mov", "mp2", 24, 24, 44100),
    ],
)
def test_sound_that_runs_on_past_the_last_frame_is_cut_there(tmp_path, suffix, codec, frames, fps, rate):
    """A video whose sound goes on for 3 s lasts as long as its picture, to the ms: the file, each of its tracks and
    the sound, which runs up to the end (copied or re-encoded; the last packet under the picture straddles its end)."""
    src = make_video(
        tmp_path / f"long{suffix}", frames=frames, fps=fps, audio_codec=codec, audio_rate=rate, audio_seconds=3.0
    )
    end = media.probe_file(src)["duration_s"]
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert out.duration_s == pytest.approx(end, abs=1e-3)
    with av.open(str(out.path)) as container:
        assert container.duration / av.time_base == pytest.approx(end, abs=1e-3)
        for stream in container.streams:
            assert float((stream.start_time + stream.duration) * stream.time_base) == pytest.approx(end, abs=1e-3)
    # No sound under the picture is lost (FFmpeg's MP3 parser gives each packet a whole frame's length, not the file's).
    assert audio_seconds(out.path) >= end - 1e-3


@pytest.mark.parametrize(("suffix", "codec"), [(".mkv", "aac"), (".mp4", "mp3"), (".mkv", "pcm_s16le")])
def test_sound_that_starts_after_the_first_frame_keeps_its_time(tmp_path, suffix, codec):
    """A track stamped to begin 0.4 s into the picture (not silence: no sound before it) begins there in the output,
    copied or re-encoded, and the output lasts as long as the picture."""
    src = make_video(tmp_path / f"clip{suffix}", frames=24, fps=24, audio_codec=codec, audio_seconds=0.6)

    def later(packet, n):
        if packet.stream.type == "audio":
            packet.pts, packet.dts = (t + round(0.4 / packet.time_base) for t in (packet.pts, packet.dts))

    late = _remux(src, tmp_path / f"late{suffix}", later)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": late}))
    assert first_sound(out.path) == pytest.approx(first_sound(late), abs=0.01)
    assert first_sound(late) == pytest.approx(0.4, abs=0.01)
    assert out.duration_s == pytest.approx(media.probe_file(late)["duration_s"], abs=1e-3)


@pytest.mark.parametrize("handler", [video_upscale, video_interpolate])
def test_an_output_says_it_has_sound_only_when_it_has(tmp_path, handler):
    """An MKV whose audio track holds no packet (a recording stopped before any sound): no audio comes out, and
    the output's facts say so."""
    src = make_video(tmp_path / "picture.mkv", frames=12, fps=24, audio=False)
    silent = tmp_path / "silent.mkv"
    with av.open(str(src)) as inp, av.open(str(silent), "w") as out:
        video = out.add_stream_from_template(inp.streams.video[0])
        sound = out.add_stream("aac", rate=44100)
        sound.layout = "stereo"
        for packet in inp.demux(video=0):
            if packet.dts is not None:
                packet.stream = video
                out.mux(packet)
    assert media.probe_file(silent)["has_audio"]
    params = {"video_asset_id": "v", "scale": 2} if handler is video_upscale else {"video_asset_id": "v", "factor": 2}
    [out] = handler.run(make_ctx(tmp_path / "w", params, {"v": silent}))
    assert audio_codec(out.path) is None and out.metadata["audio"] is False
    [kept] = handler.run(make_ctx(tmp_path / "k", params, {"v": make_video(tmp_path / "sound.mkv", frames=12)}))
    assert audio_codec(kept.path) == "aac" and kept.metadata["audio"] is True


@pytest.mark.parametrize(("suffix", "codec"), [(".mkv", "aac"), (".mp4", "aac"), (".mkv", "pcm_s16le")])
def test_sound_that_ends_before_the_first_frame_is_left_out(tmp_path, suffix, codec):
    """A picture from 2 s to 3 s over sound from 0 to 1 s: no sound falls under the picture, so the output has no
    audio track, and it lasts exactly as long as the picture (copied or re-encoded)."""
    times = [2 + i / 24 for i in range(24)]
    src = make_video(tmp_path / f"late{suffix}", frames=24, times=times, audio_codec=codec, audio_seconds=1.0)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert audio_codec(out.path) is None and out.metadata["audio"] is False
    assert out.duration_s == pytest.approx(media.probe_file(src)["duration_s"], abs=1e-3)  # 1 s, to the ms


@pytest.mark.parametrize(("suffix", "codec"), [(".mkv", "aac"), (".mp4", "aac"), (".mkv", "pcm_s16le")])
def test_sound_under_the_picture_keeps_its_lead_in(tmp_path, suffix, codec):
    """AAC's priming (a packet that ends where the sound begins) stays in front of the sound it belongs to."""
    src = make_video(tmp_path / f"clip{suffix}", frames=24, fps=24, audio_codec=codec)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    with av.open(str(out.path)) as container:
        first = next(p for p in container.demux(audio=0) if p.size)
    assert first.pts < 0 and first.pts + first.duration == pytest.approx(0, abs=10)
    assert first_sound(out.path) == pytest.approx(0.0, abs=0.01)


def test_damaged_audio_packets_are_skipped(tmp_path):
    """As the ffmpeg command does: the picture and the rest of the sound come through."""
    src = make_video(tmp_path / "ok.mkv", frames=24, fps=24, audio_codec="mp2")
    damaged, rng = tmp_path / "damaged.mkv", np.random.default_rng(0)
    with av.open(str(src)) as inp, av.open(str(damaged), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        audio_packets = 0
        for packet in inp.demux():
            if packet.dts is None:
                continue
            stream = streams[packet.stream_index]
            if packet.stream.type == "audio" and (audio_packets := audio_packets + 1) in (5, 6, 7):
                noise = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                noise.pts, noise.dts, noise.time_base = packet.pts, packet.dts, packet.time_base
                packet = noise
            packet.stream = stream
            out.mux(packet)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": damaged}))
    info = media.probe_file(out.path)
    assert info["frame_count"] == 24 and audio_codec(out.path) == "aac"
    assert audio_seconds(out.path) == pytest.approx(1.0, abs=0.05)


def _remux(src: Path, dst: Path, change) -> Path:
    """逐包复制一个文件；change(packet, n) 可改写或替换第 n 个同类包（返回新包），返回 False 则丢掉它"""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        counts = {"audio": 0, "video": 0}
        for packet in inp.demux():
            if packet.dts is None:
                continue
            counts[packet.stream.type] += 1
            changed = change(packet, counts[packet.stream.type])
            if changed is False:
                continue
            packet = changed or packet
            packet.stream = streams[packet.stream_index]
            out.mux(packet)
    return dst


@pytest.mark.parametrize(("suffix", "codec"), [(".mkv", "aac"), (".mkv", "pcm_s16le"), (".webm", "libopus")])
@pytest.mark.parametrize("handler", [video_upscale, video_interpolate])
def test_audio_packets_with_a_repeated_time_are_kept_in_order(tmp_path, suffix, codec, handler):
    """Browser recordings (MediaRecorder WebM) may repeat an audio packet's time; muxers refuse that as it is."""
    video_codec = "libvpx-vp9" if suffix == ".webm" else "libx264"
    rate = 48000 if codec == "libopus" else 44100
    src = make_video(
        tmp_path / f"ok{suffix}", frames=24, fps=24, audio_codec=codec, video_codec=video_codec, audio_rate=rate
    )
    times = {}

    def repeat_a_time(packet, n):
        if packet.stream.type == "audio":
            times[n] = packet.dts
            if n == 5:
                packet.pts = packet.dts = times[4]

    repeated = _remux(src, tmp_path / f"repeated{suffix}", repeat_a_time)
    params = {"video_asset_id": "v", "scale": 2} if handler is video_upscale else {"video_asset_id": "v", "factor": 2}
    [out] = handler.run(make_ctx(tmp_path / "w", params, {"v": repeated}))
    assert audio_seconds(out.path) == pytest.approx(1.0, abs=0.08)


@pytest.mark.parametrize("codec", ["ac3", "alac"])
def test_audio_browsers_cannot_play_in_mp4_is_re_encoded(tmp_path, codec):
    """电影压制常见的 AC-3、苹果无损 ALAC：Chrome/Firefox 放不出来，转成 AAC"""
    src = make_video(tmp_path / "film.mkv", frames=24, fps=24, audio_codec=codec, audio_rate=48000)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert audio_codec(out.path) == "aac"
    assert audio_seconds(out.path) == pytest.approx(1.0, abs=0.08)


@pytest.mark.parametrize(("codec", "expected"), [("mp2", "aac"), ("mp3", "mp3")])
def test_mpeg_audio_in_mp4_is_copied_only_when_it_is_layer_iii(tmp_path, codec, expected):
    """MP4 labels any MPEG-1 audio mp3: Layer II (which browsers do not play) is told apart by its frame header."""
    src = make_video(tmp_path / "in.mp4", frames=24, fps=24, audio_codec=codec)
    assert audio_codec(src) == "mp3"
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert audio_codec(out.path) == expected
    assert audio_seconds(out.path) == pytest.approx(1.0, abs=0.08)


def _two_audio_tracks(path: Path, default: int | None) -> Path:
    """A 1 s video with two audio tracks: the first silent, the second a tone; ``default`` marks one as default."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        tracks = [out.add_stream("aac", rate=44100), out.add_stream("aac", rate=44100)]
        for i, track in enumerate(tracks):
            track.layout = "stereo"
            track.disposition = av.stream.Disposition.default if i == default else av.stream.Disposition(0)
        for i in range(24):
            out.mux(video.encode(av.VideoFrame.from_ndarray(pattern_frame(i, 64, 48), format="rgb24")))
        out.mux(video.encode(None))
        _write_sine(out, tracks[0], 1.0, silent_for=1.0)
        _write_sine(out, tracks[1], 1.0)
    return path


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_of_two_audio_tracks_the_default_one_is_kept(tmp_path, suffix):
    """A commentary or second-language track comes first, the one players play is marked default: that one is kept."""
    src = _two_audio_tracks(tmp_path / f"two{suffix}", default=1)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert first_sound(out.path) == pytest.approx(0.0, abs=0.01)
    # Without a default mark, the first track is kept (here silent).
    plain = _two_audio_tracks(tmp_path / f"plain{suffix}", default=None)
    [out] = video_upscale.run(make_ctx(tmp_path / "p", {"video_asset_id": "v", "scale": 2}, {"v": plain}))
    assert audio_codec(out.path) == "aac" and first_sound(out.path) is None


def test_opus_without_its_decoder_setup_is_re_encoded_not_a_crash(tmp_path):
    """Matroska 里的 Opus 缺 CodecPrivate：FFmpeg 照样解码，但 MP4 写不出它的设置，复制会在收尾时失败"""
    data = make_video(tmp_path / "o.mkv", frames=24, fps=24, audio_codec="libopus", audio_rate=48000).read_bytes()
    private = data.rfind(b"\x63\xa2", 0, data.find(b"OpusHead"))  # the CodecPrivate element, renamed away
    src = tmp_path / "bare.mkv"
    src.write_bytes(data[:private] + b"\x63\xa3" + data[private + 2 :])
    with av.open(str(src)) as probe:
        assert probe.streams.audio[0].codec_context.extradata is None
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert audio_codec(out.path) == "aac" and media.probe_file(out.path)["frame_count"] == 24


def _avi_with_drops(path: Path, shown: list[int], audio: bool = False) -> Path:
    """MJPEG AVI at 24 fps showing frames only in the given slots: the muxer writes an empty chunk for each slot
    skipped, as a capture that dropped frames does."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("mjpeg", rate=24)
        video.width, video.height, video.pix_fmt = 64, 48, "yuvj420p"
        video.codec_context.time_base = Fraction(1, 24)
        sound = out.add_stream("mp3", rate=44100) if audio else None
        if sound is not None:
            sound.layout = "stereo"
        for slot in shown:
            frame = av.VideoFrame.from_ndarray(pattern_frame(slot, 64, 48), format="rgb24")
            frame.pts, frame.time_base = slot, Fraction(1, 24)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None:
            _write_sine(out, sound, (shown[-1] + 1) / 24)
    return path


@pytest.mark.parametrize("handler", [video_upscale, video_interpolate])
def test_an_avi_that_dropped_frames_keeps_its_gap_and_its_sound(tmp_path, handler):
    src = _avi_with_drops(tmp_path / "capture.avi", [*range(10), *range(20, 30)], audio=True)
    factor = 2 if handler is video_interpolate else 1
    params = {"video_asset_id": "v", "scale" if handler is video_upscale else "factor": 2}
    with av.open(str(src)) as container:  # the slots the file holds frames in (where its muxer put them)
        slots = [p.dts for p in container.demux(video=0) if p.size]
    assert len(slots) == 20 and slots[-1] - slots[0] >= 29  # a gap of ten dropped frames
    [out] = handler.run(make_ctx(tmp_path / "w", params, {"v": src}))
    times = frame_times(out.path)
    assert times[::factor] == pytest.approx([slot / 24 for slot in slots], abs=1e-3)
    assert audio_seconds(out.path) == pytest.approx((slots[-1] + 1) / 24, abs=0.08)


def test_an_avi_with_dropped_frames_is_probed_over_its_whole_span(tmp_path):
    src = _avi_with_drops(tmp_path / "capture.avi", [*range(24), 29])  # slots 24-28 dropped
    info = media.probe_file(src)
    assert info["frame_count"] == 25 and info["duration_s"] == pytest.approx(30 / 24, abs=1e-3)  # 25 pictures shown


def test_an_mp4_trimmed_at_its_end_by_an_edit_list_lasts_as_trimmed(tmp_path):
    """不重新编码的裁剪（iOS、QuickTime）：编辑列表去掉后半段，计费与上限按裁剪后的时长"""
    src = make_video(tmp_path / "a.mp4", frames=48, audio=False)
    listed = tmp_path / "listed.mp4"
    with av.open(str(src)) as inp, av.open(str(listed), "w", options={"use_editlist": "1"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(video=0):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = bytearray(listed.read_bytes())
    at = data.find(b"elst") + 12  # version 0, one entry: its segment duration in the movie's timescale
    (segment,) = struct.unpack(">I", data[at : at + 4])
    data[at : at + 4] = struct.pack(">I", segment // 2)
    trimmed = tmp_path / "trimmed.mp4"
    trimmed.write_bytes(bytes(data))
    assert media.probe_file(trimmed)["duration_s"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("handler", [video_upscale, video_interpolate])
def test_an_avi_with_b_frames_keeps_its_even_frame_times(tmp_path, handler):
    """AVI 不存显示时间：带 B 帧（行车记录仪、Xvid）时 FFmpeg 按解码顺序猜出的时间乱序且晚一帧"""
    src = tmp_path / "dashcam.avi"
    with av.open(str(src), "w") as out:
        video = out.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt, video.options = 64, 48, "yuv420p", {"bf": "2"}
        for i in range(24):
            out.mux(video.encode(av.VideoFrame.from_ndarray(pattern_frame(i, 64, 48), format="rgb24")))
        out.mux(video.encode(None))
    with av.open(str(src)) as container:  # the shape of the file: guessed times out of order
        guessed = [frame.pts for frame in container.decode(video=0)]
        assert guessed != sorted(guessed)
    factor = 2 if handler is video_interpolate else 1
    params = {"video_asset_id": "v", "scale" if handler is video_upscale else "factor": 2}
    [out] = handler.run(make_ctx(tmp_path / "w", params, {"v": src}))
    assert frame_times(out.path) == pytest.approx([i / (24 * factor) for i in range(24 * factor)], abs=1e-3)
    assert media.probe_file(out.path)["duration_s"] == pytest.approx(1.0, abs=1e-3)


def test_a_damaged_video_packet_is_skipped(tmp_path):
    """Decoding goes on past it, as the ffmpeg command does; the rest of the video comes through."""
    src = make_video(tmp_path / "ok.avi", frames=24, fps=24, audio=False, video_codec="mjpeg")

    def damage(packet, n):
        if packet.stream.type == "video" and n == 12:
            broken = av.Packet(b"\xff\xd8\xff\xdb" + bytes(packet.size))  # a JPEG that ends in nothing
            broken.pts, broken.dts, broken.time_base = packet.pts, packet.dts, packet.time_base
            return broken

    damaged = _remux(src, tmp_path / "damaged.avi", damage)
    assert media.probe_file(damaged)["frame_count"] == 24
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": damaged}))
    assert media.probe_file(out.path)["frame_count"] == 23


def test_a_damaged_first_video_packet_is_skipped_by_the_probe_too(tmp_path):
    """The upload's check takes what a job takes: its poster is the first frame that decodes."""
    src = make_video(tmp_path / "ok.avi", frames=24, fps=24, audio=False, video_codec="mjpeg")

    def damage(packet, n):
        if packet.stream.type == "video" and n == 1:
            broken = av.Packet(b"\xff\xd8\xff\xdb" + bytes(packet.size))
            broken.pts, broken.dts, broken.time_base = packet.pts, packet.dts, packet.time_base
            return broken

    damaged = _remux(src, tmp_path / "damaged.avi", damage)
    info, poster = inspect_file(damaged, poster_side=64)
    assert (info["width"], info["height"], info["frame_count"]) == (64, 48, 24) and poster is not None
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": damaged}))
    assert media.probe_file(out.path)["frame_count"] == 23


def test_a_video_damaged_throughout_is_refused(tmp_path):
    src = make_video(tmp_path / "ok.avi", frames=24, fps=24, audio=False, video_codec="mjpeg")

    def damage(packet, n):
        if packet.stream.type == "video" and n > 1:
            broken = av.Packet(b"\xff\xd8\xff\xdb" + bytes(packet.size))
            broken.pts, broken.dts, broken.time_base = packet.pts, packet.dts, packet.time_base
            return broken

    damaged = _remux(src, tmp_path / "damaged.avi", damage)
    with pytest.raises(InvalidInput, match="could not be decoded"):
        video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": damaged}))


def test_tags_that_are_not_utf8_do_not_stop_a_video(tmp_path):
    """Cameras write Latin-1 or Shift-JIS titles."""
    src = tmp_path / "tagged.mkv"
    make_video(src, frames=12, fps=24)
    with av.open(str(make_video(tmp_path / "plain.mkv", frames=12, fps=24))) as inp, av.open(str(src), "w") as out:
        out.metadata["title"] = "ZZZZtitleZZZZ"
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream_index]
                out.mux(packet)
    data = src.read_bytes()
    assert b"ZZZZtitleZZZZ" in data
    src.write_bytes(data.replace(b"ZZZZtitleZZZZ", b"ZZZZ\xff\xfe\xc3(leZZZZ"))
    assert media.probe_file(src)["frame_count"] == 12
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert media.probe_file(out.path)["frame_count"] == 12 and audio_codec(out.path) == "aac"


def test_streams_in_codecs_ffmpeg_does_not_know(tmp_path):
    """An unknown audio codec is no audio; an unknown video codec is refused with a reason."""
    src = make_video(tmp_path / "ok.mkv", frames=12, fps=24, audio_codec="libopus", audio_rate=48000)
    data = src.read_bytes()
    assert b"A_OPUS" in data and b"V_MPEG4/ISO/AVC" in data
    odd_audio, odd_video = tmp_path / "odd_audio.mkv", tmp_path / "odd_video.mkv"
    odd_audio.write_bytes(data.replace(b"A_OPUS", b"A_ZZZZ"))
    odd_video.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_MPEG4/ISO/ZZZ"))
    info = media.probe_file(odd_audio)
    assert info["has_audio"] is False and info["frame_count"] == 12
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": odd_audio}))
    assert media.probe_file(out.path)["frame_count"] == 12 and audio_codec(out.path) is None
    with pytest.raises(InvalidInput, match="codec"):
        media.probe_file(odd_video)


def test_a_png_with_a_huge_text_chunk_is_refused_cleanly(tmp_path):
    data = make_image(tmp_path / "a.png").read_bytes()
    text = b"Comment\0\1\0\0\0" + zlib.compress(b"\0" * (3 << 20))
    chunk = struct.pack(">I", len(text)) + b"iTXt" + text + struct.pack(">I", zlib.crc32(b"iTXt" + text))
    at = data.index(b"IDAT") - 4
    path = tmp_path / "big_text.png"
    path.write_bytes(data[:at] + chunk + data[at:])
    with pytest.raises(InvalidInput):
        media.probe_file(path)
    with pytest.raises(InvalidInput):
        image_upscale.run(make_ctx(tmp_path / "w", {"image_asset_id": "i", "scale": 2}, {"i": path}))


def test_video_upscale_refuses_an_image(tmp_path, picture):
    with pytest.raises(InvalidInput, match="video"):
        video_upscale.run(make_ctx(tmp_path, {"video_asset_id": "v", "scale": 2}, {"v": picture}))


def test_cancel_stops_within_one_batch(tmp_path, monkeypatch):
    src = make_video(tmp_path / "long.mp4", 64, 48, frames=48, fps=24)
    for device in ("cpu", "cuda"):
        monkeypatch.setitem(media.BATCH_PIXELS, device, 128 * 96 * 4)  # 4 frames a batch
    processed = []
    real_resize = video_upscale.resize_yuv420
    monkeypatch.setattr(
        video_upscale, "resize_yuv420", lambda x, *sizes: processed.append(len(x)) or real_resize(x, *sizes)
    )
    calls = []

    def progress(fraction, message=None):
        calls.append(fraction)
        if len(calls) == 3:  # the start, one batch, then the user cancels
            raise TaskCanceled()

    with pytest.raises(TaskCanceled):
        video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}, progress))
    assert len(calls) == 3 and sum(processed) == 8  # exactly the two batches reported, not one more
    assert not spool_threads()
    assert not list((tmp_path / "w").glob("*.mp4"))  # the partial output is removed


def test_the_last_batches_are_read_when_the_decoder_finishes_during_a_wait(tmp_path, monkeypatch):
    """The wait for a batch times out just as the decode thread queues its last batches and ends."""
    src = make_video(tmp_path / "short.mp4", 64, 48, frames=8, fps=24, audio=False)
    real_init = media.FrameReader.__init__

    def init(reader, *args, **kwargs):
        real_init(reader, *args, **kwargs)
        real_get, first = reader.queue.get, [True]

        def get(block=True, timeout=None):
            if first.pop() if first else False:
                reader.thread.join()  # everything is queued and the thread is gone...
                raise queue.Empty  # ...but this wait had already timed out
            return real_get(block, timeout)

        reader.queue.get = get

    monkeypatch.setattr(media.FrameReader, "__init__", init)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert media.probe_file(out.path)["frame_count"] == 8


def test_stream_stops_threads_when_processing_fails(tmp_path, clip):
    def process(batches):
        for x in batches:
            yield x
            raise RuntimeError("device fell over")

    with pytest.raises(RuntimeError, match="device"):
        media.stream_video(
            clip,
            tmp_path / "o.mp4",
            process,
            info=media.probe_file(clip),
            out_size=(48, 64),
            progress=lambda *a: None,
            device=torch.device("cpu"),
            batch_size=2,
        )
    assert not spool_threads()


# ---------------------------------------------------------------- image.animate


@pytest.mark.parametrize(
    ("motion", "duration", "fps", "aspect", "size", "frames"),
    [
        ("zoom_in", 2, 24, "16:9", (228, 128), 48),
        ("ken_burns", 2.5, 30, "9:16", (128, 228), 75),
        ("pan_up", 2, 24, "1:1", (128, 128), 48),
    ],
)
def test_image_animate(tmp_path, picture, motion, duration, fps, aspect, size, frames):
    params = {
        "image_asset_id": "i",
        "motion": motion,
        "duration": duration,
        "fps": fps,
        "aspect_ratio": aspect,
        "resolution": 128,
    }
    calls = []
    [out] = image_animate.run(make_ctx(tmp_path, params, {"i": picture}, lambda f, m=None: calls.append(f)))
    assert calls == sorted(calls) and calls[-1] == 1.0
    info = media.probe_file(out.path)
    assert (info["width"], info["height"]) == size == (out.width, out.height)
    assert info["frame_count"] == frames and info["fps"] == fps and not info["has_audio"]
    assert info["duration_s"] == pytest.approx(frames / fps, abs=1e-3)


def test_pan_left_moves_the_view_left(tmp_path):
    img = np.zeros((180, 320, 3), np.uint8)
    img[:, 160:] = 255  # dark left half, bright right half
    Image.fromarray(img).save(tmp_path / "halves.png")
    params = {
        "image_asset_id": "i",
        "motion": "pan_left",
        "duration": 2,
        "fps": 24,
        "aspect_ratio": "16:9",
        "resolution": 144,
    }
    [out] = image_animate.run(make_ctx(tmp_path, params, {"i": tmp_path / "halves.png"}))
    frames = decode(out.path)
    brightness = [f.mean() for f in frames]
    assert brightness[0] > brightness[len(frames) // 2] > brightness[-1]  # starts right, ends left
    assert np.all(np.diff(brightness) <= 0.5)  # eased and monotonic, no jumps back


@pytest.mark.parametrize(("aspect", "resolution"), [("16:9", 128), ("9:16", 128), ("16:9", 480)])
def test_image_animate_crops_a_square_photo_without_stretching_it(tmp_path, aspect, resolution):
    """A square stays square: the source is cut and shrunk in whole pixels, the window is exact."""
    side = {128: 1000, 480: 1199}[resolution]
    img = np.full((side, side, 3), 255, np.uint8)
    half = side // 4
    img[side // 2 - half : side // 2 + half, side // 2 - half : side // 2 + half] = 0
    Image.fromarray(img).save(tmp_path / "square.png")
    params = {"image_asset_id": "i", "motion": "zoom_in", "duration": 2, "aspect_ratio": aspect,
              "resolution": resolution}  # fmt: skip
    [out] = image_animate.run(make_ctx(tmp_path, params, {"i": tmp_path / "square.png"}))
    dark = 1 - decode(out.path)[0].mean(2) / 255  # the first frame: the whole window, unzoomed
    h, w = dark.shape
    across = dark[h // 2 - 10 : h // 2 + 10].sum(1).mean()  # the square's width and height, to a fraction of a pixel
    down = dark[:, w // 2 - 10 : w // 2 + 10].sum(0).mean()
    assert across / down == pytest.approx(1, abs=0.004)


def test_image_animate_checks_params(tmp_path, picture):
    with pytest.raises(InvalidInput, match="duration"):
        image_animate.run(
            make_ctx(tmp_path, {"image_asset_id": "i", "motion": "zoom_in", "duration": 12}, {"i": picture})
        )


# ---------------------------------------------------------------- video.interpolate


@pytest.fixture(scope="module")
def moving_square(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("media") / "square.mp4", 64, 48, frames=8, fps=12, speed=4)


def test_interpolate_puts_the_square_halfway(tmp_path, moving_square):
    results = {}
    for mode in ("motion", "blend"):
        params = {"video_asset_id": "v", "factor": 2, "mode": mode}
        [out] = video_interpolate.run(make_ctx(tmp_path / mode, params, {"v": moving_square}))
        info = media.probe_file(out.path)
        assert info["frame_count"] == 16 and info["fps"] == 24 and info["has_audio"]
        assert info["duration_s"] == pytest.approx(8 / 12, abs=2e-3)
        results[mode] = decode(out.path)
    for i in (2, 3, 4):
        middle = results["motion"][2 * i + 1]
        square = (middle[..., 0] > 180) & (middle[..., 2] < 110)
        x = np.nonzero(square)[1].mean()
        assert square_x(i, 64, 4) < x < square_x(i + 1, 64, 4)
        assert x == pytest.approx((square_x(i, 64, 4) + square_x(i + 1, 64, 4)) / 2, abs=0.75)
        truth = pattern_frame(i + 0.5, 64, 48, 4)
        assert media.psnr(middle, truth) > media.psnr(results["blend"][2 * i + 1], truth) + 4


def test_interpolate_4x(tmp_path, moving_square):
    [out] = video_interpolate.run(make_ctx(tmp_path, {"video_asset_id": "v", "factor": 4}, {"v": moving_square}))
    info = media.probe_file(out.path)
    assert (info["frame_count"], info["fps"], out.fps) == (32, 48, 48)
    assert info["duration_s"] == pytest.approx(8 / 12, abs=2e-3)
    frames = decode(out.path)
    xs = [np.nonzero((f[..., 0] > 180) & (f[..., 2] < 110))[1].mean() for f in frames[8:13]]
    assert np.allclose(np.diff(xs), 1.0, atol=0.75)  # a quarter of the 4 px step each frame


def test_a_scene_cut_repeats_the_nearer_frame(tmp_path):
    """Motion between two unrelated pictures tears them into a collage: the new frame at a cut is a repeat."""
    scene_a, scene_b = pattern_frame(0, 96, 64), np.ascontiguousarray(pattern_frame(5, 96, 64)[::-1, :, ::-1])
    scene_b[20:44, 30:70] = (30, 30, 220)
    src = make_video(tmp_path / "cut.mkv", 96, 64, frames=8, fps=12, audio=False, video_codec="ffv1",
                     frames_from=[scene_a] * 4 + [scene_b] * 4)  # fmt: skip
    [out] = video_interpolate.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "factor": 2}, {"v": src}))
    frames = decode(out.path)
    assert media.psnr(frames[7], frames[6]) > 45  # between the last of A and the first of B: A again
    assert media.psnr(frames[9], frames[8]) > 45  # B is still: its new frames are B


@pytest.mark.parametrize(("width", "height", "speed"), [(640, 96, 60), (640, 48, 100)])
def test_motion_beyond_the_search_is_no_worse_than_the_cross_fade(tmp_path, width, height, speed):
    """Where the warped neighbours disagree, the pixel falls back to the cross-fade, which ghosts but never tears."""
    src = make_video(tmp_path / "fast.mkv", width, height, frames=4, fps=12, audio=False, video_codec="ffv1",
                     speed=speed)  # fmt: skip
    middle, truth = {}, pattern_frame(1.5, width, height, speed)
    for mode in ("motion", "blend"):
        params = {"video_asset_id": "v", "factor": 2, "mode": mode}
        [out] = video_interpolate.run(make_ctx(tmp_path / mode, params, {"v": src}))
        middle[mode] = media.psnr(decode(out.path)[3], truth)
    assert middle["motion"] > middle["blend"]  # before the fallback: 0.1-0.2 dB below it, torn


def test_motion_search_filters_equal_their_plain_definitions():
    """The median and box mean written for speed give what torch's median and avg_pool2d give."""
    x = torch.randn(2, 3, 17, 23)
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3).view(2, 3, 9, 17, 23)
    assert torch.equal(video_interpolate._median3(x), patches.median(2).values)
    box = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    assert torch.allclose(video_interpolate._box_mean(x, 5), box, atol=1e-5)


# ---------------------------------------------------------------- media.probe


def test_media_probe_handler_video(tmp_path, clip):
    ctx = make_ctx(tmp_path, {"asset_id": "a"}, {"a": clip})
    [poster] = media_probe.run(ctx)
    assert ctx.result["probe"]["frame_count"] == 24 and ctx.result["probe"]["has_audio"]
    assert (poster.role, poster.kind, poster.mime, poster.width, poster.height) == (
        "poster",
        "image",
        "image/jpeg",
        64,
        48,
    )
    with Image.open(poster.path) as img:
        assert img.format == "JPEG" and img.size == (64, 48)


def test_media_probe_handler_image(tmp_path, picture):
    ctx = make_ctx(tmp_path, {"asset_id": "a"}, {"a": picture})
    [poster] = media_probe.run(ctx)
    assert ctx.result["probe"]["kind"] == "image" and (poster.width, poster.height) == (96, 64)


def test_media_probe_decodes_the_file_once(tmp_path, clip, monkeypatch):
    """The poster is the frame the probe decoded to validate the file, not a second decode."""
    opened = []

    def counted(module):
        real = module.open

        def open_and_count(*args, **kwargs):
            opened.append(module.__name__)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "open", open_and_count)

    counted(av)
    counted(Image)
    media_probe.run(make_ctx(tmp_path / "v", {"asset_id": "a"}, {"a": clip}))
    assert opened == ["PIL.Image", "av"]  # Pillow reads the header only, and declines
    opened.clear()
    photo = make_image(tmp_path / "photo.jpg", 3000, 2000, "JPEG")
    [poster] = media_probe.run(make_ctx(tmp_path / "i", {"asset_id": "a"}, {"a": photo}))
    assert opened == ["PIL.Image"] and (poster.width, poster.height) == (1280, 853)


def damaged_exif(orientation: int) -> bytes:
    """带方向标记、但 GPS 目录声称的条目数超出 EXIF 段的 EXIF（被截断或写坏的相机 EXIF）"""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = orientation, "Maker"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (1.0, 2.0, 3.0)
    raw = bytearray(exif.tobytes())
    at = 6 + int.from_bytes(raw[raw.index(b"\x88\x25") + 8 :][:4], "big")  # "Exif\0\0" + the GPS IFD's offset
    raw[at] = 1  # its entry count 2 becomes 258: the directory runs past the end of the segment
    return bytes(raw)


@pytest.mark.parametrize("damaged", [False, True])
def test_exif_rotated_photo_is_probed_postered_and_upscaled_upright(tmp_path, damaged):
    """A phone photo stored landscape with EXIF orientation 6 (turn 90° clockwise to show): left half red."""
    stored = np.zeros((60, 80, 3), np.uint8)
    stored[:, :40], stored[:, 40:] = (220, 30, 30), (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=damaged_exif(6) if damaged else exif)
    info = media.probe_file(path)
    assert (info["width"], info["height"]) == (60, 80)
    [poster] = media_probe.run(make_ctx(tmp_path / "p", {"asset_id": "a"}, {"a": path}))
    [upscaled] = image_upscale.run(make_ctx(tmp_path / "u", {"image_asset_id": "a", "scale": 2}, {"a": path}))
    for out, size in ((poster, (60, 80)), (upscaled, (120, 160))):
        with Image.open(out.path) as img:
            shown = np.asarray(img.convert("RGB")).astype(int)
        assert (out.width, out.height) == size and shown.shape[:2] == size[::-1]
        top, bottom = shown[size[1] // 8, size[0] // 2], shown[-size[1] // 8, size[0] // 2]
        assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]  # stored left (red) is shown on top


def test_media_probe_handler_refuses_audio(tmp_path):
    with pytest.raises(InvalidInput, match="audio"):
        media_probe.run(make_ctx(tmp_path, {"asset_id": "a"}, {"a": make_audio(tmp_path / "tone.mp3")}))


@pytest.fixture
def portrait_clip(tmp_path) -> Path:
    """手机竖拍：以 64x48 横向存储，显示矩阵要求顺时针转 90°（显示为 48x64）"""
    return make_video(tmp_path / "portrait.mp4", 64, 48, frames=12, fps=24, rotation=-90)


def test_probe_reports_a_rotated_video_as_displayed(portrait_clip):
    info = media.probe_file(portrait_clip)
    assert (info["width"], info["height"], info["rotation"]) == (48, 64, 270)


def test_video_upscale_turns_a_phone_video_upright(tmp_path, portrait_clip):
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": portrait_clip}))
    info = media.probe_file(out.path)
    assert (info["width"], info["height"], info["rotation"], info["frame_count"]) == (96, 128, 0, 12)
    assert (out.width, out.height) == (96, 128)
    upright = np.ascontiguousarray(np.rot90(pattern_frame(5, 64, 48), -1))  # as ffmpeg's autorotate shows it
    assert media.psnr(decode(out.path)[5], _ours(upright, (128, 96))) > 30


def test_interpolate_and_poster_of_a_phone_video_are_upright(tmp_path, portrait_clip):
    params = {"video_asset_id": "v", "factor": 2, "mode": "blend"}
    [out] = video_interpolate.run(make_ctx(tmp_path / "w", params, {"v": portrait_clip}))
    assert (out.width, out.height) == (48, 64) and decode(out.path)[0].shape == (64, 48, 3)
    [poster] = media_probe.run(make_ctx(tmp_path / "p", {"asset_id": "a"}, {"a": portrait_clip}))
    upright = np.rot90(pattern_frame(0, 64, 48), -1)
    with Image.open(poster.path) as img:
        assert img.size == (48, 64) and media.psnr(np.asarray(img.convert("RGB")), upright) > 30


@pytest.mark.parametrize(
    ("rotation", "mirror", "shown_as", "degrees"),
    [
        (0, "h", lambda p: p[:, ::-1], 0),  # a front camera's mirror
        (0, "v", lambda p: p[::-1], 180),  # upside down and mirrored: a 180° turn of an h-mirror
        (180, None, lambda p: np.rot90(p, 2), 180),
        (90, None, lambda p: np.rot90(p, 1), 90),
        (-90, "h", lambda p: np.rot90(p, -1)[:, ::-1], 270),
        (90, "h", lambda p: np.rot90(p, 1)[:, ::-1], 90),
    ],
)
def test_mirrored_and_turned_videos_are_shown_as_their_matrix_says(tmp_path, rotation, mirror, shown_as, degrees):
    """Each display matrix, as PyAV's set_display_rotation documents it (rotate counter-clockwise, then flip).

    The probe reports the turn left once a mirror is taken off the display: shown = mirror(turn(stored)).
    """
    src = make_video(tmp_path / "m.mp4", 64, 48, frames=6, audio=False, rotation=rotation, mirror=mirror)
    expected = np.ascontiguousarray(shown_as(pattern_frame(0, 64, 48)))
    info = media.probe_file(src)
    assert (info["width"], info["height"]) == expected.shape[1::-1]
    assert (info["rotation"], info["mirrored"]) == (degrees, mirror is not None)
    with av.open(str(src)) as container:
        assert media.psnr(media.Display().rgb(next(container.decode(video=0))), expected) > 30
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert media.psnr(decode(out.path)[0], _ours(expected, (2 * expected.shape[0], 2 * expected.shape[1]))) > 30


def test_frames_with_side_data_pyav_cannot_name_are_read(tmp_path):
    """MJPEG frames carrying EXIF: FFmpeg hands it on as side data PyAV has no name for; the angle still counts."""
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    src = tmp_path / "exif.avi"
    with av.open(str(src), "w") as out:
        stream = out.add_stream("mjpeg", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(6):
            jpeg = io.BytesIO()
            Image.fromarray(pattern_frame(i, 64, 48)).save(jpeg, "JPEG", exif=exif.tobytes())
            packet = av.Packet(jpeg.getvalue())
            packet.pts = packet.dts = i
            packet.time_base, packet.stream, packet.is_keyframe = Fraction(1, 24), stream, True
            out.mux(packet)
    info = media.probe_file(src)
    assert (info["width"], info["height"], info["frame_count"], info["rotation"]) == (64, 48, 6, 0)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert media.probe_file(out.path)["frame_count"] == 6
    for degrees, orientation in display._QUARTER_TURNS.items():  # the fallback's turns, as the matrix reads them
        assert (orientation.degrees, orientation.mirrored) == (degrees, False)


def test_anamorphic_video_keeps_its_pixel_aspect(tmp_path):
    """Pixels twice as wide as tall: the outputs say so, as the input did, and the poster is shown widened."""
    src = make_video(tmp_path / "dv.mp4", 96, 64, frames=6, audio=False, pixel_aspect=Fraction(2))
    assert media.probe_file(src)["pixel_aspect"] == 2
    upscale = {"video_asset_id": "v", "scale": 2}
    [up] = video_upscale.run(make_ctx(tmp_path / "u", upscale, {"v": src}))
    [smooth] = video_interpolate.run(make_ctx(tmp_path / "i", {"video_asset_id": "v", "factor": 2}, {"v": src}))
    for out, size in ((up, (192, 128)), (smooth, (96, 64))):
        info = media.probe_file(out.path)
        assert ((info["width"], info["height"]), info["pixel_aspect"]) == (size, 2)
    [poster] = media_probe.run(make_ctx(tmp_path / "p", {"asset_id": "a"}, {"a": src}))
    assert (poster.width, poster.height) == (192, 64)


# ---------------------------------------------------------------- colour


def first_frame_rgb(path: Path, **options) -> np.ndarray:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24", **options)


def test_untagged_hd_video_keeps_its_colours(tmp_path):
    """Untagged HD is BT.709 to players; decoding it as swscale's default BT.601 would shift every colour."""
    src = make_video(tmp_path / "hd.mp4", 1280, 720, frames=2, audio=False, fill=(200, 40, 40))
    shown = first_frame_rgb(src, src_colorspace="ITU709")[360, 640].astype(int)
    assert np.abs(first_frame_rgb(src)[360, 640] - shown).max() > 8  # the shift this guards against
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert np.abs(first_frame_rgb(out.path)[720, 1280] - shown).max() <= 3


def test_hdr_video_is_tone_mapped_to_sdr(tmp_path):
    """A phone's HLG / BT.2020 clip comes out as the SDR BT.709 picture the output is tagged with."""
    hlg = {"colorspace": 9, "color_trc": 18, "color_primaries": 9}
    src = make_video(tmp_path / "hlg.mp4", 64, 48, frames=4, audio=False, fill=(150, 140, 120), colour_tags=hlg)
    mapped = first_frame_rgb(src, dst_color_trc=1, dst_color_primaries=1)[24, 32].astype(int)
    assert np.abs(first_frame_rgb(src)[24, 32] - mapped).max() > 8  # the HLG signal is not an SDR picture
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert np.abs(first_frame_rgb(out.path)[48, 64] - mapped).max() <= 3
    [poster] = media_probe.run(make_ctx(tmp_path / "p", {"asset_id": "a"}, {"a": src}))
    with Image.open(poster.path) as img:
        assert np.abs(np.asarray(img.convert("RGB"))[24, 32] - mapped).max() <= 3


def test_colours_swscale_cannot_map_are_decoded_unmapped():
    """A BT.2020 frame with a reserved transfer tag: swscale refuses the mapping, the frame still decodes."""
    frame = av.VideoFrame.from_ndarray(np.full((72, 64), 128, np.uint8), format="yuv420p")
    frame.colorspace, frame.color_trc, frame.color_primaries = 9, 0, 9
    with pytest.raises(av.FFmpegError):
        frame.to_ndarray(format="rgb24", dst_color_trc=1, dst_color_primaries=1)
    display = media.Display()
    assert np.array_equal(display.rgb(frame), frame.to_ndarray(format="rgb24"))
    assert [p.shape for p in display.yuv420(frame)] == [(48, 64), (24, 32), (24, 32)]


KR_KB = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}  # the luma weights of red and blue
BT709_TAGS = {"colorspace": 1, "color_primaries": 1, "color_trc": 1}
# Input codings players read differently from 8-bit BT.709 limited range: (pixel format, tags, matrix[, encoder])
CODINGS = {
    "untagged SD": ("yuv420p", None, "bt601"),  # SD video without tags is BT.601 to players
    "BT.601": ("yuv420p", {"colorspace": 6, "color_primaries": 6, "color_trc": 6}, "bt601"),
    "full range": ("yuvj420p", {"colorspace": 5, "color_range": 2}, "bt601"),  # as many Android phones record
    "4:2:2": ("yuv422p", BT709_TAGS, "bt709"),
    "4:4:4": ("yuv444p", {"colorspace": 6, "color_primaries": 6, "color_trc": 6}, "bt601"),
    "4:4:4 10-bit": ("yuv444p10le", BT709_TAGS, "bt709"),
    "10-bit": ("yuv420p10le", BT709_TAGS, "bt709"),
    "BT.709": ("yuv420p", BT709_TAGS, "bt709"),
    # Monochrome: untagged grey is full range (as swscale and players read it), HEVC's is tagged limited range.
    "grey": ("gray", None, "bt709", "ffv1"),
    "10-bit grey": ("gray10le", None, "bt709", "ffv1"),
    "grey, limited range": ("gray", None, "bt709", "libx265"),
}
CHART = [(128, 128, 128), (255, 255, 255), (16, 16, 16), (200, 30, 30), (40, 190, 50)]
CHART += [(30, 40, 200), (230, 220, 40), (40, 200, 210), (200, 40, 190), (90, 60, 40)]
PATCH = 32


def colour_chart() -> np.ndarray:
    """两行五列的纯色块：中灰、白、黑与饱和色"""
    chart = np.zeros((2 * PATCH, 5 * PATCH, 3), np.uint8)
    for i, colour in enumerate(CHART):
        row, col = divmod(i, 5)
        chart[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = colour
    return chart


def patch_means(rgb: np.ndarray, scale: int = 1) -> np.ndarray:
    """每个色块中心 8×8（按 scale 放大）的平均 RGB"""
    means = []
    for i in range(len(CHART)):
        row, col = divmod(i, 5)
        y, x, r = (2 * row + 1) * PATCH * scale // 2, (2 * col + 1) * PATCH * scale // 2, 4 * scale
        means.append(rgb[y - r : y + r, x - r : x + r].reshape(-1, 3).mean(0))
    return np.array(means)


def as_coded(frame: av.VideoFrame, matrix: str) -> np.ndarray:
    """帧的 Y、Cb、Cr 码值按矩阵与帧的范围精确换成的 RGB（浮点）：播放器显示的颜色"""
    bits = frame.format.components[0].bits
    dtype = np.dtype(np.uint16 if bits > 8 else np.uint8)
    planes = [
        np.frombuffer(p, dtype).reshape(p.height, p.line_size // dtype.itemsize)[:, : p.width].astype(np.float64)
        for p in frame.planes
    ]
    y, h, w = planes[0], frame.height, frame.width
    one = 2 ** (bits - 8)
    grey = len(planes) == 1  # no chroma: neutral
    chroma = planes[1:3] if not grey else [np.full_like(y, 128 * one)] * 2
    u, v = (np.repeat(np.repeat(c, h // c.shape[0], 0), w // c.shape[1], 1) for c in chroma)
    if frame.color_range == 2 or frame.format.name.startswith("yuvj") or (grey and frame.color_range != 1):
        y, pb, pr = y / (255 * one), (u - 128 * one) / (255 * one), (v - 128 * one) / (255 * one)
    else:
        y, pb, pr = (y - 16 * one) / (219 * one), (u - 128 * one) / (224 * one), (v - 128 * one) / (224 * one)
    kr, kb = KR_KB[matrix]
    r, b = y + 2 * (1 - kr) * pr, y + 2 * (1 - kb) * pb
    return (255 * np.stack([r, (y - kr * r - kb * b) / (1 - kr - kb), b], -1)).clip(0, 255)  # as a screen shows it


@pytest.mark.parametrize("coding", list(CODINGS))
def test_colours_come_out_as_the_input_codes_them(tmp_path, coding):
    """Grey, white, black and saturated patches keep their colours within 2 levels of the exact conversion of the
    input's codes, in the upscaled and interpolated clips and in the poster, whatever matrix, range, chroma
    subsampling or bit depth the input is coded in, monochrome included (8-bit output codes alone are up to 1.5
    levels off)."""
    pix_fmt, tags, matrix, *encoder = CODINGS[coding]
    chart = colour_chart()
    src = make_video(
        tmp_path / ("chart.mkv" if encoder == ["ffv1"] else "chart.mp4"),
        5 * PATCH,
        2 * PATCH,
        frames=3,
        audio=False,
        frames_from=[chart] * 3,
        colour_tags=tags,
        pix_fmt=pix_fmt,
        video_codec=encoder[0] if encoder else "libx264",
    )
    with av.open(str(src)) as container:
        frame = next(container.decode(video=0))
    assert frame.format.name == pix_fmt
    exact = patch_means(as_coded(frame, matrix))
    [up] = video_upscale.run(make_ctx(tmp_path / "u", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    params = {"video_asset_id": "v", "factor": 2, "mode": "blend"}
    [smooth] = video_interpolate.run(make_ctx(tmp_path / "i", params, {"v": src}))
    _, poster = media.probe_with_poster(src)  # media.probe's poster, before its JPEG coding adds its own error
    shown = {"poster": patch_means(np.asarray(poster).astype(np.float64))}
    for name, out, index, scale in (("upscale", up, 0, 2), ("interpolate", smooth, 1, 1)):
        with av.open(str(out.path)) as container:
            frames = container.decode(video=0)
            frame = next(f for i, f in enumerate(frames) if i == index)  # 1: a frame made between two
            assert (frame.format.name, frame.colorspace, frame.color_range) == ("yuv420p", 1, 1)
            shown[name] = patch_means(as_coded(frame, "bt709"), scale)
    errors = {name: float(np.abs(rgb - exact).max()) for name, rgb in shown.items()}
    assert max(errors.values()) <= 2, errors


# ---------------------------------------------------------------- variable frame rate

VFR_TIMES = [i / 30 for i in range(20)] + [20 / 30 + i / 10 for i in range(10)]  # 30 fps, then 10 in low light


def frame_times(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        return [frame.time for frame in container.decode(video=0)]


def audio_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(audio=0) if p.pts is not None]
        return float(max((p.pts + p.duration) * p.time_base for p in packets))


@pytest.mark.parametrize("codec", ["aac", "mp2"])  # copied, re-encoded
def test_a_transport_stream_whose_sound_starts_before_its_clock_keeps_it(tmp_path, codec):
    """MPEG-TS 的时钟是 33 位的：零点之前一点的声音记作 2^33 - n，不能当成 26.5 小时之后"""
    src = make_video(tmp_path / "clip.ts", 64, 48, frames=480, fps=24, audio=True, audio_codec=codec)
    with av.open(str(src)) as container:
        assert next(p.pts for p in container.demux(audio=0) if p.pts is not None) > 2**32  # wrapped
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert out.duration_s == pytest.approx(20, abs=0.05)
    assert audio_seconds(out.path) == pytest.approx(20, abs=0.1)


@pytest.mark.parametrize("handler", [video_upscale, video_interpolate])  # planar and RGB frames
def test_frames_of_another_size_midway_are_fitted_not_stretched(tmp_path, handler):
    """录像中途改了分辨率（屏幕录制、WebRTC）：后面的竖帧按比例放进横画面，两侧补黑"""
    src = make_growing_video(tmp_path / "turned.mkv", (64, 48), (48, 64), frames=(12, 12))
    params = {"video_asset_id": "v", "scale" if handler is video_upscale else "factor": 2}
    [out] = handler.run(make_ctx(tmp_path / "w", params, {"v": src}))
    last = decode(out.path)[-1].astype(np.float64)
    width = last.shape[1]
    bar = width * 7 // 32  # the 48x64 picture fitted into 64x48 is 36 wide: 14 of 64 black on each side
    assert last[:, : bar - 2].max() < 30 and last[:, width - bar + 2 :].max() < 30
    assert last[:, width // 2 - 4 : width // 2 + 4].mean() > 40  # the picture itself
    first = decode(out.path)[0].astype(np.float64)
    assert first[:, :4].mean() > 40  # frames of the video's own size fill it


def combing(frame: np.ndarray) -> float:
    """隔行的梳齿：每行与上下两行平均的差"""
    rows = frame.astype(np.float64).mean(axis=-1)
    return float(np.abs(rows[1:-1] - (rows[:-2] + rows[2:]) / 2).mean())


def make_interlaced_video(path: Path, frames: int = 12) -> Path:
    """隔行扫描（上场优先）的 H.264：两场拍于不同时刻，白条在两场之间移动"""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"preset": "ultrafast", "flags": "+ildct+ilme"})
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        stream.options = {**stream.options, "x264opts": "tff=1"}
        for index in range(frames):
            picture = np.full((96, 128, 3), 30, np.uint8)
            picture[0::2, 10 + 6 * index : 30 + 6 * index] = 230  # the top field, at its time
            picture[1::2, 13 + 6 * index : 33 + 6 * index] = 230  # the bottom field, half a frame later
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def test_an_interlaced_videos_poster_is_deinterlaced(tmp_path):
    src = make_interlaced_video(tmp_path / "camcorder.mp4")
    [poster] = media_probe.run(make_ctx(tmp_path / "p", {"asset_id": "a"}, {"a": src}))
    with Image.open(poster.path) as img:
        shown = np.asarray(img.convert("RGB"))
    assert combing(shown) < combing(decode(src)[0]) / 3


@pytest.mark.parametrize("handler", [video_upscale, video_interpolate])
def test_interlaced_video_is_deinterlaced_frame_for_frame(tmp_path, handler):
    """摄像机、广播的隔行视频：先去隔行（每帧一帧，帧率与时长不变），否则梳齿会被放大"""
    src = make_interlaced_video(tmp_path / "camcorder.mp4")
    with av.open(str(src)) as container:
        assert next(container.decode(video=0)).interlaced_frame
    before = np.mean([combing(frame) for frame in decode(src)])
    params = {"video_asset_id": "v", "scale" if handler is video_upscale else "factor": 2}
    [out] = handler.run(make_ctx(tmp_path / "w", params, {"v": src}))
    frames = [np.asarray(Image.fromarray(f).resize((128, 96), Image.Resampling.BOX)) for f in decode(out.path)]
    assert len(frames) == 12 * (2 if handler is video_interpolate else 1)
    assert out.duration_s == pytest.approx(12 / 25, abs=1e-3)
    assert np.mean([combing(frame) for frame in frames]) < before / 3


def test_video_upscale_keeps_a_variable_frame_rate(tmp_path):
    """Each frame keeps its time: retimed at the average rate, the picture would drift off the sound."""
    src = make_video(tmp_path / "vfr.mp4", frames=30, fps=30, times=VFR_TIMES)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert frame_times(src) == pytest.approx(VFR_TIMES, abs=1e-3)
    assert frame_times(out.path) == pytest.approx(VFR_TIMES, abs=1e-3)
    assert audio_seconds(out.path) == pytest.approx(audio_seconds(src), abs=0.03)


@pytest.mark.parametrize("suffix", [".webm", ".mkv", ".mp4"])
def test_a_sparse_variable_frame_rate_is_timed_by_its_frames(tmp_path, suffix):
    """Ten frames over 9.6 s: priced and limited as 9.6 s, not as ten frames at the average rate (0.4 s)."""
    times = [0, 0.04, 0.08, 0.12, 0.16, 2, 4, 6, 8, 9.6]
    codecs = {"video_codec": "libvpx-vp9", "audio_codec": "libopus", "audio_rate": 48000} if suffix == ".webm" else {}
    src = make_video(tmp_path / f"sparse{suffix}", frames=10, fps=25, times=times, **codecs)
    assert media.probe_file(src)["duration_s"] == pytest.approx(9.64, abs=0.03)
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    assert out.duration_s == pytest.approx(9.64, abs=0.03)


def test_interpolate_keeps_a_variable_frame_rate(tmp_path):
    """New frames fall halfway between their neighbours' own times; the last one halfway to the video's end."""
    src = make_video(tmp_path / "vfr.mp4", frames=30, fps=30, times=VFR_TIMES)
    params = {"video_asset_id": "v", "factor": 2, "mode": "blend"}
    [out] = video_interpolate.run(make_ctx(tmp_path / "w", params, {"v": src}))
    end = media.probe_file(src)["duration_s"]  # the last frame lasts what the file says
    halfway = [(a + b) / 2 for a, b in zip(VFR_TIMES, [*VFR_TIMES[1:], end], strict=True)]
    expected = [t for pair in zip(VFR_TIMES, halfway, strict=True) for t in pair]
    assert frame_times(out.path) == pytest.approx(expected, abs=2e-3)


def test_an_upscaled_variable_rate_clip_read_again_lasts_as_it_plays(tmp_path):
    """Our MP4 has B-frames: at a variable rate its last packet's decode-time duration reaches past the end of the
    clip. Probed again, upscaled again or interpolated, it keeps its length, and its last frame its time."""
    # x264 lays out the frames as below for these pictures: BT.709, so that they reach it as decoded.
    src = make_video(tmp_path / "vfr.mp4", frames=30, fps=30, times=VFR_TIMES, colour_tags=BT709_TAGS)
    length = media.probe_file(src)["duration_s"]
    [up] = video_upscale.run(make_ctx(tmp_path / "u", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    with av.open(str(up.path)) as container:  # the shape of the file: the frame shown last is coded ahead of others
        last = max((p for p in container.demux(video=0) if p.size), key=lambda p: p.pts)
        assert float((last.pts + last.duration) * last.time_base) > length + 0.1
    assert media.probe_file(up.path)["duration_s"] == pytest.approx(length, abs=1e-3)
    [again] = video_upscale.run(make_ctx(tmp_path / "a", {"video_asset_id": "v", "scale": 2}, {"v": up.path}))
    params = {"video_asset_id": "v", "factor": 2, "mode": "blend"}
    [smooth] = video_interpolate.run(make_ctx(tmp_path / "i", params, {"v": up.path}))
    for out in (again, smooth):
        assert out.duration_s == pytest.approx(length, abs=2e-3)
        assert audio_seconds(out.path) == pytest.approx(length, abs=0.03)
    assert frame_times(smooth.path)[-1] == pytest.approx((VFR_TIMES[-1] + length) / 2, abs=2e-3)


def _cut_into_a_group(src: Path, dst: Path, dropped: int) -> Path:
    """丢掉前 dropped 个视频包：像不重新编码、从两个关键帧之间剪下的片段，开头几帧没有参考帧解不出来"""
    return _remux(src, dst, lambda packet, n: False if packet.stream.type == "video" and n <= dropped else None)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
@pytest.mark.parametrize("handler", [video_upscale, video_interpolate])
def test_a_clip_whose_first_frames_cannot_be_decoded_starts_with_its_first_frame(tmp_path, suffix, handler):
    """Cut between keyframes without re-encoding: the frames before the next keyframe do not decode. The output
    begins with the first frame that does, as the sound under it, and lasts as long as the frames it holds."""
    src = make_video(tmp_path / f"clip{suffix}", frames=48, fps=24, keyframe_every=12, audio_start=1.0)
    cut = _cut_into_a_group(src, tmp_path / f"cut{suffix}", dropped=3)
    with av.open(str(cut)) as container:
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base)
        shown = [frame.time - start for frame in container.decode(stream)]
    assert len(shown) == 36 and shown[0] == pytest.approx(0.375, abs=1e-3)  # frames 3 to 11 cannot be decoded
    params = {"video_asset_id": "v", "scale" if handler is video_upscale else "factor": 2}
    [out] = handler.run(make_ctx(tmp_path / "w", params, {"v": cut}))
    factor = 2 if handler is video_interpolate else 1
    assert frame_times(out.path)[0] == pytest.approx(0, abs=1e-3)
    assert len(frame_times(out.path)) == 36 * factor
    assert out.duration_s == pytest.approx(36 / 24, abs=1e-3)  # not 0.375 s more of no picture
    # the tone starts 1 s into the input, 0.5 s after the first frame that decodes (at 0.5 s)
    assert first_sound(out.path) == pytest.approx(0.5, abs=0.01)


def test_an_avi_cut_between_keyframes_is_counted_and_upscaled(tmp_path):
    """An Xvid AVI whose index holds no keyframe at its start cannot be rewound to count its packets: it is read
    afresh (the decoder shows the frames before the first keyframe as well as it can, as the ffmpeg command does)."""
    src = make_video(tmp_path / "clip.avi", frames=48, fps=24, keyframe_every=12, video_codec="mpeg4", audio=False)
    cut = _cut_into_a_group(src, tmp_path / "cut.avi", dropped=3)
    info = media.probe_file(cut)
    assert info["frame_count"] == 45
    [out] = video_upscale.run(make_ctx(tmp_path / "w", {"video_asset_id": "v", "scale": 2}, {"v": cut}))
    assert out.metadata["frames"] == 45 and out.duration_s == pytest.approx(info["duration_s"], abs=1e-3)


@pytest.mark.parametrize("handler", [video_upscale, video_interpolate])
def test_an_h264_avi_cut_between_keyframes_stays_on_its_sound(tmp_path, handler):
    """H.264's decoder shows nothing before the first keyframe: the time slots of the frames it never shows are not
    handed to the frames after them, which would then be shown that much early, ahead of their sound."""
    src = make_video(
        tmp_path / "clip.avi", frames=48, fps=24, keyframe_every=12, audio_codec="pcm_s16le", audio_start=1.0
    )
    cut = _cut_into_a_group(src, tmp_path / "cut.avi", dropped=3)
    with av.open(str(cut)) as container:
        stream = container.streams.video[0]
        key = next(float(p.dts * p.time_base) for p in container.demux(stream) if p.is_keyframe)  # its slot
    params = {"video_asset_id": "v", "scale" if handler is video_upscale else "factor": 2}
    [out] = handler.run(make_ctx(tmp_path / "w", params, {"v": cut}))
    factor = 2 if handler is video_interpolate else 1
    assert out.metadata["frames"] == 36 * factor and out.duration_s == pytest.approx(36 / 24, abs=1e-3)
    # the output begins with the keyframe: the tone comes as long after it as in the input
    assert first_sound(out.path) == pytest.approx(first_sound(cut) - key, abs=0.01)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_held_last_frame_keeps_its_time_and_the_sound_under_it(tmp_path, suffix):
    """A screen recording: one second of frames, then the last picture held three seconds while the sound goes on."""
    times = [i / 30 for i in range(31)]
    src = make_video(tmp_path / f"held{suffix}", frames=31, fps=30, times=times, hold_last=3.0)
    assert media.probe_file(src)["duration_s"] == pytest.approx(4.0, abs=0.05)
    [up] = video_upscale.run(make_ctx(tmp_path / "u", {"video_asset_id": "v", "scale": 2}, {"v": src}))
    params = {"video_asset_id": "v", "factor": 2, "mode": "blend"}
    [inter] = video_interpolate.run(make_ctx(tmp_path / "i", params, {"v": src}))
    for out in (up, inter):
        assert out.duration_s == pytest.approx(4.0, abs=0.05)
        assert audio_seconds(out.path) == pytest.approx(4.0, abs=0.05)
    assert frame_times(up.path) == pytest.approx(times, abs=2e-3)  # no frame added or moved
