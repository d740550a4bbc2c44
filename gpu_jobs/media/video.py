"""Streamed video: decode thread → device batches → encode thread, with bounded queues between them."""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import torch

from gpu_jobs.handlers import OutputFile
from gpu_jobs.media.display import BT709_LIMITED, Display, YCbCr, deinterlaced
from gpu_jobs.media.ops import to_device, to_uint8, to_yuv420, yuv420_to_bt709, yuv420_to_rgb
from gpu_jobs.media.probe import (
    PacketDecoder,
    audio_codec,
    audio_stream,
    limit_decoded_pixels,
    open_media,
    pixel_aspect,
    reason,
    video_stream,
)
from lib.errors import InvalidInput

log = logging.getLogger(__name__)
# Audio copied into the MP4 as it is: codecs browsers play there. AC-3, E-AC-3 and ALAC (film rips, Apple Lossless)
# are re-encoded: Chrome and Firefox have no AC-3 decoder, and only Safari plays ALAC.
MP4_COPY_AUDIO = {"aac", "mp3", "opus", "flac"}
NEEDS_SETUP = {"opus", "flac"}  # copied only with the decoder setup (codec private data) the MP4 must carry
AAC_RATES = {96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350}
AAC_FALLBACK = (48000, "stereo")  # what any other audio is resampled and remixed to
# Layouts for a channel count whose order the file leaves unspecified (PCM in Matroska: "2 channels").
DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
# Output pixels per batch: bounds device memory whatever the frame size (on CPU small batches stay in cache).
BATCH_PIXELS = {"cpu": 4_000_000, "cuda": 64_000_000}
# Devices that convert output frames to yuv420p themselves: on a GPU it is nearly free and halves the bytes copied
# back, and the encode thread skips swscale (≈ 20 ms a 2160p frame). On a CPU swscale in the encode thread is
# cheaper than torch's conversion and runs beside the processing, so frames go to the encoder as RGB.
YUV_ON_DEVICE = {"cuda"}
_END = object()
TS_CLOCK = 1 << 33  # MPEG-TS timestamps: a 33-bit 90 kHz clock, wrapping every 26.5 hours
LEAD_IN = 1.0  # seconds of sound before the first frame kept in front of the sound under it (a codec's priming)


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
                if self.stop.is_set():
                    return _END
                if not self.thread.is_alive():  # it may have queued its last items since the wait timed out
                    try:
                        return self.queue.get_nowait()
                    except queue.Empty:
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
    """后台线程把视频解码成帧批次（有界队列），按显示时的方向与 SDR 颜色

    A batch is the 8-bit yuv420p planes of each frame, Y then U then V, flat (N, H·W + 2·⌈H/2⌉·⌈W/2⌉): half the
    bytes of RGB, and no conversion when the video is 8-bit 4:2:0 already. Their code values are in the video's
    own Y'CbCr matrix and range, ``colour``, for the device to convert (``ops.yuv420_to_bt709`` or
    ``ops.yuv420_to_rgb``); ``size`` is (H, W). Both are set before the first batch is queued.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        *,
        pin: bool = False,
        depth: int = 3,
        max_frames: int | None = None,
    ):
        super().__init__("spool-decode", depth)
        self.path, self.batch_size = str(path), batch_size
        self.size: tuple[int, int] = (0, 0)
        self.colour: YCbCr = BT709_LIMITED
        self.max_frames = max_frames  # the frames the probe counted (and was priced for), with a margin
        # Each decoded frame's presentation time in stream ticks from the stream's start, appended before the
        # frame is queued: phone video has a variable frame rate, and its output keeps these times.
        self.ticks: list[int] = []
        self.last_hold: int | None = None  # how long the last frame is shown, in ticks, when the file says
        self._slots: deque[int] | None = None  # AVI: the time slots of coded frames not yet shown
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
        with open_media(self.path) as container:
            stream = video_stream(container)
            stream.thread_type = "AUTO"
            limit_decoded_pixels(stream)
            width, height = stream.codec_context.width, stream.codec_context.height
            start, step = stream.start_time or 0, frame_ticks(stream)
            # MP4/MOV: where the index ends the video (ticks from its start), so how long the last frame is shown.
            indexed_end = stream.duration if "mp4" in container.format.name.split(",") else None
            # AVI stores no presentation times: FFmpeg guesses them from the decode order, so with B-frames they
            # come out of order and a frame late. Each coded frame holds one slot of the constant rate (a dropped
            # frame is an empty chunk), and frames come out in the order of those slots: a frame's time is the
            # next coded frame's slot.
            self._slots = deque() if container.format.name == "avi" else None
            if self._slots is not None:  # each frame names its packet's slot (see _forget_unshown)
                stream.codec_context.flags |= av.codec.context.Flags.copy_opaque
            display, buf, n = Display(), None, 0
            for frame in deinterlaced(self._frames(container, stream), stream):
                if self.stop.is_set():
                    return
                planes = display.yuv420(frame, width, height)
                known = self._slots is None and frame.pts is not None and frame.time_base == stream.time_base
                if self._slots:
                    self.ticks.append(self._slots.popleft() - start)
                else:
                    self.ticks.append(frame.pts - start if known else (self.ticks[-1] + step if self.ticks else 0))
                # A screen recording holds its last picture for as long as nothing moves (seconds, not a frame).
                self.last_hold = frame.duration if known and frame.duration and frame.duration > 0 else None
                if known and indexed_end and indexed_end > self.ticks[-1]:
                    # A packet's duration is a decode-time step: with B-frames at a variable rate the last one's
                    # reaches past the end (the probe reads it the same way).
                    self.last_hold = indexed_end - self.ticks[-1]
                if buf is None:
                    self.size, self.colour = planes[0].shape, display.colour  # as the first frame decided
                    buf, n = self._buffer((self.batch_size, sum(p.size for p in planes))), 0
                row, at = buf[n].numpy().reshape(-1), 0
                for plane in planes:
                    row[at : at + plane.size].reshape(plane.shape)[...] = plane
                    at += plane.size
                n += 1
                if n == self.batch_size:
                    if not self.put(buf):
                        return
                    buf = None
            if buf is not None and n:
                self.put(buf[:n])
        self.put(_END)

    def _frames(self, container: Any, stream: Any) -> Iterator[av.VideoFrame]:
        """Decoded frames; a damaged packet is skipped (as the ffmpeg command does), many of them refuse the file."""
        decoder, frames = PacketDecoder(self.path), 0
        for packet in container.demux(stream):
            slot = self._slots is not None and packet.size and packet.dts is not None
            if slot:
                self._slots.append(packet.dts)
                packet.opaque = packet.dts
            try:
                decoded = decoder.decode(packet)
            except av.FFmpegError as exc:
                raise InvalidInput(f"The video could not be decoded: {reason(exc, self.path)}") from None
            if decoded is None:  # skipped: its slot is no frame's
                if slot:
                    self._slots.pop()
                continue
            if decoded and not frames and self._slots:
                self._forget_unshown(decoded[0])
            frames += len(decoded)
            if self.max_frames is not None and frames > self.max_frames:
                raise InvalidInput(
                    f"The video holds more frames than it was checked for ({self.max_frames}); "
                    "it may be damaged. Please export it again."
                )
            yield from decoded
        if not frames:
            raise InvalidInput("The video could not be decoded: no frame in it is readable.")

    def _forget_unshown(self, first: av.VideoFrame) -> None:
        """AVI：第一帧之前送进解码器却没出画面的包（剪在关键帧之间，H.264 不显示关键帧前的帧），时间槽不留给后面的帧"""
        while self._slots and first.opaque is not None and self._slots[0] < first.opaque:
            self._slots.popleft()

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
    """后台线程把帧批次编码为 H.264 MP4（yuv420p），可复制原视频音轨

    A batch is uint8 RGB (N, H, W, 3), converted by swscale here, or yuv420p planes (N, H·3/2, W) as
    ``to_yuv420`` makes them, encoded as they are.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        rate: Fraction | float,
        *,
        audio_from: str | Path | None = None,
        time_base: Fraction | None = None,
        pts: Callable[[int], int] | None = None,
        start_time: float = 0.0,
        pixel_aspect: Fraction | None = None,
        crf: int = 18,
        preset: str = "veryfast",
        thread_type: str = "AUTO",
        threads: int = 0,
        depth: int = 3,
    ):
        super().__init__("spool-encode", depth)
        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs even dimensions, got {width}x{height}")
        self.path, self.width, self.height = str(path), width, height
        self.rate = Fraction(rate).limit_denominator(1001000)
        # Frame i is shown at pts(i) ticks of time_base (the input's own times); by default at i / rate.
        if not (time_base and pts):
            time_base, pts = 1 / self.rate, lambda index: index
        self.time_base, self.pts = time_base, pts
        self._last_pts = -1
        self._origin: int | None = None  # pts(0): the output's zero, where its first frame is shown
        self.audio_from, self.start_time, self.crf, self.preset = audio_from, start_time, crf, preset
        self.pixel_aspect = pixel_aspect  # non-square pixels (anamorphic input) are kept, so players widen them
        self.thread_type, self.threads = thread_type, threads  # 0: as many as x264 sees fit for the cores
        self.frames_written = 0
        self._pending: tuple[float, Any] | None = None
        # Audio that ends by the first frame waits here until sound under the picture comes; if none does, the
        # track stays empty and the MP4 muxer leaves it out.
        self._lead_in: deque[tuple[float, Any]] = deque()
        self._heard = False
        self._held: Any = None  # the latest video packet, muxed once the next arrives: the last one ends the video
        self._first_dts: int | None = None
        self.buffers: queue.Queue = queue.Queue()  # pinned host buffers the encoder is done with
        self.thread.start()

    def write(self, frames: torch.Tensor) -> None:
        """提交一批帧（CPU 上的 uint8 RGB 或 yuv420p 平面）"""
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

    def _open(self, audio_as: str | tuple[int, str] | None) -> tuple[Any, Any, Any, Any]:
        """The output, its video stream, the audio source and the output's audio stream: none, the source's
        copied (``"copy"``) or encoded to AAC at ``(rate, layout)``."""
        # faststart: the index goes before the frames once they are written, so a browser plays the clip as it
        # streams in (the muxer moves it at close: 80 ms for a 211 MB file)
        out = av.open(self.path, "w", format="mp4", container_options={"movflags": "+faststart"})
        try:
            video = out.add_stream("libx264", rate=self.rate)
            video.width, video.height, video.pix_fmt = self.width, self.height, "yuv420p"
            video.time_base = self.time_base
            video.codec_context.time_base = self.time_base
            video.options = {"crf": str(self.crf), "preset": self.preset}
            cc = video.codec_context
            # x264's frame threads, as the ffmpeg command uses: PyAV's default (slice threads) cuts each frame
            # into one slice per thread, which on many cores codes larger files more slowly.
            cc.thread_type, cc.thread_count = self.thread_type, self.threads
            cc.colorspace = cc.color_primaries = cc.color_trc = 1  # BT.709, as the conversion below
            cc.color_range = 1  # limited (MPEG) range
            if self.pixel_aspect and self.pixel_aspect != 1:
                cc.sample_aspect_ratio = self.pixel_aspect
            src = audio = None
            if audio_as is not None:
                src = open_media(self.audio_from)
                if audio_as == "copy":
                    audio = out.add_stream_from_template(audio_stream(src))
                else:
                    audio = out.add_stream("aac", rate=audio_as[0])
                    audio.layout = audio_as[1]
            out.start_encoding()
            return out, video, src, audio
        except BaseException:
            out.close()
            if src is not None:
                src.close()
            raise

    def work(self) -> None:
        ways: list[str | tuple[int, str] | None] = [None]
        if self.audio_from is not None:
            with open_media(self.audio_from) as probe:
                if (in_audio := audio_stream(probe)) is not None:
                    ways = _audio_ways(in_audio.codec_context, audio_codec(probe, in_audio))
        for way in ways:  # copied if MP4 takes the codec, else AAC at the source's rate and layout, else stereo
            try:
                out, video, src, audio = self._open(way)
                break
            except av.FFmpegError as exc:
                if way is None:
                    raise
                if way == ways[-1]:
                    raise InvalidInput(f"The audio track could not be written: {reason(exc, self.path)}") from None
                log.info("writing the audio as %s failed (%s); trying the next way", way, exc)
        copy = way == "copy"
        audio_items = self._audio_items(src, audio, copy) if src is not None else iter(())
        try:
            while (batch := self.get()) is not _END:
                planar = batch.ndim == 3
                for frame in batch.numpy():
                    if planar:
                        vf = av.VideoFrame.from_ndarray(frame, format="yuv420p")
                    else:
                        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
                        vf = vf.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
                    vf.pts, vf.time_base = self._next_pts(), self.time_base
                    self._mux_video(out, video.encode(vf))
                    self.frames_written += 1
                if batch.is_pinned():
                    self.buffers.put(batch)
                self._mux_audio(out, audio_items, float(self._last_pts * self.time_base))
            if self.stop.is_set():
                return
            self._mux_video(out, video.encode(None))
            last = self.frames_written - 1  # the video ends when its last frame's time is up
            end_pts = self._last_pts + self.pts(last + 1) - self.pts(last) if last >= 0 else 0
            if self._held is not None:  # MP4 makes a track last from its first dts to its last dts + duration
                held, first_dts = self._held, self._first_dts or 0
                held.duration = max(held.duration or 0, end_pts - (held.dts - first_dts))
                out.mux(held)
            self._mux_audio(out, audio_items, float(end_pts * self.time_base), flush=True)
        finally:
            out.close()
            if src is not None:
                src.close()

    def _mux_video(self, out: Any, packets: list) -> None:
        """写出视频包，但留住最新的一个（最后一个包的时长决定视频在哪里结束）"""
        for packet in packets:
            if self._held is not None:
                out.mux(self._held)
            else:
                self._first_dts = packet.dts  # below 0 by the B-frame delay
            self._held = packet

    def _next_pts(self) -> int:
        """The next frame's pts: its time, kept strictly increasing (a broken file may repeat a time)."""
        at = self.pts(self.frames_written)
        if self._origin is None:
            # The output begins with its first frame, and the sound moves with it: frames an input holds before
            # its first decodable one (a clip cut between keyframes) leave no gap without a picture.
            self._origin = at
            self.start_time += float(at * self.time_base)
        self._last_pts = max(at - self._origin, self._last_pts + 1)
        return self._last_pts

    def _audio_items(self, src: Any, audio: Any, copy: bool) -> Iterator[tuple[float, Any]]:
        """(seconds, packet) of the source's audio, copied or re-encoded, shifted to the video's zero."""
        in_audio = audio_stream(src)
        shift = round(self.start_time / in_audio.time_base) if in_audio.time_base else 0
        wrap = TS_CLOCK if src.format.name == "mpegts" and in_audio.time_base == Fraction(1, 90_000) else None
        next_at, ended_at, last_dts = 0.0, None, None
        for packet in src.demux(in_audio):
            if wrap:  # sound stamped just before the clock's zero reads 2^33 - n: it is -n, not 26.5 hours on
                packet.pts, packet.dts = _unwrap(packet.pts, shift, wrap), _unwrap(packet.dts, shift, wrap)
            if copy:
                if packet.dts is None or not packet.size:
                    continue
                if last_dts is not None and packet.dts <= last_dts:
                    continue  # a repeated or backwards time (some recorders write them): muxers refuse it
                last_dts = packet.dts
                pts = max(packet.pts if packet.pts is not None else packet.dts, packet.dts)
                packet.pts, packet.dts = pts - shift, packet.dts - shift
                packet.stream = audio
                yield float(packet.pts * packet.time_base), packet
                continue
            try:
                frames = packet.decode()
            except av.FFmpegError:  # a damaged audio packet: skipped, as the ffmpeg command does
                continue
            for frame in frames:
                # Timed from the video's zero in samples: audio that starts late (or early) stays in sync.
                at = frame.time - self.start_time if frame.time is not None else next_at
                if ended_at is not None:
                    at = max(at, ended_at)  # never overlapping the previous frame: the encoder needs rising times
                next_at = ended_at = at + frame.samples / frame.sample_rate
                frame.pts, frame.time_base = round(at * frame.sample_rate), Fraction(1, frame.sample_rate)
                for out_packet in audio.encode(frame):
                    yield _packet_time(out_packet, at), out_packet
        if not copy:
            for out_packet in audio.encode(None):
                yield _packet_time(out_packet, math.inf), out_packet

    def _mux_audio(self, out: Any, items: Iterator, until: float, flush: bool = False) -> None:
        """Mux audio up to ``until`` seconds of video, keeping the file interleaved; none past its end."""
        while True:
            if self._pending is None:
                self._pending = next(items, None)
                if self._pending is None:
                    return
            time, packet = self._pending
            end = _packet_end(packet, time)
            if not flush and (time >= until or end > until):  # the video's end may yet fall inside it
                return
            if (time < until and (end <= until or _cut_at(packet, until))) or math.isinf(time):
                if not self._heard and end <= 0:
                    self._lead_in.append((end, packet))
                    while self._lead_in and self._lead_in[0][0] < -LEAD_IN:
                        self._lead_in.popleft()
                else:
                    self._heard = True
                    while self._lead_in:
                        out.mux(self._lead_in.popleft()[1])
                    out.mux(packet)
            self._pending = None


