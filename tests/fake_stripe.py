"""A local HTTP server standing in for Stripe's API, and webhook payloads signed the way Stripe signs them.

The server speaks the part of Stripe's wire format the app uses: form-encoded POSTs to /v1/customers and
/v1/checkout/sessions, GETs of a session or of a paid session's PaymentIntent, JSON answers, `Idempotency-Key`
replays, Stripe error bodies. Each request is recorded (method, path, the flat form as sent, headers) so tests can
read exactly what went over the wire. ``pay(session_id)`` and ``expire(session_id)`` move a session on, as the buyer
or Stripe would.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

CARD_DECLINED = {
    "type": "card_error",
    "code": "card_declined",
    "decline_code": "generic_decline",
    "message": "Your card was declined.",
}


@dataclass
class FakeRequest:
    method: str
    path: str
    form: dict[str, str]
    headers: dict[str, str]


@dataclass
class FakeStripe:
    """记录请求、像 Stripe 一样应答的本地服务器"""

    requests: list[FakeRequest] = field(default_factory=list)
    failures: dict[str, tuple[int, dict]] = field(default_factory=dict)
    missing_customers: set[str] = field(default_factory=set)  # customers deleted at Stripe
    sessions: dict[str, dict] = field(default_factory=dict)  # checkout sessions created, by id
    payment_intents: dict[str, dict] = field(default_factory=dict)  # the PaymentIntents of paid sessions, by id
    _intent_metadata: dict[str, dict] = field(default_factory=dict)  # a session's payment_intent_data[metadata]
    _replays: dict[str, tuple[dict, int, dict]] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeStripe:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self._serve("POST")

            def do_GET(self):
                self._serve("GET")

            def _serve(self, method: str):
                body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
                request = FakeRequest(
                    method,
                    self.path.split("?", 1)[0],
                    dict(parse_qsl(body, keep_blank_values=True)),
                    {k.lower(): v for k, v in self.headers.items()},
                )
                status, payload, extra = fake.answer(request)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_fake_{next(fake._ids)}")
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def down(self) -> None:
        """停止监听：之后的连接被拒绝（Stripe 不可达）"""
        self.stop()

    def fail(self, path: str, status: int = 402, error: dict | None = None) -> None:
        """让某个路径之后的请求都返回 Stripe 错误"""
        self.failures[path] = (status, {"error": error or CARD_DECLINED})

    def posts(self, path: str) -> list[FakeRequest]:
        return [r for r in self.requests if r.path == path and r.method == "POST"]

    def gets(self, path: str) -> list[FakeRequest]:
        return [r for r in self.requests if r.path == path and r.method == "GET"]

    def pay(self, session_id: str, *, payment_intent: str = "pi_test_1", amount_total: int = 500) -> dict:
        """买家付了款：会话完成、已付"""
        paid = {"status": "complete", "payment_status": "paid", "payment_intent": payment_intent}
        self.sessions[session_id].update(paid, amount_total=amount_total, currency="usd")
        self.payment_intents[payment_intent] = {
            "id": payment_intent,
            "object": "payment_intent",
            "amount": amount_total,
            "currency": "usd",
            "status": "succeeded",
            "metadata": self._intent_metadata.get(session_id, {}),
            "livemode": False,
        }
        return self.sessions[session_id]

    def expire(self, session_id: str) -> dict:
        """会话过期未付"""
        self.sessions[session_id].update(status="expired")
        return self.sessions[session_id]

    def answer(self, request: FakeRequest) -> tuple[int, dict, dict]:
        self.requests.append(request)
        if request.path in self.failures:
            status, body = self.failures[request.path]
            return status, body, {"Stripe-Should-Retry": "false"}
        key = request.headers.get("idempotency-key")
        if key and key in self._replays:
            form, status, body = self._replays[key]
            if form != request.form:
                return (
                    400,
                    {
                        "error": {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can"
                            " only be used with the same parameters they were first used with.",
                        }
                    },
                    {},
                )
            return status, body, {"Idempotent-Replayed": "true"}
        status, body = self.create(request)
        if key:
            self._replays[key] = (request.form, status, body)
        return status, body, {}

    def create(self, request: FakeRequest) -> tuple[int, dict]:
        params = nest(request.form)
        n = next(self._ids)
        if request.method == "GET" and request.path.startswith("/v1/checkout/sessions/"):
            found = self.sessions.get(request.path.rsplit("/", 1)[1])
            if found is None:
                return 404, {
                    "error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such session"}
                }
            return 200, found
        if request.method == "GET" and request.path.startswith("/v1/payment_intents/"):
            found = self.payment_intents.get(request.path.rsplit("/", 1)[1])
            if found is None:
                return 404, {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "resource_missing",
                        "message": "No such payment_intent",
                    }
                }
            return 200, found
        if request.path == "/v1/customers":
            return 200, {
                "id": f"cus_fake{n}",
                "object": "customer",
                "email": params.get("email"),
                "metadata": params.get("metadata", {}),
                "livemode": False,
            }
        if request.path == "/v1/checkout/sessions" and params.get("customer") in self.missing_customers:
            return 400, {
                "error": {
                    "type": "invalid_request_error",
                    "code": "resource_missing",
                    "param": "customer",
                    "message": f"No such customer: '{params['customer']}'",
                }
            }
        if request.path == "/v1/checkout/sessions":
            session_id = f"cs_test_fake{n}"
            self._intent_metadata[session_id] = params.get("payment_intent_data", {}).get("metadata", {})
            self.sessions[session_id] = {
                "id": session_id,
                "object": "checkout.session",
                "mode": params.get("mode"),
                "url": f"https://checkout.stripe.com/c/pay/{session_id}",
                "status": "open",
                "payment_status": "unpaid",
                "customer": params.get("customer"),
                "client_reference_id": params.get("client_reference_id"),
                "metadata": params.get("metadata", {}),
                "success_url": params.get("success_url"),
                "cancel_url": params.get("cancel_url"),
                "payment_intent": None,
                "amount_total": None,
                "livemode": False,
            }
            return 200, self.sessions[session_id]
        return 404, {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL {request.path}"}}


def nest(form: dict[str, str]) -> dict:
    """把 Stripe 的表单键（a[b][0][c]）还原为嵌套字典"""
    out: dict = {}
    for key, value in form.items():
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def sign(payload: str, secret: str, timestamp: int | None = None) -> str:
    """按 Stripe 的方式签名：t=...,v1=HMAC-SHA256(secret, "t.payload")"""
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{timestamp}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


_event_ids = itertools.count(1)


def event(kind: str, obj: dict, event_id: str | None = None) -> dict:
    """一个 Stripe 事件（快照负载）"""
    return {
        "id": event_id or f"evt_test_{time.monotonic_ns()}_{next(_event_ids)}",
        "object": "event",
        "api_version": "2025-01-27.acacia",
        "created": int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "type": kind,
        "data": {"object": obj},
    }


def session(
    session_id: str,
    metadata: dict,
    *,
    payment_status: str = "paid",
    status: str = "complete",
    payment_intent: str | None = "pi_test_1",
    amount_total: int = 500,
) -> dict:
    """Checkout Session 对象（事件里的样子）"""
    return {
        "id": session_id,
        "object": "checkout.session",
        "mode": "payment",
        "status": status,
        "payment_status": payment_status,
        "payment_intent": payment_intent,
        "amount_total": amount_total,
        "currency": "usd",
        "client_reference_id": metadata.get("user_id"),
        "metadata": metadata,
    }


def charge(metadata: dict, *, amount: int = 500, amount_refunded: int, payment_intent: str = "pi_test_1") -> dict:
    """Charge 对象（charge.refunded 事件里的样子；metadata 来自 payment_intent_data）"""
    return {
        "id": f"ch_test_{payment_intent}",
        "object": "charge",
        "amount": amount,
        "amount_refunded": amount_refunded,
        "refunded": amount_refunded >= amount,
        "currency": "usd",
        "payment_intent": payment_intent,
        "metadata": metadata,
        "paid": True,
        "status": "succeeded",
    }


def dispute(*, amount: int = 500, payment_intent: str = "pi_test_1", status: str = "needs_response") -> dict:
    """Dispute 对象（charge.dispute.* 事件里的样子；不带购买的 metadata）"""
    return {
        "id": f"dp_test_{payment_intent}",
        "object": "dispute",
        "amount": amount,
        "currency": "usd",
        "charge": f"ch_test_{payment_intent}",
        "payment_intent": payment_intent,
        "reason": "fraudulent",
        "status": status,
        "metadata": {},
    }
