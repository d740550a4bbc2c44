"""Device choice and the small helpers every handler uses to read its context."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib.errors import InvalidInput

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def pick_device() -> str:
    """选择计算设备"""
    import torch  # here, not at the top: the upload checks read their context through this module without torch

    return os.environ.get("SPOOL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def job_device(ctx: Any) -> torch.device:
    """任务使用的设备（SPOOL_DEVICE 优先，其次 ctx.device 中的 GPU）"""
    import torch

    if os.environ.get("SPOOL_DEVICE"):
        return torch.device(os.environ["SPOOL_DEVICE"])
    device = getattr(ctx, "device", "cpu") or "cpu"
    return torch.device(device if device.startswith("cuda") else pick_device())


def work_dtype(device: torch.device) -> torch.dtype:
    """设备上的计算精度：CUDA 用 fp16，CPU 用 fp32"""
    import torch

    return torch.float16 if device.type == "cuda" else torch.float32


def param(params: Any, name: str, default: Any = None) -> Any:
    """读取参数（pydantic 模型或字典）"""
    value = params.get(name, default) if isinstance(params, dict) else getattr(params, name, default)
    return default if value is None else value


def input_path(ctx: Any, asset_id: Any) -> Path:
    """取得已下载的输入文件路径"""
    path = ctx.inputs.get(str(asset_id)) if asset_id is not None else None
    if path is None:
        raise InvalidInput(f"Input asset {asset_id} was not provided.")
    return Path(path)


def even(n: float) -> int:
    """向下取偶数（至少 2）"""
    return max(2, int(n) // 2 * 2)
