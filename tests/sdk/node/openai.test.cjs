// The official `openai` Node SDK, unchanged, with tiergate as its base URL: streaming, the
// rate-limit headers of a stream, and the SDK's retries (tests/sdk/run sets the environment and
// NODE_PATH to the cached node_modules).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const OpenAI = require('openai');

const GATEWAY = process.env.TIERGATE_SDK_GATEWAY;
const MOCK = process.env.TIERGATE_SDK_MOCK;
const ADMIN_TOKEN = process.env.TIERGATE_SDK_ADMIN_TOKEN;
assert.ok(GATEWAY && MOCK && ADMIN_TOKEN, 'run with tests/sdk/run');

const MODEL = 'mistral-small-latest';
const WORDS = 'mock token stream lorem ipsum dolor sit amet'.split(' ');
const mockReply = (n) => Array.from({ length: n }, (_, i) => WORDS[i % WORDS.length] + ' ').join('');

async function admin(method, path, body) {
  const res = await fetch(`${GATEWAY}/admin/v1${path}`, {
    method,
    headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json();
  assert.ok(res.status === 200 || res.status === 201, `${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

// A tier with exactly these limits, a workspace on it and a key; the tag counts what reached
// the mock upstream.
async function makeWorkspace(limits) {
  const tier = `sdk-node-${crypto.randomBytes(6).toString('hex')}`;
  await admin('PUT', `/tiers/${tier}`, limits);
  const ws = await admin('POST', '/workspaces', { name: tier, tier });
  const key = await admin('POST', `/workspaces/${ws.id}/keys`, {});
  return {
    id: ws.id,
    key: key.key,
    tag: tier,
    client: (opts = {}) =>
      new OpenAI({ baseURL: `${GATEWAY}/v1`, apiKey: key.key, defaultHeaders: { 'x-mock-tag': tier }, ...opts }),
    async totals() {
      const rows = (await admin('GET', `/workspaces/${ws.id}/usage`)).daily;
      const sum = (f) => rows.reduce((a, r) => a + r[f], 0);
      return { requests: sum('requests'), denied: sum('denied'), tokens: sum('tokens') };
    },
    async upstreamCount() {
      return (await (await fetch(`${MOCK}/mock/stats?tag=${tier}`)).json()).count;
    },
  };
}

// The ledger may lag an answer by a flush: poll until the totals match.
async function waitTotals(ws, expected) {
  const deadline = Date.now() + 10_000;
  let t;
  for (;;) {
    t = await ws.totals();
    if (Object.entries(expected).every(([k, v]) => t[k] === v)) return t;
    if (Date.now() > deadline) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.deepEqual(t, { ...t, ...expected }, `workspace ${ws.id} totals`);
}

const msgs = [{ role: 'user', content: 'hi there' }];
// A retry that honours a Retry-After of weeks would hang: each test fails after this long.
const T = { timeout: 60_000 };

test('streamed chat completion, its rate-limit headers, usage settled', T, async () => {
  const ws = await makeWorkspace({ requests_per_second: 0.01, burst: 10, tokens_per_minute: 100000 });
  const c = ws.client();
  const { data: stream, response } = await c.chat.completions
    .create({ model: MODEL, messages: msgs, stream: true })
    .withResponse();
  assert.equal(response.status, 200);
  assert.equal(response.headers.get('x-ratelimit-limit-requests'), '0.01');
  assert.equal(response.headers.get('x-ratelimit-remaining-requests'), '9');
  assert.equal(response.headers.get('x-ratelimit-limit-tokens'), '100000');
  assert.match(response.headers.get('x-request-id'), /^req_[0-9a-f]{32}$/);
  let text = '';
  const chunks = [];
  for await (const chunk of stream) {
    chunks.push(chunk);
    text += chunk.choices[0]?.delta?.content ?? '';
  }
  assert.equal(text, mockReply(16));
  assert.ok(chunks.every((c) => c.choices.length === 1 && !c.usage), 'a usage chunk leaked to the client');

  // Asked for, the usage comes as the last chunk.
  const withUsage = await c.chat.completions.create({
    model: MODEL, messages: msgs, stream: true, max_tokens: 3, stream_options: { include_usage: true },
  });
  let last;
  for await (const chunk of withUsage) last = chunk;
  assert.deepEqual(last.choices, []);
  assert.deepEqual(
    [last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens], [5, 3, 8]);
  await waitTotals(ws, { requests: 2, denied: 0, tokens: 21 + 8 });
});

test('default retries carry sequential calls through 2 requests/s, burst 1', T, async () => {
  const ws = await makeWorkspace({ requests_per_second: 2, burst: 1 });
  const c = ws.client();
  assert.equal(c.maxRetries, 2);
  for (let i = 0; i < 4; i++) {
    if (i % 2 === 0) {
      const r = await c.chat.completions.create({ model: MODEL, messages: msgs, max_tokens: 2 });
      assert.equal(r.choices[0].message.content, mockReply(2));
    } else {
      let text = '';
      const s = await c.chat.completions.create({ model: MODEL, messages: msgs, max_tokens: 2, stream: true });
      for await (const chunk of s) text += chunk.choices[0]?.delta?.content ?? '';
      assert.equal(text, mockReply(2));
    }
  }
  const t = await waitTotals(ws, { requests: 4, tokens: 4 * (5 + 2) });
  assert.ok(t.denied >= 1 && t.denied <= 6, `denied ${t.denied}: the limit did not bite, or retries overshot`);
  assert.equal(await ws.upstreamCount(), 4);
});

test('a 429 surfaces as RateLimitError with the body intact', T, async () => {
  // One request per 10 s: the second call is denied however slow the machine.
  const ws = await makeWorkspace({ requests_per_second: 0.1, burst: 1 });
  const c = ws.client({ maxRetries: 0 });
  await c.chat.completions.create({ model: MODEL, messages: msgs });
  await assert.rejects(c.chat.completions.create({ model: MODEL, messages: msgs }), (err) => {
    assert.ok(err instanceof OpenAI.RateLimitError);
    assert.equal(err.status, 429);
    assert.equal(err.type, 'rate_limited');
    assert.equal(err.code, 'requests_per_second');
    assert.match(err.error.message,
      /^Rate limit exceeded: 0\.1 requests per second \(requests_per_second\)\. Retry in [0-9.]+m?s\.$/);
    assert.equal(err.message, `429 ${err.error.message}`);
    assert.ok(Number(err.headers.get('retry-after-ms')) >= 1);
    return true;
  });
  await waitTotals(ws, { requests: 1, denied: 1 });
});

test('quota_exceeded and request_too_large are not retried (x-should-retry: false)', T, async () => {
  // quota_exceeded: this SDK would sleep for any Retry-After (no cap), here until the month ends;
  // x-should-retry is what stops it.
  const quota = await makeWorkspace({ tokens_per_month: 100 });
  const c = quota.client();
  await c.chat.completions.create({ model: MODEL, messages: msgs }, { headers: { 'x-mock-usage': '10,95' } });
  await waitTotals(quota, { requests: 1, tokens: 105 });
  await assert.rejects(c.chat.completions.create({ model: MODEL, messages: msgs }), (err) => {
    assert.ok(err instanceof OpenAI.RateLimitError);
    assert.equal(err.type, 'quota_exceeded');
    assert.equal(err.code, 'tokens_per_month');
    assert.equal(err.headers.get('x-should-retry'), 'false');
    return true;
  });
  await waitTotals(quota, { requests: 1, denied: 1 });

  const large = await makeWorkspace({ tokens_per_minute: 50 });
  await assert.rejects(
    large.client({ maxRetries: 5 }).chat.completions.create({
      model: MODEL, messages: [{ role: 'user', content: Array(400).fill('elephant').join(' ') }],
    }),
    (err) => {
      assert.ok(err instanceof OpenAI.RateLimitError);
      assert.equal(err.type, 'request_too_large');
      assert.equal(err.headers.get('retry-after'), null);
      return true;
    });
  await waitTotals(large, { requests: 0, denied: 1 });
  assert.equal(await large.upstreamCount(), 0);
});

test('a 401 surfaces as AuthenticationError with the body intact', T, async () => {
  const c = new OpenAI({ baseURL: `${GATEWAY}/v1`, apiKey: 'tg_not-a-key' });
  const ref = await fetch(`${GATEWAY}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: 'Bearer tg_not-a-key', 'content-type': 'application/json' },
    body: JSON.stringify({ model: MODEL, messages: msgs }),
  });
  const refBody = await ref.json();
  assert.equal(ref.status, 401);
  await assert.rejects(c.chat.completions.create({ model: MODEL, messages: msgs }), (err) => {
    assert.ok(err instanceof OpenAI.AuthenticationError);
    assert.equal(err.status, 401);
    // The body's `error` object, the OpenAI API's shape: the only part this SDK reads.
    assert.deepEqual(err.error, refBody.error);
    assert.equal(err.message, `401 ${refBody.message}`);
    assert.equal(err.type, 'authentication_error');
    assert.equal(err.code, 'invalid_api_key');
    return true;
  });
});
