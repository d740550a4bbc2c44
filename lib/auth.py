"""Verification of Supabase access tokens: asymmetric keys through the project's JWKS, legacy HS256."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from functools import cache

from lib.config import get_settings
from lib.errors import Unauthorized

log = logging.getLogger("spool.auth")
ASYMMETRIC_ALGS = ("ES256", "RS256")
LEEWAY_SECONDS = 30
VERIFIED_CACHE_SIZE = 4096


class TokenVerifier:
    """Supabase 访问令牌校验器"""

    def __init__(self):
        from jwt import PyJWKClient  # imported on first use: /health and cold starts don't pay for it

        settings = get_settings()
        self.issuer = settings.auth_issuer
        self.hs_secret = settings.supabase_jwt_secret
        # PyJWKClient caches the key set (lifespan) and refetches once on an unknown kid.
        self.jwks = PyJWKClient(
            settings.jwks_url,
            cache_jwk_set=True,
            lifespan=settings.jwks_cache_seconds,
            cache_keys=False,
            timeout=5,
            cooldown_duration=10,
        )
        # A browser sends the same token with every request for up to an hour: tokens that passed
        # verification are remembered (bounded LRU) until they expire, so repeats skip the signature check.
        self._verified: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()  # verify also runs in worker threads (first JWKS fetch)

    def verify(self, token: str) -> dict:
        """校验令牌并返回 claims（签名、过期、受众、签发者、sub）"""
        with self._lock:
            claims = self._verified.get(token)
            if claims is not None:
                if claims["exp"] + LEEWAY_SECONDS >= time.time():
                    self._verified.move_to_end(token)
                    return dict(claims)
                del self._verified[token]
        claims = self._verify_signed(token)
        with self._lock:
            self._verified[token] = claims
            if len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return dict(claims)

    def _verify_signed(self, token: str) -> dict:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("Malformed access token.") from None
        alg = header.get("alg")
        try:
            if alg in ASYMMETRIC_ALGS:
                # The PyJWK itself, not its raw key: PyJWT then refuses a header alg that is not the key's
                # (an RS256 header on an EC key's kid) instead of failing on the key type.
                kid = header.get("kid")
                claims = self._decode(token, self._cached_key(kid) or self.jwks.get_signing_key(kid), alg)
            elif alg == "HS256" and self.hs_secret:
                claims = self._decode(token, self.hs_secret, "HS256")
            else:
                raise Unauthorized("Unsupported token algorithm.")
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Access token expired.") from None
        except jwt.PyJWKClientConnectionError as exc:
            log.warning("could not fetch the JWKS from %s: %s", self.jwks.uri, exc)
            raise Unauthorized("Could not fetch the signing keys.") from None
        except jwt.PyJWTError:
            raise Unauthorized("Invalid access token.") from None
        try:
            uuid.UUID(str(claims.get("sub")))
        except ValueError:
            raise Unauthorized("Access token has no valid subject.") from None
        return claims

    def _decode(self, token: str, key, alg: str) -> dict:
        import jwt

        # One algorithm per key type: an HS256 token is never checked against a
        # public key and an ES256 token never against the shared secret.
        return jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience="authenticated",
            issuer=self.issuer,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "sub", "aud", "iss"]},
        )

    def _cached_key(self, kid) -> object | None:
        """缓存的密钥集里该 kid 的签名密钥（不联网、不等 PyJWKClient 的锁）；没有 → None"""
        cache = self.jwks.jwk_set_cache
        jwk_set = cache.get() if cache is not None else None
        if jwk_set is None or not kid:
            return None
        return next((key for key in jwk_set.keys if key.key_id == kid and key.public_key_use in ("sig", None)), None)

    def _needs_fetch(self, token: str) -> bool:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return False  # refused without a key
        return header.get("alg") in ASYMMETRIC_ALGS and self._cached_key(header.get("kid")) is None

    async def averify(self, token: str) -> dict:
        """异步校验：需要取 JWKS 时（缓存为空、kid 未知：密钥轮换或伪造）在线程中进行，不阻塞事件循环"""
        if token in self._verified or not self._needs_fetch(token):
            return self.verify(token)
        return await asyncio.to_thread(self.verify, token)


@cache
def get_token_verifier() -> TokenVerifier:
    """获取令牌校验器单例"""
    return TokenVerifier()


def reset_token_verifier() -> None:
    """丢弃缓存的校验器（配置变化后）"""
    get_token_verifier.cache_clear()
