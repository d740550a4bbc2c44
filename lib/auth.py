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
from lib.errors import ServiceUnavailable, Unauthorized

log = logging.getLogger("spool.auth")
ASYMMETRIC_ALGS = ("ES256", "RS256")
LEEWAY_SECONDS = 30
VERIFIED_CACHE_SIZE = 4096
JWKS_TIMEOUT_SECONDS = 5
# After a failed fetch, requests answer at once (with the last good keys, or a 503) instead of each waiting
# out its own time-out; an unknown kid (a rotation, or a forged token) refetches at most this often.
JWKS_RETRY_SECONDS = 5
JWKS_COOLDOWN_SECONDS = 10


class SigningKeys:
    """项目 JWKS 里的签名密钥：缓存 lifespan 秒；重新获取失败时沿用上次取到的密钥"""

    def __init__(self, url: str, lifespan: float):
        from jwt import PyJWKClient  # imported on first use: /health and cold starts don't pay for it

        # The client only fetches and parses; caching is ours, so an outage never drops keys we had.
        self.client = PyJWKClient(url, cache_jwk_set=False, cache_keys=False, timeout=JWKS_TIMEOUT_SECONDS)
        self.lifespan = lifespan
        self._keys: dict[str, object] = {}
        self._fetched_at: float | None = None  # monotonic time of the last good fetch
        self._failed_at: float | None = None
        self._lock = threading.Lock()  # one fetch at a time: requests that waited for it use its keys

    def cached(self, kid: str | None) -> object | None:
        """不联网即可用的密钥（密钥集未过期且含该 kid）；否则 None"""
        fresh = self._fetched_at is not None and time.monotonic() - self._fetched_at < self.lifespan
        return self._keys.get(kid) if fresh else None

    def get(self, kid: str | None) -> object:
        """kid 的签名密钥：缓存里没有时获取 JWKS；kid 未知 → 401，取不到且没有旧密钥 → 503"""
        if not kid:
            raise Unauthorized("Invalid access token.")
        key = self.cached(kid)
        if key is not None:
            return key
        known = self._keys.get(kid)
        # While another request fetches the key set again, a key we had serves at once: waiting for the fetch
        # would hold every request up for as long as the identity provider takes (up to the time-out).
        if not self._lock.acquire(blocking=known is None):
            return known
        try:
            return self.cached(kid) or self._refresh(kid)
        finally:
            self._lock.release()

    def _refresh(self, kid: str) -> object:
        import jwt

        now = time.monotonic()
        known = self._keys.get(kid)
        if self._failed_at is not None and now - self._failed_at < JWKS_RETRY_SECONDS:
            return self._last_good(known)
        if known is None and self._fetched_at is not None and now - self._fetched_at < JWKS_COOLDOWN_SECONDS:
            raise Unauthorized("Invalid access token.")  # an unknown kid just after a fetch
        try:
            keys = self.client.get_signing_keys(refresh=True)
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, ValueError, OSError) as exc:  # down, cut off, not keys
            self._failed_at = time.monotonic()  # the back-off counts from the failure: a time-out takes seconds
            log.warning("could not fetch the JWKS from %s: %s", self.client.uri, exc)
            return self._last_good(known)
        self._keys = {key.key_id: key for key in keys}
        self._fetched_at, self._failed_at = time.monotonic(), None
        if kid not in self._keys:
            raise Unauthorized("Invalid access token.")
        return self._keys[kid]

    @staticmethod
    def _last_good(known: object | None) -> object:
        # A key we had stays good while the key set cannot be fetched: an outage of the identity provider
        # must not sign everyone out (clients drop their session on a 401).
        if known is None:
            raise ServiceUnavailable("Sign-in keys could not be fetched. Please try again in a few seconds.")
        return known


