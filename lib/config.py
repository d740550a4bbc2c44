"""Typed settings, read from the environment and `.env` (pydantic-settings)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# URLs that requests carry keys to (the service key, Stripe's secret key, a Kling token): https only in the cloud.
KEYED_URL_SETTINGS = ("supabase_url", "stripe_api_base", "kling_api_base")
# Settings that cloud mode cannot run without; checked at start, each missing one named.
CLOUD_REQUIRED = (
    "supabase_url",
    "supabase_db_url",
    "supabase_service_role_key",
    "stripe_secret_key",
    "stripe_webhook_secret",
)
# The legacy HS256 secret signs every user's token: Supabase's are at least 32 characters, and the local CLI's
# default is published, so either of those in the cloud would let anyone sign in as anyone.
JWT_SECRET_MIN_LENGTH = 32
# The database connection carries the password and every user's data: encrypted in the cloud. Unnamed, libpq's
# `prefer` falls back to plain text when someone on the path refuses TLS, so cloud mode asks for `require`.
WEAK_SSLMODES = ("disable", "allow", "prefer")
PUBLISHED_JWT_SECRETS = ("super-secret-jwt-token-with-at-least-32-characters-long",)
# The deploy steps start with this stand-in until Stripe has the endpoint and its signing secret; being written in
# the docs, it verifies nothing: webhooks answer 503 (Stripe retries) until the real secret replaces it.
PENDING_WEBHOOK_SECRET = "whsec_pending"
PLACEHOLDER_PREFIXES = ("change-me", "your-")
PLACEHOLDER_MARKS = ("<", ">", "...", "…")  # `https://<project-ref>.supabase.co`, `sk_test_...` copied from the docs
URL_SETTINGS = (
    "public_url",
    "supabase_url",
    "stripe_api_base",
    "billing_success_url",
    "billing_cancel_url",
    "kling_api_base",
)
# A list of origins: a JSON array or comma-separated (`https://a.example,https://b.example`).
Origins = Annotated[list[str], NoDecode]
DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str | None:
    """URL 的源，写成浏览器 Origin 头的样子（scheme://host[:port]，小写，无默认端口）；无效时为 None"""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.username or parts.password:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # an IPv6 address keeps its brackets
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != DEFAULT_PORTS[parts.scheme] else "")


