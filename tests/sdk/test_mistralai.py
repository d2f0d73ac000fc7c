"""The official `mistralai` Python SDK, unchanged, with tiergate as its server URL.

What this SDK does with retries (read in its installed source, mistralai/client/utils/retries.py,
and checked below):
- no retries unless a `RetryConfig` is given (per call, `retries=`, or per client,
  `retry_config=`); then a 429 or 5xx is retried with backoff until `max_elapsed_time`;
- the wait is `retry-after-ms` when present, else `Retry-After` (seconds or an HTTP date), used
  as is, without a cap; the backoff parameters apply only when neither is sent;
- `x-should-retry` is not read: a `request_too_large` is retried until `max_elapsed_time`, and a
  `quota_exceeded` makes the call sleep until the month's end (its Retry-After).
"""

from __future__ import annotations

import json
import re
import time
import types

import httpx2
import pytest
from mistralai.client import Mistral, errors
from mistralai.client.utils import BackoffStrategy, RetryConfig
from mistralai.client.utils import retries as retries_module

from conftest import HUGE_PROMPT, Workspace, http, mock_reply, seconds_to_next_month

MODEL = "mistral-small-latest"


def client(gateway: str, ws: Workspace, on_response=None, **kwargs) -> Mistral:
    # The SDK's documented custom HTTP client, here only to send the test's tag header (and,
    # where asked, to see each response's headers).
    hooks = {"response": [on_response]} if on_response else {}
    http_client = httpx2.Client(headers=ws.tag_headers, event_hooks=hooks, follow_redirects=True)
    return Mistral(api_key=ws.key, server_url=gateway, client=http_client, **kwargs)


def backoff(**kw) -> RetryConfig:
    return RetryConfig("backoff", BackoffStrategy(**kw), retry_connection_errors=False)


@pytest.fixture
def sleeps(monkeypatch):
    """Records every sleep of the SDK's retry loop (and sleeps it): the SDK's `time` module is
    replaced, in that module alone, by one whose `sleep` is recorded."""
    recorded: list[float] = []

    def sleep(seconds: float) -> None:
        recorded.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(retries_module, "time", types.SimpleNamespace(time=time.time, sleep=sleep))
    return recorded


def body_of(err: errors.SDKError) -> dict:
    return json.loads(err.body)


# --- The routes ---------------------------------------------------------------------------------


def test_chat_complete_with_the_default_client(gateway, make_workspace):
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    with Mistral(api_key=ws.key, server_url=gateway) as m:
        r = m.chat.complete(
            model=MODEL,
            messages=[{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "Hello, world! How are you?"}],
            max_tokens=5, http_headers=ws.tag_headers,
        )
    assert r.model == MODEL
    assert r.choices[0].message.content == mock_reply(5)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (18, 5, 23)
    ws.wait_totals(requests=1, denied=0, tokens=23)
    assert ws.upstream_count() == 1


def test_chat_stream(gateway, make_workspace):
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    m = client(gateway, ws)
    events = list(m.chat.stream(model=MODEL, messages=[{"role": "user", "content": "hi there"}]))
    chunks = [e.data for e in events]
    assert all(len(c.choices) == 1 for c in chunks), "a usage chunk leaked to the client"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == mock_reply(16)
    assert chunks[-1].choices[0].finish_reason == "stop"
    ws.wait_totals(requests=1, tokens=5 + 16)


def test_chat_stream_with_usage_in_the_last_chunk(gateway, make_workspace):
    """An upstream that, as the Mistral API does, puts the usage in the last chunk: the SDK reads
    it there, and the gateway settles it."""
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    m = client(gateway, ws)
    chunks = [e.data for e in m.chat.stream(
        model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=4,
        http_headers={"x-mock-stream-usage": "last-chunk"},
    )]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == mock_reply(4)
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (5, 4, 9)
    ws.wait_totals(requests=1, tokens=9)


def test_embeddings(gateway, make_workspace):
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    r = client(gateway, ws).embeddings.create(model="mistral-embed", inputs=["one two", "three, four"])
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in r.data)
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (5, 5)
    ws.wait_totals(requests=1, tokens=5)


def test_models_list_and_get(gateway, make_workspace):
    # The model cards this SDK validates (`type`, `capabilities`) pass through the gateway whole.
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    m = client(gateway, ws)
    ids = [card.id for card in m.models.list().data]
    assert ids == ["mistral-small-latest", "mistral-large-latest", "codestral-latest"]
    assert m.models.retrieve(model_id="codestral-latest").capabilities.completion_fim


