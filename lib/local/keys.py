"""The local issuer: an ES256 key pair and a service key under SPOOL_HOME, tokens shaped like Supabase Auth's."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from functools import cached_property
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

TOKEN_SECONDS = 3600


class LocalIssuer:
    """本地令牌签发者"""

    def __init__(self, home: Path, issuer: str):
        self.dir = Path(home) / "keys"
        self.issuer = issuer

    @cached_property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        path = self.dir / "jwt_es256.pem"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            path.touch(mode=0o600)
            path.write_bytes(pem)
        return serialization.load_pem_private_key(path.read_bytes(), password=None)

    @cached_property
    def public_jwk(self) -> dict:
        jwk = json.loads(ECAlgorithm.to_jwk(self.private_key.public_key()))
        jwk.update({"kid": self.kid, "alg": "ES256", "use": "sig", "key_ops": ["verify"]})
        return jwk

    @cached_property
    def kid(self) -> str:
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(der).hexdigest()[:16]

    def jwks(self) -> dict:
        """JWKS 文档"""
        return {"keys": [self.public_jwk]}

    def service_role_key(self) -> str:
        """本地服务密钥（sb_secret_ 格式，首次使用时生成）"""
        path = self.dir / "service_role_key"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text("sb_secret_" + secrets.token_urlsafe(32))
        return path.read_text().strip()

    def mint(self, user_id: str, email: str | None = None, *, seconds: int = TOKEN_SECONDS, **extra) -> str:
        """签发一个与 Supabase Auth 相同形状的访问令牌"""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user_id,
            "aud": "authenticated",
            "role": "authenticated",
            "email": email,
            "iat": now,
            "exp": now + seconds,
            "aal": "aal1",
            "session_id": secrets.token_hex(8),
            "is_anonymous": False,
            **extra,
        }
        return jwt.encode(claims, self.private_key, algorithm="ES256", headers={"kid": self.kid})
