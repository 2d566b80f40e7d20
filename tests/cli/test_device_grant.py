"""The CLI's RFC 8628 client against scripted token endpoints (httpx MockTransport), with a
clock the test owns: the interval is honoured, slow_down lengthens it for good, and every
way a grant ends without a token says so."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from cli.device_grant import (
    DeviceCode,
    DeviceGrantError,
    poll_for_token,
    request_device_code,
)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


def scripted(*answers: tuple[int, dict[str, object]]) -> httpx.Client:
    replies: Iterator[tuple[int, dict[str, object]]] = iter(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        status, body = next(replies)
        return httpx.Response(status, json=body)

    return httpx.Client(transport=httpx.MockTransport(handle))


DEVICE = DeviceCode("dev", "ABCD-EFGH", "https://idp/activate", None, expires_in=60, interval=2)


def poll(http: httpx.Client, clock: FakeTime, device: DeviceCode = DEVICE) -> dict[str, object]:
    return poll_for_token(
        http,
        "https://idp/token",
        device,
        {},
        "the IdP",
        sleep=clock.sleep,
        monotonic=clock.monotonic,
    )


def test_pending_then_token_at_the_interval_and_slow_down_adds_five_seconds() -> None:
    clock = FakeTime()
    http = scripted(
        (400, {"error": "authorization_pending"}),
        (400, {"error": "slow_down"}),
        (400, {"error": "authorization_pending"}),
        (200, {"access_token": "t"}),
    )
    assert poll(http, clock) == {"access_token": "t"}
    assert clock.slept == [2, 2, 7, 7]


@pytest.mark.parametrize(
    ("error", "said"),
    [
        ("access_denied", r"refused at the IdP \(access_denied\)"),
        ("expired_token", "expired before it was confirmed at the IdP"),
        ("invalid_grant", "refused: invalid_grant"),
    ],
)
def test_each_end_without_a_token_is_named(error: str, said: str) -> None:
    http = scripted((400, {"error": "authorization_pending"}), (400, {"error": error}))
    with pytest.raises(DeviceGrantError, match=said):
        poll(http, FakeTime())


def test_the_code_s_own_lifetime_ends_the_polling() -> None:
    clock = FakeTime()
    short = DeviceCode("dev", "ABCD-EFGH", "https://idp/activate", None, expires_in=5, interval=2)
    pending: tuple[int, dict[str, object]] = (400, {"error": "authorization_pending"})
    http = scripted(*[pending] * 10)
    with pytest.raises(DeviceGrantError, match="expired"):
        poll(http, clock, short)
    assert clock.now <= 8


def test_a_device_authorization_response_without_its_fields_is_an_error() -> None:
    http = scripted((200, {"device_code": "d"}))
    with pytest.raises(DeviceGrantError, match="without device_code"):
        request_device_code(http, "https://idp/device", {}, "the IdP")
    refused = scripted((400, {"error": "invalid_client", "error_description": "unknown client"}))
    with pytest.raises(DeviceGrantError, match="invalid_client: unknown client"):
        request_device_code(refused, "https://idp/device", {}, "the IdP")
