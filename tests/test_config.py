"""Settings: defaults, and cloud mode refusing to start without what it needs."""

import re
import subprocess
from pathlib import Path

import pytest

from lib.config import Settings


def test_local_defaults():
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    assert defaults["spool_mode"] == "local" and defaults["spool_port"] == 8000
    assert defaults["spool_host"] == "127.0.0.1" and str(defaults["spool_home"]) == ".spool"
    settings = Settings(_env_file=None)
    assert settings.spool_home.is_absolute()
    settings.require_complete()  # local mode needs nothing


def cloud(**values) -> Settings:
    """云模式配置（只用给定的值，不读 .env）"""
    return Settings(_env_file=None, spool_mode="cloud", **values)


def test_cloud_mode_names_every_missing_setting():
    settings = cloud(
        supabase_url="https://x.supabase.co",
        supabase_db_url="",
        supabase_service_role_key="",
        stripe_secret_key="change-me",
        stripe_webhook_secret="",
    )
    with pytest.raises(RuntimeError) as refused:
        settings.require_complete()
    message = str(refused.value)
    for name in ("SUPABASE_DB_URL", "SUPABASE_SERVICE_ROLE_KEY", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"):
        assert name in message
    assert "SUPABASE_URL," not in message


def test_cloud_app_refuses_to_start(monkeypatch):
    from functions.app import create_app
    from lib.config import get_settings

    monkeypatch.setenv("SPOOL_MODE", "cloud")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "")
    get_settings.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="SUPABASE_SERVICE_ROLE_KEY"):
            create_app()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_cloud_mode_accepts_secret_keys():
    settings = cloud(
        supabase_url="https://x.supabase.co",
        supabase_db_url="postgresql://u:p@h:6543/postgres",
        supabase_service_role_key="sb_secret_abc",
        stripe_secret_key="sk_test_1",
        stripe_webhook_secret="whsec_1",
    )
    settings.require_complete()
    assert settings.jwks_url == "https://x.supabase.co/auth/v1/.well-known/jwks.json"
    assert settings.auth_issuer == "https://x.supabase.co/auth/v1"


COMPLETE = {
    "supabase_url": "https://x.supabase.co",
    "supabase_db_url": "postgresql://u:p@h:6543/postgres",
    "supabase_service_role_key": "sb_secret_abc",
    "stripe_secret_key": "sk_test_1",
    "stripe_webhook_secret": "whsec_1",
}


@pytest.mark.parametrize(
    "secret",
    [
        "...",  # the deploy steps' `SUPABASE_JWT_SECRET=...`, copied as written
        "jwt-secret",
        "super-secret-jwt-token-with-at-least-32-characters-long",  # the Supabase CLI's local default
        "your-super-secret-jwt-token-with-at-least-32-characters-long",  # self-hosting's example
    ],
)
def test_cloud_mode_refuses_a_jwt_secret_anyone_could_sign_with(secret):
    """云模式下 SUPABASE_JWT_SECRET 是占位符、公开的默认值或不足 32 个字符：拒绝启动（否则谁都能签发令牌）"""
    settings = cloud(**COMPLETE, supabase_jwt_secret=secret)
    with pytest.raises(RuntimeError, match="SUPABASE_JWT_SECRET"):
        settings.require_complete()
    assert "SUPABASE_JWT_SECRET" not in str(settings.missing_cloud_settings())  # optional, not missing


def test_cloud_mode_takes_a_real_jwt_secret_or_none():
    cloud(**COMPLETE, supabase_jwt_secret="Qk3v9x" * 7).require_complete()
    cloud(**COMPLETE, supabase_jwt_secret="").require_complete()  # empty is unset: HS256 tokens are refused
    cloud(**COMPLETE).require_complete()


@pytest.mark.parametrize("name", ["supabase_url", "stripe_api_base", "kling_api_base"])
def test_cloud_mode_sends_its_keys_over_https_only(name):
    """云模式下带着密钥去访问的地址须是 https：http 会把服务密钥、Stripe 密钥、Kling 令牌明文发出去"""
    for url in ("http://x.supabase.co", "HTTP://x.supabase.co"):
        settings = cloud(**{**COMPLETE, name: url})
        assert settings.missing_cloud_settings() == []
        with pytest.raises(RuntimeError, match=name.upper()):
            settings.require_complete()


async def test_openapi_docs_are_served(client):
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    assert {"/tasks", "/tasks/{task_id}/cancel", "/assets/uploads", "/billing/checkout"} <= set(spec["paths"])


def test_placeholders_copied_from_the_docs_count_as_missing():
    settings = cloud(
        supabase_url="https://<project-ref>.supabase.co",
        supabase_db_url="postgresql://postgres.<project-ref>:<password>@aws-0-<region>.pooler.supabase.com:6543/postgres",
        supabase_service_role_key="sb_secret_...",
        stripe_secret_key="sk_test_...",
        stripe_webhook_secret="whsec_1",
    )
    assert settings.missing_cloud_settings() == [
        "SUPABASE_URL",
        "SUPABASE_DB_URL",
        "SUPABASE_SERVICE_ROLE_KEY",
        "STRIPE_SECRET_KEY",
    ]


