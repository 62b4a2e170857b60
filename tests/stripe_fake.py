"""A small Stripe on loopback: the REST endpoints the SDK calls, and the events Stripe would send.

Stripe itself is unreachable from the test machines, so this is the one
stand-in the project allows. It speaks Stripe's wire protocol for what
`cheapest.billing` uses: form-encoded POST bodies with bracketed nesting
(`line_items[0][price]=...`), Bearer authentication, `Idempotency-Key`
replay, JSON objects, and Stripe's error shape `{"error": {"type", "code",
"message", "param"}}` with its HTTP statuses. Objects it creates follow the
current API version's shapes (period ends on subscription items, the
invoice's subscription under `parent.subscription_details`).

Events are produced as Python dicts by `complete_session`, `renew`,
`fail_payment` and `cancel`; tests sign and deliver them themselves.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

API_VERSION = "2026-10-28.endive"
PERIOD_S = 30 * 86_400


def _id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(12)}"


def decode_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding back to nested dicts/lists: a[b][0][c]=v."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        parts = re.findall(r"[^\[\]]+", key)
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt_is_index = not last and parts[i + 1].isdigit()
            if isinstance(node, list):
                idx = int(part)
                while len(node) <= idx:
                    node.append(None)
                if last:
                    node[idx] = value
                else:
                    if node[idx] is None:
                        node[idx] = [] if nxt_is_index else {}
                    node = node[idx]
            else:
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, [] if nxt_is_index else {})
    return root


class StripeError(Exception):
    def __init__(self, status: int, type_: str, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error": {"type": type_, "message": message, "code": code,
                                                     "param": param}}


class FakeStripe:
    def __init__(self, api_key: str, prices: dict[str, int]) -> None:
        """`prices`: recurring monthly USD price id -> unit amount in cents."""
        self.api_key = api_key
        self.prices = prices
        self.sessions: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self._idempotent: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeStripe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # -- HTTP ------------------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                try:
                    status, payload = fake._dispatch(method, self.path, dict(self.headers.items()), body)
                except StripeError as err:
                    status, payload = err.status, err.body
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("Request-Id", _id("req"))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

        return Handler

    def _dispatch(self, method: str, path: str, headers: dict[str, str], body: str) -> tuple[int, dict[str, Any]]:
        headers = {k.lower(): v for k, v in headers.items()}
        params = decode_form(body)
        with self._lock:
            self.requests.append({"method": method, "path": path, "headers": headers, "params": params})
        if headers.get("authorization") != f"Bearer {self.api_key}":
            raise StripeError(401, "invalid_request_error", "Invalid API Key provided", "api_key_invalid")
        key = headers.get("idempotency-key")
        if method == "POST" and key:
            with self._lock:
                seen = self._idempotent.get(key)
            if seen is not None:
                if seen[0] != body:
                    raise StripeError(400, "idempotency_error",
                                      "Keys for idempotent requests can only be used with the same parameters")
                return seen[1], seen[2]
        if method == "POST" and path == "/v1/checkout/sessions":
            status, out = 200, self._create_session(params)
        elif method == "GET" and path.startswith("/v1/checkout/sessions/"):
            sid = path.rsplit("/", 1)[1]
            if sid not in self.sessions:
                raise StripeError(404, "invalid_request_error", f"No such checkout.session: '{sid}'",
                                  "resource_missing", "id")
            status, out = 200, self.sessions[sid]
        else:
            raise StripeError(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path}).")
        if method == "POST" and key:
            with self._lock:
                self._idempotent[key] = (body, status, out)
        return status, out

    def _create_session(self, p: dict[str, Any]) -> dict[str, Any]:
        mode = p.get("mode")
        if mode not in ("payment", "subscription", "setup"):
            raise StripeError(400, "invalid_request_error", "Invalid mode", "parameter_invalid_string", "mode")
        if not p.get("success_url"):
            raise StripeError(400, "invalid_request_error", "Missing required param: success_url.",
                              "parameter_missing", "success_url")
        items = p.get("line_items") or []
        if not items:
            raise StripeError(400, "invalid_request_error", "Missing required param: line_items.",
                              "parameter_missing", "line_items")
        for i, item in enumerate(items):
            if item.get("price") not in self.prices:
                raise StripeError(400, "invalid_request_error", f"No such price: '{item.get('price')}'",
                                  "resource_missing", f"line_items[{i}][price]")
        sid = _id("cs")
        session = {
            "id": sid, "object": "checkout.session", "mode": mode, "status": "open",
            "payment_status": "unpaid", "client_reference_id": p.get("client_reference_id"),
            "metadata": p.get("metadata") or {}, "customer": None, "subscription": None,
            "customer_email": p.get("customer_email"), "success_url": p["success_url"],
            "cancel_url": p.get("cancel_url"), "created": int(time.time()), "livemode": False,
            "url": f"https://checkout.stripe.com/c/pay/{sid}",
            "_line_items": items, "_subscription_data": p.get("subscription_data") or {},
        }
        with self._lock:
            self.sessions[sid] = session
        return {k: v for k, v in session.items() if not k.startswith("_")}

    # -- events, as Stripe would send them ---------------------------------------------------------------
    @staticmethod
    def event(type_: str, obj: dict[str, Any], created: int) -> dict[str, Any]:
        return {"id": _id("evt").replace("evt_test_", "evt_"), "object": "event", "api_version": API_VERSION,
                "created": created, "type": type_, "livemode": False, "pending_webhooks": 1,
                "data": {"object": json.loads(json.dumps(obj))}, "request": {"id": None, "idempotency_key": None}}

    def complete_session(self, session_id: str, now: int, email: str = "payer@example.com") -> list[dict]:
        """The customer paid on the hosted page: customer, subscription and first invoice appear."""
        s = self.sessions[session_id]
        price = s["_line_items"][0]["price"]
        customer = _id("cus")
        sub = {
            "id": _id("sub"), "object": "subscription", "customer": customer, "status": "active",
            "created": now, "metadata": s["_subscription_data"].get("metadata") or {},
            "items": {"object": "list", "data": [{
                "id": _id("si"), "object": "subscription_item", "price": {"id": price, "object": "price"},
                "current_period_start": now, "current_period_end": now + PERIOD_S, "quantity": 1}]},
            "cancel_at_period_end": False,
        }
        self.subscriptions[sub["id"]] = sub
        s.update(status="complete", payment_status="paid", customer=customer, subscription=sub["id"])
        public = {k: v for k, v in s.items() if not k.startswith("_")}
        public["customer_details"] = {"email": email, "name": "Pat Payer"}
        created = dict(sub, status="incomplete")
        return [
            self.event("customer.subscription.created", created, now),
            self.event("invoice.paid", self._invoice(sub, now, "subscription_create"), now),
            self.event("customer.subscription.updated", dict(sub), now),
            self.event("checkout.session.completed", public, now),
        ]

    def renew(self, sub_id: str, now: int) -> list[dict]:
        sub = self.subscriptions[sub_id]
        item = sub["items"]["data"][0]
        item.update(current_period_start=now, current_period_end=now + PERIOD_S)
        sub["status"] = "active"
        return [self.event("invoice.paid", self._invoice(sub, now, "subscription_cycle"), now),
                self.event("customer.subscription.updated", dict(sub), now)]

    def fail_payment(self, sub_id: str, now: int) -> list[dict]:
        sub = self.subscriptions[sub_id]
        sub["status"] = "past_due"
        return [self.event("invoice.payment_failed", self._invoice(sub, now, "subscription_cycle", paid=False), now),
                self.event("customer.subscription.updated", dict(sub), now)]

    def cancel(self, sub_id: str, now: int) -> list[dict]:
        sub = self.subscriptions[sub_id]
        sub["status"] = "canceled"
        return [self.event("customer.subscription.deleted", dict(sub), now)]

    def _invoice(self, sub: dict[str, Any], now: int, reason: str, paid: bool = True) -> dict[str, Any]:
        item = sub["items"]["data"][0]
        price = item["price"]["id"]
        amount = self.prices[price]
        return {
            "id": _id("in"), "object": "invoice", "customer": sub["customer"], "currency": "usd",
            "amount_due": amount, "amount_paid": amount if paid else 0, "status": "paid" if paid else "open",
            "billing_reason": reason, "created": now,
            "parent": {"type": "subscription_details", "subscription_details": {
                "subscription": sub["id"], "metadata": sub["metadata"]}},
            "lines": {"object": "list", "data": [{
                "id": _id("il"), "object": "line_item", "amount": amount,
                "period": {"start": item["current_period_start"], "end": item["current_period_end"]},
                "pricing": {"type": "price_details", "price_details": {"price": price}}}]},
        }