def _packet_time(packet: Any, default: float) -> float:
    """编码器交出的包自己的时刻（秒）：编码器有延迟，包里的声音比刚送进去的那一帧早"""
    return float(packet.pts * packet.time_base) if packet.pts is not None and packet.time_base else default


def _packet_end(packet: Any, time: float) -> float:
    """包里的声音结束的时刻（秒）；包没有时长 → 它开始的时刻"""
    if packet.duration and packet.time_base:
        return time + float(packet.duration * packet.time_base)
    return time


def _cut_at(packet: Any, until: float) -> bool:
    """把跨过 until（秒）的包缩短到 until 结束；包在 until 之前已没有一个刻度的声音 → False（不写）"""
    if not (packet.duration and packet.time_base and packet.pts is not None):
        return True
    # MP4 ends a track at its last packet's pts + duration (its edit list and the file's duration follow), as for
    # an encoder's last, partial frame. A millionth of a tick absorbs the float's error, never adds a tick.
    ticks = math.floor(until / packet.time_base + 1e-6) - packet.pts
    if ticks <= 0:
        return False
    packet.duration = min(packet.duration, ticks)
    return True


def _unwrap(ticks: int | None, near: int, wrap: int) -> int | None:
    """把绕回的时间戳移到离 near 最近的那一圈"""
    if ticks is None:
        return None
    return ticks - wrap * round((ticks - near) / wrap)


