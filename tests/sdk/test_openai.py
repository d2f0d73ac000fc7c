"""The official `openai` Python SDK, unchanged, with tiergate as its base URL."""

from __future__ import annotations

import re
import time
import types

import openai
import openai._base_client
import pytest
from openai import OpenAI

from conftest import HUGE_PROMPT, Workspace, http, mock_reply, seconds_to_next_month

MODEL = "mistral-small-latest"


def client(gateway: str, ws: Workspace, **kwargs) -> OpenAI:
    # The only changes a user makes: the base URL and the key. The tag header only lets the
    # test count what reached the upstream.
    return OpenAI(base_url=f"{gateway}/v1", api_key=ws.key, default_headers=ws.tag_headers, **kwargs)


# --- The routes ---------------------------------------------------------------------------------


def test_chat_completion(gateway, make_workspace):
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    r = client(gateway, ws).chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Hello, world! How are you?"}],
        max_tokens=5,
    )
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == mock_reply(5)
    assert r.choices[0].finish_reason == "length"
    # The mock's rule: (3 + 1) + (5 + 3) words and punctuation, 3 per message.
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (18, 5, 23)
    ws.wait_totals(requests=1, denied=0, tokens=23)
    assert ws.upstream_count() == 1


def test_chat_stream_without_usage_requested(gateway, make_workspace):
    """The gateway asks the upstream for the usage chunk and removes it, since the SDK did not ask:
    the SDK sees an ordinary stream, and the usage is settled all the same."""
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    stream = client(gateway, ws).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi there"}], stream=True,
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks), "a usage chunk leaked to the client"
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == mock_reply(16)
    assert chunks[-1].choices[0].finish_reason == "stop"
    ws.wait_totals(requests=1, tokens=(2 + 3) + 16)


def test_chat_stream_with_usage(gateway, make_workspace):
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    stream = client(gateway, ws).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi there"}], stream=True,
        max_tokens=3, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == mock_reply(3)
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (5, 3, 8)
    ws.wait_totals(requests=1, tokens=8)


def test_responses_stream_helper(gateway, make_workspace):
    # The SDK's stream helper refuses a text delta for an item it was not told of: the mock
    # announces its message item and text part first, as the OpenAI API does.
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    # Room enough for the mock's whole answer: `response.completed`, which the helper waits for.
    with client(gateway, ws).responses.stream(model=MODEL, input="hi there", max_output_tokens=1000) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text and final.output_text == text
    assert final.status == "completed"
    assert final.usage.total_tokens > 0
    ws.wait_totals(requests=1, tokens=final.usage.total_tokens)


def test_embeddings(gateway, make_workspace):
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    # The SDK asks for base64 unless told otherwise; ask for floats, then take its default too.
    c = client(gateway, ws)
    r = c.embeddings.create(model="mistral-embed", input=["one two", "three, four"], encoding_format="float")
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == 8 and all(isinstance(x, float) for x in d.embedding) for d in r.data)
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (2 + 3, 5)
    r2 = c.embeddings.create(model="mistral-embed", input="one two")
    assert len(r2.data) == 1 and len(r2.data[0].embedding) == 8
    assert r2.usage.total_tokens == 2
    ws.wait_totals(requests=2, tokens=7)


def test_models_list_and_retrieve(gateway, make_workspace):
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    c = client(gateway, ws)
    assert [m.id for m in c.models.list()] == ["mistral-small-latest", "mistral-large-latest", "codestral-latest"]
    assert c.models.retrieve("mistral-large-latest").id == "mistral-large-latest"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


