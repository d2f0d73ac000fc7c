"""Shared harness of the SDK suite: the gateway that tests/sdk/run started, its admin API, and a
fresh workspace per test.

Every test gets a workspace on a tier of its own (so limits and usage never mix between tests)
and a tag that the SDK sends as `x-mock-tag` through its ordinary `default_headers` option: the
mock upstream counts the requests that reached it under that tag. What the gateway saw (admitted
and denied requests, tokens settled) is read from the admin usage view, which is exact.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest

GATEWAY = os.environ.get("TIERGATE_SDK_GATEWAY", "")
MOCK = os.environ.get("TIERGATE_SDK_MOCK", "")
ADMIN_TOKEN = os.environ.get("TIERGATE_SDK_ADMIN_TOKEN", "")

# The mock upstream's reply: min(max_tokens, 16) words cycling these, each followed by a space.
MOCK_WORDS = "mock token stream lorem ipsum dolor sit amet".split()


def mock_reply(n: int = 16) -> str:
    return "".join(MOCK_WORDS[i % len(MOCK_WORDS)] + " " for i in range(n))


def pytest_configure(config: pytest.Config) -> None:
    if not (GATEWAY and MOCK and ADMIN_TOKEN):
        raise pytest.UsageError(
            "run these tests with tests/sdk/run, which starts the gateway and the mock upstream"
        )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


def http(method: str, url: str, body: Any = None, token: Optional[str] = None,
         headers: Optional[dict[str, str]] = None) -> Answer:
    """A plain HTTP call (no SDK): for the admin API, the mock's counters, and the reference
    answers the SDKs' errors are compared with."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw, status, hdrs = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, e.headers
    text = raw.decode()
    try:
        parsed: Any = json.loads(text) if text else None
    except ValueError:
        parsed = text
    return Answer(status, {k.lower(): v for k, v in hdrs.items()}, parsed)


def admin(method: str, path: str, body: Any = None) -> Any:
    a = http(method, f"{GATEWAY}/admin/v1{path}", body, token=ADMIN_TOKEN)
    assert a.status in (200, 201, 204), f"{method} {path}: {a.status} {a.body}"
    return a.body


def wait_for(what: str, probe: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """Polls `probe` until `ok(value)`; the gateway settles and writes its ledger in the
    background, so a figure may lag an answer by a flush (250 ms)."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = probe()
    assert ok(value), f"{what}: last seen {value!r}"
    return value


@dataclass
class Workspace:
    id: int
    key: str
    key_id: int
    tag: str
    tier: str

    @property
    def tag_headers(self) -> dict[str, str]:
        return {"x-mock-tag": self.tag}

    def usage(self) -> dict:
        return admin("GET", f"/workspaces/{self.id}/usage")

    def totals(self) -> dict[str, int]:
        """Admitted requests, denied requests and settled tokens this month, from the ledger."""
        rows = self.usage()["daily"]
        return {
            "requests": sum(r["requests"] for r in rows),
            "denied": sum(r["denied"] for r in rows),
            "tokens": sum(r["tokens"] for r in rows),
        }

    def wait_totals(self, **expected: int) -> dict[str, int]:
        return wait_for(
            f"workspace {self.id} totals {expected}",
            self.totals,
            lambda t: all(t[k] == v for k, v in expected.items()),
        )

    def upstream_count(self) -> int:
        """Requests that reached the mock upstream with this workspace's tag."""
        return http("GET", f"{MOCK}/mock/stats?tag={self.tag}").body["count"]


@pytest.fixture
def gateway() -> str:
    return GATEWAY


@pytest.fixture
def make_workspace(request: pytest.FixtureRequest) -> Callable[..., Workspace]:
    """make_workspace(requests_per_second=2, burst=1, ...): a tier with exactly these limits
    (absent ones: no limit), a workspace on it and a key."""

    def make(**limits: Any) -> Workspace:
        name = f"sdk-{uuid.uuid4().hex[:12]}"
        admin("PUT", f"/tiers/{name}", limits)
        ws = admin("POST", "/workspaces", {"name": f"{request.node.name}"[:120], "tier": name})
        key = admin("POST", f"/workspaces/{ws['id']}/keys", {"name": "sdk-suite"})
        assert key["key"].startswith("tg_")
        return Workspace(id=ws["id"], key=key["key"], key_id=key["id"], tag=name, tier=name)

    return make


def seconds_to_next_month() -> float:
    now = dt.datetime.now(dt.timezone.utc)
    y, m = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return calendar.timegm((y, m, 1, 0, 0, 0)) - now.timestamp()


# A prompt whose estimate alone is far above a limit of 50 tokens: `request_too_large`.
HUGE_PROMPT = " ".join(["elephant"] * 400)
