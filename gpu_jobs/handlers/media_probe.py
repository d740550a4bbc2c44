"""media.probe: the facts of an uploaded file (container, codecs, size, duration, fps, frames), a poster."""

from __future__ import annotations

from gpu_jobs.handlers import JobContext, OutputFile
from gpu_jobs.media import input_path, param, probe_with_poster


def run(ctx: JobContext) -> list[OutputFile]:
    """探测媒体并生成海报图"""
    path = input_path(ctx, param(ctx.params, "asset_id"))
    info, poster = probe_with_poster(path)
    ctx.result["probe"] = info
    ctx.progress(0.5, "Writing poster")
    out = ctx.workdir / "poster.jpg"
    poster.save(out, format="JPEG", quality=85)
    return [
        OutputFile(
            path=out,
            kind="image",
            mime="image/jpeg",
            width=poster.width,
            height=poster.height,
            role="poster",
            metadata={"source_kind": info["kind"]},
        )
    ]
