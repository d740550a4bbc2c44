"""Domain errors raised by services and turned into the error envelope in one place."""

from __future__ import annotations

from typing import Any


class SpoolError(Exception):
    """领域错误基类"""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: Any = None):
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidWebhook(SpoolError):
    """Stripe webhook 无效（签名、时间戳或内容）"""

    status_code = 400
    code = "invalid_webhook"


ACCOUNT_GONE = "This account no longer exists."  # a token that outlived its deleted user


class Unauthorized(SpoolError):
    """未认证"""

    status_code = 401
    code = "unauthorized"


class InsufficientCredits(SpoolError):
    """积分不足"""

    status_code = 402
    code = "insufficient_credits"


class Forbidden(SpoolError):
    """无权访问"""

    status_code = 403
    code = "forbidden"


class NotFound(SpoolError):
    """资源不存在（包括他人的资源）"""

    status_code = 404
    code = "not_found"


class Conflict(SpoolError):
    """状态冲突"""

    status_code = 409
    code = "conflict"


class PayloadTooLarge(SpoolError):
    """请求体过大"""

    status_code = 413
    code = "payload_too_large"


class InvalidInput(SpoolError):
    """输入无效（参数或媒体文件）"""

    status_code = 422
    code = "validation_error"
    task_error_code = "invalid_input"  # the code a failed task records


class OutputTooLarge(InvalidInput):
    """任务的结果文件超过存储接受的大小"""

    task_error_code = "output_too_large"


class TooManyActiveTasks(SpoolError):
    """进行中的任务过多"""

    status_code = 429
    code = "too_many_active_tasks"


class UpstreamError(SpoolError):
    """外部服务（Stripe、存储、模型提供方）出错"""

    status_code = 502
    code = "upstream_error"


class ServiceUnavailable(SpoolError):
    """暂时不可用（依赖的服务连不上）：客户端稍后重试"""

    status_code = 503
    code = "service_unavailable"
    retry_after = 5


class ProviderUnavailable(SpoolError):
    """外部模型提供方未配置"""

    status_code = 503
    code = "provider_unavailable"


class TaskCanceled(Exception):
    """任务已被取消（处理过程中发现）"""


class TransientError(Exception):
    """可重试的临时错误（网络、存储）"""