class TokenVerifier:
    """Supabase 访问令牌校验器"""

    def __init__(self):
        settings = get_settings()
        self.issuer = settings.auth_issuer
        self.hs_secret = settings.supabase_jwt_secret
        self.keys = SigningKeys(settings.jwks_url, settings.jwks_cache_seconds)
        # A browser sends the same token with every request for up to an hour: tokens that passed
        # verification are remembered (bounded LRU) until they expire, so repeats skip the signature check.
        # Each with the kid that signed it (None: HS256), so a key the project revokes stops its tokens too.
        self._verified: OrderedDict[str, tuple[dict, str | None]] = OrderedDict()
        self._lock = threading.Lock()  # verify also runs in worker threads (JWKS fetches)

    def verify(self, token: str) -> dict:
        """校验令牌并返回 claims（签名、过期、受众、签发者、sub、role）"""
        claims = self._remembered(token)
        if claims is not None:
            return claims
        claims, kid = self._verify_signed(token)
        with self._lock:
            self._verified[token] = (claims, kid)
            if len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return dict(claims)

    async def averify(self, token: str) -> dict:
        """异步校验：需要取 JWKS 时（缓存过期、kid 未知：密钥轮换或伪造）在线程中进行，不阻塞事件循环"""
        claims = self._remembered(token)
        if claims is not None:
            return claims
        if self._needs_fetch(token):
            return await asyncio.to_thread(self.verify, token)
        return self.verify(token)

    def _remembered(self, token: str) -> dict | None:
        """之前验证过、尚未过期、签名密钥仍在当前密钥集里的令牌的 claims；否则 None（重新校验）"""
        with self._lock:
            remembered = self._verified.get(token)
            if remembered is None:
                return None
            claims, kid = remembered
            if claims["exp"] + LEEWAY_SECONDS < time.time():
                del self._verified[token]
                return None
            if kid is not None and self.keys.cached(kid) is None:
                # The key set is due for a fetch: the full check fetches it, and refuses a key no longer listed.
                return None
            self._verified.move_to_end(token)
            return dict(claims)

    def _verify_signed(self, token: str) -> tuple[dict, str | None]:
        """校验签名与各项 claims；返回 (claims, 签名密钥的 kid，HS256 为 None)"""
        import jwt

        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthorized("Malformed access token.") from None
        exp = unverified.get("exp")
        if isinstance(exp, int | float) and exp + LEEWAY_SECONDS < time.time():
            # Refused before any key is fetched: a tab waking up sends its old token first.
            raise Unauthorized("Access token expired.")
        alg = header.get("alg")
        try:
            if alg in ASYMMETRIC_ALGS:
                kid = header.get("kid")
                # The PyJWK itself, not its raw key: PyJWT then refuses a header alg that is not the key's
                # (an RS256 header on an EC key's kid) instead of failing on the key type.
                claims = self._decode(token, self.keys.get(kid), alg)
            elif alg == "HS256" and self.hs_secret:
                kid = None
                claims = self._decode(token, self.hs_secret, "HS256")
            else:
                raise Unauthorized("Unsupported token algorithm.")
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Access token expired.") from None
        except jwt.PyJWTError:
            raise Unauthorized("Invalid access token.") from None
        if type(claims["exp"]) not in (int, float):
            # PyJWT takes "1735689600" too, but a remembered token's expiry is compared as a number.
            raise Unauthorized("Invalid access token.")
        sub = claims.get("sub")
        try:
            canonical = str(uuid.UUID(sub)) == sub  # Supabase's user ids; not '{...}' or 'urn:uuid:' spellings
        except (TypeError, ValueError, AttributeError):
            canonical = False
        if not canonical:
            raise Unauthorized("Access token has no valid subject.")
        if claims.get("role") != "authenticated":  # a signed-in user's token, not an anon or service key's
            raise Unauthorized("Access token is not a signed-in user's.")
        return claims, kid

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

    def _needs_fetch(self, token: str) -> bool:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return False  # refused without a key
        return header.get("alg") in ASYMMETRIC_ALGS and self.keys.cached(header.get("kid")) is None


@cache
def get_token_verifier() -> TokenVerifier:
    """获取令牌校验器单例"""
    return TokenVerifier()


def reset_token_verifier() -> None:
    """丢弃缓存的校验器（配置变化后）"""
    get_token_verifier.cache_clear()
