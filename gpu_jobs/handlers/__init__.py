"""The contract between the runner and a handler.

A handler is a plain function ``run(ctx: JobContext) -> list[OutputFile]``. It knows
nothing about HTTP, credits or Supabase: it reads local input files, writes output
files into ``ctx.workdir``, reports progress through ``ctx.progress`` (which raises
``TaskCanceled`` once the task was canceled) and raises ``lib.errors.InvalidInput``
for media it refuses. The runner downloads, uploads, records assets and settles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class ProgressFn(Protocol):
    def __call__(self, fraction: float, message: str | None = None) -> None: ...


@dataclass
class JobContext:
    """处理器运行上下文"""

    task_id: str
    params: Any  # the catalog entry's validated pydantic params model
    inputs: dict[str, Path]  # asset id -> downloaded local file
    input_meta: dict[str, dict]  # asset id -> asset row (kind, mime, width, height, duration_s, fps, ...)
    workdir: Path
    progress: ProgressFn
    device: str = "cpu"  # "cuda" when a GPU is present
    result: dict = field(default_factory=dict)  # extra facts for the task's ``result`` (e.g. a probe)
    state: dict = field(default_factory=dict)  # durable per-task state (e.g. a provider's job id)
    save_state: Callable[[dict], None] = lambda state: None


@dataclass
class OutputFile:
    """处理器产出的文件"""

    path: Path
    kind: str  # "image" | "video"
    mime: str
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    fps: float | None = None
    role: str = "result"  # "result" is the task's result; "poster" etc. are extra assets
    metadata: dict = field(default_factory=dict)