def test_legacy_completions_with_suffix(gateway, make_workspace):
    ws = make_workspace(requests_per_second=10, tokens_per_minute=100_000)
    c = client(gateway, ws)
    r = c.completions.create(model="codestral-latest", prompt="one two three", max_tokens=4)
    assert r.object == "text_completion"
    assert r.choices[0].text == mock_reply(4)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 4)
    streamed = list(c.completions.create(model="codestral-latest", prompt="one two", max_tokens=2, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == mock_reply(2)
    ws.wait_totals(requests=2, tokens=7 + 4)


# --- Rate-limit headers through the raw-response APIs -------------------------------------------


def check_headers(h, remaining_requests: int):
    assert h["x-ratelimit-limit-requests"] == "0.01"  # not the mock's stand-in "999"
    assert h["x-ratelimit-remaining-requests"] == str(remaining_requests)
    assert h["x-ratelimit-limit-tokens"] == "100000"
    # After this request: its settled cost (a JSON answer) or its reservation (a stream), a few
    # dozen tokens at most.
    assert 99_900 <= int(h["x-ratelimit-remaining-tokens"]) < 100_000
    assert h["x-ratelimit-limit-tokens-month"] == "5000000"
    assert 4_999_000 <= int(h["x-ratelimit-remaining-tokens-month"]) < 5_000_000
    assert re.fullmatch(r"req_[0-9a-f]{32}", h["x-request-id"])


def test_rate_limit_headers_raw_and_streamed(gateway, make_workspace):
    # A burst of 10 refilled once per 100 s: each request takes exactly one, whatever the speed.
    ws = make_workspace(requests_per_second=0.01, burst=10, tokens_per_minute=100_000,
                        tokens_per_month=5_000_000)
    c = client(gateway, ws)
    msgs = [{"role": "user", "content": "Hello, world!"}]

    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=5)
    check_headers(raw.headers, 9)
    assert raw.retries_taken == 0
    assert raw.parse().choices[0].message.content == mock_reply(5)

    with c.chat.completions.with_streaming_response.create(
        model=MODEL, messages=msgs, max_tokens=5, stream=True,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        check_headers(resp.headers, 8)
        text = "".join(ch.choices[0].delta.content or "" for ch in resp.parse() if ch.choices)
    assert text == mock_reply(5)

    # A plain stream keeps its HTTP response too.
    stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, stream=True)
    check_headers(stream.response.headers, 7)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == mock_reply(5)

    raw = c.embeddings.with_raw_response.create(model="mistral-embed", input="a b", encoding_format="float")
    check_headers(raw.headers, 6)
    ws.wait_totals(requests=4, denied=0)


# --- Retries --------------------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch):
    """Records every sleep of the SDK's retry loop (and sleeps it): the SDK's `time` module is
    replaced, in its `_base_client` module alone, by one whose `sleep` is recorded."""
    recorded: list[float] = []

    def sleep(seconds: float) -> None:
        recorded.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(openai._base_client, "time", types.SimpleNamespace(time=time.time, sleep=sleep))
    return recorded


def test_default_retries_carry_sequential_calls_through_a_tight_rate(gateway, make_workspace, sleeps):
    """2 requests/s with a burst of 1 and four calls back to back: every call after the first is
    answered 429 with retry-after-ms, and the SDK's default retries (2) wait that long and get
    through. Plain and streamed calls alike."""
    ws = make_workspace(requests_per_second=2, burst=1)
    c = client(gateway, ws)
    assert c.max_retries == 2  # the default, untouched
    msgs = [{"role": "user", "content": "hi there"}]
    retries = 0
    for i in range(4):
        if i % 2 == 0:
            raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=2)
            assert raw.parse().choices[0].message.content == mock_reply(2)
        else:
            with c.chat.completions.with_streaming_response.create(
                model=MODEL, messages=msgs, max_tokens=2, stream=True,
            ) as raw:
                assert "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices) == mock_reply(2)
        assert raw.status_code == 200
        retries += raw.retries_taken
    # Each retry the SDK reports is one 429 the gateway counted; nothing denied reached the mock.
    assert retries >= 1, "four calls at 2/s with a burst of 1 met no 429: the limit is not enforced"
    # It waited what retry-after-ms said: whole milliseconds up to 0.5 s (Retry-After would be
    # 1 s, the SDK's own backoff a random fraction).
    assert len(sleeps) == retries
    assert all(0 < s <= 0.5 and abs(s * 1000 - round(s * 1000)) < 1e-6 for s in sleeps), sleeps
    ws.wait_totals(requests=4, denied=retries, tokens=4 * (5 + 2))
    assert ws.upstream_count() == 4


