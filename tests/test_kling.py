"""Kling provider tasks: the real runner against a local server that behaves as the Kling API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import httpx
import jwt
import pytest
from pydantic import ValidationError

from gpu_jobs import providers
from gpu_jobs.handlers import JobContext
from gpu_jobs.providers import (
    AccessRefused,
    DownloadRefused,
    ProviderBusy,
    ProviderError,
    ProviderJob,
    _minutes,
    download_file,
    public_only,
    submit_or_resume,
    waiting_fraction,
)
from gpu_jobs.providers.kling import JobNotFound, KlingProvider, refusal_message
from gpu_jobs.runner import run_task_async
from lib.catalog import KlingParams
from lib.config import get_settings
from lib.errors import TaskCanceled, TransientError
from lib.reaper import reap
from tests.conftest import ROOT
from tests.factories import balance, job_state, ledger, make_asset, set_balance, sql, task_row
from tests.fake_kling import FakeKling

AK, SK = "ak-test-access", "sk-test-secret-key-long-enough-for-hs256"
KLING_ENV = (
    "KLING_AI_ACCESS_KEY",
    "KLING_AI_SECRET_KEY",
    "KLING_API_BASE",
    "KLING_POLL_INTERVAL_SECONDS",
    "KLING_POLL_DEADLINE_SECONDS",
)


def set_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """假 Kling 生成的视频"""
    from tests.media_factories import make_video

    return make_video(tmp_path_factory.mktemp("kling") / "clip.mp4", 64, 48, frames=12, fps=12, audio=False)


@contextlib.contextmanager
def serving_kling(video):
    """运行中的假 Kling，且配置指向它（轮询间隔极短）"""
    fake = FakeKling(access_key=AK, secret_key=SK, video=video).start()
    saved = {name: os.environ.get(name) for name in KLING_ENV}
    set_env(
        {
            "KLING_AI_ACCESS_KEY": AK,
            "KLING_AI_SECRET_KEY": SK,
            "KLING_API_BASE": fake.url,
            "KLING_POLL_INTERVAL_SECONDS": "0.01",
            "KLING_POLL_DEADLINE_SECONDS": "30",
        }
    )
    try:
        yield fake
    finally:
        fake.stop()
        set_env(saved)


@pytest.fixture
def kling(clip):
    with serving_kling(clip) as fake:
        yield fake


@pytest.fixture
def no_kling():
    saved = {name: os.environ.get(name) for name in KLING_ENV}
    set_env({"KLING_AI_ACCESS_KEY": None, "KLING_AI_SECRET_KEY": None})
    yield
    set_env(saved)


async def create(client, user, model: str = "kling.text2video", **params) -> dict:
    if model == "kling.text2video":
        params.setdefault("prompt", "a paper boat sailing down a rainy street")
    resp = await client.post("/tasks", json={"model_key": model, "params": params}, headers=user.headers)
    assert resp.status_code == 201, resp.text
    return resp.json()["data"]


def kinds(user, task) -> list[str]:
    return [e["kind"] for e in ledger(user.id, task["id"])]


def outputs(task) -> list[dict]:
    return sql("select * from public.assets where source_task_id = %s", (task["id"],))


def submitted_earlier(kling: FakeKling, task_id: str, state: dict | None) -> None:
    """之前的一次尝试已提交了 Kling 任务，却在保存其 id 之前死去（state：它留下的作业状态）"""
    with KlingProvider(access_key=AK, secret_key=SK, base_url=kling.url, endpoint="text2video") as provider:
        provider.submit(external_id=task_id, params=KlingParams(prompt="a paper boat"), inputs={})
    if state is not None:
        sql("insert into public.task_job_states (task_id, state) values (%s, %s)", (task_id, json.dumps(state)))


async def wait_until(predicate, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- the adapter alone


def test_token_has_kling_header_and_claims():
    provider = KlingProvider(
        access_key=AK, secret_key=SK, base_url="http://kling.test", endpoint="text2video", clock=lambda: 1_000_000
    )
    token = provider.token()
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(token, SK, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})
    assert claims == {"iss": AK, "exp": 1_001_800, "nbf": 999_940}  # a minute early: our clock may run ahead


def mock_provider(*answers: httpx.Response, api=None, **options) -> tuple[KlingProvider, list[httpx.Request]]:
    """一个 Kling 适配器：按顺序给出这些应答（或由 api 回答），以及它发出的请求"""
    queue, sent = list(answers), []

    def replay(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return queue.pop(0)

    provider = KlingProvider(
        access_key=AK,
        secret_key=SK,
        base_url="http://kling.test",
        endpoint="text2video",
        retry_base=0.001,
        transport=httpx.MockTransport(api or replay),
        **options,
    )
    return provider, sent


def kling_ok(data) -> httpx.Response:
    return httpx.Response(200, json={"code": 0, "message": "SUCCEED", "request_id": "r", "data": data})


def test_a_fresh_token_is_minted_for_every_request_and_every_retry():
    now = [1_000_000.0]
    sent: list[int] = []
    answers = [429, 200, 200, 500, 200]

    def kling_api(request: httpx.Request) -> httpx.Response:
        token = request.headers["Authorization"].removeprefix("Bearer ")
        claims = jwt.decode(token, SK, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})
        assert claims["nbf"] <= now[0] < claims["exp"]  # valid at the moment it is sent
        sent.append(claims["exp"])
        now[0] += 1000  # time passes between requests: a reused token would expire
        status = answers.pop(0)
        if status != 200:
            return httpx.Response(status, json={"code": 1302 if status == 429 else 5000, "message": "busy"})
        return kling_ok({"task_id": "kt-1", "task_status": "processing"})

    provider, _ = mock_provider(api=kling_api, clock=lambda: now[0])
    for _ in range(3):
        assert provider.status("kt-1").state == "running"
    assert len(sent) == 5 and len(set(sent)) == 5


def test_an_answer_that_is_not_klings_is_retried_not_taken_as_a_refusal():
    provider, sent = mock_provider(
        httpx.Response(200, text="<html>gateway hiccup</html>"),
        httpx.Response(404, text="Not Found"),
        kling_ok({"task_id": "kt-1", "task_status": "processing"}),
    )
    assert provider.status("kt-1").state == "running" and len(sent) == 3


def test_lookups_wait_less_for_an_answer_than_a_submit():
    provider, sent = mock_provider(
        kling_ok({"task_id": "kt-1", "task_status": "submitted"}),
        kling_ok({"task_id": "kt-1", "task_status": "processing"}),
    )
    provider.submit(external_id="our-task", params=KlingParams(prompt="a boat"), inputs={})
    provider.status("kt-1")
    post, get = (r.extensions["timeout"] for r in sent)
    assert post["read"] == 60 and get["read"] == 15  # the submit carries up to 10 MB of image
    assert post["connect"] == get["connect"] == 10


def test_a_status_poll_gives_up_on_a_slow_answer_after_its_own_time_out(kling):
    options = {"base_url": kling.url, "endpoint": "text2video", "retry_base": 0.001, "lookup_timeout_s": 0.3}
    with KlingProvider(access_key=AK, secret_key=SK, **options) as provider:
        job_id = provider.submit(external_id="our-task", params=KlingParams(prompt="a boat"), inputs={})
        kling.hold_first_poll = True  # the first poll is answered only after 30 s
        assert provider.status(job_id).state == "queued"
    assert kling.polls == [job_id, job_id]  # given up on the held answer, then asked again


def test_a_bare_403_on_a_status_poll_is_retried_not_taken_as_a_refusal():
    provider, sent = mock_provider(
        httpx.Response(403, text="<html>Access denied</html>"),  # a proxy's or firewall's page, no Kling code
        kling_ok({"task_id": "kt-1", "task_status": "processing"}),
    )
    assert provider.status("kt-1").state == "running" and len(sent) == 2


def test_a_403_with_klings_account_code_on_a_status_poll_stays_a_refusal():
    provider, sent = mock_provider(httpx.Response(403, json={"code": 1103, "message": "no access to this resource"}))
    with pytest.raises(ProviderError) as refused:
        provider.status("kt-1")
    assert "problem on our side" in refused.value.message and len(sent) == 1


def test_a_submit_answered_by_a_bare_403_stays_refused():
    provider, sent = mock_provider(httpx.Response(403, text="<html>Access denied</html>"))
    with pytest.raises(ProviderError) as refused:  # nothing was created: no lookup, no retry
        provider.submit(external_id="our-task", params=KlingParams(prompt="a boat"), inputs={})
    assert "problem on our side" in refused.value.message and [r.method for r in sent] == ["POST"]


@pytest.mark.parametrize(
    "task_result",
    [{"videos": {"url": "http://x"}}, {"videos": ["http://x"]}, {"videos": [{"url": 7}]}, "done", ["x"]],
)
def test_a_finished_job_of_unexpected_shape_is_waited_for_three_polls_then_fails(task_result):
    answer = {"task_id": "kt-1", "task_status": "succeed", "task_result": task_result}
    provider, _ = mock_provider(*[kling_ok(answer) for _ in range(3)])
    assert provider.status("kt-1").state == "unknown"  # no video to fetch yet: polled again
    assert provider.status("kt-1").state == "unknown"
    with pytest.raises(ProviderError) as failed:
        provider.status("kt-1")
    assert failed.value.message == "Kling finished without a video. Your credits were refunded."


def test_only_consecutive_answers_without_a_video_count():
    empty = {"task_id": "kt-1", "task_status": "succeed", "task_result": {"videos": []}}
    running = {"task_id": "kt-1", "task_status": "processing"}
    provider, _ = mock_provider(*[kling_ok(a) for a in (empty, empty, running, empty, empty)])
    assert [provider.status("kt-1").state for _ in range(5)] == ["unknown", "unknown", "running", "unknown", "unknown"]


def test_one_second_reads_in_the_singular():
    assert [_minutes(s) for s in (1, 0.5, 30, 60, 90)] == [
        "1 second",
        "0.5 seconds",
        "30 seconds",
        "1 minute",
        "1.5 minutes",
    ]


def test_a_submit_accepted_without_a_job_id_adopts_the_job_by_our_id():
    provider, sent = mock_provider(
        kling_ok({"task_status": "submitted"}),
        kling_ok({"task_id": "kt-9", "task_status": "submitted"}),
    )
    job_id = provider.submit(external_id="our-task", params=KlingParams(prompt="a boat"), inputs={})
    assert job_id == "kt-9" and [r.method for r in sent] == ["POST", "GET"]
    assert sent[1].url.path == "/v1/videos/text2video/our-task"


@pytest.mark.parametrize(("status", "code"), [(401, 1004), (401, 1003), (400, 1002), (401, None)])
def test_a_refused_token_is_an_access_refusal_not_retried(status, code):
    provider, sent = mock_provider(httpx.Response(status, json={"code": code, "message": "Authorization is invalid"}))
    with pytest.raises(AccessRefused) as refused:
        provider.status("kt-1")
    assert isinstance(refused.value, ProviderError) and "problem on our side" in refused.value.message
    assert len(sent) == 1


def test_a_rate_limited_lookup_after_a_lost_submit_answer_leaves_the_submit_unclear():
    lost = httpx.Response(500, json={"code": 5000, "message": "Server internal error"})
    limited = httpx.Response(429, json={"code": 1302, "message": "rate limit exceeded"})
    provider, sent = mock_provider(lost, *[limited] * 5, retries=4)
    with pytest.raises(ProviderBusy) as busy:
        provider.submit(external_id="our-task", params=KlingParams(prompt="a boat"), inputs={})
    assert busy.value.ambiguous  # the job may exist: the next attempt looks it up before submitting again
    assert [r.method for r in sent] == ["POST", *["GET"] * 5]


def test_a_refused_token_on_the_lookup_after_a_lost_submit_answer_leaves_the_submit_unclear():
    provider, sent = mock_provider(
        httpx.Response(500, json={"code": 5000, "message": "Server internal error"}),
        httpx.Response(401, json={"code": 1003, "message": "Authorization is not yet valid"}),
    )
    with pytest.raises(ProviderBusy) as busy:
        provider.submit(external_id="our-task", params=KlingParams(prompt="a boat"), inputs={})
    assert busy.value.ambiguous and [r.method for r in sent] == ["POST", "GET"]


def test_a_submit_refused_for_our_existing_id_adopts_the_job():
    provider, sent = mock_provider(
        httpx.Response(400, json={"code": 1201, "message": "external_task_id already exists"}),
        kling_ok({"task_id": "kt-7", "task_status": "processing"}),
    )
    assert provider.submit(external_id="our-task", params=KlingParams(prompt="a boat"), inputs={}) == "kt-7"
    assert [r.method for r in sent] == ["POST", "GET"] and sent[1].url.path == "/v1/videos/text2video/our-task"


def test_a_submit_refused_for_our_existing_id_whose_lookups_miss_stays_unclear():
    """The job exists (Kling says so) though its lookup has not caught up: never refunded while Kling runs it."""
    missing = httpx.Response(404, json={"code": 1203, "message": "The requested resource does not exist"})
    provider, sent = mock_provider(
        httpx.Response(400, json={"code": 1201, "message": "external_task_id already exists"}), *[missing] * 5
    )
    with pytest.raises(ProviderBusy) as busy:
        provider.submit(external_id="our-task", params=KlingParams(prompt="a boat"), inputs={})
    assert busy.value.ambiguous and busy.value.exists and [r.method for r in sent] == ["POST", *["GET"] * 5]


def test_a_submit_refused_for_its_parameters_without_a_job_stays_refused():
    missing = httpx.Response(404, json={"code": 1203, "message": "The requested resource does not exist"})
    provider, sent = mock_provider(
        httpx.Response(400, json={"code": 1201, "message": "prompt is too long"}), *[missing] * 5, retries=4
    )
    with pytest.raises(ProviderError) as refused:
        provider.submit(external_id="our-task", params=KlingParams(prompt="a boat"), inputs={})
    assert "prompt is too long" in refused.value.message and not isinstance(refused.value, JobNotFound)
    assert [r.method for r in sent] == ["POST", *["GET"] * 5]  # looked up with the late-lookup retry


class OneJobProvider:
    """一个只会接受或查找一个任务的提供方（submit 的回答丢失时抛出不明确的 ProviderBusy）"""

    name = "Kling"

    def __init__(self, *, lose_answer: bool):
        self.lose_answer = lose_answer

    def submit(self, *, external_id, params, inputs, submit_by=None) -> str:
        """提交：回答丢失或返回任务 id"""
        if self.lose_answer:
            raise ProviderBusy("no answer", ambiguous=True)
        return "kt-1"

    def find(self, external_id):
        """按我们的 id 找到任务"""
        return ProviderJob(job_id="kt-1", state="running", raw_state="processing")


def job_context(workdir: Path, progress=lambda *a, **k: None, **state) -> JobContext:
    """提供方流程直接调用时的任务上下文（无参数、无输入）"""
    return JobContext(
        task_id="our-task", params=None, inputs={}, input_meta={}, workdir=workdir, progress=progress, state=state
    )


def test_a_job_adopted_by_our_id_keeps_the_deadline_of_its_first_submit(tmp_path):
    ctx = job_context(tmp_path)
    before = time.time()
    with pytest.raises(TransientError):  # the submit's answer was lost: the attempt ends before the id is known
        submit_or_resume(ctx, OneJobProvider(lose_answer=True), deadline_s=60, interval_s=0.01)
    assert ctx.state["provider_submitting"] is True and before <= ctx.state["provider_submitted_at"] <= time.time()
    first = ctx.state["provider_submitted_at"]
    time.sleep(0.05)
    job_id, started_at = submit_or_resume(ctx, OneJobProvider(lose_answer=False), deadline_s=60, interval_s=0.01)
    assert (job_id, started_at) == ("kt-1", first) and ctx.state["provider_submitted_at"] == first


def test_a_submit_refused_as_an_unknown_resource_is_a_refusal_not_a_lost_job():
    provider, _ = mock_provider(httpx.Response(404, json={"code": 1203, "message": "model is not exist"}))
    with pytest.raises(ProviderError) as refused:
        provider.submit(external_id="t", params=KlingParams(prompt="a boat"), inputs={})
    assert "model is not exist" in refused.value.message and not isinstance(refused.value, JobNotFound)


@pytest.mark.parametrize(
    ("job_id", "name"),
    [
        ("../../x/y", "kling-xy.mp4"),
        ("/etc/passwd", "kling-etcpasswd.mp4"),
        ("../..", "kling-video.mp4"),  # nothing usable left
        ("kt-" + "a" * 500, "kling-kt-" + "a" * 61 + ".mp4"),
    ],
)
def test_the_downloaded_file_stays_in_its_folder_whatever_the_job_id(tmp_path, job_id, name):
    provider, _ = mock_provider(api=lambda request: httpx.Response(200, content=b"video"))
    dest_dir = tmp_path / "work"
    dest_dir.mkdir()
    job = ProviderJob(job_id=job_id, state="succeeded", raw_state="succeed", result_urls=("http://kling.test/v.mp4",))
    path = provider.fetch_result(job, dest_dir)
    assert path == dest_dir / name and path.read_bytes() == b"video"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [name]


def test_a_redirect_loop_on_the_download_is_retried_then_reported_as_temporary(tmp_path):
    def loop(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": str(request.url)})

    with httpx.Client(transport=httpx.MockTransport(loop), follow_redirects=True) as http:
        with pytest.raises(ProviderBusy):
            download_file(http, "http://cdn.test/v.mp4", tmp_path / "v.mp4", max_bytes=10, delays=[0.0], what="Kling")


def checked_download(http: httpx.Client, url: str, tmp_path, *, exempt: str) -> Path:
    """下载一个小文件，地址经 public_only 检查"""
    return download_file(
        http, url, tmp_path / "v.mp4", max_bytes=10, delays=[0.0], what="Kling", check_url=public_only(exempt=exempt)
    )


def resolving_to(monkeypatch, *addresses: str) -> None:
    """让下载地址检查把任何主机名解析为这些地址"""

    def getaddrinfo(host, port, *args, **kwargs):
        """任何主机名都解析为给定的地址"""
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_download_follows_redirects_between_public_https_hosts(tmp_path, monkeypatch):
    resolving_to(monkeypatch, "93.184.216.34")
    seen: list[tuple[str, str, str]] = []

    def cdn(request: httpx.Request) -> httpx.Response:
        """cdn.test 重定向到 edge.test（相对地址再跳一次），后者给出视频"""
        assert request.headers["connection"] == "close"
        seen.append((request.headers["host"], request.extensions.get("sni_hostname"), str(request.url)))
        if request.headers["host"] == "cdn.test":
            return httpx.Response(302, headers={"Location": "https://edge.test/v.mp4?sig=1"})
        if request.url.path == "/v.mp4":
            return httpx.Response(302, headers={"Location": "/final.mp4"})
        return httpx.Response(200, content=b"video")

    with httpx.Client(transport=httpx.MockTransport(cdn)) as http:
        path = checked_download(http, "https://cdn.test/v.mp4", tmp_path, exempt="http://kling.test")
    # Each hop connects to the address that was checked, named for TLS and HTTP by its host: a DNS answer that
    # changes after the check (a rebinding) cannot send the request elsewhere.
    assert path.read_bytes() == b"video" and seen == [
        ("cdn.test", "cdn.test", "https://93.184.216.34/v.mp4"),
        ("edge.test", "edge.test", "https://93.184.216.34/v.mp4?sig=1"),
        ("edge.test", "edge.test", "https://93.184.216.34/final.mp4"),
    ]


@pytest.mark.parametrize(
    ("url", "addresses"),
    [
        ("http://cdn.test/v.mp4", ["93.184.216.34"]),  # not https
        ("https://cdn.test/v.mp4", ["10.0.0.1"]),
        ("https://cdn.test/v.mp4", ["93.184.216.34", "127.0.0.1"]),  # one private answer is enough
        ("https://cdn.test/v.mp4", ["169.254.169.254"]),
        ("https://cdn.test/v.mp4", ["::1"]),
        ("https://cdn.test/v.mp4", ["::ffff:192.168.1.1"]),
        ("https://cdn.test/v.mp4", ["0.0.0.0"]),
        ("https://cdn.test/v.mp4", ["224.0.0.1"]),
        ("https://cdn.test/v.mp4", ["240.0.0.1"]),
        ("http://kling.test:8080/v.mp4", ["93.184.216.34"]),  # the API's host, another port
        ("https://kling.test/v.mp4", ["127.0.0.1"]),  # the API's host, another scheme: not exempt
    ],
)
def test_a_download_address_that_is_not_public_https_is_refused_before_connecting(
    tmp_path, monkeypatch, url, addresses
):
    resolving_to(monkeypatch, *addresses)
    sent: list[httpx.Request] = []
    with httpx.Client(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200))) as http:
        with pytest.raises(ProviderError) as refused:
            checked_download(http, url, tmp_path, exempt="http://kling.test")
    assert sent == [] and "refunded" in refused.value.message and not isinstance(refused.value, DownloadRefused)


def test_the_api_origin_is_exempt(tmp_path, monkeypatch):
    resolving_to(monkeypatch, "127.0.0.1")
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, content=b"v"))) as http:
        path = checked_download(http, "http://kling.test:80/files/v.mp4", tmp_path, exempt="http://kling.test/")
    assert path.read_bytes() == b"v"


def trickling(pieces: int, pause: float):
    """一个慢慢吐出视频的下载地址（每 pause 秒一个字节）及其请求记录"""
    sent: list[httpx.Request] = []

    def cdn(request: httpx.Request) -> httpx.Response:
        """每个请求都慢慢地回答"""
        sent.append(request)

        def body():
            """逐字节产出"""
            for _ in range(pieces):
                time.sleep(pause)
                yield b"x"

        return httpx.Response(200, content=body())

    return httpx.MockTransport(cdn), sent


def test_a_cancel_stops_a_download_within_one_chunk(tmp_path):
    transport, sent = trickling(1000, 0.01)
    chunks: list[int] = []

    def cancel_after_three() -> None:
        """第三块之后任务被取消"""
        chunks.append(1)
        if len(chunks) == 3:
            raise TaskCanceled("t")

    with httpx.Client(transport=transport) as http:
        with pytest.raises(TaskCanceled):
            download_file(
                http,
                "http://cdn.test/v.mp4",
                tmp_path / "v.mp4",
                max_bytes=10**6,
                delays=[0.0],
                what="Kling",
                on_chunk=cancel_after_three,
            )
    assert len(chunks) == 3 and len(sent) == 1


def test_a_download_slower_than_its_time_limit_is_temporary_and_not_retried(tmp_path):
    transport, sent = trickling(1000, 0.01)
    with httpx.Client(transport=transport) as http:  # the whole trickle would take 10 s
        with pytest.raises(ProviderBusy) as slow:
            download_file(
                http,
                "http://cdn.test/v.mp4",
                tmp_path / "v.mp4",
                max_bytes=10**6,
                delays=[0.0, 0.0],
                what="Kling",
                time_limit=0.3,
            )
    assert len(sent) == 1 and "0.3 seconds" in str(slow.value)


def test_a_blank_prompt_is_refused_before_charging():
    with pytest.raises(ValidationError):
        KlingParams(prompt=" \n\t ")
    assert KlingParams(prompt="  a boat ").prompt == "a boat"


def test_refusals_read_as_plain_words():
    assert "content rules" in refusal_message(400, 1301, "Trigger the content security policy")
    assert "problem on our side" in refusal_message(401, 1004, "Authorization is expired")
    assert "problem on our side" in refusal_message(429, 1102, "Resource pack exhausted")
    message = refusal_message(400, 1201, "prompt is too long")
    assert "prompt is too long" in message and "refunded" in message


def test_waiting_progress_rises_but_never_reaches_the_download():
    deadline = 1800
    queued = [waiting_fraction("queued", t, deadline) for t in (0, 10, 100, 10_000)]
    running = [waiting_fraction("running", t, deadline) for t in (0, 10, 100, 600, 1799, 10**9)]
    assert queued == sorted(queued) and max(queued) <= 0.3
    assert running == sorted(running) and running[0] >= 0.3 and max(running) < 0.9


class ScriptedProvider:
    """按脚本回答状态查询的提供方（每次查询一个状态，最后一个重复）"""

    name = "Kling"

    def __init__(self, *states: str):
        self.states = list(states)

    def status(self, job_id: str) -> ProviderJob:
        """下一个状态"""
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return ProviderJob(job_id=job_id, state=state, raw_state=state)


def test_generating_after_a_long_queue_starts_where_the_queue_left_the_progress(tmp_path):
    reports: list[tuple[float, str | None]] = []
    ctx = job_context(tmp_path, lambda fraction, message=None: reports.append((fraction, message)))
    provider = ScriptedProvider("queued", "running", "running", "succeeded")
    # Ten minutes in Kling's queue (or waiting for a slot) before it starts generating.
    started_at = time.time() - 600
    providers.wait_for(ctx, provider, "kt-1", started_at=started_at, deadline_s=1800, interval_s=0.01)
    queued = [f for f, m in reports if m == "Queued at Kling"]
    generating = [f for f, m in reports if m == "Generating video"]
    assert queued and generating and max(queued) <= 0.3
    assert generating[0] == pytest.approx(0.3)  # rising from there, not at once near the end
    assert generating == sorted(generating) and max(generating) < 0.89


def test_the_longest_poll_deadline_and_the_download_fit_each_kling_models_limit():
    from lib.catalog import CATALOG
    from lib.config import Settings

    metadata = Settings.model_fields["kling_poll_deadline_seconds"].metadata
    [longest_poll] = [m.le for m in metadata if getattr(m, "le", None) is not None]
    margin = 2 * 60  # the last status poll after the deadline (its retries included), a fresh link, the probe
    specs = [spec for spec in CATALOG.values() if spec.handler == "gpu_jobs.handlers.kling:run"]
    assert {spec.key for spec in specs} == {"kling.text2video", "kling.image2video"}
    for spec in specs:
        assert longest_poll + providers.DOWNLOAD_LIMIT_S + margin <= spec.timeout_s, spec.key


class RefusedOnceProvider:
    """已完成任务的提供方：第一次下载费时 spend 秒后被拒绝，第二次下载成功；记下每次下载得到的时限"""

    name = "Kling"

    def __init__(self, video: Path, *, spend: float):
        self.video, self.spend = video, spend
        self.time_limits: list[float | None] = []

    def status(self, job_id: str) -> ProviderJob:
        """任务已完成，附一个新的下载地址"""
        return ProviderJob(job_id=job_id, state="succeeded", raw_state="succeed", result_urls=("https://cdn.test/v",))

    def fetch_result(self, job: ProviderJob, dest_dir: Path, *, time_limit: float | None = None) -> Path:
        """第一次：耗时后被拒绝；第二次：交出视频"""
        self.time_limits.append(time_limit)
        if len(self.time_limits) == 1:
            time.sleep(self.spend)
            raise DownloadRefused("HTTP 403")
        return self.video


def test_the_download_with_a_fresh_link_gets_only_what_is_left_of_the_allowance(tmp_path, monkeypatch, clip):
    monkeypatch.setattr(providers, "DOWNLOAD_LIMIT_S", 2.0)
    ctx = job_context(tmp_path, provider_job_id="kt-1", provider_submitted_at=time.time())
    provider = RefusedOnceProvider(clip, spend=0.5)
    [output] = providers.run_provider_job(ctx, provider, deadline_s=60, interval_s=0.01)
    first, second = provider.time_limits
    assert output.path == clip and first == 2.0
    assert second is not None and second <= 2.0 - 0.5  # one allowance for both downloads


# ---------------------------------------------------------------- availability


@pytest.mark.parametrize(
    ("params", "credits"),
    [
        ({}, 35),
        ({"mode": "pro", "duration": "10"}, 120),
        ({"model_name": "kling-v2-master"}, 130),
        ({"model_name": "kling-v2-1-master", "mode": "pro", "duration": "10"}, 260),
    ],
)
async def test_master_models_cost_what_kling_bills_for_them(client, make_user, kling, params, credits):
    user = await make_user()
    body = {"params": {"prompt": "a paper boat", **params}}
    quoted = await client.post("/models/kling.text2video/quote", json=body, headers=user.headers)
    assert quoted.status_code == 200, quoted.text
    assert quoted.json()["data"]["credits"] == credits


async def test_missing_keys_make_kling_unavailable_and_charge_nothing(client, make_user, no_kling):
    models = {m["key"]: m for m in (await client.get("/models")).json()["data"]["items"]}
    assert models["kling.text2video"]["available"] is False
    assert models["kling.image2video"]["available"] is False
    user = await make_user()
    resp = await client.post(
        "/tasks", json={"model_key": "kling.text2video", "params": {"prompt": "a cat"}}, headers=user.headers
    )
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "provider_unavailable"
    assert balance(user.id) == 100 and sql("select id from public.tasks where user_id = %s", (user.id,)) == []


async def test_configured_keys_make_kling_available(client, kling):
    models = {m["key"]: m for m in (await client.get("/models")).json()["data"]["items"]}
    assert models["kling.text2video"]["available"] and models["kling.image2video"]["available"]


# ---------------------------------------------------------------- the provider flow


async def test_text2video_rehosts_the_video_and_charges_once(client, make_user, kling, clip):
    user = await make_user()
    set_balance(user.id, 500)
    task = await create(client, user, mode="pro", duration="10", aspect_ratio="9:16", negative_prompt="blurry")
    assert task["cost"] == 120
    assert await run_task_async(task["id"]) == "completed"

    [body] = kling.submits
    assert body == {
        "model_name": "kling-v1-6",
        "prompt": "a paper boat sailing down a rainy street",
        "negative_prompt": "blurry",
        "cfg_scale": 0.5,
        "mode": "pro",
        "duration": "10",
        "aspect_ratio": "9:16",
        "external_task_id": task["id"],
    }
    row = task_row(task["id"])
    [job_id] = kling.jobs
    assert row["status"] == "completed" and job_state(task["id"])["provider_job_id"] == job_id
    assert row["result"]["provider_job_id"] == job_id and kling.downloads == 1
    assert row["result_url"] and not row["result_url"].startswith(kling.url)
    async with httpx.AsyncClient() as http:
        stored = await http.get(row["result_url"])
    assert stored.status_code == 200 and stored.content == clip.read_bytes()
    [asset] = outputs(task)
    assert (asset["kind"], asset["mime"], asset["width"], asset["height"]) == ("video", "video/mp4", 64, 48)
    assert asset["duration_s"] == pytest.approx(1.0, abs=0.1) and asset["metadata"]["provider"] == "kling"
    assert kinds(user, task) == ["charge"] and balance(user.id) == 500 - 120
    assert kling.rejected == [] and len(kling.claims) == 1 + len(kling.polls)  # every API request had a valid token


async def test_image2video_sends_the_input_image_as_base64(client, make_user, kling):
    from PIL import Image

    from lib.storage import get_storage

    user = await make_user()
    buf = io.BytesIO()
    Image.new("RGB", (480, 360), (20, 120, 200)).save(buf, "PNG")
    path = f"{user.id}/uploads/{uuid.uuid4()}.png"
    await get_storage().upload_bytes(path=path, data=buf.getvalue(), content_type="image/png")
    asset_id = make_asset(user.id, kind="image", width=480, height=360, path=path)
    task = await create(client, user, "kling.image2video", image_asset_id=asset_id, prompt="the water ripples")
    assert task["cost"] == 35
    assert await run_task_async(task["id"]) == "completed"
    [body] = kling.submits
    assert base64.b64decode(body["image"]) == buf.getvalue()
    assert body["prompt"] == "the water ripples" and "aspect_ratio" not in body
    assert kling.polls and set(kling.polls) == set(kling.jobs)
    assert len(outputs(task)) == 1 and kinds(user, task) == ["charge"]


def test_a_turned_or_wide_gamut_photo_goes_to_kling_upright_in_srgb(tmp_path):
    """Kling 收到的图片与我们显示的一样：按 EXIF 方向摆正、转成 sRGB（只有已经如此的 JPEG/PNG 原样发送）"""
    from PIL import Image, ImageCms

    from gpu_jobs.media.images import to_srgb
    from gpu_jobs.providers.kling import encode_image
    from tests.media_factories import display_p3_profile

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    turned = tmp_path / "turned.jpg"
    Image.new("RGB", (480, 360), (20, 120, 200)).save(turned, "JPEG", exif=exif)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (480, 360), (200, 100, 50)).save(wide, "PNG", icc_profile=display_p3_profile())
    srgb = tmp_path / "srgb.jpg"
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (480, 360), (20, 120, 200)).save(srgb, "JPEG", icc_profile=profile)

    def sent(path: Path) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(encode_image(path))))

    upright = sent(turned)
    assert upright.size == (360, 480) and upright.getexif().get(0x0112) in (None, 1)
    orange = sent(wide)
    expected = to_srgb(Image.new("RGB", (1, 1), (200, 100, 50)), display_p3_profile()).getpixel((0, 0))
    assert expected[0] > 210 and orange.info.get("icc_profile") is None  # P3's orange is redder than sRGB's
    assert all(abs(a - b) <= 3 for a, b in zip(orange.getpixel((10, 10)), expected, strict=True))
    assert base64.b64decode(encode_image(srgb)) == srgb.read_bytes()  # already as shown: the bytes as uploaded


async def test_image_too_small_for_kling_is_refused_before_charging(client, make_user, kling):
    user = await make_user()
    asset_id = make_asset(user.id, kind="image", width=200, height=200)
    resp = await client.post(
        "/tasks", json={"model_key": "kling.image2video", "params": {"image_asset_id": asset_id}}, headers=user.headers
    )
    assert resp.status_code == 422 and "300 px" in resp.json()["error"]["message"]
    assert kling.submits == [] and balance(user.id) == 100


async def test_provider_failure_fails_with_its_reason_and_refunds_once(client, make_user, kling):
    kling.fail("Failure to pass the risk control system")
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["status"] == "failed"
    message = row["error"]["message"]
    assert "risk control" in message and "refunded" in message and "change the prompt" in message
    assert outputs(task) == [] and kling.downloads == 0
    assert kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def test_refused_prompt_fails_with_the_reason_and_refunds_once(client, make_user, kling):
    kling.refuse = (400, 1301, "Trigger the content security policy")
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "failed"
    message = task_row(task["id"])["error"]["message"]
    assert "content rules" in message and "content security policy" in message and "refunded" in message
    assert kling.jobs == {} and kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def test_deadline_fails_and_refunds_once(client, make_user, kling):
    kling.hang()
    set_env({"KLING_POLL_DEADLINE_SECONDS": "0.5"})
    user = await make_user()
    task = await create(client, user)
    assert await asyncio.wait_for(run_task_async(task["id"]), 20) == "failed"
    row = task_row(task["id"])
    assert row["error"]["message"] == ("The provider did not finish within 0.5 seconds; your credits were refunded.")
    assert len(kling.submits) == 1 and outputs(task) == []
    assert kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def test_rate_limits_and_server_errors_are_retried(client, make_user, kling):
    kling.errors = [429, 500, 503, 429, 502]
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "completed"
    assert kling.errors == [] and len(kling.submits) == 1 and len(kling.jobs) == 1
    assert kinds(user, task) == ["charge"] and kling.rejected == []


async def completes_with_one_paid_job(client, make_user, kling) -> None:
    """任务完成：Kling 只收到（也只收费）一个任务，且正是任务记下的那个"""
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "completed"
    [job_id] = kling.jobs
    assert len(kling.submits) == 1 and job_state(task["id"])["provider_job_id"] == job_id
    assert kinds(user, task) == ["charge"]


async def test_a_lost_submit_answer_adopts_the_job_instead_of_paying_twice(client, make_user, kling):
    kling.lose_submit_response = True
    await completes_with_one_paid_job(client, make_user, kling)


@pytest.mark.parametrize(
    "missing_job", [(404, 1203, "The requested resource does not exist"), (400, 1201, "task_id is invalid")]
)
async def test_a_submit_that_never_arrived_is_sent_again(client, make_user, kling, missing_job):
    kling.drop_submit, kling.missing_job = True, missing_job
    await completes_with_one_paid_job(client, make_user, kling)


async def test_a_resend_refused_as_a_duplicate_adopts_the_job_the_lost_answer_created(client, make_user, kling):
    kling.lose_submit_response, kling.lagging_lookups = True, 1  # the lookup right after the lost answer misses
    await completes_with_one_paid_job(client, make_user, kling)


async def test_a_rate_limited_lookup_after_a_lost_answer_retries_with_a_lookup_not_a_second_submit(
    client, make_user, kling
):
    kling.lose_submit_response, kling.busy_lookups = True, 5  # every try of the lookup after the lost answer
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "queued"  # requeued: whether Kling took the job is not known
    assert await run_task_async(task["id"]) == "completed"
    [job_id] = kling.jobs
    assert len(kling.submits) == 1 and job_state(task["id"])["provider_job_id"] == job_id
    assert task_row(task["id"])["attempts"] == 2 and kinds(user, task) == ["charge"]


async def test_a_lost_submit_answer_whose_job_takes_the_only_slot_is_requeued_not_refunded(client, make_user, kling):
    # The lost answer's job runs in the account's only slot, so every resend is refused as "full" until it ends.
    kling.lose_submit_response, kling.lagging_lookups, kling.concurrency = True, 1, 1
    set_env({"KLING_POLL_DEADLINE_SECONDS": "0.5"})
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "queued"  # whether Kling took the job is not known: never refunded
    assert len(kling.jobs) == 1 and kinds(user, task) == ["charge"]
    set_env({"KLING_POLL_DEADLINE_SECONDS": "30"})
    assert await run_task_async(task["id"]) == "completed"  # looked up by our id, not submitted again
    [job_id] = kling.jobs
    assert len(kling.submits) == 1 and job_state(task["id"])["provider_job_id"] == job_id
    assert kinds(user, task) == ["charge"]


async def test_a_submit_refused_because_our_id_exists_adopts_the_job(client, make_user, kling):
    user = await make_user()
    task = await create(client, user)
    submitted_earlier(kling, task["id"], None)  # nothing of it was stored with the task
    assert await run_task_async(task["id"]) == "completed"
    [job_id] = kling.jobs
    assert len(kling.submits) == 1 and job_state(task["id"])["provider_job_id"] == job_id
    assert kinds(user, task) == ["charge"]


async def test_a_refused_token_while_polling_keeps_polling_the_paid_job(client, make_user, kling):
    kling.unauthorized_polls = 3
    await completes_with_one_paid_job(client, make_user, kling)
    assert kling.unauthorized_polls == 0 and task_row(kling.submits[0]["external_task_id"])["attempts"] == 1


async def test_status_polls_forbidden_by_a_proxy_keep_polling_the_paid_job(client, make_user, kling):
    kling.forbidden_polls = 8  # more than the adapter's own retries: the poll loop retries too
    await completes_with_one_paid_job(client, make_user, kling)
    assert kling.forbidden_polls == 0 and task_row(kling.submits[0]["external_task_id"])["attempts"] == 1


async def test_a_token_refused_on_every_poll_fails_at_the_deadline(client, make_user, kling):
    kling.unauthorized_polls = 10**6
    set_env({"KLING_POLL_DEADLINE_SECONDS": "0.5"})
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"]["message"] == "The provider did not finish within 0.5 seconds; your credits were refunded."
    assert len(kling.submits) == 1 and kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def test_a_submit_with_a_refused_token_fails_at_once_as_our_problem(client, make_user, kling):
    kling.clock_offset = -600  # Kling's clock ten minutes behind ours: no margin covers that
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"]["code"] == "provider_error" and "problem on our side" in row["error"]["message"]
    assert kling.rejected == ["not yet valid"] and kling.submits == []
    assert kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def test_a_clock_slightly_ahead_of_klings_is_tolerated(client, make_user, kling):
    kling.clock_offset = -30  # Kling's clock half a minute behind ours
    await completes_with_one_paid_job(client, make_user, kling)
    assert kling.rejected == []


async def test_a_job_that_succeeded_without_a_video_fails_after_three_polls_and_refunds(client, make_user, kling):
    kling.videoless_polls = 10**6
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"] == {
        "code": "provider_error",
        "message": "Kling finished without a video. Your credits were refunded.",
    }
    assert len(kling.polls) == 2 + 3 and kling.downloads == 0 and len(kling.submits) == 1
    assert kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def test_a_video_that_shows_up_on_the_third_poll_after_success_is_kept(client, make_user, kling):
    kling.videoless_polls = 2
    await completes_with_one_paid_job(client, make_user, kling)
    assert len(kling.polls) == 2 + 3


@pytest.fixture
def elsewhere(clip):
    """另一个端口上的本地服务器（也能提供视频）：下载不应碰到它"""
    other = FakeKling(access_key=AK, secret_key=SK, video=clip).start()
    yield other
    other.stop()


async def fails_as_a_refused_download(client, make_user, kling) -> dict:
    """任务失败（provider_error）并退款一次，没有产出"""
    user = await make_user()
    task = await create(client, user)
    assert await asyncio.wait_for(run_task_async(task["id"]), 20) == "failed"
    row = task_row(task["id"])
    assert row["error"]["code"] == "provider_error" and "refunded" in row["error"]["message"]
    assert len(kling.submits) == 1 and outputs(task) == []
    assert kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100
    return row


async def test_a_video_url_on_a_loopback_port_is_not_downloaded(client, make_user, kling, elsewhere):
    kling.video_url = f"{elsewhere.url}/files/x.mp4"
    await fails_as_a_refused_download(client, make_user, kling)
    assert elsewhere.downloads == 0


async def test_a_video_url_on_a_private_address_is_refused_before_connecting(client, make_user, kling):
    kling.video_url = "https://10.0.0.1/x.mp4"
    await fails_as_a_refused_download(client, make_user, kling)


async def test_a_redirect_to_a_loopback_port_is_not_followed(client, make_user, kling, elsewhere):
    kling.redirect_downloads = f"{elsewhere.url}/files/x.mp4"
    await fails_as_a_refused_download(client, make_user, kling)
    assert kling.downloads == 1 and elsewhere.downloads == 0


async def test_cancel_stops_a_slow_download(client, make_user, kling, clip):
    kling.trickle_downloads = (32, 0.2)
    assert clip.stat().st_size > 32 * 100  # a download of more than 20 s
    user = await make_user()
    task = await create(client, user)
    job = asyncio.create_task(run_task_async(task["id"]))
    await wait_until(lambda: kling.downloads > 0)
    await asyncio.sleep(0.5)
    assert (await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)).status_code == 200
    assert await asyncio.wait_for(job, 15) == "canceled"  # long before the download could end
    assert outputs(task) == [] and kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def requeued_by_a_slow_download(client, make_user, kling: FakeKling, monkeypatch) -> tuple:
    """一个任务：Kling 的任务已完成，下载超过时限，任务回到队列；之后的下载恢复正常速度"""
    monkeypatch.setattr(providers, "DOWNLOAD_LIMIT_S", 1.0)
    kling.trickle_downloads = (32, 0.2)
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "queued"
    kling.trickle_downloads = None
    return user, task


async def test_a_download_over_the_time_limit_requeues_and_the_next_attempt_resumes(
    client, make_user, kling, monkeypatch
):
    user, task = await requeued_by_a_slow_download(client, make_user, kling, monkeypatch)
    assert task_row(task["id"])["message"] == "A temporary problem interrupted the job; retrying."
    assert await run_task_async(task["id"]) == "completed"
    [job_id] = kling.jobs
    assert len(kling.submits) == 1 and job_state(task["id"])["provider_job_id"] == job_id
    assert task_row(task["id"])["attempts"] == 2 and kinds(user, task) == ["charge"]


async def test_a_finished_job_whose_status_is_unavailable_past_the_deadline_is_not_refunded_as_unfinished(
    client, make_user, kling, monkeypatch
):
    user, task = await requeued_by_a_slow_download(client, make_user, kling, monkeypatch)  # the job had finished
    set_env({"KLING_POLL_DEADLINE_SECONDS": "0.5"})  # the next attempt comes past the deadline
    kling.errors = [500] * 5  # and Kling answers none of its status poll's tries
    assert await run_task_async(task["id"]) == "queued"  # Kling finished it: not "did not finish", not refunded
    assert kinds(user, task) == ["charge"]
    assert await run_task_async(task["id"]) == "completed"
    assert len(kling.submits) == 1 and kinds(user, task) == ["charge"]


async def test_a_full_account_makes_the_job_wait_for_a_slot_without_spending_attempts(client, make_user, kling):
    kling.busy_submits = 12  # more than the adapter's own retries
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "completed"
    assert kling.busy_submits == 0 and len(kling.submits) == 1
    assert task_row(task["id"])["attempts"] == 1 and kinds(user, task) == ["charge"]


async def test_no_slot_before_the_deadline_fails_and_refunds_once(client, make_user, kling):
    set_env({"KLING_POLL_DEADLINE_SECONDS": "0.5"})
    kling.busy_submits = 10**6
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["attempts"] == 1 and row["error"]["code"] == "provider_error"
    assert row["error"]["message"].startswith("Kling could not take the job within 0.25 seconds")  # half of it
    assert kling.submits == [] and kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def test_a_slot_that_frees_too_late_for_the_job_to_finish_is_not_taken(client, make_user, kling):
    """A job sent when little of the deadline is left would be paid for and abandoned at the deadline."""
    set_env({"KLING_POLL_DEADLINE_SECONDS": "2"})
    kling.busy_submits = 10**6
    user = await make_user()
    task = await create(client, user)

    async def free_a_slot_late() -> None:
        await wait_until(lambda: kling.refused_submits > 0)  # the job's deadline counts from before its first submit
        await asyncio.sleep(1.3)  # past half the deadline, well before its end
        kling.busy_submits = 0

    freeing = asyncio.create_task(free_a_slot_late())
    assert await run_task_async(task["id"]) == "failed"
    await freeing
    assert task_row(task["id"])["error"]["message"].startswith("Kling could not take the job within 1 second")
    assert kling.submits == [] and kinds(user, task) == ["charge", "refund"]


async def test_a_slot_freed_past_half_the_deadline_is_not_taken_by_the_adapters_own_retries(client, make_user, kling):
    """Kling 要求一秒后再试：适配器自己的重试也不能在期限过半之后把任务发出去"""
    set_env({"KLING_POLL_DEADLINE_SECONDS": "3"})  # sent no later than 1.5 s after the first try
    kling.busy_submits, kling.retry_after = 10**6, 1
    user = await make_user()
    task = await create(client, user)

    async def free_a_slot_past_half() -> None:
        await wait_until(lambda: kling.refused_submits > 0)
        await asyncio.sleep(1.6)  # before the adapter's retry two seconds after the first try
        kling.busy_submits = 0

    freeing = asyncio.create_task(free_a_slot_past_half())
    assert await run_task_async(task["id"]) == "failed"
    await freeing
    assert task_row(task["id"])["error"]["message"].startswith("Kling could not take the job within 1.5 seconds")
    assert kling.submits == [] and kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


def test_the_adapter_sends_no_submit_at_or_after_the_time_it_is_given():
    now = [1_000.0]
    busy = httpx.Response(429, json={"code": 1303, "message": "parallel task over resource pack limit"})
    provider, sent = mock_provider(*[busy] * 5, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    with pytest.raises(ProviderBusy) as late:  # tries at 1000, +0.001, +0.002, +0.004: the next would be too late
        provider.submit(external_id="t", params=KlingParams(prompt="a boat"), inputs={}, submit_by=1_000.01)
    assert not late.value.ambiguous and len(sent) == 4
    with pytest.raises(ProviderBusy) as late:  # already past it: nothing is sent at all
        provider.submit(external_id="t", params=KlingParams(prompt="a boat"), inputs={}, submit_by=now[0])
    assert not late.value.ambiguous and len(sent) == 4


async def test_cancel_is_noticed_while_kling_asks_us_to_retry_later(client, make_user, kling):
    set_env({"KLING_POLL_DEADLINE_SECONDS": "120"})  # the 30 s asked for still end before half the deadline
    kling.busy_submits, kling.retry_after = 10**6, 30
    user = await make_user()
    task = await create(client, user)
    job = asyncio.create_task(run_task_async(task["id"]))
    await wait_until(lambda: kling.refused_submits > 0)
    assert (await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)).status_code == 200
    assert await asyncio.wait_for(job, 20) == "canceled"  # before the 30 s Kling asked for
    assert kling.refused_submits == 1 and kinds(user, task) == ["charge", "refund"]


@pytest.mark.parametrize(("refusals", "outcome"), [(1, "completed"), (2, "failed")])
async def test_a_refused_download_asks_for_a_fresh_link_once(client, make_user, kling, refusals, outcome):
    kling.refused_downloads = refusals
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == outcome
    assert kling.downloads == 2 and len(kling.submits) == 1
    if outcome == "failed":
        assert "could not be downloaded from Kling (HTTP 403)" in task_row(task["id"])["error"]["message"]
        assert kinds(user, task) == ["charge", "refund"]
    else:
        assert kinds(user, task) == ["charge"] and len(outputs(task)) == 1


async def test_an_ip_whitelist_refusal_fails_at_once_as_our_problem(client, make_user, kling):
    kling.refuse = (429, 1304, "IP whitelist policy")
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "failed"
    assert "problem on our side" in task_row(task["id"])["error"]["message"]
    assert len(kling.claims) == 1  # refused once, not retried as a rate limit
    assert kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def test_each_endpoint_takes_its_own_model_names(client, make_user, kling):
    user = await make_user()
    set_balance(user.id, 500)
    resp = await client.post(
        "/tasks",
        json={"model_key": "kling.text2video", "params": {"prompt": "a boat", "model_name": "kling-v2-1"}},
        headers=user.headers,
    )
    assert resp.status_code == 422 and balance(user.id) == 500  # kling-v2-1 is image-to-video only
    asset_id = make_asset(user.id, kind="image", width=480, height=360)
    resp = await client.post(
        "/tasks",
        json={"model_key": "kling.image2video", "params": {"image_asset_id": asset_id, "model_name": "kling-v2-1"}},
        headers=user.headers,
    )
    assert resp.status_code == 201, resp.text

    task = await create(client, user, model_name="kling-v2-1-master", cfg_scale=0.8)
    assert await run_task_async(task["id"]) == "completed"
    [body] = kling.submits
    assert body["model_name"] == "kling-v2-1-master" and "cfg_scale" not in body  # 2.x models take none


async def test_unknown_provider_states_are_treated_as_running(client, make_user, kling):
    kling.script = ["submitted", "queueing_for_gpu", "processing", "postprocess", "succeed"]
    user = await make_user()
    task = await create(client, user)
    assert await run_task_async(task["id"]) == "completed"
    assert len(kling.polls) == 5 and kinds(user, task) == ["charge"]


async def test_a_job_killed_after_submit_resumes_polling_the_same_provider_task(client, make_user, kling):
    kling.hold_first_poll = True
    user = await make_user()
    task = await create(client, user)
    code = f"from gpu_jobs.runner import run_task; run_task({task['id']!r})"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=ROOT, env=os.environ.copy())
    try:
        await wait_until(lambda: kling.polls or proc.returncode is not None)
        assert proc.returncode is None, "the first run ended instead of waiting at Kling"
        [job_id] = kling.jobs
        assert job_state(task["id"])["provider_job_id"] == job_id  # stored before the first poll
    finally:
        proc.kill()  # SIGKILL: no cleanup, exactly like a lost container
        await proc.wait()
    kling.release.set()

    sql("update public.tasks set heartbeat_at = now() - interval '1 hour' where id = %s", (task["id"],))
    assert (await reap()).get("requeued") == 1
    assert await run_task_async(task["id"]) == "completed"
    row = task_row(task["id"])
    assert row["attempts"] == 2 and job_state(task["id"])["provider_job_id"] == job_id
    assert len(kling.submits) == 1 and set(kling.polls) == {job_id}
    assert len(outputs(task)) == 1 and kinds(user, task) == ["charge"] and kling.rejected == []


async def test_a_retry_after_an_unsaved_submit_adopts_the_job_by_our_id(client, make_user, kling):
    user = await make_user()
    task = await create(client, user)
    submitted_earlier(kling, task["id"], {"provider_submitting": True})
    assert await run_task_async(task["id"]) == "completed"
    [job_id] = kling.jobs
    assert len(kling.submits) == 1 and job_state(task["id"])["provider_job_id"] == job_id


async def test_a_refused_token_while_looking_up_an_unsaved_submit_requeues_the_task(client, make_user, kling):
    user = await make_user()
    task = await create(client, user)
    submitted_earlier(kling, task["id"], {"provider_submitting": True})
    kling.unauthorized_lookups = 1  # the paid job exists: failing the task would throw it away
    assert await run_task_async(task["id"]) == "queued"
    assert await run_task_async(task["id"]) == "completed"
    assert len(kling.submits) == 1 and kinds(user, task) == ["charge"]


async def test_an_adopted_job_keeps_the_deadline_of_the_submit_that_created_it(client, make_user, kling):
    user = await make_user()
    task = await create(client, user)
    submitted_at = time.time() - 3600  # the attempt that submitted died an hour ago
    submitted_earlier(kling, task["id"], {"provider_submitting": True, "provider_submitted_at": submitted_at})
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"]["message"] == "The provider did not finish within 30 seconds; your credits were refunded."
    assert len(kling.submits) == 1 and job_state(task["id"])["provider_submitted_at"] == submitted_at
    assert kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def adopts_the_one_job_once_it_is_found(kling: FakeKling, user, task: dict) -> None:
    """Kling 的查询赶上之后，下一次尝试领养那一个任务：完成，只提交过一次，只扣费一次"""
    kling.lagging_lookups = 0
    assert await run_task_async(task["id"]) == "completed"
    [job_id] = kling.jobs
    assert len(kling.submits) == 1 and job_state(task["id"])["provider_job_id"] == job_id
    assert kinds(user, task) == ["charge"]


async def test_a_duplicate_refusal_whose_lookups_all_miss_is_requeued_then_adopted(client, make_user, kling):
    kling.lagging_lookups = 100  # Kling's lookup by our id lags far behind its submits
    user = await make_user()
    task = await create(client, user)
    submitted_earlier(kling, task["id"], None)
    assert await run_task_async(task["id"]) == "queued"  # Kling has a job under our id: never refunded
    assert kinds(user, task) == ["charge"]
    await adopts_the_one_job_once_it_is_found(kling, user, task)


async def test_a_job_kling_says_it_has_is_not_refunded_when_the_next_attempt_comes_past_half_the_deadline(
    client, make_user, kling
):
    kling.lagging_lookups = 100  # Kling's lookup by our id lags far behind its submits
    user = await make_user()
    task = await create(client, user)
    submitted_earlier(kling, task["id"], {"provider_submitting": True, "provider_submitted_at": time.time() - 10})
    assert await run_task_async(task["id"]) == "queued"  # refused as a duplicate of our id: Kling has the job
    set_env({"KLING_POLL_DEADLINE_SECONDS": "16"})  # the next attempt comes past half the deadline
    assert await run_task_async(task["id"]) == "queued"  # the job runs and is paid: not "could not take the job"
    assert kinds(user, task) == ["charge"]
    await adopts_the_one_job_once_it_is_found(kling, user, task)


async def test_a_job_kling_says_it_has_is_not_refunded_when_its_resend_past_half_the_deadline_finds_the_account_full(
    client, make_user, kling
):
    kling.lagging_lookups, kling.concurrency = 100, 1  # the job Kling has (and bills) holds the account's only slot
    user = await make_user()
    task = await create(client, user)
    state = {"provider_submitting": True, "provider_exists": True, "provider_submitted_at": time.time() - 10}
    submitted_earlier(kling, task["id"], state)
    set_env({"KLING_POLL_DEADLINE_SECONDS": "16"})  # this attempt comes past half the deadline
    assert await run_task_async(task["id"]) == "queued"  # the resend is refused as busy: the job still runs and is paid
    assert kinds(user, task) == ["charge"] and len(kling.jobs) == 1
    await adopts_the_one_job_once_it_is_found(kling, user, task)


async def test_a_job_adopted_after_a_lookup_that_missed_keeps_the_deadline_of_the_submit_that_created_it(
    client, make_user, kling
):
    kling.lagging_lookups = 1  # the lookup by our id misses; the resend is refused as a duplicate and adopted
    user = await make_user()
    task = await create(client, user)
    submitted_at = time.time() - 10  # the attempt that submitted died ten seconds ago
    submitted_earlier(kling, task["id"], {"provider_submitting": True, "provider_submitted_at": submitted_at})
    assert await run_task_async(task["id"]) == "completed"
    [job_id] = kling.jobs
    assert len(kling.submits) == 1 and job_state(task["id"])["provider_job_id"] == job_id
    assert job_state(task["id"])["provider_submitted_at"] == submitted_at  # where its deadline counts from
    assert kinds(user, task) == ["charge"]


async def test_a_retry_past_the_deadline_of_an_earlier_submit_that_created_nothing_submits_nothing(
    client, make_user, kling
):
    user = await make_user()
    task = await create(client, user)
    # An hour ago an attempt began submitting (or waiting for a slot) and died; Kling has no job under our id.
    state = {"provider_submitting": True, "provider_submitted_at": time.time() - 3600}
    sql("insert into public.task_job_states (task_id, state) values (%s, %s)", (task["id"], json.dumps(state)))
    assert await run_task_async(task["id"]) == "failed"
    row = task_row(task["id"])
    assert row["error"]["message"].startswith("Kling could not take the job within 15 seconds")
    assert kling.submits == [] and kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100


async def test_cancel_refunds_and_abandons_the_provider_job(client, make_user, kling):
    kling.hang()
    user = await make_user()
    task = await create(client, user)
    job = asyncio.create_task(run_task_async(task["id"]))
    await wait_until(lambda: task_row(task["id"])["message"] == "Generating video")
    assert 0.3 * 0.95 <= task_row(task["id"])["progress"] < 0.9 * 0.95
    resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert resp.status_code == 200
    assert await asyncio.wait_for(job, 10) == "canceled"
    polls = len(kling.polls)
    await asyncio.sleep(0.3)
    assert len(kling.polls) == polls  # nobody is polling the abandoned job
    assert task_row(task["id"])["status"] == "canceled" and outputs(task) == []
    assert len(kling.submits) == 1 and kinds(user, task) == ["charge", "refund"] and balance(user.id) == 100
