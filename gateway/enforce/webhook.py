"""Tells a webhook of each new approval request and each decision: an httpx POST, retried
with backoff, signed so the receiver can check it came from this gateway.

Signature: header `X-Pgwarden-Signature: t=<unix time>,v1=<hex>`, where hex is
HMAC-SHA256(key, "<unix time>." + body). The receiver recomputes it over the raw body and
rejects a time too far from its own clock (replays)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any

import httpx
import orjson

from gateway.control.models import ApprovalRequest

log = logging.getLogger("pgwarden.webhook")

SIGNATURE_HEADER = "X-Pgwarden-Signature"
EVENT_HEADER = "X-Pgwarden-Event"
FIRST_BACKOFF_SECONDS = 0.5


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(key: bytes, header: str, body: bytes) -> bool:
    """What a receiver does (and the tests): recompute and compare in constant time."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    stamp = parts.get("t", "")
    if not stamp.isdigit():
        return False
    return hmac.compare_digest(sign(key, int(stamp), body), header)


def payload(event: str, request: ApprovalRequest, fmt: str) -> dict[str, Any]:
    if fmt == "slack":
        who = request.subject
        votes = ", ".join(f"{v.subject} ({v.verdict}: {v.note})" for v in request.votes)
        lines = [
            f"*pgwarden approval {request.id}: {event}*",
            f"{who} on {request.target}: `{' '.join(request.text.split())[:500]}`",
            "Reasons: " + "; ".join(request.reasons),
        ]
        if request.justification:
            lines.append(f"Justification: {request.justification}")
        if votes:
            lines.append(f"Votes: {votes}")
        if event == "requested":
            lines.append(f"Approve: `pgwarden approvals approve {request.id} --note '...'`")
        return {"text": "\n".join(lines)}
    body = request.to_json()
    body.pop("grant_key", None)
    return {"event": event, "request": body}


class Webhook:
    """One per gateway; `announce` never blocks the caller (each event is its own task)."""

    def __init__(
        self,
        url: str,
        key: bytes,
        *,
        fmt: str = "json",
        attempts: int = 5,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.key = key
        self.fmt = fmt
        self.attempts = attempts
        self._client = httpx.AsyncClient(timeout=timeout)
        self._tasks: set[asyncio.Task[None]] = set()

    def announce(self, event: str, request: ApprovalRequest) -> None:
        body = orjson.dumps(payload(event, request, self.fmt))
        task = asyncio.ensure_future(self._deliver(event, request.id, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event: str, request_id: str, body: bytes) -> None:
        wait = FIRST_BACKOFF_SECONDS
        problem = ""
        for attempt in range(1, self.attempts + 1):
            headers = {
                "Content-Type": "application/json",
                EVENT_HEADER: event,
                SIGNATURE_HEADER: sign(self.key, int(time.time()), body),
            }
            try:
                reply = await self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if reply.status_code < 300:
                    return
                problem = f"HTTP {reply.status_code}"
                if 400 <= reply.status_code < 500 and reply.status_code not in (408, 429):
                    break  # the receiver refuses this event: sending it again will not help
            if attempt < self.attempts:
                await asyncio.sleep(wait)
                wait *= 2
        log.warning(
            "webhook: event %s of %s not delivered: %s",
            event,
            request_id,
            problem,
            extra={"event": "webhook_failed", "approval_id": request_id},
        )

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        await self._client.aclose()
