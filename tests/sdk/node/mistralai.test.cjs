// The official `@mistralai/mistralai` TypeScript SDK, unchanged, with tiergate as its server:
// its streams are checked against its own schemas, which refuse what Mistral's API never sends
// (tests/sdk/run sets the environment and NODE_PATH to the cached node_modules).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Mistral } = require('@mistralai/mistralai');

const GATEWAY = process.env.TIERGATE_SDK_GATEWAY;
const ADMIN_TOKEN = process.env.TIERGATE_SDK_ADMIN_TOKEN;
assert.ok(GATEWAY && ADMIN_TOKEN, 'run with tests/sdk/run');

const MODEL = 'mistral-small-latest';

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

async function makeClient() {
  const tier = `sdk-mistral-node-${crypto.randomBytes(6).toString('hex')}`;
  await admin('PUT', `/tiers/${tier}`, { requests_per_second: 10, tokens_per_minute: 100000 });
  const ws = await admin('POST', '/workspaces', { name: tier, tier });
  const key = await admin('POST', `/workspaces/${ws.id}/keys`, {});
  const month = async () => {
    const res = await fetch(`${GATEWAY}/v1/limits`, { headers: { authorization: `Bearer ${key.key}` } });
    return (await res.json()).usage.tokens_this_month;
  };
  return { client: new Mistral({ apiKey: key.key, serverURL: GATEWAY }), month };
}

const T = { timeout: 60_000 };
const messages = [{ role: 'user', content: 'hi there' }];

// The gateway asks an OpenAI-style upstream for the stream's usage on the client's behalf; the
// upstream then puts `"usage": null` on every chunk, which this SDK's schema refuses: the
// gateway removes it with the usage-only chunk (an outside audit: the stream failed on its first
// chunk with a ZodError).
test('a streamed chat completion is read whole by the SDK and settled', T, async () => {
  const { client, month } = await makeClient();
  const stream = await client.chat.stream({ model: MODEL, messages, maxTokens: 5 });
  let text = '';
  let finish = null;
  for await (const event of stream) {
    const choice = event.data.choices[0];
    text += choice.delta.content ?? '';
    finish = choice.finishReason ?? finish;
  }
  assert.equal(text, 'mock token stream lorem ipsum ');
  assert.equal(finish, 'length');
  // Settled to the upstream's usage: 3 for the message, 2 words, 5 completion tokens.
  const deadline = Date.now() + 10_000;
  let settled;
  while ((settled = await month()) === 0 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.equal(settled, 3 + 2 + 5);
});

test('a chat completion and its usage', T, async () => {
  const { client } = await makeClient();
  const r = await client.chat.complete({ model: MODEL, messages, maxTokens: 5 });
  assert.equal(r.choices[0].message.content, 'mock token stream lorem ipsum ');
  assert.deepEqual(
    [r.usage.promptTokens, r.usage.completionTokens, r.usage.totalTokens],
    [5, 5, 10],
  );
});