class Settings(BaseSettings):
    """应用配置"""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Mode and local server
    spool_mode: Literal["local", "cloud"] = "local"
    spool_host: str = "127.0.0.1"
    spool_port: int = Field(8000, ge=1, le=65535)
    spool_home: Path = Path(".spool")
    public_url: str | None = None  # how browsers reach the API; default http://SPOOL_HOST:SPOOL_PORT
    cors_origins: Origins = ["http://localhost:3000", "http://127.0.0.1:3000"]
    log_level: str = "INFO"

    # Supabase
    supabase_url: str | None = None
    supabase_db_url: str | None = None
    supabase_service_role_key: str | None = None  # legacy service_role JWT or an sb_secret_ key
    supabase_jwt_secret: str | None = None  # legacy HS256 signing secret, optional
    jwks_cache_seconds: int = Field(600, gt=0, le=600)
    storage_bucket: str = "media"
    db_pool_min: int = 1
    db_pool_max: int = 10
    # How long a request waits for a free connection (or for the database to open) before a 503.
    db_wait_seconds: float = Field(10, gt=0)

    # Credits and tasks
    signup_credits: int = Field(100, ge=0)
    task_stall_seconds: int = Field(120, ge=5)
    task_max_attempts: int = Field(3, ge=1)
    task_queue_timeout_seconds: int = Field(6 * 3600, ge=60)
    max_active_tasks_per_user: int = Field(5, ge=1)
    max_upload_checks_per_user: int = Field(20, ge=1)
    worker_concurrency: int = Field(1, ge=1)
    reaper_interval_seconds: float = 5.0

    # Uploads and media limits
    max_direct_upload_bytes: int = 25 * 1024 * 1024
    max_upload_bytes: int = 2 * 1024 * 1024 * 1024
    signed_url_seconds: int = 3600
    max_input_pixels: int = 40_000_000
    max_output_pixels: int = 7680 * 4320
    max_video_seconds: float = 600
    max_video_frames: int = 36_000

    # Stripe
    stripe_secret_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_base: str | None = None  # another server speaking Stripe's API (tests)
    stripe_webhook_tolerance: int = Field(300, gt=0)  # 0 would turn off Stripe's replay check
    billing_allowed_origins: Origins = ["http://localhost:3000", "http://127.0.0.1:3000"]
    billing_success_url: str = "http://localhost:3000/billing/success?session_id={CHECKOUT_SESSION_ID}"
    billing_cancel_url: str = "http://localhost:3000/billing/cancel"

    # Modal
    modal_app_name: str = "spool"

    # Kling AI
    kling_ai_access_key: str | None = None
    kling_ai_secret_key: str | None = None
    kling_api_base: str = "https://api-singapore.klingai.com"
    # At most 40 min: the Kling models' job limit (lib/catalog.py) is 48, and the 5 min download comes after.
    kling_poll_deadline_seconds: float = Field(1800, gt=0, le=40 * 60)
    kling_poll_interval_seconds: float = Field(5, gt=0)

    @field_validator("spool_home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("cors_origins", "billing_allowed_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)  # a JSONDecodeError is a ValueError: reported with the setting's name
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator(*URL_SETTINGS)
    @classmethod
    def _http_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or (not value.strip() and cls.model_fields[info.field_name].default is None):
            return None  # an optional URL left empty (`STRIPE_API_BASE=`) is unset
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an http(s) URL such as https://example.com, not {value!r}")
        return value

    @property
    def is_local(self) -> bool:
        return self.spool_mode == "local"

    @property
    def auth_issuer(self) -> str:
        return f"{self.supabase_url.rstrip('/')}/auth/v1" if self.supabase_url else ""

    @property
    def jwks_url(self) -> str:
        return f"{self.auth_issuer}/.well-known/jwks.json"

    @property
    def stripe_webhook_configured(self) -> bool:
        secret = self.stripe_webhook_secret
        return bool(secret) and secret != PENDING_WEBHOOK_SECRET and not is_placeholder(secret)

    @property
    def kling_configured(self) -> bool:
        return bool(self.kling_ai_access_key and self.kling_ai_secret_key)

    def missing_cloud_settings(self) -> list[str]:
        """列出云模式缺失的配置项"""
        missing = []
        for name in CLOUD_REQUIRED:
            value = getattr(self, name)
            if not value or is_placeholder(str(value)):
                missing.append(name.upper())
        return missing

    def forgeable_jwt_secret(self) -> bool:
        """设置了的 SUPABASE_JWT_SECRET 是否谁都能用来签名（占位符、公开的默认值、不足 32 个字符）"""
        secret = self.supabase_jwt_secret
        if not secret:
            return False  # unset: HS256 tokens are refused
        return is_placeholder(secret) or secret in PUBLISHED_JWT_SECRETS or len(secret) < JWT_SECRET_MIN_LENGTH

    def db_sslmode(self) -> str | None:
        """数据库连接的 sslmode：地址里写明的；云模式下没写 → require；本地 → None（libpq 默认）"""
        from psycopg.conninfo import conninfo_to_dict

        try:
            named = conninfo_to_dict(self.supabase_db_url or "").get("sslmode")
        except Exception:  # a URL libpq cannot read fails at connect with its own message
            named = None
        return named or ("require" if self.spool_mode == "cloud" else None)

    def require_complete(self) -> None:
        """云模式下缺少必需配置、带密钥的地址不是 https、或 JWT 密钥可被猜到时拒绝启动"""
        if self.spool_mode == "cloud":
            missing = self.missing_cloud_settings()
            if missing:
                raise RuntimeError("Cloud mode is missing required settings: " + ", ".join(missing))
            plain = [n.upper() for n in KEYED_URL_SETTINGS if urlsplit(getattr(self, n) or "").scheme == "http"]
            if plain:
                raise RuntimeError(f"Cloud mode sends keys to these URLs, so they must be https: {', '.join(plain)}")
            if self.db_sslmode() in WEAK_SSLMODES:
                raise RuntimeError(
                    f"SUPABASE_DB_URL asks for sslmode={self.db_sslmode()}, which may connect in clear: remove it"
                    " (cloud mode requires TLS) or use sslmode=verify-full with the project's CA."
                )
            if self.forgeable_jwt_secret():
                raise RuntimeError(
                    "SUPABASE_JWT_SECRET is a placeholder, a published default or shorter than"
                    f" {JWT_SECRET_MIN_LENGTH} characters, so anyone could sign tokens with it: set the project's"
                    " legacy JWT secret, or leave it unset if the project signs with asymmetric keys."
                )


def is_placeholder(value: str) -> bool:
    """值是否还是文档里的占位符"""
    return value.lower().startswith(PLACEHOLDER_PREFIXES) or any(mark in value for mark in PLACEHOLDER_MARKS)


@lru_cache
def get_settings() -> Settings:
    """获取缓存的配置对象"""
    # SPOOL_ENV_FILE set empty reads no .env: the test session sets it, so a developer's .env cannot reach it
    return Settings(_env_file=os.environ.get("SPOOL_ENV_FILE", ".env") or None)