def test_fim_complete_and_stream(gateway, make_workspace):
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    m = client(gateway, ws)
    r = m.fim.complete(model="codestral-latest", prompt="def add(a, b):", suffix="return c", max_tokens=6)
    assert r.choices[0].message.content == mock_reply(6)
    # prompt "def add(a, b):" is 3 words and 4 punctuation marks, the suffix 2 words.
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (9, 6, 15)
    chunks = [e.data for e in m.fim.stream(model="codestral-latest", prompt="one", suffix="two", max_tokens=3)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == mock_reply(3)
    ws.wait_totals(requests=2, tokens=15 + 2 + 3)
    assert ws.upstream_count() == 2


# --- Rate-limit headers: on a stream's response, through the HTTP client, on errors --------------


def test_rate_limit_headers(gateway, make_workspace):
    ws = make_workspace(requests_per_second=0.01, burst=10, tokens_per_minute=100_000,
                        tokens_per_month=5_000_000)
    seen: list[httpx2.Headers] = []
    m = client(gateway, ws, on_response=lambda r: seen.append(r.headers))
    msgs = [{"role": "user", "content": "Hello, world!"}]

    m.chat.complete(model=MODEL, messages=msgs, max_tokens=5)
    assert len(seen) == 1
    stream = m.chat.stream(model=MODEL, messages=msgs, max_tokens=5)
    h = stream.response.headers  # the stream's own HTTP response
    assert "".join(e.data.choices[0].delta.content or "" for e in stream) == mock_reply(5)
    assert seen[1] is h or dict(seen[1]) == dict(h)

    for headers, remaining in ((seen[0], 9), (h, 8)):
        assert headers["x-ratelimit-limit-requests"] == "0.01"
        assert headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert headers["x-ratelimit-limit-tokens"] == "100000"
        assert 99_900 <= int(headers["x-ratelimit-remaining-tokens"]) < 100_000
        assert headers["x-ratelimit-limit-tokens-month"] == "5000000"
        assert re.fullmatch(r"req_[0-9a-f]{32}", headers["x-request-id"])
    ws.wait_totals(requests=2)


# --- Errors and retries ----------------------------------------------------------------------


def test_no_retries_by_default_and_the_429_surfaces_intact(gateway, make_workspace):
    # One request per 10 s: the second call is denied however slow the machine.
    ws = make_workspace(requests_per_second=0.1, burst=1)
    m = client(gateway, ws)
    msgs = [{"role": "user", "content": "hi there"}]
    m.chat.complete(model=MODEL, messages=msgs)
    with pytest.raises(errors.SDKError) as e:
        m.chat.complete(model=MODEL, messages=msgs)
    err = e.value
    assert isinstance(err, errors.MistralError)
    assert err.status_code == 429
    body = body_of(err)
    assert (body["object"], body["type"], body["code"]) == ("error", "rate_limited", "requests_per_second")
    assert re.fullmatch(
        r"Rate limit exceeded: 0\.1 requests per second \(requests_per_second\)\. Retry in [0-9.]+m?s\.",
        body["message"],
    ), body
    assert body["message"] in err.message
    assert 1 <= int(err.headers["retry-after-ms"]) <= 10_000
    assert 1 <= int(err.headers["retry-after"]) <= 10
    assert err.headers["x-ratelimit-limit-requests"] == "0.1"
    ws.wait_totals(requests=1, denied=1)


def test_retry_config_carries_sequential_calls_through_a_tight_rate(gateway, make_workspace, sleeps):
    """With a RetryConfig the SDK waits what retry-after-ms says: the backoff here would sleep 3 s
    exactly (no jitter), the gateway's hints are at most 0.5 s."""
    ws = make_workspace(requests_per_second=2, burst=1)
    m = client(gateway, ws, retry_config=backoff(
        initial_interval=3000, max_interval=3000, exponent=1, max_elapsed_time=30_000, jitter_ms=0))
    msgs = [{"role": "user", "content": "hi there"}]
    for i in range(4):
        if i % 2 == 0:
            r = m.chat.complete(model=MODEL, messages=msgs, max_tokens=2)
            assert r.choices[0].message.content == mock_reply(2)
        else:
            text = "".join(e.data.choices[0].delta.content or ""
                           for e in m.chat.stream(model=MODEL, messages=msgs, max_tokens=2))
            assert text == mock_reply(2)
    assert len(sleeps) >= 1, "four calls at 2/s with a burst of 1 met no 429: the limit is not enforced"
    assert all(0 < s <= 0.5 for s in sleeps), f"slept {sleeps}: not the gateway's retry-after-ms"
    ws.wait_totals(requests=4, denied=len(sleeps))
    assert ws.upstream_count() == 4


def test_retry_config_ignores_x_should_retry_on_request_too_large(gateway, make_workspace, sleeps):
    """The SDK does not read `x-should-retry`: a request that can never fit is retried with
    backoff until max_elapsed_time, then the 429 surfaces. Set max_elapsed_time low, or leave
    429 out of `status_codes_override`, where that matters."""
    ws = make_workspace(tokens_per_minute=50)
    m = client(gateway, ws, retry_config=backoff(
        initial_interval=100, max_interval=100, exponent=1, max_elapsed_time=500, jitter_ms=0))
    with pytest.raises(errors.SDKError) as e:
        m.chat.complete(model=MODEL, messages=[{"role": "user", "content": HUGE_PROMPT}])
    err = e.value
    assert err.status_code == 429
    body = body_of(err)
    assert (body["type"], body["code"]) == ("request_too_large", "tokens_per_minute")
    assert err.headers["x-should-retry"] == "false"
    assert "retry-after" not in err.headers
    assert len(sleeps) >= 2 and all(s == 0.1 for s in sleeps), sleeps
    ws.wait_totals(requests=0, denied=len(sleeps) + 1)
    assert ws.upstream_count() == 0


def test_retry_config_sleeps_until_next_month_on_quota_exceeded(gateway, make_workspace, monkeypatch):
    """The SDK does not read `x-should-retry` and does not cap Retry-After: with a RetryConfig, a
    `quota_exceeded` makes the call sleep until the month ends. The sleep is intercepted here."""
    ws = make_workspace(tokens_per_month=100)
    m = client(gateway, ws, retry_config=backoff(
        initial_interval=100, max_interval=100, exponent=1, max_elapsed_time=500, jitter_ms=0))
    msgs = [{"role": "user", "content": "hi there"}]
    m.chat.complete(model=MODEL, messages=msgs, http_headers={"x-mock-usage": "10,95"})
    ws.wait_totals(requests=1, tokens=105)

    class Asleep(Exception):
        pass

    asked: list[float] = []

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        raise Asleep()

    monkeypatch.setattr(retries_module, "time", types.SimpleNamespace(time=time.time, sleep=sleep))
    with pytest.raises(Asleep):
        m.chat.complete(model=MODEL, messages=msgs)
    assert len(asked) == 1
    assert abs(asked[0] - seconds_to_next_month()) < 120, asked
    ws.wait_totals(requests=1, denied=1)

    # Without a RetryConfig the quota error surfaces at once, intact.
    with pytest.raises(errors.SDKError) as e:
        m.chat.complete(model=MODEL, messages=msgs, retries=None)
    body = body_of(e.value)
    assert (e.value.status_code, body["type"], body["code"]) == (429, "quota_exceeded", "tokens_per_month")
    assert body["message"].startswith("Monthly quota exceeded: 100 tokens per month (tokens_per_month).")
    assert e.value.headers["x-should-retry"] == "false"
    ws.wait_totals(requests=1, denied=2)
    assert ws.upstream_count() == 1


@pytest.mark.parametrize("case", ["malformed", "revoked"])
def test_unauthorized_surfaces_intact(gateway, make_workspace, case):
    from conftest import admin

    ws = make_workspace(requests_per_second=10)
    key = "tg_not-a-key"
    if case == "revoked":
        admin("DELETE", f"/keys/{ws.key_id}")
        key = ws.key
    reference = http("POST", f"{gateway}/v1/chat/completions", token=key,
                     body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert reference.status == 401
    sent = []
    m = Mistral(api_key=key, server_url=gateway,
                client=httpx2.Client(headers=ws.tag_headers, event_hooks={"request": [sent.append]}),
                retry_config=backoff(initial_interval=100, max_interval=100, exponent=1,
                                     max_elapsed_time=500, jitter_ms=0))
    with pytest.raises(errors.SDKError) as e:
        m.chat.complete(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    err = e.value
    assert err.status_code == 401
    assert body_of(err) == reference.body
    assert (reference.body["type"], reference.body["code"]) == ("authentication_error", "invalid_api_key")
    assert reference.body["message"] in err.message
    assert len(sent) == 1  # a 401 is not among the retried statuses
    assert ws.upstream_count() == 0