def test_rate_limited_error_surfaces_intact(gateway, make_workspace):
    # One request per 10 s: the second call is denied however slow the machine.
    ws = make_workspace(requests_per_second=0.1, burst=1)
    c = client(gateway, ws, max_retries=0)
    msgs = [{"role": "user", "content": "hi there"}]
    c.chat.completions.create(model=MODEL, messages=msgs)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=MODEL, messages=msgs)
    err = e.value
    assert err.status_code == 429
    assert err.type == "rate_limited"
    assert err.code == "requests_per_second"
    assert err.param is None
    assert re.fullmatch(
        r"Rate limit exceeded: 0\.1 requests per second \(requests_per_second\)\. Retry in [0-9.]+m?s\.",
        err.body["message"],
    ), err.body
    # openai-python reads the body's `error` object, the OpenAI API's shape.
    assert err.body == {"message": err.body["message"], "type": "rate_limited", "param": None,
                        "code": "requests_per_second"}
    assert err.body["message"] in err.message
    assert 1 <= int(err.response.headers["retry-after-ms"]) <= 10_000
    assert 1 <= int(err.response.headers["retry-after"]) <= 10
    assert "x-should-retry" not in err.response.headers
    assert err.response.headers["x-ratelimit-limit-requests"] == "0.1"
    ws.wait_totals(requests=1, denied=1)


def test_quota_exceeded_is_not_retried(gateway, make_workspace):
    ws = make_workspace(tokens_per_month=100)
    c = client(gateway, ws)  # default retries
    msgs = [{"role": "user", "content": "hi there"}]
    # The upstream reports 10 + 95 tokens: the month (100) is spent.
    c.chat.completions.create(model=MODEL, messages=msgs, extra_headers={"x-mock-usage": "10,95"})
    ws.wait_totals(requests=1, tokens=105)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs)
    err = e.value
    assert (err.status_code, err.type, err.code) == (429, "quota_exceeded", "tokens_per_month")
    assert err.body["message"].startswith(
        "Monthly quota exceeded: 100 tokens per month (tokens_per_month). It renews in "), err.body
    # One denial: the SDK's two default retries were not spent on it.
    ws.wait_totals(requests=1, denied=1)
    assert ws.upstream_count() == 1
    h = err.response.headers
    assert h.get("x-should-retry") == "false"
    assert abs(int(h["retry-after"]) - seconds_to_next_month()) < 120


def test_request_too_large_is_not_retried(gateway, make_workspace):
    """No Retry-After here, so only `x-should-retry: false` keeps the SDK from retrying."""
    ws = make_workspace(tokens_per_minute=50)
    c = client(gateway, ws, max_retries=5)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": HUGE_PROMPT}])
    err = e.value
    assert (err.status_code, err.type, err.code) == (429, "request_too_large", "tokens_per_minute")
    assert err.body["message"].startswith(
        "This request can never fit: its prompt alone exceeds the limit of 50 tokens per minute"), err.body
    ws.wait_totals(requests=0, denied=1)  # not retried, though 5 retries were allowed
    assert ws.upstream_count() == 0
    h = err.response.headers
    assert h.get("x-should-retry") == "false"
    assert "retry-after" not in h and "retry-after-ms" not in h


# --- Refused input ---------------------------------------------------------------------------


def test_a_refused_field_is_named_in_param(gateway, make_workspace):
    ws = make_workspace(requests_per_second=10)
    c = client(gateway, ws, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    err = e.value
    assert err.status_code == 400
    # As the OpenAI API names the field at fault.
    assert (err.type, err.param, err.code) == ("invalid_request_error", "max_tokens", None)
    assert err.body["message"].startswith("'max_tokens' must be")
    assert ws.upstream_count() == 0


# --- Authentication -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["malformed", "revoked"])
def test_unauthorized_surfaces_intact_and_is_not_retried(gateway, make_workspace, case):
    from conftest import admin

    ws = make_workspace(requests_per_second=10)
    key = "tg_not-a-key"
    if case == "revoked":
        admin("DELETE", f"/keys/{ws.key_id}")
        key = ws.key
    reference = http("POST", f"{gateway}/v1/chat/completions", token=key,
                     body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert reference.status == 401
    # The SDK's own HTTP client with a hook that counts what it sends: a 401 is sent once.
    sent = []
    c = OpenAI(base_url=f"{gateway}/v1", api_key=key, default_headers=ws.tag_headers,
               http_client=openai.DefaultHttpxClient(event_hooks={"request": [sent.append]}))
    with pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    err = e.value
    assert err.status_code == 401
    # The body's `error` object (the OpenAI API's shape), exactly as the gateway sent it, with the
    # same fields as the top level (the Mistral API's shape).
    assert err.body == reference.body["error"]
    assert {k: reference.body[k] for k in ("message", "type", "param", "code")} == err.body
    assert (err.type, err.code) == ("authentication_error", "invalid_api_key")
    assert err.body["message"] in err.message
    assert err.response.headers["www-authenticate"] == "Bearer"
    assert len(sent) == 1
    assert ws.upstream_count() == 0
