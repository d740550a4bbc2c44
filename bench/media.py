"""Media handler throughput: video.upscale 2x stage by stage and end to end, against ffmpeg and Pillow,
and image.animate.

    .venv/bin/python bench/media.py                      # 720p clip, this machine's device
    python3 bench/media.py --size 1080 --device cuda     # the GPU run (bench/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation
from PIL import Image

from gpu_jobs import media
from gpu_jobs.handlers import JobContext, image_animate, video_interpolate, video_upscale
from gpu_jobs.media import ops
from gpu_jobs.media.display import YCbCr

FPS = 30


def make_clip(path: Path, width: int, height: int, frames: int, colour_tags: dict | None = None) -> None:
    """A panning textured scene with noise and a sine-wave AAC track: x264 has real work to do."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0 : width + 4 * frames].astype(np.float32)
    scene = np.stack(
        [
            128 + 90 * np.sin(xx / 37 + yy / 53) + 30 * np.sin(xx / 5),
            128 + 80 * np.cos(yy / 29 - xx / 71),
            128 + 60 * np.sin((xx + yy) / 13),
        ],
        -1,
    )
    for _ in range(12):  # hard-edged shapes
        x0, y0 = rng.integers(0, scene.shape[1] - 200), rng.integers(0, height - 120)
        scene[y0 : y0 + 120, x0 : x0 + 200] = rng.integers(0, 255, 3)
    scene = scene.clip(0, 255).astype(np.uint8)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "veryfast", "crf": "20"}
        for name, value in (colour_tags or {}).items():  # e.g. a phone's HLG: the decode maps it to SDR
            setattr(video.codec_context, name, value)
        audio = out.add_stream("aac", rate=44100)
        audio.layout = "stereo"
        for i in range(frames):
            noisy = scene[:, 4 * i : 4 * i + width].astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
            out.mux(video.encode(av.VideoFrame.from_ndarray(noisy.clip(0, 255).astype(np.uint8), format="rgb24")))
        out.mux(video.encode(None))
        for start in range(0, int(frames / FPS * 44100), 1024):
            wave = (0.2 * np.sin(2 * np.pi * 440 * (start + np.arange(1024)) / 44100)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 44100, start
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))


def ffmpeg_in_process(clip: Path, name: str, args: str, encode_to: Path | None = None) -> int:
    """One FFmpeg filter (e.g. scale with lanczos) through PyAV's filter graph, optionally into libx264;
    returns the frames it put out.

    The same C code as the ffmpeg command, for machines without the binary (the GPU machine).
    """
    with av.open(str(clip)) as src:
        stream = src.streams.video[0]
        stream.thread_type = "AUTO"
        graph = av.filter.Graph()
        node = graph.add(name, args)
        graph.link_nodes(graph.add_buffer(template=stream), node, graph.add("buffersink")).configure()
        out = av.open(str(encode_to), "w") if encode_to else None
        video, count = None, 0

        def drain() -> None:
            nonlocal video, count
            while True:
                try:
                    frame = graph.vpull()
                except (av.error.BlockingIOError, av.error.EOFError):
                    return
                count += 1
                if out is None:
                    continue
                if video is None:
                    video = out.add_stream("libx264", rate=stream.average_rate)
                    video.width, video.height, video.pix_fmt = frame.width, frame.height, "yuv420p"
                    video.options = {"preset": "veryfast", "crf": "18"}
                    video.codec_context.thread_type = "AUTO"  # frame threads, as the command's
                out.mux(video.encode(frame))

        for frame in src.decode(stream):
            graph.vpush(frame)
            drain()
        graph.vpush(None)
        drain()
        if out is not None:
            if video is not None:
                out.mux(video.encode(None))
            out.close()
    return count


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def line(name: str, frames: int, seconds: float, extra: str = "") -> float:
    fps = frames / seconds
    print(f"  {name:<52} {fps:8.1f} frames/s  ({frames} frames in {seconds:5.2f} s){extra}")
    return fps


def ctx_for(workdir: Path, params: dict, inputs: dict) -> JobContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return JobContext("bench", params, inputs, {}, workdir, lambda fraction, message=None: None)


def planes_to_rgb(planes: np.ndarray) -> np.ndarray:
    """(H·3/2, W) yuv420p, BT.709 limited range, as a player shows it."""
    frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
    return frame.to_ndarray(format="rgb24", src_colorspace="ITU709", src_color_range="MPEG")