def _audio_ways(cc: Any, name: str) -> list[str | tuple[int, str]]:
    """音轨（编码名由 audio_codec 分辨）写进 MP4 的方式，好的在前：复制、原采样率与布局的 AAC、48 kHz 立体声 AAC"""
    copy = name in MP4_COPY_AUDIO and (name not in NEEDS_SETUP or bool(cc.extradata))
    ways: list[str | tuple[int, str]] = ["copy"] if copy else []
    layout = cc.layout.name
    if layout.endswith(" channels"):  # the order is unspecified: the usual one for that count
        layout = DEFAULT_LAYOUTS.get(cc.layout.nb_channels, AAC_FALLBACK[1])
    if cc.sample_rate in AAC_RATES:
        ways.append((cc.sample_rate, layout))
    return [*ways, AAC_FALLBACK] if AAC_FALLBACK not in ways else ways


def frame_ticks(stream: Any) -> int:
    """一帧的标称时长（流的 time_base 刻度数）"""
    rate = stream.average_rate or stream.guessed_rate or 25
    return max(1, round(1 / rate / stream.time_base)) if stream.time_base else 1


def _between(ticks: list[int], index: int, factor: int, step: int, hold: int | None = None) -> int:
    """Output frame ``index`` of ``factor`` per input frame: its time in ticks of time_base / factor.

    The last input frame lasts ``hold`` ticks (its own duration, when the file gives one), else one nominal step.
    """
    i, k = divmod(index, factor)
    end = (ticks[-1] + (hold or step)) if ticks else 0  # where the video ends
    if i >= len(ticks):  # past the end: on at the nominal rate
        return (end + (i - len(ticks)) * step) * factor + k * step
    after = ticks[i + 1] if i + 1 < len(ticks) else end
    return ticks[i] * factor + k * (after - ticks[i])


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
    planar: bool = False,
    message: str = "Processing video",
) -> int:
    """流式处理视频：解码线程 → 设备批处理 → 编码线程（音轨原样复制），返回写出的帧数

    ``process`` maps an iterator of float NCHW device batches (0..255) to an iterable of output batches
    of ``out_size`` (H, W); it may hold frames across batches (interpolation does), but a batch it yields
    belongs to the encoder, which converts it in place: yield copies of frames it keeps. With ``planar``
    the batches are the frames' flat yuv420p planes (BT.709 limited-range code values), and ``process`` yields
    (N, H·3/2, W) yuv420p code values.
    """
    with open_media(src) as container:  # header only: timing facts the writer keeps
        stream = video_stream(container)
        rate = stream.average_rate or stream.guessed_rate or Fraction(info["fps"]).limit_denominator(1001000)
        time_base, step = stream.time_base, frame_ticks(stream)
        start = float((stream.start_time or 0) * time_base) if time_base else 0.0
        aspect = pixel_aspect(stream, transpose=info.get("rotation") in (90, 270))
    total = max(1, info.get("frame_count") or 1)
    batch_size = batch_size or batch_size_for(out_size[1], out_size[0], device)
    done = 0
    with (
        FrameReader(
            src,
            batch_size,
            pin=device.type == "cuda",
            max_frames=frames_allowed(info["frame_count"]) if info.get("frame_count") else None,
        ) as reader,
        FrameWriter(
            dst,
            out_size[1],
            out_size[0],
            rate * rate_factor,
            audio_from=src if info.get("has_audio") else None,
            # rate_factor frames per input frame, evenly between its time and the next frame's: exact in
            # ticks of time_base / rate_factor.
            time_base=time_base / rate_factor if time_base else None,
            pts=lambda index: _between(reader.ticks, index, rate_factor, step, reader.last_hold),
            start_time=start,
            pixel_aspect=aspect,
        ) as writer,
    ):

        def batches() -> Iterator[torch.Tensor]:
            nonlocal done
            for frames in reader:
                x = to_device(frames, device)
                reader.release(frames)
                done += frames.shape[0]
                # The video's matrix and range to BT.709's, or to RGB: exact, and on a GPU nearly free.
                if planar:
                    yield yuv420_to_bt709(x, reader.size, reader.colour)
                else:
                    yield yuv420_to_rgb(x, reader.size, reader.colour)

        encode_batches(process(batches()), writer, lambda: progress(min(done / total, 1.0), message))
    if not writer.frames_written:  # the probe saw frames, but none could be decoded: no empty video for a charge
        raise InvalidInput("No frame of the video could be decoded.")
    return writer.frames_written