def test_origin_lists_read_json_or_comma_separated(monkeypatch):
    monkeypatch.setenv("CORS_ORIGINS", "https://app.example.com, https://admin.example.com")
    monkeypatch.setenv("BILLING_ALLOWED_ORIGINS", '["https://app.example.com"]')
    settings = Settings(_env_file=None)
    assert settings.cors_origins == ["https://app.example.com", "https://admin.example.com"]
    assert settings.billing_allowed_origins == ["https://app.example.com"]


@pytest.mark.parametrize("name", ["BILLING_SUCCESS_URL", "SUPABASE_URL", "KLING_API_BASE", "PUBLIC_URL"])
def test_a_url_setting_that_is_not_a_url_is_refused_by_name(monkeypatch, name):
    monkeypatch.setenv(name, "localhost:3000/billing")
    with pytest.raises(ValueError, match=f"(?is){name}.*http\\(s\\) URL"):
        Settings(_env_file=None)


def test_an_empty_optional_url_is_unset(monkeypatch):
    monkeypatch.setenv("STRIPE_API_BASE", "")
    monkeypatch.setenv("PUBLIC_URL", " ")
    settings = Settings(_env_file=None)
    assert settings.stripe_api_base is None and settings.public_url is None


def test_a_kling_deadline_past_the_jobs_own_limit_is_refused():
    from pydantic import ValidationError

    from lib.catalog import get_model

    limit = Settings.model_fields["kling_poll_deadline_seconds"].metadata
    assert any(getattr(m, "le", 0) < get_model("kling.text2video").timeout_s for m in limit)
    with pytest.raises(ValidationError, match="kling_poll_deadline_seconds"):
        Settings(_env_file=None, kling_poll_deadline_seconds=3600)


def test_a_developers_env_file_does_not_reach_the_tests(tmp_path, monkeypatch):
    """.env 里的设置（Kling 密钥、云端数据库、隧道地址）不进入测试会话与它启动的进程；make dev 照常读它"""
    import os
    import subprocess
    import sys

    from lib.config import get_settings
    from tests.conftest import ROOT

    (tmp_path / ".env").write_text("PUBLIC_URL=https://tunnel.example.test\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PUBLIC_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert get_settings().public_url is None
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    code = "from lib.config import get_settings; print(get_settings().public_url)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "None", done.stderr  # a server, worker or CLI the tests start
    env.pop("SPOOL_ENV_FILE", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "https://tunnel.example.test", done.stderr  # outside the tests


@pytest.mark.parametrize("port", [0, 65536, 80000])
def test_a_port_no_server_can_listen_on_is_refused_by_name(port):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="spool_port"):
        Settings(_env_file=None, spool_port=port)


CREDENTIAL = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|\b[sr]k_(?:live|test)_[0-9A-Za-z]{16,}"
    r"|\bwhsec_[0-9A-Za-z+/=]{20,}"
    r"|\bsb_secret_[0-9A-Za-z_-]{16,}"
    r"|\beyJ[0-9A-Za-z_-]{10,}\.eyJ[0-9A-Za-z_-]{10,}\.[0-9A-Za-z_-]{10,}"
    r"|\bAKIA[0-9A-Z]{16}\b"
)


def test_no_credential_is_committed():
    """仓库里不提交任何凭据（私钥、Stripe 与 Supabase 密钥、签名过的 JWT）；本地开发密钥每台机器自己生成在 SPOOL_HOME"""
    root = Path(__file__).resolve().parent.parent
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    found = []
    for name in listed.stdout.decode().split("\0"):
        path = root / name
        if name and path.is_file():
            found += [f"{name}: {m.group()[:12]}…" for m in CREDENTIAL.finditer(path.read_text(errors="ignore"))]
    assert found == []


def test_cloud_mode_connects_to_the_database_over_tls_only():
    """云模式下数据库连接要求 TLS：地址没写 sslmode → require；写了会明文连接的 sslmode → 拒绝启动"""
    db_url = COMPLETE["supabase_db_url"]
    assert cloud(**COMPLETE).db_sslmode() == "require"  # libpq's own default, prefer, falls back to plain text
    strict = f"{db_url}?sslmode=verify-full&sslrootcert=/ca.crt"
    assert cloud(**{**COMPLETE, "supabase_db_url": strict}).db_sslmode() == "verify-full"
    for weak in ("disable", "allow", "prefer"):
        settings = cloud(**{**COMPLETE, "supabase_db_url": f"{db_url}?sslmode={weak}"})
        with pytest.raises(RuntimeError, match=f"sslmode={weak}"):
            settings.require_complete()
    local = Settings(_env_file=None, supabase_db_url="postgresql://postgres@127.0.0.1:5432/postgres")
    assert local.db_sslmode() is None  # the embedded Postgres speaks no TLS


def test_the_pool_connects_with_the_sslmode_settings_ask_for(monkeypatch):
    """连接池的连接参数带上配置给出的 sslmode"""
    from lib import config, db

    monkeypatch.setattr(config.Settings, "db_sslmode", lambda self: "require")
    assert db.connect_kwargs()["sslmode"] == "require"
    monkeypatch.setattr(config.Settings, "db_sslmode", lambda self: None)
    assert "sslmode" not in db.connect_kwargs()