def bench_upscale(tmp: Path, width: int, height: int, frames: int, device: torch.device) -> None:
    clip = tmp / "clip.mp4"
    make_clip(clip, width, height, frames)
    out_h, out_w = 2 * height, 2 * width
    batch = media.batch_size_for(out_w, out_h, device)
    print(f"\nvideo.upscale 2x: {width}x{height} -> {out_w}x{out_h}, {frames} frames, batch {batch}, {device}")

    # Decode on its own (the decode thread, into host buffers): yuv420p planes, as video.upscale reads them.
    pin = device.type == "cuda"
    seconds, decoded = timed(lambda: [b.clone() for b in media.FrameReader(clip, batch, pin=pin)])
    if pin:  # the pipeline copies from pinned buffers
        decoded = [b.pin_memory() for b in decoded]
    stages = {"decode": line("decode to yuv420p planes (PyAV, thread)", frames, seconds)}

    # The colour conversions the batches take on the device: to RGB for the other handlers, and a video coded
    # otherwise than BT.709 limited range (here full-range BT.601, as Android phones record) to BT.709.
    def convert(fn) -> list[torch.Tensor]:
        out = [fn(media.to_device(b, device)) for b in decoded]
        sync(device)
        return out

    to_rgb = lambda x: media.yuv420_to_rgb(x, (height, width))  # noqa: E731
    convert(to_rgb)
    line("planes to RGB on the device (the other handlers)", frames, timed(lambda: convert(to_rgb))[0])
    to_bt709 = lambda x: media.yuv420_to_bt709(x, (height, width), YCbCr(0.299, 0.114, True))  # noqa: E731
    convert(to_bt709)
    line("full-range BT.601 planes to BT.709 on the device", frames, timed(lambda: convert(to_bt709))[0])
    rgb_in = [media.to_uint8(x).cpu() for x in convert(to_rgb)]
    hdr = tmp / "hlg.mp4"
    make_clip(hdr, width, height, frames, {"colorspace": 9, "color_trc": 18, "color_primaries": 9})
    seconds, _ = timed(lambda: sum(1 for _ in media.FrameReader(hdr, batch, pin=pin)))
    line("decode an HLG clip, mapped to SDR (swscale)", frames, seconds)

    # Process on its own: host planes -> device -> Lanczos 2x of Y, U and V -> uint8 -> host, as the pipeline.
    def process(keep: bool = False) -> list[torch.Tensor]:
        kept = []  # the outputs, for the encode stage (an untimed run: copying them out is no part of it)
        host = None
        for b in decoded:
            up = media.resize_yuv420(media.to_device(b, device), (height, width), (out_h, out_w))
            out = up.add_(0.5).clamp_(0, 255).to(torch.uint8)
            if host is None or host.shape != out.shape:  # to a pinned buffer on CUDA, as the pipeline does
                host = torch.empty(out.shape, dtype=torch.uint8, pin_memory=pin)
            host.copy_(out)
            if keep:
                kept.append(host.clone())
        sync(device)
        return kept

    processed = process(keep=True)  # also the warm-up (kernels, plans)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, _ = timed(process)
    stages["process"] = line("process (to device, lanczos 2x of Y, U, V, to host)", frames, seconds)
    other = "transposed conv" if device.type in ops.UPSCALE_TAPS_ON else "shifted multiply-adds (a CPU's way)"
    ops.UPSCALE_TAPS_ON ^= {device.type}  # the other way to upscale on this device, for comparison
    process()
    line(f"  same, {other}", frames, timed(process)[0])
    ops.UPSCALE_TAPS_ON ^= {device.type}
    bench_traffic(decoded, (height, width), (out_h, out_w), device, stages["process"])

    # Encode on its own: libx264 veryfast crf 18 of every processed frame, from yuv420p planes as here, and
    # from RGB through swscale, as the other handlers hand frames over on a CPU.
    planes = torch.cat(processed)
    rgb = torch.from_numpy(np.stack([planes_to_rgb(p) for p in planes.numpy()]))

    def encode(keep: torch.Tensor, name: str, **options) -> float:
        chunks = list(keep.split(batch))

        def run() -> None:
            with media.FrameWriter(tmp / "encode.mp4", out_w, out_h, FPS, **options) as writer:
                for chunk in chunks:
                    writer.write(chunk)

        seconds = timed(run)[0]
        return line(name, frames, seconds, f", {(tmp / 'encode.mp4').stat().st_size / 2**20:.1f} MiB")

    stages["encode"] = encode(planes, "encode yuv420p (libx264 veryfast, thread)")
    encode(planes, "  same, x264 slice threads (PyAV's default)", thread_type="SLICE")
    if (os.cpu_count() or 1) < 16:  # the choice matters on a GPU machine's 16 cores: its thread count, here
        encode(planes, "  16 frame threads (as on 16 cores)", threads=16)
        encode(planes, "  16 slice threads", thread_type="SLICE", threads=16)
    encode(rgb, "encode RGB (swscale + libx264; the other handlers)")

    os.environ["SPOOL_DEVICE"] = device.type
    ctx = ctx_for(tmp / "e2e", {"video_asset_id": "v", "scale": 2}, {"v": clip})
    seconds, outputs = timed(lambda: video_upscale.run(ctx))
    end_to_end = line("end to end (video.upscale handler)", frames, seconds)
    bound = min(stages, key=stages.get)
    print(
        f"  bounding stage: {bound} ({stages[bound]:.1f} frames/s; end to end reaches "
        f"{100 * end_to_end / stages[bound]:.0f}% of it)"
    )
    if device.type == "cpu":  # the stages' threads share the cores, so their times add up
        shared = 1 / sum(1 / fps for fps in stages.values())
        print(
            f"  on {os.cpu_count()} shared CPUs the stages' times add up: {shared:.1f} frames/s "
            f"(end to end reaches {100 * end_to_end / shared:.0f}% of it)"
        )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"  torch.cuda.max_memory_allocated (process + end to end): {peak:.0f} MiB")

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg:
        scale = ["-vf", "scale=iw*2:ih*2:flags=lanczos"]
        run = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-i", str(clip), *scale]
        seconds, _ = timed(lambda: subprocess.run([*run, "-f", "null", "-"], check=True))
        line("ffmpeg lanczos 2x, no encode (CPU)", frames, seconds)
        x264 = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p", "-c:a", "copy"]
        seconds, _ = timed(lambda: subprocess.run([*run, *x264, str(tmp / "ffmpeg.mp4")], check=True))
        line("ffmpeg decode + lanczos 2x + libx264 (CPU)", frames, seconds)
    else:
        print("  ffmpeg command: not installed (apt-get install -y ffmpeg); its libraries through PyAV follow")
    lanczos = f"{out_w}:{out_h}:flags=lanczos"
    seconds, _ = timed(lambda: ffmpeg_in_process(clip, "scale", lanczos))
    line("FFmpeg scale filter via PyAV, no encode (CPU)", frames, seconds)
    seconds, _ = timed(lambda: ffmpeg_in_process(clip, "scale", lanczos, tmp / "pyav.mp4"))
    line("FFmpeg decode + scale + libx264 via PyAV (CPU)", frames, seconds)

    # Pillow LANCZOS frame by frame on the decoded RGB, and how close we are to it (before and after H.264).
    count = min(frames, 30)
    pil_frames = [f.numpy() for f in torch.cat(rgb_in)[:count]]
    seconds, refs = timed(
        lambda: [np.asarray(Image.fromarray(f).resize((out_w, out_h), Image.LANCZOS)) for f in pil_frames]
    )
    line("Pillow LANCZOS 2x, frame by frame (CPU)", count, seconds)
    with av.open(str(outputs[0].path)) as container:
        encoded = [f.to_ndarray(format="rgb24") for f in islice(container.decode(video=0), count)]
    raw = np.mean([media.psnr(o, r) for o, r in zip(rgb[:count].numpy(), refs, strict=True)])
    coded = np.mean([media.psnr(e, r) for e, r in zip(encoded, refs, strict=True)])
    print(f"  likeness to Pillow LANCZOS on RGB (PSNR): ours {raw:.2f} dB, after H.264 (crf 18) {coded:.2f} dB")