def frames_allowed(probed: int) -> int:
    """解码时允许的帧数：探测数加一点余量（探测按包计数，解码器偶尔多出一两帧）"""
    return probed + max(2, probed // 100)


def encode_batches(batches: Iterable[torch.Tensor], writer: FrameWriter, after_batch: Callable[[], None]) -> None:
    """把设备上的浮点帧批次交给编码线程（批次就地转换，交出后不可再用）；每批之后调用 after_batch（进度/取消）"""
    for y in batches:
        if y.ndim == 3:  # yuv420p code values already (a planar process): rounded in place
            frames = y.add_(0.5).clamp_(0, 255).to(torch.uint8)
        elif y.device.type in YUV_ON_DEVICE:
            frames = to_yuv420(y)
        else:
            frames = to_uint8(y, inplace=True)
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
    """一个 H.264 MP4 产出（时长与有无声音读自写好的文件：帧率可变时帧数 / 帧率并不是时长）"""
    with av.open(str(path)) as container:  # the stream's own duration is off once B-frames meet uneven times
        length = container.duration / av.time_base if container.duration else None
        # An input's audio track may hold no sound under the picture (none at all, or only before or after it).
        metadata["audio"] = bool(container.streams.audio)
    return OutputFile(
        path=path,
        kind="video",
        mime="video/mp4",
        width=width,
        height=height,
        duration_s=length or frames / fps,
        fps=float(fps),
        metadata={"frames": frames, **metadata},
    )
