// The official TypeScript SDK (@anthropic-ai/sdk) drives one whole Managed Agents flow through
// the gateway: the same flow as tests/e2e/test_sdk.py. Run by tests/e2e/test_sdk_ts.py:
//
//   node tests/sdk-ts/flow.mjs --base-url http://127.0.0.1:10000 --api-key <gateway key>
//
// (or MA_GATEWAY_URL / MA_GATEWAY_KEY in the environment). Prints one JSON line:
// {"session_id", "texts", "event_types", "history_types", "usage"}. Exits non-zero on any error.
//
// The SDK's default headers are left exactly as they are: Node's fetch offers compressed
// responses (accept-encoding), and the gateway's metering must be exact anyway.

import Anthropic from '@anthropic-ai/sdk';

const OVERALL_DEADLINE_MS = 60_000; // the whole flow
const REQUEST_TIMEOUT_MS = 30_000; // each request, until its response headers
const STREAM_DEADLINE_MS = 30_000; // the event stream, until session.status_idle
const OPEN_DEADLINE_MS = 15_000; // the event stream, until it is open

function args(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    if (flag !== '--base-url' && flag !== '--api-key') throw new Error(`unknown argument ${argv[i]}`);
    const value = inline ?? argv[++i];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    out[flag.slice(2)] = value;
  }
  return out;
}

function withDeadline(promise, ms, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

async function flow(baseURL, apiKey) {
  const client = new Anthropic({ baseURL, apiKey, maxRetries: 0, timeout: REQUEST_TIMEOUT_MS });

  const agent = await client.beta.agents.create({ name: 'sdk-ts-agent', model: 'claude-sonnet-4-6' });
  const environment = await client.beta.environments.create({
    name: 'sdk-ts-env',
    config: { type: 'cloud', networking: { type: 'unrestricted' } },
  });
  const session = await client.beta.sessions.create({ agent: agent.id, environment_id: environment.id });
  if (!session.id.startsWith('sesn_')) throw new Error(`unexpected session id ${session.id}`);

  // Awaiting stream() resolves once the response headers arrived: the stream is open. It has
  // no replay, so the user.message is sent only after that.
  const abort = new AbortController();
  const stream = await withDeadline(
    client.beta.sessions.events.stream(session.id, {}, { signal: abort.signal }),
    OPEN_DEADLINE_MS,
    'opening the event stream',
  );

  const texts = [];
  const eventTypes = [];
  const consume = (async () => {
    for await (const event of stream) {
      eventTypes.push(event.type);
      if (event.type === 'agent.message') {
        for (const block of event.content) if (block.type === 'text') texts.push(block.text);
      }
      if (event.type === 'session.status_idle') return; // leaving the loop closes the stream
    }
    throw new Error(`the stream ended before session.status_idle; saw ${JSON.stringify(eventTypes)}`);
  })();
  consume.catch(() => {}); // awaited below; if send() fails first, that error is the one reported

  try {
    await client.beta.sessions.events.send(session.id, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: 'hello from the TypeScript SDK' }] }],
    });
    await withDeadline(consume, STREAM_DEADLINE_MS, `reading until session.status_idle (saw ${eventTypes})`);
  } finally {
    abort.abort();
  }

  const history = await client.beta.sessions.events.list(session.id);
  const historyTypes = history.data.map((event) => event.type);

  const fetched = await client.beta.sessions.retrieve(session.id);
  return {
    session_id: session.id,
    texts,
    event_types: eventTypes,
    history_types: historyTypes,
    usage: fetched.usage,
  };
}

async function main() {
  const given = args(process.argv.slice(2));
  const baseURL = given['base-url'] ?? process.env.MA_GATEWAY_URL;
  const apiKey = given['api-key'] ?? process.env.MA_GATEWAY_KEY;
  if (!baseURL || !apiKey) throw new Error('usage: flow.mjs --base-url URL --api-key KEY (or MA_GATEWAY_URL, MA_GATEWAY_KEY)');
  const result = await withDeadline(flow(baseURL, apiKey), OVERALL_DEADLINE_MS, 'the whole flow');
  process.stdout.write(JSON.stringify(result) + '\n');
}

main().then(
  () => process.exit(0),
  (err) => {
    const detail = err instanceof Anthropic.APIError ? ` (status ${err.status}: ${JSON.stringify(err.error)})` : '';
    process.stderr.write(`flow.mjs: ${err?.stack ?? err}${detail}\n`);
    process.exit(1);
  },
);