def bench_traffic(
    decoded: list[torch.Tensor], size: tuple[int, int], out_size: tuple[int, int], device: torch.device, process: float
) -> None:
    """The process stage against the memory traffic it cannot avoid: each frame's uint8 yuv420p planes read
    once and the upscaled planes written once, at the copy bandwidth measured here (and over PCIe on a GPU)."""
    (h, w), (oh, ow) = size, out_size
    read, written = h * w * 3 // 2, oh * ow * 3 // 2
    frames = sum(b.shape[0] for b in decoded)
    on_device = [b.to(device) for b in decoded]

    def kernels() -> None:  # the same work as the pipeline's, with frames already on the device and kept there
        for b in on_device:
            media.resize_yuv420(b.to(media.work_dtype(device)), size, out_size).add_(0.5).clamp_(0, 255).to(torch.uint8)
        sync(device)

    device_only = process  # on a CPU the process stage copies nothing
    if device.type == "cuda":
        kernels()
        device_only = line("process on the device alone (no host copies)", frames, timed(kernels)[0])
    copy = bandwidth(device, device)
    bound = copy / (read + written)
    print(
        f"  memory bound: {read / 2**20:.1f} MiB read + {written / 2**20:.1f} MiB written a frame at "
        f"{copy / 1e9:.0f} GB/s (a {device.type} copy) = {bound:.0f} frames/s; processing is "
        f"{bound / device_only:.1f}x slower"
    )
    if device.type == "cuda":
        up, down = bandwidth(torch.device("cpu"), device), bandwidth(device, torch.device("cpu"))
        pcie = 1 / (read / up + written / down)
        print(
            f"  PCIe bound: in at {up / 1e9:.0f} GB/s, out at {down / 1e9:.0f} GB/s (pinned, one stream) = "
            f"{pcie:.0f} frames/s; the process stage is {pcie / process:.1f}x slower"
        )


