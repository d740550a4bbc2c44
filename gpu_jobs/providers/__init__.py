"""External video providers: the small interface an adapter implements, and the one flow that runs a provider task.

A provider task runs on a CPU function: submit (or resume) → poll with backoff under a deadline → download the
result into the workdir → probe it → hand it to the runner, which re-hosts it in our storage and settles credits.

A provider job is paid the moment it is submitted, so the flow stores the provider's job id on our task
(``ctx.save_state``) before it waits; a restarted job resumes polling that id instead of submitting again. Adding a
provider is one module: a class with ``submit``, ``find``, ``status`` and ``fetch_result`` (see ``Provider``), and a
handler that calls ``run_provider_job``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from gpu_jobs.handlers import JobContext, OutputFile
from lib.errors import InvalidInput, TransientError

log = logging.getLogger("spool.providers")

JobState = Literal["queued", "running", "succeeded", "failed", "unknown"]
MAX_FRACTION = 0.89  # waiting never reports more than this: the download and the upload come after
PAUSE_SLICE = 2.0  # seconds between cancel checks while waiting between polls
DOWNLOAD_LIMIT_S = 300.0  # a whole download, retries included
# A job is sent only while at least this share of the deadline is left: the rest is its time to generate. One sent
# later would be paid for and abandoned unfinished at the deadline.
SUBMIT_SHARE = 0.5
RETRY_AFTER_CAP = 30.0  # the longest wait a provider's Retry-After may ask for
MAX_REDIRECTS = 10
DEFAULT_PORTS = {"http": 80, "https": 443}


class ProviderError(InvalidInput):
    """外部提供方拒绝或失败：任务失败并退款，消息直接给用户看"""

    task_error_code = "provider_error"


class DownloadRefused(ProviderError):
    """提供方的下载地址拒绝了我们（4xx）"""


class AccessRefused(ProviderError):
    """提供方不接受我们的凭据（令牌缺失、无效、尚未生效或已过期）"""


class ProviderBusy(Exception):
    """提供方暂时不可用（429、5xx、网络），可稍后重试"""

    def __init__(
        self, message: str, *, ambiguous: bool = False, exists: bool = False, retry_after: float | None = None
    ):
        super().__init__(message)
        # The request may have reached the provider (a submit may have been accepted).
        self.ambiguous = ambiguous or exists
        self.exists = exists  # the provider said it has a job under our id, which its lookup does not show yet
        self.retry_after = retry_after


@dataclass(frozen=True)
class ProviderJob:
    """提供方任务的状态"""

    job_id: str
    state: JobState
    raw_state: str  # the provider's own word, for logs
    message: str | None = None  # for failed jobs: the reason, in words a user understands
    result_urls: tuple[str, ...] = ()


class Provider(Protocol):
    """外部提供方适配器接口"""

    name: str  # shown to users: "Queued at Kling"

    def submit(self, *, external_id: str, params: Any, inputs: dict[str, Path], submit_by: float | None = None) -> str:
        """提交任务，返回提供方任务 id；submit_by（time.time() 的秒）起不再发出提交（ProviderBusy：暂时失败或已太晚）"""
        ...

    def find(self, external_id: str) -> ProviderJob | None:
        """按我们的任务 id 查找已提交的任务（提交结果不明时使用）"""
        ...

    def status(self, job_id: str) -> ProviderJob:
        """查询任务状态"""
        ...

    def fetch_result(self, job: ProviderJob, dest_dir: Path, *, time_limit: float) -> Path:
        """把成功任务的结果下载到本地目录，重试在内最多用 time_limit 秒（超时 → ProviderBusy）"""
        ...


def backoff(base: float, tries: int, cap: float) -> list[float]:
    """指数退避的等待时间列表"""
    return [min(cap, base * 2**i) for i in range(tries)]


def run_provider_job(ctx: JobContext, provider: Provider, *, deadline_s: float, interval_s: float) -> list[OutputFile]:
    """运行一个提供方任务：提交或恢复、轮询、下载、探测"""
    job_id, started_at = submit_or_resume(ctx, provider, deadline_s=deadline_s, interval_s=interval_s)
    job = wait_for(ctx, provider, job_id, started_at=started_at, deadline_s=deadline_s, interval_s=interval_s)
    if not ctx.state.get("provider_finished"):
        _save(ctx, {"provider_finished": True})  # a requeued download resumes it, maybe past the deadline
    ctx.progress(0.9, f"Downloading the video from {provider.name}")
    limit = DOWNLOAD_LIMIT_S
    # One allowance for the download and the one with a fresh link: the poll deadline plus it fit the job's limit.
    download_deadline = time.monotonic() + limit
    try:
        try:
            path = provider.fetch_result(job, ctx.workdir, time_limit=limit)
        except DownloadRefused as exc:
            # A CDN can refuse a link for a moment after the job finished, and a link expires: ask for a fresh one once.
            log.warning("task %s: %s; asking %s for a fresh link", ctx.task_id, exc, provider.name)
            _pause(ctx, max(interval_s, 0.01), 0.9, f"Downloading the video from {provider.name}")
            job = provider.status(job.job_id)
            if job.state != "succeeded":
                raise
            left = download_deadline - time.monotonic()
            if left <= 0:
                raise ProviderBusy(f"the download took longer than {_minutes(limit)}") from exc
            path = provider.fetch_result(job, ctx.workdir, time_limit=left)
    except (ProviderBusy, AccessRefused) as exc:  # AccessRefused: asking for a fresh link of the finished job
        raise TransientError(f"download from {provider.name} failed: {exc}") from exc
    ctx.progress(0.95, "Checking the video")
    ctx.result.update({"provider": provider.name.lower(), "provider_job_id": job.job_id})
    return [probe_output(path, provider, job)]


def submit_or_resume(ctx: JobContext, provider: Provider, *, deadline_s: float, interval_s: float) -> tuple[str, float]:
    """已有提供方任务 id 则恢复轮询；否则提交（满载时等空位），并在等待前保存 id；返回 id 与期限的起点"""
    state = ctx.state
    if state.get("provider_job_id"):
        log.info("task %s: resuming %s job %s", ctx.task_id, provider.name, state["provider_job_id"])
        return state["provider_job_id"], float(state.get("provider_submitted_at") or time.time())
    started_at = time.time()  # the deadline counts from here: waiting for a free slot is waiting too
    if state.get("provider_submitting"):  # an earlier attempt died between submitting and saving the id
        # Its deadline counts from the first submit, not from each attempt that died before the save: the job a
        # resend below is refused for (our id exists already) and adopts is the one that submit created.
        started_at = float(state.get("provider_submitted_at") or started_at)
        found = _find(provider, ctx.task_id)
        if found is not None:
            log.info("task %s: adopting %s job %s found by our id", ctx.task_id, provider.name, found.job_id)
            return _saved(ctx, found.job_id, started_at)
        # Too late to send a job that can finish; but a job the provider said it has runs and is paid, whatever
        # its lookup shows: a resend is refused again for our id and the job looked up once more.
        if time.time() - started_at >= deadline_s * SUBMIT_SHARE and not state.get("provider_exists"):
            raise _no_slot(provider, deadline_s)
    ctx.progress(0.03, f"Sending the request to {provider.name}")
    _save(ctx, {"provider": provider.name.lower(), "provider_submitting": True, "provider_submitted_at": started_at})
    submit_by = started_at + deadline_s * SUBMIT_SHARE
    # A resend of a job the provider said it has is refused as a duplicate (it creates nothing): not bound.
    bound = None if state.get("provider_exists") else submit_by
    delay = max(interval_s, 0.01)
    while True:
        try:
            job_id = provider.submit(external_id=ctx.task_id, params=ctx.params, inputs=ctx.inputs, submit_by=bound)
            break
        except ProviderBusy as exc:
            if exc.ambiguous:  # the next attempt looks the job up by our id before submitting again
                if exc.exists:
                    _save(ctx, {"provider_exists": True})
                raise TransientError(f"{provider.name} did not accept the job: {exc}") from exc
            # Certainly not created: the provider's rate or concurrency limit is full, or it is down. Other jobs
            # of ours end and free a slot, so this one waits in line (a retry would only spend an attempt).
            wait = max(delay, min(exc.retry_after or 0.0, RETRY_AFTER_CAP))
            if time.time() + wait >= submit_by:
                if state.get("provider_exists"):  # the job runs and is paid, maybe in the very slot we wait for
                    raise TransientError(f"{provider.name} has the job but it is not found yet: {exc}") from exc
                raise _no_slot(provider, deadline_s) from exc
            log.warning("task %s: %s has no room for the job (%s); trying again", ctx.task_id, provider.name, exc)
            _pause(ctx, wait, 0.03, f"Waiting for a free slot at {provider.name}")
            delay = min(delay * 1.5, 30.0)
    log.info("task %s: submitted %s job %s", ctx.task_id, provider.name, job_id)
    return _saved(ctx, job_id, started_at)


def _no_slot(provider: Provider, deadline_s: float) -> ProviderError:
    """提供方在可以提交的时间内没有接下任务"""
    return ProviderError(
        f"{provider.name} could not take the job within {_minutes(deadline_s * SUBMIT_SHARE)}; "
        "your credits were refunded. Please try again later."
    )


def wait_for(
    ctx: JobContext, provider: Provider, job_id: str, *, started_at: float, deadline_s: float, interval_s: float
) -> ProviderJob:
    """轮询直到成功；失败或超过期限 → ProviderError；未知状态视为仍在运行"""
    deadline = started_at + deadline_s
    interval_s = max(interval_s, 0.01)
    delay, cap = interval_s, max(interval_s, min(6 * interval_s, 30.0))
    state, message, last_raw = "queued", f"Queued at {provider.name}", None
    running_since: float | None = None  # when this attempt first saw the job generating
    while True:
        try:
            job = provider.status(job_id)
        except (ProviderBusy, AccessRefused) as exc:  # the poll loop is itself the retry, until the deadline
            # A refused token while the paid job runs is most likely a clock briefly off, ours or theirs.
            log.warning("task %s: status of %s job %s unavailable: %s", ctx.task_id, provider.name, job_id, exc)
            job = None
        if job is not None:
            if job.state == "succeeded":
                return job
            if job.state == "failed":
                raise ProviderError(
                    job.message or f"{provider.name} could not generate the video. Your credits were refunded."
                )
            if job.state == "unknown" and job.raw_state != last_raw:
                log.warning("task %s: unknown %s state %r; still waiting", ctx.task_id, provider.name, job.raw_state)
            last_raw = job.raw_state
            state = "queued" if job.state == "queued" else "running"
            message = f"Queued at {provider.name}" if state == "queued" else "Generating video"
            if state == "running" and running_since is None:
                running_since = time.time()
        now = time.time()
        if now >= deadline and ctx.state.get("provider_finished"):
            # An earlier attempt saw it finish (its download was requeued): a status we cannot read now is no
            # reason to call it unfinished and refund a paid video.
            raise TransientError(f"status of the finished {provider.name} job {job_id} unavailable")
        if now >= deadline:
            raise ProviderError(
                f"The provider did not finish within {_minutes(deadline_s)}; your credits were refunded."
            )
        # Generating rises from when it began: a long queue or wait for a slot must not put it near the end at once.
        fraction = waiting_fraction(state, now - (running_since or started_at), deadline_s)
        _pause(ctx, min(delay, deadline - now), fraction, message)
        delay = min(delay * 1.5, cap)


def waiting_fraction(state: str, elapsed: float, deadline_s: float) -> float:
    """等待中的进度：随时间上升，排队时不超过 0.3，永远不到 0.9"""
    tau = max(1.0, min(deadline_s / 3, 120.0))
    fraction = 0.9 - 0.85 * math.exp(-max(0.0, elapsed) / tau)
    fraction = min(fraction, 0.3) if state == "queued" else max(fraction, 0.3)
    return min(fraction, MAX_FRACTION)


def public_only(*, exempt: str | None) -> Callable[[httpx.URL, str], str | None]:
    """下载地址检查：只允许 https 且只解析到公网地址（与 exempt 同源的地址除外），否则 ProviderError；返回要连接的 IP"""
    exempt_origin = _origin(httpx.URL(exempt)) if exempt else None

    def check(url: httpx.URL, what: str) -> str | None:
        """检查一个地址（首个地址与每次重定向）：返回检查过的 IP（连接只去那里），豁免的地址 → None"""
        if exempt_origin is not None and _origin(url) == exempt_origin:
            return None
        refused = ProviderError(
            f"{what} named an address for the video that we do not download from. Your credits were refunded."
        )
        if url.scheme != "https" or not url.host:
            log.warning("refused to download %s from %s: not https", url, what)
            raise refused
        try:
            infos = socket.getaddrinfo(url.host, url.port or 443, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ProviderBusy(f"{what}: could not resolve {url.host}: {exc}") from exc
        for info in infos:
            if not _public(str(info[4][0])):
                log.warning("refused to download %s from %s: %s is not a public address", url, what, info[4][0])
                raise refused
        return str(infos[0][4][0]).split("%", 1)[0]

    return check


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """地址的来源（协议、主机、端口）"""
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme)


def _public(address: str) -> bool:
    """地址是否为公网地址"""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id (fe80::1%eth0) is not part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    special = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast
    return ip.is_global and not (special or ip.is_unspecified)


def download_file(
    client: httpx.Client,
    url: str,
    dest: Path,
    *,
    max_bytes: int,
    delays: list[float],
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    check_url: Callable[[httpx.URL, str], str | None] | None = None,
    on_chunk: Callable[[], None] | None = None,
    time_limit: float | None = None,
) -> Path:
    """流式下载：临时错误按退避重试；4xx、过大 → ProviderError；逐跳检查地址；每块后调 on_chunk；超时 → ProviderBusy"""
    limit = DOWNLOAD_LIMIT_S if time_limit is None else time_limit
    deadline = time.monotonic() + limit
    for attempt, delay in enumerate([*delays, None], start=1):
        try:
            with _open(client, httpx.URL(url), what=what, check_url=check_url) as resp:
                if resp.status_code == 429 or resp.status_code >= 500:
                    raise ProviderBusy(f"{what}: HTTP {resp.status_code}")
                if resp.status_code >= 400:
                    raise DownloadRefused(
                        f"The finished video could not be downloaded from {what} "
                        f"(HTTP {resp.status_code}). Your credits were refunded."
                    )
                size = 0
                with open(dest, "wb") as out:
                    for chunk in resp.iter_bytes():  # as the data arrives: a trickle still reaches on_chunk
                        size += len(chunk)
                        if size > max_bytes:
                            raise ProviderError(
                                f"The video from {what} is larger than {max_bytes:,} bytes. Your credits were refunded."
                            )
                        out.write(chunk)
                        if on_chunk is not None:
                            on_chunk()
                        if time.monotonic() > deadline:
                            raise ProviderBusy(f"the download took longer than {_minutes(limit)}")
            return dest
        except (ProviderBusy, httpx.RequestError) as exc:  # RequestError: also redirect loops, undecodable bodies
            if delay is None or time.monotonic() + delay >= deadline:
                raise ProviderBusy(f"{what}: {exc}") from exc
            log.warning("download from %s failed (try %d): %s; retrying in %.1fs", what, attempt, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")


@contextmanager
def _open(
    client: httpx.Client, url: httpx.URL, *, what: str, check_url: Callable[[httpx.URL, str], str | None] | None
) -> Iterator[httpx.Response]:
    """发出 GET 并逐跳跟随重定向（每一跳先经 check_url 检查，并只连接检查过的地址），产出最终的流式应答"""
    for _ in range(MAX_REDIRECTS + 1):
        address = check_url(url, what) if check_url is not None else None
        target, pinned = url, {}
        if address is not None:
            # To the address checked, not to whatever the name resolves to next (a DNS rebinding); TLS and HTTP
            # still name the host, so its certificate is verified against it. Not kept open: a connection is
            # pooled by address, and another host behind the same address must get its own TLS session.
            target = url.copy_with(host=address)
            headers = {"Host": url.netloc.decode("ascii"), "Connection": "close"}
            pinned = {"headers": headers, "extensions": {"sni_hostname": url.host}}
        with client.stream("GET", target, follow_redirects=False, **pinned) as resp:
            location = resp.headers.get("location") if resp.is_redirect else None
            if location is None:
                yield resp
                return
            url = url.join(location)  # against the name, not the address
    raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects", request=resp.request)


def probe_output(path: Path, provider: Provider, job: ProviderJob) -> OutputFile:
    """探测下载的视频，生成输出文件"""
    from gpu_jobs.media import probe_file

    try:
        info = probe_file(path)
    except InvalidInput as exc:
        raise ProviderError(
            f"{provider.name} returned a file we could not read ({exc.message}). Your credits were refunded."
        ) from None
    if info["kind"] != "video":
        raise ProviderError(f"{provider.name} returned {info['kind']} instead of a video. Your credits were refunded.")
    return OutputFile(
        path=path,
        kind="video",
        mime=info["mime"],
        width=info["width"],
        height=info["height"],
        duration_s=info["duration_s"],
        fps=info["fps"],
        metadata={"provider": provider.name.lower(), "provider_job_id": job.job_id},
    )


def _find(provider: Provider, external_id: str) -> ProviderJob | None:
    try:
        return provider.find(external_id)
    except (ProviderBusy, AccessRefused) as exc:  # the job may exist and be paid: never fail the task for it
        raise TransientError(f"could not look up the {provider.name} job: {exc}") from exc


def _saved(ctx: JobContext, job_id: str, started_at: float) -> tuple[str, float]:
    _save(ctx, {"provider_job_id": job_id, "provider_submitted_at": started_at, "provider_submitting": False})
    return job_id, started_at


def _save(ctx: JobContext, state: dict) -> None:
    ctx.save_state(state)
    ctx.state.update(state)


def cancelable_sleep(ctx: JobContext) -> Callable[[float], None]:
    """给适配器的重试用的 sleep：等待中定期报到，任务被取消时抛出 TaskCanceled"""
    return lambda seconds: _pause(ctx, seconds, 0.0, None)  # progress never goes back: 0 reports nothing new


def _pause(ctx: JobContext, seconds: float, fraction: float, message: str | None) -> None:
    """等待下一次轮询；期间定期报告进度（也借此发现取消）"""
    ctx.progress(fraction, message)
    end = time.monotonic() + max(0.0, seconds)
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, PAUSE_SLICE))
        ctx.progress(fraction, message)


def _minutes(seconds: float) -> str:
    if seconds < 60:
        return "1 second" if seconds == 1 else f"{seconds:g} seconds"
    minutes = round(seconds / 60, 1)
    return "1 minute" if minutes == 1 else f"{minutes:g} minutes"
