"""Logging for every entry point: one format, and no credentials in the lines libraries write."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# httpx logs each request's URL at INFO: a signed storage URL there is a working key to a user's file.
QUIET = ("httpx", "httpcore")


def configure_logging(level: str | int) -> None:
    """配置日志：统一格式；httpx 只记警告（它的请求行含签名 URL）"""
    logging.basicConfig(level=level, format=FORMAT)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
