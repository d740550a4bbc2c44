"""The model catalog: what users can run, with bounded params, a price rule and where it runs. No torch here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from pydantic import ConfigDict, Field

from lib.config import Settings, get_settings
from lib.errors import InvalidInput
from lib.fields import Number, RequestBody, Text, text_up_to

# Modal GPU classes, each with a fallback list (first available wins).
GPU_CLASSES: dict[str, list[str]] = {
    "gpu-small": ["L4", "A10G"],
    "gpu-large": ["H100", "A100-80GB"],
}
# Modal pools for the models that need no GPU, each its own function with its own container cap: upload checks
# (seconds each, every upload waits for one) and provider jobs (up to 48 min each, nearly all of it polling) never
# wait for each other's containers.
CPU_POOLS = ("probe", "provider")
MINUTES = 60
# A job's inputs are downloaded and its outputs uploaded within this, on top of its handler's timeout_s.
IO_ALLOWANCE_S = 8 * MINUTES


class Params(RequestBody):
    """模型参数的基类：与请求体一样，未知字段是 422"""


# The longest side each image format can hold (PNG's limit is far beyond any pixel limit).
IMAGE_MAX_SIDE = {"jpeg": 65_500, "webp": 16_383}
VIDEO_MAX_SIDE = 16_384  # H.264 as libx264 writes it: no frame wider or taller


def a_kind(kind: str) -> str:
    """资源类型连同冠词（an image、a video），用于错误信息"""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def check_image_side(width: int, height: int, fmt: str) -> None:
    """输出图片的边长超出格式上限时拒绝（WebP 16383，JPEG 65500）"""
    limit = IMAGE_MAX_SIDE.get(fmt)
    if limit and max(width, height) > limit:
        raise InvalidInput(
            f"The result would be {width}×{height}; {fmt.upper()} holds at most {limit:,} pixels a side. "
            "Choose PNG, a smaller scale or a smaller input.",
            details=[{"field": "params.format", "message": "output too large for this format"}],
        )


class ImageUpscaleParams(Params):
    image_asset_id: UUID
    scale: Literal[2, 4] = 2
    sharpen: Number = Field(0.0, ge=0, le=1, description="Unsharp-mask strength after upscaling.")
    format: Literal["png", "jpeg", "webp"] = "png"


class VideoUpscaleParams(Params):
    video_asset_id: UUID
    scale: Literal[2, 4] = 2


class ImageAnimateParams(Params):
    image_asset_id: UUID
    motion: Literal["zoom_in", "zoom_out", "pan_left", "pan_right", "pan_up", "pan_down", "ken_burns"] = "ken_burns"
    duration: Number = Field(5, ge=2, le=10, description="Clip length in seconds.")
    fps: Literal[24, 30] = 24
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    resolution: Literal[480, 720, 1080] = Field(720, description="Short side of the output in pixels.")


class VideoInterpolateParams(Params):
    video_asset_id: UUID
    factor: Literal[2, 4] = 2
    mode: Literal["motion", "blend"] = Field(
        "motion", description="'motion': motion-compensated; 'blend': plain cross-fade fallback."
    )


class MediaProbeParams(Params):
    asset_id: UUID


class KlingParams(Params):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)  # a blank prompt is no prompt

    prompt: Text = Field(min_length=1, max_length=2500)
    negative_prompt: text_up_to(2500) | None = None
    model_name: Literal["kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master"] = "kling-v1-6"
    mode: Literal["std", "pro"] = "std"
    duration: Literal["5", "10"] = "5"
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    cfg_scale: Number = Field(0.5, ge=0, le=1, description="Kling 1.x models only; 2.x models ignore it.")


class KlingImageParams(KlingParams):
    image_asset_id: UUID
    model_name: Literal[  # image2video knows more models than text2video (kling-v1-5, kling-v2-1)
        "kling-v1", "kling-v1-5", "kling-v1-6", "kling-v2-master", "kling-v2-1", "kling-v2-1-master"
    ] = "kling-v1-6"
    prompt: Text = Field("", max_length=2500)
    aspect_ratio: None = Field(None, description="Not used: the video takes the image's shape.")


KLING_PRICES = {("std", "5"): 35, ("std", "10"): 70, ("pro", "5"): 60, ("pro", "10"): 120}
# Kling bills its "master" models at several times the units of kling-v1-6 pro, in either mode.
KLING_MASTER_PRICES = {"5": 130, "10": 260}
KLING_PRICE_RULE = "std: 35 (5 s) / 70 (10 s); pro: 60 (5 s) / 120 (10 s); master models: 130 (5 s) / 260 (10 s)"
# The longest poll deadline (40 min, lib/config.py), then the download (5 min) and the last poll's retries.
KLING_TIMEOUT_S = 48 * MINUTES


def kling_price(params) -> int:
    """Kling 任务的价格（按模型档次、模式、时长）"""
    if params.model_name.endswith("-master"):
        return KLING_MASTER_PRICES[params.duration]
    return KLING_PRICES[(params.mode, params.duration)]


Assets = dict[str, dict]  # input asset id -> asset row (width, height, duration_s, fps, kind, ...)


@dataclass(frozen=True)
class ModelSpec:
    """一个可运行的模型"""

    key: str
    kind: Literal["image", "video"]
    title: str
    params: type[Params]
    price: Callable[[Any, Assets], int]
    price_rule: str
    handler: str  # "module:function", imported only by the runner
    gpu: str | None = None  # a GPU_CLASSES key; None runs in cpu_pool
    cpu_pool: str = "probe"  # a CPU_POOLS key, for a model without a GPU
    timeout_s: int = 30 * MINUTES
    inputs: dict[str, str] = field(default_factory=dict)  # params field -> required asset kind
    check: Callable[[Any, Assets, Settings], None] | None = None  # limits, before charging
    available: Callable[[Settings], bool] = lambda settings: True
    public: bool = True  # internal models (the probe) are hidden from /models

    @property
    def job_class(self) -> str:
        """在哪一类容器里运行：其 GPU 类别，没有 GPU 时其 CPU 池"""
        return self.gpu if self.gpu is not None else self.cpu_pool

    def input_asset_ids(self, params: Params) -> list[str]:
        """参数里引用的输入资源 id"""
        return [str(getattr(params, name)) for name in self.inputs]

    def public_view(self, settings: Settings) -> dict:
        return {
            "key": self.key,
            "kind": self.kind,
            "title": self.title,
            "params_schema": self.params.model_json_schema(),
            "price_rule": self.price_rule,
            "gpu": self.gpu,
            "available": self.available(settings),
        }


def _only(assets: Assets) -> dict:
    return next(iter(assets.values()))


BILLED_FPS = 60  # a billed second holds at most this many frames: the GPU's work is per frame
OVER_60_FPS = "; over 60 fps, a second per 60 frames"


def _seconds(asset: dict) -> int:
    """计费秒数：时长向上取整；帧率超过 60 的按每 60 帧一秒（1 秒 36000 帧的片子不能按 1 秒算）"""
    fps = max(asset.get("fps") or 0, BILLED_FPS)
    return max(1, math.ceil((asset.get("duration_s") or 0) * fps / BILLED_FPS - 1e-9))


def _check_output_size(params, assets: Assets, settings: Settings) -> None:
    """Outputs the size of the input (times the scale, if any), cut to even sizes as the handlers cut them."""
    asset, scale = _only(assets), getattr(params, "scale", 1)
    width, height = ((asset.get(side) or 0) * scale for side in ("width", "height"))
    width, height = width - width % 2, height - height % 2
    if width * height > settings.max_output_pixels:
        field = "params.scale" if scale > 1 else "params.video_asset_id"
        raise InvalidInput(
            f"The result would be {width * height:,} pixels; the limit is {settings.max_output_pixels:,}. "
            + ("Choose a smaller scale or a smaller input." if scale > 1 else "Choose a smaller input."),
            details=[{"field": field, "message": "output exceeds the pixel limit"}],
        )
    if hasattr(params, "format"):
        check_image_side(width, height, params.format)
    if hasattr(params, "video_asset_id") and max(width, height) > VIDEO_MAX_SIDE:
        raise InvalidInput(
            f"The result would be {width}×{height}; a video holds at most {VIDEO_MAX_SIDE:,} pixels a side. "
            + ("Choose a smaller scale or a smaller input." if scale > 1 else "Choose a smaller input."),
            details=[{"field": "params.video_asset_id", "message": "output too wide or tall for a video"}],
        )


def _check_kling_image(params, assets: Assets, settings: Settings) -> None:
    asset = _only(assets)
    width, height = asset.get("width") or 0, asset.get("height") or 0
    if min(width, height) < 300 or max(width, height) > 2.5 * min(width, height):
        raise InvalidInput(
            "Kling needs an image at least 300 px on each side and no wider or taller than 2.5:1.",
            details=[{"field": "params.image_asset_id", "message": "image size or shape not accepted"}],
        )


def _image_upscale_price(params: ImageUpscaleParams, assets: Assets) -> int:
    asset = _only(assets)
    megapixels = (asset.get("width") or 0) * (asset.get("height") or 0) * params.scale**2 / 1e6
    return max(2, math.ceil(megapixels))


CATALOG: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in [
        ModelSpec(
            key="image.upscale",
            kind="image",
            title="Image upscale (2× / 4×)",
            params=ImageUpscaleParams,
            price=_image_upscale_price,
            price_rule="1 credit per output megapixel, at least 2",
            handler="gpu_jobs.handlers.image_upscale:run",
            gpu="gpu-small",
            timeout_s=10 * MINUTES,
            inputs={"image_asset_id": "image"},
            check=_check_output_size,
        ),
        ModelSpec(
            key="video.upscale",
            kind="video",
            title="Video upscale (2× / 4×)",
            params=VideoUpscaleParams,
            price=lambda p, a: _seconds(_only(a)) * (2 if p.scale == 2 else 6),
            price_rule=f"2 credits per second at 2×, 6 at 4× (seconds rounded up){OVER_60_FPS}",
            handler="gpu_jobs.handlers.video_upscale:run",
            gpu="gpu-large",
            timeout_s=60 * MINUTES,
            inputs={"video_asset_id": "video"},
            check=_check_output_size,
        ),
        ModelSpec(
            key="image.animate",
            kind="video",
            title="Animate a still (camera motion)",
            params=ImageAnimateParams,
            # Charged for what is rendered: round(duration·fps) frames (2.01 s at 24 fps is 48 frames, 2 s).
            price=lambda p, a: math.ceil(round(p.duration * p.fps) / p.fps - 1e-9) * (2 if p.resolution < 1080 else 3),
            price_rule="2 credits per second (3 at 1080p)",
            handler="gpu_jobs.handlers.image_animate:run",
            gpu="gpu-small",
            timeout_s=15 * MINUTES,
            inputs={"image_asset_id": "image"},
        ),
        ModelSpec(
            key="video.interpolate",
            kind="video",
            title="Frame interpolation (2× / 4× fps)",
            params=VideoInterpolateParams,
            price=lambda p, a: _seconds(_only(a)) * (1 if p.mode == "blend" else 2) * (p.factor // 2),
            price_rule=f"2 credits per second per 2× (motion), 1 (blend); 4× costs double{OVER_60_FPS}",
            handler="gpu_jobs.handlers.video_interpolate:run",
            gpu="gpu-large",
            timeout_s=60 * MINUTES,
            inputs={"video_asset_id": "video"},
            check=_check_output_size,
        ),
        ModelSpec(
            key="media.probe",
            kind="image",
            title="Probe an upload",
            params=MediaProbeParams,
            price=lambda p, a: 0,
            price_rule="free (runs when an upload completes)",
            handler="gpu_jobs.handlers.media_probe:run",
            cpu_pool="probe",
            timeout_s=5 * MINUTES,
            public=False,
        ),
        ModelSpec(
            key="kling.text2video",
            kind="video",
            title="Kling AI — text to video",
            params=KlingParams,
            price=lambda p, a: kling_price(p),
            price_rule=KLING_PRICE_RULE,
            handler="gpu_jobs.handlers.kling:run",
            cpu_pool="provider",
            timeout_s=KLING_TIMEOUT_S,
            available=lambda s: s.kling_configured,
        ),
        ModelSpec(
            key="kling.image2video",
            kind="video",
            title="Kling AI — image to video",
            params=KlingImageParams,
            price=lambda p, a: kling_price(p),
            price_rule=KLING_PRICE_RULE,
            handler="gpu_jobs.handlers.kling:run",
            cpu_pool="provider",
            timeout_s=KLING_TIMEOUT_S,
            inputs={"image_asset_id": "image"},
            check=_check_kling_image,
            available=lambda s: s.kling_configured,
        ),
    ]
}


def get_model(key: str) -> ModelSpec:
    """按 key 查找模型"""
    spec = CATALOG.get(key)
    if spec is None:
        raise InvalidInput(f"Unknown model '{key}'.", details=[{"field": "model_key", "message": "unknown model"}])
    return spec


def list_models() -> list[dict]:
    """公开的模型列表"""
    settings = get_settings()
    return [spec.public_view(settings) for spec in CATALOG.values() if spec.public]


def validate_params(spec: ModelSpec, raw: Any) -> Params:
    """按模型的参数模型校验（失败 → 422，带字段详情）"""
    from pydantic import ValidationError

    try:
        return spec.params.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        details = [
            {"field": ".".join(["params", *(str(p) for p in err["loc"])]), "message": err["msg"]}
            for err in exc.errors()
        ]
        raise InvalidInput("The parameters are not valid for this model.", details=details) from None


def price_of(spec: ModelSpec, params: Params, assets: Assets) -> int:
    """按参数与输入资源计算价格（先检查限制）"""
    if spec.check is not None:
        spec.check(params, assets, get_settings())
    return int(spec.price(params, assets))
