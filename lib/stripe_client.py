"""The Stripe client: one lazily created `StripeClient` (async over httpx), pointed at STRIPE_API_BASE when set."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lib.config import get_settings
from lib.errors import ProviderUnavailable

if TYPE_CHECKING:
    import stripe

NETWORK_RETRIES = 2  # the library retries connection errors and 409/5xx answers, same idempotency key
TIMEOUT_SECONDS = 20

_client: stripe.StripeClient | None = None
_client_loop: asyncio.AbstractEventLoop | None = None


def get_stripe_client() -> stripe.StripeClient:
    """获取（必要时创建）Stripe 客户端"""
    global _client, _client_loop
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    # The httpx connection pool belongs to one event loop; a new loop gets a new client.
    if _client is None or (loop is not None and _client_loop is not loop):
        import stripe  # imported on first use: the web container's cold start does not pay for it

        settings = get_settings()
        if not settings.stripe_secret_key:
            raise ProviderUnavailable("Payments are not configured: STRIPE_SECRET_KEY is not set.")
        base_addresses = {"api": settings.stripe_api_base.rstrip("/")} if settings.stripe_api_base else None
        _client = stripe.StripeClient(
            settings.stripe_secret_key,
            base_addresses=base_addresses,
            max_network_retries=NETWORK_RETRIES,
            http_client=stripe.HTTPXClient(timeout=TIMEOUT_SECONDS),
        )
        _client_loop = loop
    return _client


def reset_stripe_client() -> None:
    """丢弃客户端（配置变更后下次重新创建）"""
    global _client, _client_loop
    _client, _client_loop = None, None
