"""A local HTTP server that behaves as the Kling API: JWT checks, submit, status progression, a served MP4.

Knobs (set on the instance before or during a test):
- ``script``: the states a job walks through, one per status poll; the last one repeats
  (default submitted → processing → succeed; ``hang()`` keeps it processing forever);
- ``fail_reason``: the ``task_status_msg`` of a job whose script ends in ``failed``;
- ``refuse``: ``(http_status, code, message)`` answered to every submit;
- ``busy_submits``: the next submits answered 429 code 1303 (the account's concurrency is full), with a
  ``Retry-After`` of ``retry_after`` seconds when that is set;
- ``concurrency``: how many unfinished jobs the account may have; a submit beyond it is answered 429 code 1303
  (a job counts until its polls reach the end of its script);
- ``errors``: HTTP statuses answered, in order, to the next API requests (429 with code 1302, 5xx with 5000);
- ``lose_submit_response``: the next submit creates the job, then answers 500 (a lost response);
- ``drop_submit``: the next submit answers 500 without creating the job (a request that never arrived);
- ``missing_job``: ``(http_status, code, message)`` answered to a status lookup of a job it does not know;
- ``lagging_lookups``: the next lookups by our id miss a job that exists (Kling's lookup behind its submits);
- ``busy_lookups``: the next lookups by our id answered 429 code 1302 (a rate limit that hits the lookup);
- ``refused_downloads``: the next downloads of a video answered 403 (a link the CDN does not serve yet, or expired);
- ``hold_first_poll``: the first status poll blocks until ``release`` is set (a job killed while waiting);
- ``videoless_polls``: the next polls of a succeeded job answer ``succeed`` without any video in ``task_result``;
- ``video_url``: the URL a succeeded job names for its video, instead of the fake's own ``/files/...``;
- ``redirect_downloads``: a URL the fake's ``/files/...`` answer with a 302 to, instead of the video;
- ``trickle_downloads``: ``(bytes, seconds)``: the video is sent in pieces of that many bytes, that many seconds
  apart (a slow CDN);
- ``clock_offset``: seconds the fake's clock is ahead of ours (negative: behind) when it checks a token's
  ``nbf`` and ``exp``;
- ``unauthorized_lookups``: the next lookups by our id answered 401 code 1003 (a token Kling's clock takes as not
  yet valid);
- ``unauthorized_polls``: the next status polls of a Kling task id answered 401 code 1003 (the token is not yet
  valid: a clock that jumped for a moment);
- ``forbidden_polls``: the next status polls of a Kling task id answered 403 with an HTML page and no Kling ``code``
  (a proxy or firewall in front of Kling).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt

KINDS = ("text2video", "image2video")
MODELS = {
    "text2video": ("kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master"),
    "image2video": ("kling-v1", "kling-v1-5", "kling-v1-6", "kling-v2-master", "kling-v2-1", "kling-v2-1-master"),
}


class FakeKling:
    """本地假 Kling API"""

    def __init__(self, *, access_key: str, secret_key: str, video: Path):
        self.access_key, self.secret_key, self.video = access_key, secret_key, video
        self.script = ["submitted", "processing", "succeed"]
        self.fail_reason = "Failure to pass the risk control system"
        self.refuse: tuple[int, int, str] | None = None
        self.busy_submits = 0
        self.concurrency: int | None = None
        self.retry_after: int | None = None
        self.refused_submits = 0
        self.lagging_lookups = 0
        self.busy_lookups = 0
        self.refused_downloads = 0
        self.errors: list[int] = []
        self.lose_submit_response = False
        self.drop_submit = False
        self.missing_job = (404, 1203, "The requested resource does not exist")
        self.hold_first_poll = False
        self.clock_offset = 0.0
        self.videoless_polls = 0
        self.video_url: str | None = None
        self.redirect_downloads: str | None = None
        self.trickle_downloads: tuple[int, float] | None = None
        self.unauthorized_polls = 0
        self.unauthorized_lookups = 0
        self.forbidden_polls = 0
        self.release = threading.Event()
        self.jobs: dict[str, dict] = {}  # Kling task id -> job
        self.submits: list[dict] = []  # bodies of accepted submits (each one a paid job)
        self.polls: list[str] = []  # ids asked for by status polls
        self.claims: list[dict] = []  # claims of every accepted token
        self.rejected: list[str] = []  # why a request's token was refused
        self.downloads = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKling:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def hang(self) -> None:
        """任务永远停在 processing"""
        self.script = ["submitted", "processing"]

    def fail(self, reason: str | None = None) -> None:
        """任务在 processing 之后失败"""
        self.script = ["submitted", "processing", "failed"]
        self.fail_reason = reason or self.fail_reason

    # ------------------------------------------------------------ request handling (server threads)

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict, bytes, str]:
        if method == "GET" and path.startswith("/files/"):
            self.downloads += 1
            with self._lock:
                if self.refused_downloads:
                    self.refused_downloads -= 1
                    return 403, {}, b"<Error><Code>AccessDenied</Code></Error>", "application/xml"
            if self.redirect_downloads:
                return 302, {"Location": self.redirect_downloads}, b"", "text/plain"
            return 200, {}, self.video.read_bytes(), "video/mp4"
        denied = self._check_token(headers.get("Authorization", ""))
        if denied:
            return _error(401, denied[0], denied[1])
        with self._lock:
            if self.errors:
                status = self.errors.pop(0)
                return _error(status, 1302 if status == 429 else 5000, "busy, try later")
        match = re.fullmatch(r"/v1/videos/(text2video|image2video)(?:/([^/]+))?", path)
        if not match:
            return _error(404, 1202, "Invalid request method or path")
        kind, job_ref = match.groups()
        if method == "POST" and job_ref is None:
            return self._submit(kind, body)
        if method == "GET" and job_ref is not None:
            return self._status(kind, job_ref)
        return _error(404, 1202, "Invalid request method or path")

    def _check_token(self, header: str) -> tuple[int, str] | None:
        if not header.startswith("Bearer "):
            self.rejected.append("no bearer token")
            return 1001, "Authorization is empty"
        token = header.removeprefix("Bearer ")
        try:
            if jwt.get_unverified_header(token).get("typ") != "JWT":
                raise jwt.InvalidTokenError("typ is not JWT")
            claims = jwt.decode(
                token,
                self.secret_key,
                algorithms=["HS256"],
                options={"require": ["iss", "exp", "nbf"], "verify_exp": False, "verify_nbf": False},
            )
            now = time.time() + self.clock_offset
            if not isinstance(claims["exp"], int | float) or claims["exp"] <= now:
                self.rejected.append("expired")
                return 1004, "Authorization is expired"
            if not isinstance(claims["nbf"], int | float) or claims["nbf"] > now:
                self.rejected.append("not yet valid")
                return 1003, "Authorization is not yet valid"
        except jwt.InvalidTokenError as exc:
            self.rejected.append(f"invalid: {exc}")
            return 1002, "Authorization is invalid"
        if claims["iss"] != self.access_key:
            self.rejected.append("unknown access key")
            return 1002, "Authorization is invalid"
        self.claims.append(claims)
        return None

    def _submit(self, kind: str, body: bytes) -> tuple[int, dict, bytes, str]:
        if self.refuse:
            status, code, message = self.refuse
            return _error(status, code, message)
        with self._lock:
            full = self.concurrency is not None and len(self._unfinished()) >= self.concurrency
            if self.busy_submits or full:
                self.busy_submits = max(0, self.busy_submits - 1)
                self.refused_submits += 1
                status, _, payload, ctype = _error(429, 1303, "parallel task over resource pack limit")
                return status, {"Retry-After": str(self.retry_after)} if self.retry_after else {}, payload, ctype
        try:
            req = json.loads(body)
        except ValueError:
            return _error(400, 1200, "Invalid request parameters")
        problem = _invalid(kind, req)
        if problem:
            return _error(400, 1201, problem)
        with self._lock:
            if self.drop_submit:
                self.drop_submit = False
                return _error(500, 5000, "Server internal error")
            external = req.get("external_task_id")
            if external and any(job["external_task_id"] == external for job in self.jobs.values()):
                return _error(400, 1201, "external_task_id already exists")
            task_id = f"kt-{uuid.uuid4().hex[:12]}"
            self.jobs[task_id] = {
                "task_id": task_id,
                "kind": kind,
                "external_task_id": external,
                "polls": 0,
                "created_at": int(time.time() * 1000),
            }
            self.submits.append(req)
            if self.lose_submit_response:
                self.lose_submit_response = False
                return _error(500, 5000, "Server internal error")
        return _ok(
            {
                "task_id": task_id,
                "task_status": "submitted",
                "task_info": {"external_task_id": external},
                "created_at": self.jobs[task_id]["created_at"],
                "updated_at": self.jobs[task_id]["created_at"],
            }
        )

    def _unfinished(self) -> list[dict]:
        """还没有被轮询到结束状态的任务（占着账户的并发名额）"""
        last = len(self.script) - 1
        ended = ("succeed", "failed")
        return [j for j in self.jobs.values() if not j["polls"] or self.script[min(j["polls"] - 1, last)] not in ended]

    def _status(self, kind: str, ref: str) -> tuple[int, dict, bytes, str]:
        job = self.jobs.get(ref)
        if job is None:
            with self._lock:
                busy, self.busy_lookups = self.busy_lookups > 0, max(0, self.busy_lookups - 1)
            if busy:
                return _error(429, 1302, "rate limit exceeded")
            with self._lock:
                refused, self.unauthorized_lookups = (
                    self.unauthorized_lookups > 0,
                    max(0, self.unauthorized_lookups - 1),
                )
            if refused:
                return _error(401, 1003, "Authorization is not yet valid")
            with self._lock:
                lagging, self.lagging_lookups = self.lagging_lookups > 0, max(0, self.lagging_lookups - 1)
            if not lagging:
                job = next((j for j in self.jobs.values() if j["external_task_id"] == ref), None)
        if job is None or job["kind"] != kind:
            return _error(*self.missing_job)
        if ref == job["task_id"]:
            with self._lock:
                unauthorized, self.unauthorized_polls = self.unauthorized_polls > 0, max(0, self.unauthorized_polls - 1)
            if unauthorized:
                return _error(401, 1003, "Authorization is not yet valid")
            with self._lock:
                forbidden, self.forbidden_polls = self.forbidden_polls > 0, max(0, self.forbidden_polls - 1)
            if forbidden:
                return 403, {}, b"<html><body>403 Forbidden</body></html>", "text/html"
        with self._lock:
            first = not self.polls
            self.polls.append(ref)
        if first and self.hold_first_poll:
            self.release.wait(30)
        with self._lock:
            state = self.script[min(job["polls"], len(self.script) - 1)]
            job["polls"] += 1
        data = {
            "task_id": job["task_id"],
            "task_status": state,
            "task_status_msg": "",
            "task_info": {"external_task_id": job["external_task_id"]},
            "created_at": job["created_at"],
            "updated_at": int(time.time() * 1000),
        }
        if state == "failed":
            data["task_status_msg"] = self.fail_reason
        videoless = False
        if state == "succeed":
            with self._lock:
                videoless, self.videoless_polls = self.videoless_polls > 0, max(0, self.videoless_polls - 1)
        if videoless:
            data["task_result"] = {"videos": []}
        elif state == "succeed":
            data["task_result"] = {
                "videos": [
                    {
                        "id": f"v-{job['task_id']}",
                        "url": self.video_url or f"{self.url}/files/{job['task_id']}.mp4",
                        "duration": "1.0",
                    }
                ]
            }
        return _ok(data)


def _invalid(kind: str, req: dict) -> str | None:
    if req.get("model_name", "kling-v1") not in MODELS[kind]:
        return "model_name is invalid"
    if kind == "text2video" and not req.get("prompt"):
        return "prompt is required"
    if len(req.get("prompt") or "") > 2500 or len(req.get("negative_prompt") or "") > 2500:
        return "prompt is too long"
    if req.get("mode", "std") not in ("std", "pro"):
        return "mode is invalid"
    if req.get("duration", "5") not in ("5", "10"):  # a string, as Kling wants it
        return "duration is invalid"
    if req.get("aspect_ratio", "16:9") not in ("16:9", "9:16", "1:1"):
        return "aspect_ratio is invalid"
    if not 0 <= float(req.get("cfg_scale", 0.5)) <= 1:
        return "cfg_scale is invalid"
    if kind == "image2video":
        image = req.get("image") or ""
        if not image:
            return "image is required"
        if not image.startswith(("http://", "https://")):
            try:
                base64.b64decode(image, validate=True)
            except ValueError:
                return "image is not valid base64"
    return None


def _ok(data: dict) -> tuple[int, dict, bytes, str]:
    body = {"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data}
    return 200, {}, json.dumps(body).encode(), "application/json"


def _error(status: int, code: int, message: str) -> tuple[int, dict, bytes, str]:
    body = {"code": code, "message": message, "request_id": str(uuid.uuid4())}
    return status, {}, json.dumps(body).encode(), "application/json"


def _handler(fake: FakeKling) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, headers, payload, ctype = fake.handle(self.command, self.path, self.headers, body)
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                trickle = fake.trickle_downloads if self.path.startswith("/files/") and status == 200 else None
                if trickle is None:
                    self.wfile.write(payload)
                else:
                    size, pause = trickle
                    for start in range(0, len(payload), size):
                        self.wfile.write(payload[start : start + size])
                        self.wfile.flush()
                        time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (a killed job)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:
            pass

    return Handler
