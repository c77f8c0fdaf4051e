// k6 load test for the story service.
//
//   TRUSTED_PROXIES=127.0.0.1 make run                    # the server, in another terminal
//   k6 run load-test.js                                   # full profile, http://127.0.0.1:8000
//   k6 run -e K6_PROFILE=ci load-test.js                  # ~20 s, few VUs (.ci/check-deploy)
//   k6 run -e BASE_URL=https://staging.example -e CLIENT_IPS=0 load-test.js
//
// .ci/check-deploy runs the ci profile three times: on the embedded defaults; on
// PostgreSQL + Redis + a healthy (fake) OpenAI with EXPECT_DEGRADED=0; and with
// OpenAI answering 500 and Redis gone, EXPECT_DEGRADED=1 (the dependency outage:
// every story still 201, from the fallback, and readiness still 200).
//
// Scenarios (run together; the burst runs last, alone):
//   create_stories      POST /v1/stories, a fresh Idempotency-Key per iteration
//   idempotent_repeats  the same key sent twice in a row, then twice at once
//   reads               GET /v1/stories (list, next page) and GET /v1/stories/{id}
//   health              GET /health/live and /health/ready
//   burst               one client far above the rate limit: 429s are the point
//
// Environment (all optional):
//   BASE_URL             target, default http://127.0.0.1:8000
//   K6_PROFILE           ci | full (default full)
//   DURATION, CREATE_RATE, READ_RATE, HEALTH_RATE, BURST_RATE, BURST_DURATION, MAX_VUS
//                        override the profile's numbers (rates are iterations/second)
//   P95_CREATE_MS, P95_READ_MS, P95_HEALTH_MS   override the latency bounds
//   EXPECT_RATE_LIMIT=1  fail unless the burst sees 429s carrying Retry-After
//   EXPECT_IDEMPOTENCY=1 fail unless repeated keys return the same story, the repeat
//                        marked `Idempotent-Replayed: true`
//   EXPECT_DEGRADED=0|1  fail unless every new story has `degraded` false (a healthy
//                        upstream) / true (the upstream failing: the fallback serves)
//   CLIENT_IPS=0         do not send X-Forwarded-For (see below)
//
// Client identity: rate limits are per client (100 requests a minute across the
// API by default), and every k6 request leaves from one address. Unless
// CLIENT_IPS=0, each iteration sends X-Forwarded-For with an address from
// 198.18.0.0/15 (RFC 2544 benchmarking range; a header only, no traffic goes
// there), so ordinary traffic looks like many clients and the burst like one.
// The service believes that header only from TRUSTED_PROXIES, which is empty by
// default (`python -m app` trusts no proxy, not even loopback): start the server
// with TRUSTED_PROXIES=127.0.0.1 (compose: the Docker bridge, e.g.
// TRUSTED_PROXIES=172.16.0.0/12 docker compose up). setup() checks that the
// header is believed and stops with this advice when it is not, instead of
// failing later on 429s. Behind a proxy that rewrites the header, set
// CLIENT_IPS=0 and a RATE_LIMIT_PER_CLIENT that fits the whole load.

import http from 'k6/http';
import { check } from 'k6';
import { randomBytes } from 'k6/crypto';
import { Counter, Rate } from 'k6/metrics';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8000').replace(/\/+$/, '');
const PROFILE_NAME = __ENV.K6_PROFILE || 'full';
const EXPECT_RATE_LIMIT = __ENV.EXPECT_RATE_LIMIT === '1';
const EXPECT_IDEMPOTENCY = __ENV.EXPECT_IDEMPOTENCY === '1';
const CLIENT_IPS = (__ENV.CLIENT_IPS || '1') !== '0';
const EXPECT_DEGRADED = __ENV.EXPECT_DEGRADED === undefined || __ENV.EXPECT_DEGRADED === ''
  ? null : __ENV.EXPECT_DEGRADED === '1';

const PROFILES = {
  // ~20 s end to end on a 2-core CI machine that also runs the server.
  ci: {
    duration: 12, createRate: 3, readRate: 3, healthRate: 4, repeatRate: 1,
    burstRate: 40, burstDuration: 4, maxVUs: 10,
    p95CreateMs: 1500, p95ReadMs: 800, p95HealthMs: 500,
  },
  // Minutes of steady traffic; create latency allows for a real LLM upstream.
  full: {
    duration: 180, createRate: 5, readRate: 20, healthRate: 2, repeatRate: 1,
    burstRate: 100, burstDuration: 10, maxVUs: 100,
    p95CreateMs: 20000, p95ReadMs: 300, p95HealthMs: 100,
  },
};

