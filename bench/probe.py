"""What an upload's probe costs, and what deinterlacing adds to decoding.

The probe takes an MP4's frame count from its index when the index agrees with itself, and counts the packets of
any other container (demuxed, not decoded: a header's counts cost nothing to forge). Compared in one run with
decoding the whole file, which a probe that trusted no header would have to do. Then the decode thread's rate on
an interlaced clip (deinterlaced with bwdif) against the same thread on the same picture, progressive.

    .venv/bin/python bench/probe.py              # 30 s of 720p
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av
import numpy as np

from gpu_jobs import media

FPS = 30


def make_clip(path: Path, width: int, height: int, frames: int, *, interlaced: bool = False) -> None:
    """A drifting gradient with a moving bar, H.264 (x264 ultrafast), a keyframe every 2 s."""
    options = {"preset": "ultrafast", "g": str(2 * FPS)}
    if interlaced:
        options |= {"flags": "+ildct+ilme", "x264opts": "tff=1"}
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            picture = np.stack([(xx + 3 * i) % 256, (yy + i) % 256, np.full_like(xx, 96)], -1).astype(np.uint8)
            bar = (40 + 7 * i) % (width - 40)
            picture[:, bar : bar + 40] = 235
            if interlaced:  # the bottom field half a frame later
                picture[1::2, (bar + 3) % (width - 40) : (bar + 3) % (width - 40) + 40] = 20
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))


def remux(src: Path, dst: Path) -> None:
    """同样的包换一个容器"""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(video=0):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)


def timed(fn, repeat: int = 3) -> float:
    """fn 的中位耗时（秒）"""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_all(path: Path) -> int:
    """PyAV 解码全部帧（不转换）"""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def main() -> None:
    """运行并打印"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=720, help="frame height (16:9)")
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    height = args.size
    width = height * 16 // 9 // 2 * 2
    frames = args.seconds * FPS
    with tempfile.TemporaryDirectory() as tmp:
        mp4 = Path(tmp) / "clip.mp4"
        make_clip(mp4, width, height, frames)
        print(f"probe: {width}x{height}, {frames} frames ({args.seconds} s), {mp4.stat().st_size / 2**20:.1f} MiB")
        for ext in ("mkv", "ts"):
            remux(mp4, mp4.with_suffix(f".{ext}"))
        for ext, how in (
            ("mp4", "index taken"),
            ("mkv", "packets counted"),
            ("ts", "packets counted"),
        ):
            path = mp4.with_suffix(f".{ext}")
            info = media.probe_file(path)
            assert info["frame_count"] == frames, (ext, info["frame_count"])
            print(f"  probe_file {ext:<4} ({how:<15}) {timed(lambda p=path: media.probe_file(p)) * 1000:8.1f} ms")
        seconds = timed(lambda: decode_all(mp4), repeat=1)
        print(f"  baseline: decode every frame (PyAV)     {seconds * 1000:8.1f} ms")

        short = min(frames, 10 * FPS)
        progressive, interlaced = Path(tmp) / "progressive.mp4", Path(tmp) / "interlaced.mp4"
        make_clip(progressive, width, height, short)
        make_clip(interlaced, width, height, short, interlaced=True)
        print(f"deinterlace: {width}x{height}, {short} frames, the decode thread (to yuv420p planes)")
        for name, path in (("progressive (baseline)", progressive), ("interlaced, bwdif", interlaced)):
            seconds = timed(lambda p=path: sum(len(b) for b in media.FrameReader(p, 8)), repeat=1)
            print(f"  {name:<24} {short / seconds:8.1f} frames/s")


if __name__ == "__main__":
    main()
