"""The Kling AI adapter: JWT auth, text2video / image2video submit, status, result download, errors in plain words.

API: ``POST {base}/v1/videos/{endpoint}`` and ``GET {base}/v1/videos/{endpoint}/{id}`` (``id`` is Kling's task id or
our ``external_task_id``); every answer is ``{code, message, request_id, data}`` and ``code != 0`` is an error.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import jwt

from gpu_jobs.providers import (
    RETRY_AFTER_CAP,
    AccessRefused,
    ProviderBusy,
    ProviderError,
    ProviderJob,
    backoff,
    download_file,
    public_only,
)
from lib.config import Settings
from lib.errors import InvalidInput

log = logging.getLogger("spool.providers.kling")

Endpoint = Literal["text2video", "image2video"]
TOKEN_SECONDS = 1800
TOKEN_NOT_BEFORE = 60  # a token valid a minute early: our clock may run ahead of Kling's
STATES = {"submitted": "queued", "processing": "running", "succeed": "succeeded", "failed": "failed"}
# Kling's error codes (https://app.klingai.com/global/dev/document-api/apiReference/commonInfo)
AUTH_CODES = range(1000, 1100)  # 1000-1004: the token is missing, invalid, not yet valid or expired
# arrears, resource pack used up, no access (sent with HTTP 429 or 403); 1304: our IP is not on the account's whitelist
ACCOUNT_CODES = (*range(1100, 1200), 1304)
PARAM_CODES = (1200, 1201)  # invalid parameters; on a status lookup the only parameter is the job id
NOT_FOUND_CODE = 1203
CONTENT_CODES = (1300, 1301)  # platform strategy / content security policy
BUSY_CODES = (1302, 1303, 5000, 5001, 5002)  # rate and concurrency limits, server errors
IMAGE_MAX_BYTES = 10 * 1024 * 1024  # Kling's limit for the input image
IMAGE_MIN_SIDE = 300
IMAGE_MAX_RATIO = 2.5
IMAGE_REENCODE_SIDE = 4096
REASON_CHARS = 300
VIDEOLESS_POLLS = 3  # consecutive "succeed" answers without a video before the job counts as failed
NO_VIDEO = "Kling finished without a video. Your credits were refunded."
FILE_ID_CHARS = 64  # of Kling's job id in the downloaded file's name
CONNECT_TIMEOUT_S = 10.0
SUBMIT_TIMEOUT_S = 60.0  # a submit carries up to 10 MB of base64 image; also the download's wait between chunks
LOOKUP_TIMEOUT_S = 15.0  # a status poll or lookup: a hung connection or a cancel is noticed sooner


class TooLate(ProviderBusy):
    """提交的时限已到，没有再发出提交"""


class JobNotFound(ProviderError):
    """Kling 不认识这个任务 id"""


class Refused(ProviderError):
    """Kling 拒绝了请求（带 Kling 的错误码）"""

    def __init__(self, message: str, *, code: int | None, reason: str = ""):
        super().__init__(message)
        self.code = code
        self.reason = reason  # Kling's own words, for telling a duplicate of our id from other refusals

    @property
    def names_our_id_taken(self) -> bool:
        """拒绝的原因是我们的 external_task_id 已存在（任务已建好）"""
        reason = self.reason.lower()
        return self.code in PARAM_CODES and "external_task_id" in reason and "exist" in reason


class KlingProvider:
    """Kling AI 适配器"""

    name = "Kling"

    def __init__(
        self,
        *,
        access_key: str,
        secret_key: str,
        base_url: str,
        endpoint: Endpoint,
        retry_base: float = 1.0,
        retries: int = 4,
        max_download_bytes: int = 2 * 1024**3,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
        lookup_timeout_s: float = LOOKUP_TIMEOUT_S,
    ):
        self.access_key, self.secret_key = access_key, secret_key
        self.endpoint = endpoint
        self.delays = backoff(retry_base, retries, cap=30.0)
        self.max_download_bytes = max_download_bytes
        self.clock = clock
        self.sleep = sleep  # between retries; a job passes one that notices a cancel
        self.check_url = public_only(exempt=base_url)  # the API's own origin may serve files too
        self.videoless: dict[str, int] = {}  # job id -> consecutive "succeed" answers without a video
        self.lookup_timeout = httpx.Timeout(lookup_timeout_s, connect=CONNECT_TIMEOUT_S)
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            transport=transport,
            follow_redirects=True,
            timeout=httpx.Timeout(SUBMIT_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, endpoint: Endpoint, sleep: Callable[[float], None] = time.sleep
    ) -> KlingProvider:
        """按配置创建（重试节奏跟随轮询间隔，最多 1 秒起步）"""
        return cls(
            access_key=settings.kling_ai_access_key or "",
            secret_key=settings.kling_ai_secret_key or "",
            base_url=settings.kling_api_base,
            endpoint=endpoint,
            retry_base=min(1.0, settings.kling_poll_interval_seconds),
            max_download_bytes=settings.max_upload_bytes,
            sleep=sleep,
        )

    def __enter__(self) -> KlingProvider:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.http.close()

    # ------------------------------------------------------------ the Provider interface

    def submit(self, *, external_id: str, params: Any, inputs: dict[str, Path], submit_by: float | None = None) -> str:
        """提交文生视频或图生视频任务，返回 Kling 任务 id；submit_by 起不再发出提交（重试也不）"""
        body = self.request_body(external_id=external_id, params=params, inputs=inputs)
        unclear = False  # an earlier try may have created the job although its answer was lost
        for attempt, delay in enumerate([*self.delays, None], start=1):
            try:
                if submit_by is not None and self.clock() >= submit_by:
                    # A job sent now could not finish within its deadline, yet would be paid for.
                    raise TooLate("no time left to send the job")
                job_id = self._send("POST", f"/v1/videos/{self.endpoint}", body).get("task_id")
                if not isinstance(job_id, str | int) or not str(job_id):
                    raise ProviderBusy("Kling accepted the job without naming it", ambiguous=True)
                return str(job_id)
            except ProviderBusy as exc:
                if exc.ambiguous:  # the job may exist although we got no answer: never submit it twice
                    found = self._lookup(external_id, late=False)
                    if found is not None:
                        return found.job_id
                    unclear = True
                wait = None if delay is None or isinstance(exc, TooLate) else self._delay(exc, delay)
                if wait is not None and submit_by is not None and self.clock() + wait >= submit_by:
                    wait = None  # the retry would come too late: the caller decides what follows
                if wait is None:
                    if unclear and not exc.ambiguous:
                        # A later try refused as busy does not undo an earlier one that may have created the job
                        # (whose own run may be what fills the account): the next attempt looks it up first.
                        raise ProviderBusy(str(exc), ambiguous=True, retry_after=exc.retry_after) from exc
                    raise
                self._wait("submit", attempt, exc, wait)
            except ProviderError as exc:
                # A submit refused for its parameters may be refused for our external id (1201 "external_task_id
                # already exists"): an earlier try, in this call or an earlier attempt, created the job and Kling's
                # lookup by our id had not caught up. Our external id is our task id, so a job under it is ours.
                if not (unclear or (isinstance(exc, Refused) and exc.code in PARAM_CODES)):
                    raise
                found = self._lookup(external_id, late=True)
                if found is not None:
                    return found.job_id
                if isinstance(exc, Refused) and exc.names_our_id_taken:
                    # Kling has a job under our id that its lookup does not show yet: it runs and is paid, so the
                    # task must not fail and refund; the next attempt looks it up again.
                    raise ProviderBusy(f"Kling has our job but not yet found: {exc.reason}", exists=True) from exc
                raise
        raise AssertionError("unreachable")

    def _lookup(self, external_id: str, *, late: bool) -> ProviderJob | None:
        """提交结果不明时按我们的 id 查找任务；查询本身暂时失败时结果仍不明（ambiguous）"""
        try:
            return self._find_late(external_id) if late else self.find(external_id)
        except (ProviderBusy, AccessRefused) as exc:
            # Not "certainly not created": the job may exist, so the next attempt looks it up before submitting.
            raise ProviderBusy(f"could not look up the job by our id: {exc}", ambiguous=True) from exc

    def find(self, external_id: str) -> ProviderJob | None:
        """按 external_task_id 查找任务；不存在 → None"""
        try:
            return self.status(external_id)
        except JobNotFound:
            return None

    def _find_late(self, external_id: str) -> ProviderJob | None:
        """查找刚创建、查询可能尚未可见的任务（按退避再试几次）"""
        for delay in (0.0, *self.delays):
            self.sleep(delay)
            found = self.find(external_id)
            if found is not None:
                return found
        return None

    def status(self, job_id: str) -> ProviderJob:
        """查询任务状态"""
        data = self._call("GET", f"/v1/videos/{self.endpoint}/{job_id}")
        raw = str(data.get("task_status") or "")
        state = STATES.get(raw, "unknown")
        result = data.get("task_result")
        videos = result.get("videos") if isinstance(result, dict) else None
        videos = videos if isinstance(videos, list) else []  # an answer of another shape: no video yet
        urls = tuple(v["url"] for v in videos if isinstance(v, dict) and isinstance(v.get("url"), str) and v["url"])
        job_id = str(data.get("task_id") or job_id)
        if state == "succeeded" and not urls:
            # Succeeded without a video yet: it may show up on the next poll, but not after several.
            self.videoless[job_id] = self.videoless.get(job_id, 0) + 1
            if self.videoless[job_id] >= VIDEOLESS_POLLS:
                raise ProviderError(NO_VIDEO)
            state = "unknown"
        else:
            self.videoless.pop(job_id, None)
        message = failure_message(data.get("task_status_msg")) if state == "failed" else None
        return ProviderJob(job_id=job_id, state=state, raw_state=raw, message=message, result_urls=urls)

    def fetch_result(self, job: ProviderJob, dest_dir: Path, *, time_limit: float | None = None) -> Path:
        """下载生成的视频，最多用 time_limit 秒（Kling 的地址会过期，所以要转存）"""
        if not job.result_urls:
            raise ProviderError(NO_VIDEO)
        return download_file(
            self.http,
            job.result_urls[0],
            dest_dir / result_file_name(job.job_id),
            max_bytes=self.max_download_bytes,
            delays=self.delays,
            what="Kling",
            sleep=self.sleep,
            check_url=self.check_url,
            on_chunk=lambda: self.sleep(0.0),  # a job's sleep reports to it, so a cancel stops the download
            time_limit=time_limit,
        )

    # ------------------------------------------------------------ requests

    def token(self) -> str:
        """签发新的 JWT（每个请求一个，永不复用）"""
        now = int(self.clock())
        claims = {"iss": self.access_key, "exp": now + TOKEN_SECONDS, "nbf": now - TOKEN_NOT_BEFORE}
        return jwt.encode(claims, self.secret_key, algorithm="HS256", headers={"alg": "HS256", "typ": "JWT"})

    def request_body(self, *, external_id: str, params: Any, inputs: dict[str, Path]) -> dict:
        """构造提交请求体"""
        body: dict[str, Any] = {
            "model_name": params.model_name,
            "mode": params.mode,
            "duration": str(params.duration),
            "external_task_id": external_id,
        }
        if params.model_name.startswith("kling-v1"):  # Kling 2.x models take no cfg_scale
            body["cfg_scale"] = params.cfg_scale
        if params.prompt:
            body["prompt"] = params.prompt
        if params.negative_prompt:
            body["negative_prompt"] = params.negative_prompt
        if self.endpoint == "image2video":
            path = inputs.get(str(params.image_asset_id))
            if path is None:
                raise InvalidInput("The input image of this task is missing.")
            body["image"] = encode_image(Path(path))
        else:  # image2video takes its shape from the image
            body["aspect_ratio"] = params.aspect_ratio
        return body

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """带重试的请求（仅用于幂等请求）"""
        for attempt, delay in enumerate([*self.delays, None], start=1):
            try:
                return self._send(method, path, body)
            except ProviderBusy as exc:
                if delay is None:
                    raise
                self._wait(f"{method} {path}", attempt, exc, delay)
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, body: dict | None = None) -> dict:
        """发送一次请求；返回 data，或抛 ProviderBusy / ProviderError"""
        headers = {"Authorization": f"Bearer {self.token()}"}
        try:
            timeout = self.lookup_timeout if method == "GET" else httpx.USE_CLIENT_DEFAULT
            resp = self.http.request(method, path, json=body, headers=headers, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ProviderBusy(f"Kling unreachable: {exc}") from exc
        except httpx.RequestError as exc:  # timeouts, dropped connections, redirect loops, undecodable bodies
            raise ProviderBusy(f"no answer from Kling: {exc!r}", ambiguous=True) from exc
        try:
            payload = resp.json()
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        code = payload.get("code")
        code = int(code) if isinstance(code, int | str) and str(code).lstrip("-").isdigit() else None
        status = resp.status_code
        if resp.is_success and code == 0:
            data = payload.get("data")
            return data if isinstance(data, dict) else {}
        # Not Kling's answer (a proxy's page, a body cut short): nothing can be read from it, so it is retried like
        # a 5xx, and a submit so answered may have gone through. A bare 403 (a proxy or firewall in front of Kling)
        # is waited out only on a lookup, where a paid job may run: a submit so refused created nothing.
        bare_403_on_get = status == 403 and method == "GET"
        if code is None and status < 500 and (status not in (401, 403, 429) or bare_403_on_get):
            raise ProviderBusy(f"HTTP {status} without Kling's answer", ambiguous=method == "POST")
        log.warning(
            "Kling %s %s: HTTP %d code %s %r (request %s)",
            method,
            path,
            status,
            code,
            payload.get("message"),
            payload.get("request_id"),
        )
        if code in BUSY_CODES or status >= 500 or (status == 429 and code not in ACCOUNT_CODES):
            retry_after = _seconds(resp.headers.get("retry-after"))
            raise ProviderBusy(f"HTTP {status} code {code}", ambiguous=status >= 500, retry_after=retry_after)
        if method == "GET" and (status == 404 or code == NOT_FOUND_CODE or code in PARAM_CODES):
            raise JobNotFound("Kling no longer knows this job; your credits were refunded.")
        if status == 401 or (code is not None and code in AUTH_CODES):
            raise AccessRefused(refusal_message(status, code, payload.get("message")))
        reason = _reason(payload.get("message"))
        raise Refused(refusal_message(status, code, payload.get("message")), code=code, reason=reason)

    @staticmethod
    def _delay(exc: ProviderBusy, delay: float) -> float:
        """重试前的等待：退避时间，Kling 要求更久（Retry-After）则按它（至多 30 秒）"""
        return max(delay, min(exc.retry_after or 0.0, RETRY_AFTER_CAP))

    def _wait(self, what: str, attempt: int, exc: ProviderBusy, delay: float) -> None:
        delay = self._delay(exc, delay)
        log.warning("Kling %s busy (try %d): %s; retrying in %.2fs", what, attempt, exc, delay)
        self.sleep(delay)


def refusal_message(status: int, code: int | None, reason: Any) -> str:
    """把 Kling 的拒绝原因翻译成用户能懂的话"""
    reason = _reason(reason)
    if status == 401 or (code is not None and code in AUTH_CODES):
        return (
            "Kling did not accept our access keys. This is a problem on our side, not with your request; "
            "your credits were refunded."
        )
    if (code is not None and code in ACCOUNT_CODES) or status == 403:
        return (
            "Kling cannot take new jobs on our account right now. This is a problem on our side; "
            "your credits were refunded. Please try again later."
        )
    if code in CONTENT_CODES:
        return (
            f"Kling refused the prompt or image under its content rules ({reason}). "
            "Please change them and try again; your credits were refunded."
        )
    return (
        f"Kling rejected the request ({reason}). Please check the prompt and settings and try again; "
        "your credits were refunded."
    )


def result_file_name(job_id: str) -> str:
    """下载文件名：只保留任务 id 中的字母、数字、_ 和 -，并限制长度（id 来自 Kling，不能决定写到哪里）"""
    safe = re.sub(r"[^A-Za-z0-9_-]", "", job_id)[:FILE_ID_CHARS]
    return f"kling-{safe or 'video'}.mp4"


def failure_message(reason: Any) -> str:
    """Kling 任务失败的原因（给用户看）"""
    reason = _reason(reason)
    hint = ""
    if any(word in reason.lower() for word in ("risk", "sensitive", "content", "policy", "safety")):
        hint = " Please change the prompt or image and try again."
    return f"Kling could not generate the video ({reason}).{hint} Your credits were refunded."


def encode_image(path: Path) -> str:
    """把输入图片编码为 base64：已是摆正的 sRGB JPEG/PNG 且不超过 10 MB 原样发送，否则摆正、转 sRGB 后转成 JPEG"""
    from PIL import Image

    from gpu_jobs.media import open_image
    from gpu_jobs.media.probe import exif_orientation

    try:
        with Image.open(path) as img:
            fmt, (width, height) = img.format, img.size
            # Kling is sent the picture as we show it: turned by its EXIF orientation, in sRGB.
            as_shown = exif_orientation(img) in (None, 1) and _srgb_or_untagged(img.info.get("icc_profile"))
    except OSError:
        raise InvalidInput("The input image could not be read.") from None
    if min(width, height) < IMAGE_MIN_SIDE:
        raise InvalidInput(
            f"Kling needs an image at least {IMAGE_MIN_SIDE} pixels on each side; this one is {width}x{height}."
        )
    if max(width, height) / min(width, height) > IMAGE_MAX_RATIO:
        raise InvalidInput(
            f"Kling needs an image no more than {IMAGE_MAX_RATIO:g} times as wide as it is tall "
            f"(or the reverse); this one is {width}x{height}."
        )
    if fmt in ("JPEG", "PNG") and as_shown and path.stat().st_size <= IMAGE_MAX_BYTES:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    img = open_image(path)
    img.thumbnail((IMAGE_REENCODE_SIDE, IMAGE_REENCODE_SIDE), Image.Resampling.LANCZOS)
    for quality in (92, 85, 75):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        if buf.tell() <= IMAGE_MAX_BYTES:
            return base64.b64encode(buf.getvalue()).decode("ascii")
    raise InvalidInput("The input image is too large for Kling even after compression.")


def _srgb_or_untagged(profile: Any) -> bool:
    """没有 ICC 描述，或描述就是 sRGB"""
    if not isinstance(profile, bytes) or not profile:
        return True
    from PIL import ImageCms

    try:
        return "srgb" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(profile))).lower()
    except (ImageCms.PyCMSError, OSError, ValueError):
        return False


def _reason(reason: Any) -> str:
    text = " ".join(str(reason or "").split())
    text = text[:REASON_CHARS].rstrip(" .")
    return text or "no reason given"


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