if (!(PROFILE_NAME in PROFILES)) {
  throw new Error(`K6_PROFILE must be one of ${Object.keys(PROFILES).join(', ')}`);
}

function numberFromEnv(name, fallback) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${name} must be a positive number`);
  return value;
}

const P = PROFILES[PROFILE_NAME];
const DURATION = numberFromEnv('DURATION', P.duration);
const CREATE_RATE = numberFromEnv('CREATE_RATE', P.createRate);
const READ_RATE = numberFromEnv('READ_RATE', P.readRate);
const HEALTH_RATE = numberFromEnv('HEALTH_RATE', P.healthRate);
const BURST_RATE = numberFromEnv('BURST_RATE', P.burstRate);
const BURST_DURATION = numberFromEnv('BURST_DURATION', P.burstDuration);
const MAX_VUS = numberFromEnv('MAX_VUS', P.maxVUs);
const P95_CREATE_MS = numberFromEnv('P95_CREATE_MS', P.p95CreateMs);
const P95_READ_MS = numberFromEnv('P95_READ_MS', P.p95ReadMs);
const P95_HEALTH_MS = numberFromEnv('P95_HEALTH_MS', P.p95HealthMs);

// 429 is what the burst is for; everything else outside 2xx/3xx is a failure.
const BURST_EXPECTED = http.expectedStatuses({ min: 200, max: 399 }, 429);
// Two simultaneous requests with one key: the second may be told "in progress".
const CONCURRENT_REPEAT_EXPECTED = http.expectedStatuses({ min: 200, max: 399 }, 409);

const rateLimited = new Counter('rate_limited_responses');
const burstLimitedRate = new Rate('burst_rate_limited');
const retryAfterPresent = new Rate('rate_limit_retry_after_present');
const idempotencyConsistent = new Rate('idempotency_consistent');
const rateLimitHeaders = new Rate('rate_limit_headers_present');
const degradedAsExpected = new Rate('degraded_as_expected');

function arrival(rate, execName, startTime, duration, tags) {
  return {
    executor: 'constant-arrival-rate',
    exec: execName,
    rate: Math.max(1, Math.round(rate)),
    timeUnit: '1s',
    duration: `${duration}s`,
    startTime: `${startTime}s`,
    preAllocatedVUs: Math.max(1, Math.min(MAX_VUS, Math.ceil(rate))),
    maxVUs: MAX_VUS,
    gracefulStop: '5s',
    tags,
  };
}

const thresholds = {
  // Failures outside the burst's deliberate 429s (which its requests mark expected).
  http_req_failed: ['rate<0.01'],
  checks: ['rate>0.99'],
  'http_req_duration{scenario:create_stories}': [`p(95)<${P95_CREATE_MS}`],
  'http_req_duration{scenario:idempotent_repeats}': [`p(95)<${P95_CREATE_MS}`],
  'http_req_duration{scenario:reads}': [`p(95)<${P95_READ_MS}`],
  'http_req_duration{scenario:health}': [`p(95)<${P95_HEALTH_MS}`],
  'http_req_duration{endpoint:list}': [`p(95)<${P95_READ_MS}`],
  'http_req_duration{endpoint:get}': [`p(95)<${P95_READ_MS}`],
  'http_req_duration{endpoint:live}': [`p(95)<${P95_HEALTH_MS}`],
  'http_req_duration{endpoint:ready}': [`p(95)<${P95_HEALTH_MS}`],
  // Listed so the summary shows them even when nothing is asserted.
  rate_limited_responses: ['count>=0'],
  burst_rate_limited: ['rate>=0'],
  // Every API answer tells the client its limit (X-RateLimit-Limit/-Remaining/-Reset).
  rate_limit_headers_present: ['rate==1'],
};
if (EXPECT_DEGRADED !== null) {
  thresholds.degraded_as_expected = ['rate==1'];
}
if (EXPECT_RATE_LIMIT) {
  thresholds.rate_limited_responses = ['count>0'];
  thresholds.rate_limit_retry_after_present = ['rate==1'];
}
if (EXPECT_IDEMPOTENCY) {
  thresholds.idempotency_consistent = ['rate==1'];
}

export const options = {
  scenarios: {
    create_stories: arrival(CREATE_RATE, 'createStory', 0, DURATION, { flow: 'create' }),
    idempotent_repeats: arrival(P.repeatRate, 'repeatStory', 0, DURATION, { flow: 'create' }),
    reads: arrival(READ_RATE, 'readStories', 1, DURATION - 1, { flow: 'read' }),
    health: arrival(HEALTH_RATE, 'probeHealth', 0, DURATION, { flow: 'health' }),
    // After the others, so its 429s cannot spill into them however the service keys clients.
    burst: arrival(BURST_RATE, 'burst', DURATION + 1, BURST_DURATION, { flow: 'burst' }),
  },
  thresholds,
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  // Story responses are small; keep bodies for ids and checks.
  discardResponseBodies: false,
};

const PROMPTS = [
  'a fox who learns to whistle', 'a lighthouse that is afraid of the dark',
  'two snails racing to the garden gate', 'a cloud that wants to be a rainbow',
  'a robot who plants trees', 'a bear looking for the perfect pillow',
];

function pick(items) {
  return items[Math.floor(Math.random() * items.length)];
}

function uuidv4() {
  const b = new Uint8Array(randomBytes(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// One address per iteration from 198.18.0.0/16: many clients, each with a few requests.
function randomClientIp() {
  return `198.18.${Math.floor(Math.random() * 256)}.${1 + Math.floor(Math.random() * 254)}`;
}
// The burst is one client, from the other half of the range.
const BURST_CLIENT_IP = '198.19.0.1';

function headers(clientIp, extra) {
  const h = Object.assign({ 'Content-Type': 'application/json', Accept: 'application/json' }, extra);
  if (CLIENT_IPS) h['X-Forwarded-For'] = clientIp;
  return h;
}

function storyBody() {
  return JSON.stringify({
    prompt: pick(PROMPTS),
    age: 3 + Math.floor(Math.random() * 8),
    length: 'short',
    language: 'en',
    illustrate: false,
  });
}

function jsonField(res, field) {
  try {
    return res.json(field);
  } catch (_) {
    return undefined;
  }
}

function postStory(body, key, clientIp, endpoint, params) {
  return http.post(`${BASE_URL}/v1/stories`, body, Object.assign({
    headers: headers(clientIp, { 'Idempotency-Key': key }),
    tags: { endpoint, name: 'POST /v1/stories' },
  }, params));
}

function isCreated(res) {
  return res.status === 201 || res.status === 200;
}

function hasRateLimitHeaders(res) {
  return ['X-Ratelimit-Limit', 'X-Ratelimit-Remaining', 'X-Ratelimit-Reset']
    .every((name) => res.headers[name] !== undefined);
}

function remaining(res) {
  return Number(res.headers['X-Ratelimit-Remaining']);
}

// Stops the run at once, with the fix, when the service keys every k6 request as
// one client (TRUSTED_PROXIES does not name this machine): everything would be 429.
function checkClientIdentity() {
  if (!CLIENT_IPS) return;
  const get = (ip) => http.get(`${BASE_URL}/v1/stories?limit=1`, {
    headers: headers(ip), tags: { endpoint: 'setup', name: 'GET /v1/stories' },
  });
  const [a, b] = [randomClientIp(), randomClientIp()];
  const first = get(a);
  get(a);
  const other = get(b);
  if (!hasRateLimitHeaders(first) || !hasRateLimitHeaders(other)) return;  // limits off
  if (remaining(other) < remaining(first)) {
    throw new Error(
      `${BASE_URL} ignores X-Forwarded-For from this machine, so every k6 request is one `
      + 'client and would be rate limited. Start the server with TRUSTED_PROXIES=127.0.0.1 '
      + '(compose: the Docker bridge network, e.g. 172.16.0.0/12), or run with CLIENT_IPS=0 '
      + 'against a server whose RATE_LIMIT_PER_CLIENT fits the whole load.',
    );
  }
}

function recordDegraded(res) {
  if (EXPECT_DEGRADED === null || !isCreated(res)) return;
  degradedAsExpected.add(jsonField(res, 'degraded') === EXPECT_DEGRADED);
}

export function setup() {
  const probe = http.get(`${BASE_URL}/health/live`, { tags: { endpoint: 'live' } });
  if (probe.status !== 200) {
    throw new Error(`${BASE_URL}/health/live answered ${probe.status}: is the server up?`);
  }
  checkClientIdentity();
  const ids = [];
  for (let i = 0; i < 3; i += 1) {
    const res = postStory(storyBody(), uuidv4(), randomClientIp(), 'create');
    if (isCreated(res) && jsonField(res, 'id')) ids.push(jsonField(res, 'id'));
  }
  return { ids };
}

export function createStory() {
  const res = postStory(storyBody(), uuidv4(), randomClientIp(), 'create');
  rateLimitHeaders.add(hasRateLimitHeaders(res));
  recordDegraded(res);
  check(res, {
    'create: 201': isCreated,
    'create: has id': (r) => typeof jsonField(r, 'id') === 'string',
    'create: has paragraphs': (r) => Array.isArray(jsonField(r, 'paragraphs')),
  });
}

export function repeatStory() {
  const ip = randomClientIp();
  const body = storyBody();

  // The same key and body twice in a row: the retry of a phone on a bad network.
  const key = uuidv4();
  const first = postStory(body, key, ip, 'create_repeat');
  const second = postStory(body, key, ip, 'create_repeat');
  check(first, { 'repeat: first created': isCreated });
  check(second, { 'repeat: second answered 2xx': isCreated });
  recordDegraded(first);
  const sameStory = isCreated(first) && isCreated(second)
    && jsonField(first, 'id') === jsonField(second, 'id')
    && first.headers['Idempotent-Replayed'] === undefined
    && second.headers['Idempotent-Replayed'] === 'true';
  idempotencyConsistent.add(sameStory, { mode: 'sequential' });
  if (EXPECT_IDEMPOTENCY) check(second, { 'repeat: same story for the same key': () => sameStory });

  // The same key twice at once: one story, or a 409 for the request still in flight.
  const racingKey = uuidv4();
  const request = {
    method: 'POST',
    url: `${BASE_URL}/v1/stories`,
    body,
    params: {
      headers: headers(ip, { 'Idempotency-Key': racingKey }),
      tags: { endpoint: 'create_repeat', name: 'POST /v1/stories' },
      responseCallback: CONCURRENT_REPEAT_EXPECTED,
    },
  };
  const [a, b] = http.batch([request, request]);
  const created = [a, b].filter(isCreated);
  const conflicts = [a, b].filter((r) => r.status === 409);
  const ids = new Set(created.map((r) => jsonField(r, 'id')));
  const consistent = created.length >= 1 && created.length + conflicts.length === 2 && ids.size === 1;
  idempotencyConsistent.add(consistent, { mode: 'concurrent' });
  check(a, { 'repeat: concurrent pair answered 2xx or 409': () => created.length + conflicts.length === 2 });
  if (EXPECT_IDEMPOTENCY) check(a, { 'repeat: one story for a concurrent pair': () => consistent });
}

export function readStories(data) {
  const ip = randomClientIp();
  const list = http.get(`${BASE_URL}/v1/stories?limit=10`, {
    headers: headers(ip), tags: { endpoint: 'list', name: 'GET /v1/stories' },
  });
  const items = jsonField(list, 'items');
  rateLimitHeaders.add(hasRateLimitHeaders(list));
  check(list, {
    'list: 200': (r) => r.status === 200,
    'list: has items': () => Array.isArray(items),
  });
  const cursor = jsonField(list, 'next_cursor');
  if (cursor) {
    const next = http.get(`${BASE_URL}/v1/stories?limit=10&cursor=${encodeURIComponent(cursor)}`, {
      headers: headers(ip), tags: { endpoint: 'list', name: 'GET /v1/stories' },
    });
    check(next, { 'list: next page 200': (r) => r.status === 200 });
  }
  const known = Array.isArray(items) && items.length ? items.map((s) => s.id) : data.ids;
  if (!known || known.length === 0) return;
  const id = pick(known);
  const got = http.get(`${BASE_URL}/v1/stories/${id}`, {
    headers: headers(ip), tags: { endpoint: 'get', name: 'GET /v1/stories/{id}' },
  });
  check(got, {
    'get: 200': (r) => r.status === 200,
    'get: same id': (r) => jsonField(r, 'id') === id,
  });
}

export function probeHealth() {
  const live = http.get(`${BASE_URL}/health/live`, { tags: { endpoint: 'live', name: 'GET /health/live' } });
  check(live, {
    'live: 200': (r) => r.status === 200,
    'live: pass': (r) => jsonField(r, 'status') === 'pass',
  });
  const ready = http.get(`${BASE_URL}/health/ready`, { tags: { endpoint: 'ready', name: 'GET /health/ready' } });
  check(ready, {
    'ready: 200': (r) => r.status === 200,
    'ready: pass or warn': (r) => ['pass', 'warn'].includes(jsonField(r, 'status')),
  });
}

export function burst() {
  const res = http.get(`${BASE_URL}/v1/stories?limit=1`, {
    headers: headers(BURST_CLIENT_IP),
    tags: { endpoint: 'burst', name: 'GET /v1/stories' },
    responseCallback: BURST_EXPECTED,
  });
  const limited = res.status === 429;
  rateLimited.add(limited ? 1 : 0);
  burstLimitedRate.add(limited);
  if (limited) retryAfterPresent.add(Boolean(res.headers['Retry-After']));
  check(res, { 'burst: 200 or 429': (r) => r.status === 200 || r.status === 429 });
}