def bandwidth(src: torch.device, dst: torch.device, size: int = 256 * 2**20) -> float:
    """Bytes a second one copy moves from src to dst (read and write both counted within one device)."""
    pin = "cuda" in (src.type, dst.type) and src != dst
    a = torch.empty(size, dtype=torch.uint8, device=src, pin_memory=pin and src.type == "cpu")
    b = torch.empty(size, dtype=torch.uint8, device=dst, pin_memory=pin and dst.type == "cpu")
    cuda = src if src.type == "cuda" else dst
    b.copy_(a)
    sync(cuda)
    seconds, _ = timed(lambda: ([b.copy_(a, non_blocking=pin) for _ in range(10)], sync(cuda)))
    return 10 * size * (2 if src == dst else 1) / seconds


def bench_quality(tmp: Path, device: torch.device) -> None:
    """PSNR against the truth: a 640x360 clip shrunk 2x (Pillow), coded losslessly, upscaled back."""
    truth_clip, clip = tmp / "truth.mp4", tmp / "small.mp4"
    make_clip(truth_clip, 640, 360, 8)
    with av.open(str(truth_clip)) as container:
        truth = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        stream.codec_context.colorspace, stream.codec_context.color_range = 1, 1  # BT.709, limited
        for t in truth:
            small = av.VideoFrame.from_ndarray(np.asarray(Image.fromarray(t).resize((320, 180), Image.LANCZOS)))
            out.mux(stream.encode(small.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")))
        out.mux(stream.encode(None))
    planes = torch.cat(list(media.FrameReader(clip, 8)))
    rgb = media.to_uint8(media.yuv420_to_rgb(media.to_device(planes, device), (180, 320))).cpu()
    candidates = {
        "Pillow LANCZOS on the decoded RGB": [
            np.asarray(Image.fromarray(f).resize((640, 360), Image.LANCZOS)) for f in rgb.numpy()
        ],
        "our Lanczos on RGB": list(
            media.to_uint8(media.resize(media.to_device(rgb, device), (360, 640))).cpu().numpy()
        ),
        "our Lanczos on yuv420p planes (video.upscale)": [
            planes_to_rgb(p)
            for p in media.resize_yuv420(media.to_device(planes, device), (180, 320), (360, 640))
            .add_(0.5)
            .clamp_(0, 255)
            .to(torch.uint8)
            .cpu()
            .numpy()
        ],
    }
    [out] = video_upscale.run(ctx_for(tmp / "quality", {"video_asset_id": "v", "scale": 2}, {"v": clip}))
    with av.open(str(out.path)) as container:
        candidates["video.upscale output, after H.264 (crf 18)"] = [
            f.to_ndarray(format="rgb24") for f in container.decode(video=0)
        ]
    print("\nvideo.upscale 2x quality: 320x180 (a 640x360 clip shrunk by Pillow) -> 640x360, PSNR against the truth")
    for name, frames in candidates.items():
        print(f"  {name:<52} {np.mean([media.psnr(f, t) for f, t in zip(frames, truth, strict=True)]):6.2f} dB")


def per_frame_ms(fn, frames: int = 5) -> float:
    fn()  # warm up
    seconds, _ = timed(lambda: [fn() for _ in range(frames)])
    return 1000 * seconds / frames


def bench_conversions(tmp: Path, device: torch.device) -> None:
    """The per-frame costs behind where colour conversion and rounding happen."""
    print(f"\nper-frame costs behind the pipeline's choices, {device}")
    rng = np.random.default_rng(2)
    for width, height in ((2560, 1440), (3840, 2160)):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ms = per_frame_ms(
            lambda rgb=rgb: av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG"
            )
        )
        print(f"  {f'swscale RGB -> yuv420p, {height}p (the encode thread)':<52} {ms:8.1f} ms")
    x = media.to_device(torch.from_numpy(rng.integers(0, 256, (1, 1440, 2560, 3), dtype=np.uint8)), device)

    def on_device(fn) -> float:
        return per_frame_ms(lambda: (fn(x.clone()), sync(device)))

    print(f"  {'ops.to_yuv420, 1440p, on the device':<52} {on_device(media.to_yuv420):8.1f} ms")
    print(f"  {'ops.to_uint8, 1440p, into a fresh float copy':<52} {on_device(media.to_uint8):8.1f} ms")
    inplace = on_device(lambda y: media.to_uint8(y, inplace=True))
    print(f"  {'ops.to_uint8, 1440p, in place':<52} {inplace:8.1f} ms  (both include a clone of the batch)")
    # A video's colours to BT.709 limited range (video.upscale) and to RGB (the other handlers): swscale's fast
    # paths (default flags) in the decode thread, which were up to 3 levels off, its exact ones, and ours.
    frame = av.VideoFrame(1920, 1080, "yuv420p")
    for plane in frame.planes:
        plane.update(rng.integers(16, 236, plane.buffer_size, dtype=np.uint8).tobytes())
    frame.colorspace, frame.color_range = 6, 1  # BT.601
    exact = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
    for name, to in (("BT.601 -> BT.709 yuv420p", {"dst_colorspace": "ITU709"}), ("yuv420p -> RGB", {})):
        fmt = "yuv420p" if to else "rgb24"
        fast = per_frame_ms(lambda fmt=fmt, to=to: frame.reformat(format=fmt, **to), frames=10)
        slow = per_frame_ms(lambda fmt=fmt, to=to: frame.reformat(format=fmt, interpolation=exact, **to), frames=10)
        print(f"  {f'swscale {name}, 1080p (default flags)':<52} {fast:8.1f} ms")
        print(f"  {'  same, exact (ACCURATE_RND | FULL_CHR_H_INT)':<52} {slow:8.1f} ms")
    planes = media.to_device(torch.from_numpy(rng.integers(16, 236, (1, 1920 * 1080 * 3 // 2), dtype=np.uint8)), device)
    bt601 = YCbCr(0.299, 0.114, False)
    ms = per_frame_ms(lambda: (media.yuv420_to_bt709(planes, (1080, 1920), bt601), sync(device)), frames=10)
    print(f"  {'ops.yuv420_to_bt709 (BT.601), 1080p, on the device':<52} {ms:8.1f} ms")
    ms = per_frame_ms(lambda: (media.yuv420_to_rgb(planes, (1080, 1920), bt601), sync(device)), frames=10)
    print(f"  {'ops.yuv420_to_rgb, 1080p, on the device':<52} {ms:8.1f} ms")
    hdr = tmp / "hlg1080.mp4"
    make_clip(hdr, 1920, 1080, 4, {"colorspace": 9, "color_trc": 18, "color_primaries": 9})
    with av.open(str(hdr)) as container:
        frames = list(container.decode(video=0))
    display = media.Display()
    reused = per_frame_ms(lambda: [display.rgb(f) for f in frames]) / len(frames)
    fresh = per_frame_ms(lambda: [media.Display().rgb(f) for f in frames], frames=1) / len(frames)
    print(f"  {'HLG 1080p -> SDR RGB, one swscale context per frame':<52} {fresh:8.1f} ms")
    print(f"  {'HLG 1080p -> SDR RGB, one context reused':<52} {reused:8.1f} ms")


def bench_interpolate(tmp: Path, width: int, height: int, device: torch.device) -> None:
    """video.interpolate 2x, against FFmpeg's own motion-compensated (minterpolate) and blending filters."""
    clip = tmp / "interpolate.mp4"
    make_clip(clip, width, height, FPS)
    print(f"\nvideo.interpolate 2x: {width}x{height}, {FPS} -> {2 * FPS} fps, 1 s, {device} (output frames/s)")
    batch = max(2, media.batch_size_for(width, height, device) // 2)
    reader = media.FrameReader(clip, batch)
    decoded = list(reader)
    for mode in ("motion", "blend"):

        def process(mode: str = mode) -> int:
            batches = (media.yuv420_to_rgb(media.to_device(b, device), reader.size, reader.colour) for b in decoded)
            count = sum(y.shape[0] for y in video_interpolate.interpolate(batches, 2, mode))
            sync(device)
            return count

        process()  # warm up
        line(f"process, {mode} mode (decoded frames, on the device)", *reversed(timed(process)))
        ctx = ctx_for(tmp / f"interpolate-{mode}", {"video_asset_id": "v", "factor": 2, "mode": mode}, {"v": clip})
        seconds, [out] = timed(lambda ctx=ctx: video_interpolate.run(ctx))
        line(f"end to end, {mode} mode (video.interpolate handler)", out.metadata["frames"], seconds)
    for name, args, what in (
        ("minterpolate", f"fps={2 * FPS}:mi_mode=mci", "mci"),
        ("framerate", f"fps={2 * FPS}", "blend"),
    ):
        seconds, count = timed(lambda name=name, args=args: ffmpeg_in_process(clip, name, args))
        line(f"FFmpeg {name} {what} via PyAV, no encode (CPU)", count, seconds)


def bench_animate(tmp: Path, size: int, device: torch.device) -> None:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:2000, 0:3000].astype(np.float32)
    picture = np.stack([128 + 100 * np.sin(xx / 41), 128 + 100 * np.cos(yy / 37), 128 + 60 * np.sin((xx - yy) / 9)], -1)
    picture = (picture + rng.normal(0, 5, picture.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp / "picture.jpg", quality=92)
    width, height = image_animate.frame_size(Fraction(16, 9), size)
    frames = 3 * FPS
    print(f"\nimage.animate ken_burns: 3000x2000 picture -> {width}x{height}, {frames} frames, {device}")
    source = image_animate.prepare_source(media.load_image(tmp / "picture.jpg"), Fraction(16, 9), width, device)
    batch = media.batch_size_for(width, height, device)

    def render() -> None:
        for start in range(0, frames, batch):
            count = min(batch, frames - start)
            cams = image_animate.camera("ken_burns", start, count, frames)
            media.to_uint8(image_animate.render(source, cams, width, height)).cpu()
        sync(device)

    render()
    seconds, _ = timed(render)
    line("render (grid_sample bicubic, to host)", frames, seconds)
    params = {
        "image_asset_id": "i",
        "motion": "ken_burns",
        "duration": 3,
        "fps": FPS,
        "aspect_ratio": "16:9",
        "resolution": size,
    }
    seconds, _ = timed(lambda: image_animate.run(ctx_for(tmp / "anim", params, {"i": tmp / "picture.jpg"})))
    line("end to end (image.animate handler, incl. load)", frames, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=720, help="short side of the test clip (720, 1080)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--device", default=media.pick_device())
    args = parser.parse_args()
    device = torch.device(args.device)
    width = round(args.size * 16 / 9 / 2) * 2
    print(
        f"torch {torch.__version__}, PyAV {av.__version__}, {os.cpu_count()} CPUs, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    with tempfile.TemporaryDirectory(prefix="spool-bench-") as tmp:
        bench_upscale(Path(tmp), width, args.size, round(args.seconds * FPS), device)
        bench_quality(Path(tmp), device)
        bench_conversions(Path(tmp), device)
        bench_interpolate(Path(tmp), width, args.size, device)
        bench_animate(Path(tmp), args.size, device)


if __name__ == "__main__":
    main()
