// Status batches pipelined (cloud.c's follower, cloudreq.c's chained calls): with a TPM at a
// chip's pace (lib/slowtpm.mjs, 70 ms a command), the next batch is signed while the previous
// one is on the wire, yet the cloud sees one status request at a time, in order, and a batch that
// failed goes again before anything newer. Real parts: swtpm behind the slow proxy, mosquitto,
// the reference cloud (which records each status request's first and last frame and its times);
// at the end, a second hub signed in with a DPoP-bound token from the real authorization server
// (tests/oauth) at a cloud that asks for its own DPoP nonce.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Broker, Hub, Swtpm, mqttClient, sleep, tempDir, waitFor } from './lib/harness.mjs';
import { Bulb } from './lib/bulb.mjs';
import { SlowTpm } from './lib/slowtpm.mjs';
import { loginApproved } from './lib/login.mjs';
import { keyBeforeDaemon, startTestbed, startStrictCloud, stopTestbed } from './lib/testbed.mjs';
import { startCloud } from '../cloud/server.mjs';

const N = 70; // ms per TPM command
const PER_BATCH = 20;
const TPM2_CC_SIGN = 0x15d;
const TOKEN = 'tok-pipeline-0123456789';
const TOKEN2 = 'tok-pipeline-second-0123456789';
const TIMEOUT_S = 20; // [cloud] timeout_s
const MARGIN_S = 15; // UPLINK_CLIENT_MARGIN_S: iothubd waits for an answer timeout_s and this much more
let dir, tpm, slow, broker, cloud, hub, client, bulbs;
const sent = []; // every frame published, in order: { dev, seq, jws }
const indexOf = new Map(); // jws -> index in sent

before(async () => {
  dir = await tempDir();
  tpm = await Swtpm.start(path.join(dir, 'tpm'));
  slow = await SlowTpm.start(tpm, N, { protocol: 'mssim' });
  broker = await Broker.start(dir);
  cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'alice', [TOKEN2]: 'alice' } });
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  const overrides = {
    key: { backend: 'tpm', tcti: slow.tcti, handle: '0x81000101' },
    cloud: { url: cloud.url, ca_file: cloud.caFile, bearer_token_file: path.join(dir, 'token'),
      batch_max_frames: PER_BATCH, batch_max_delay_ms: 200, timeout_s: TIMEOUT_S },
    frames: { rate_per_device: 1000, max_clock_skew_s: 86400 },
  };
  await keyBeforeDaemon(broker, overrides);
  hub = await Hub.start(broker, overrides);
  await waitFor(async () => (await hub.status()).mqtt.connected, 10000, 'mqtt');
  const r = await hub.ctl(['register']);
  assert.equal(r.code, 0, r.stderr);
  client = await mqttClient(broker.port);
  bulbs = [await Bulb.create('pipe-es', 'ES256'), await Bulb.create('pipe-ed', 'EdDSA')];
  for (const b of bulbs) {
    const f = path.join(hub.dir, `${b.id}.pem`);
    await fs.writeFile(f, b.pem);
    assert.equal((await hub.ctl(['bulb', 'add', b.id, '--key', f])).code, 0);
  }
  await waitFor(() => cloud.state.hubs.get('test-hub')?.devices?.size === 2, 10000, 'device list at the cloud');
});

after(async () => {
  await client?.endAsync();
  await hub?.cleanup();
  await cloud?.close();
  await broker?.stop();
  await slow?.stop();
  await tpm?.stop();
  if (dir) await fs.rm(dir, { recursive: true, force: true });
});

// n frames per bulb, round robin, in order (one MQTT connection, QoS 1: the spool's order).
async function publish(n, { via = client, of = bulbs } = {}) {
  const out = [];
  for (let i = 0; i < n; i++) {
    for (const b of of) {
      const jws = await b.frame();
      const f = { dev: b.id, seq: b.seq, jws };
      indexOf.set(jws, sent.length);
      sent.push(f);
      out.push(f);
      await via.publishAsync(`iothub/v1/bulbs/${b.id}/status`, jws, { qos: 1 });
    }
  }
  return out;
}

const statusRequests = (from = 0, at = cloud) => at.state.requests.slice(from).filter((q) => q.url.endsWith('/status') && q.first);

// Every frame of 'frames' at the cloud exactly once (byte for byte), in order per bulb.
async function assertDelivered(frames, timeoutMs = 30000, { at = cloud, of = bulbs } = {}) {
  const key = (f) => `${f.dev}\n${f.seq}`;
  await waitFor(() => { const have = new Set(at.state.frames.map(key)); return frames.every((f) => have.has(key(f))); },
    timeoutMs, `all ${frames.length} frames at the cloud`);
  for (const b of of) {
    const seqs = at.state.frames.filter((f) => f.dev === b.id).map((f) => f.seq);
    assert.deepEqual(seqs, [...new Set(seqs)], `stored once: ${b.id}`);
    assert.deepEqual(seqs, [...seqs].sort((a, c) => a - c), `in order: ${b.id}`);
  }
}

// The order of the status requests the cloud saw since 'from': never two on the wire at once; each
// one a run of consecutive frames; and none starts past the first frame not yet stored (a batch
// that failed goes again before anything newer; a batch stored but whose answer was lost may go
// again). killedAt: when the hub's side of the requests then out was killed (performance.now()):
// those may still be held at the cloud while the new process sends. Returns the requests.
async function assertOrdered(from, killedAt = null, at = cloud) {
  await waitFor(() => statusRequests(from, at).every((q) => q.end !== undefined), 10000, 'every request answered');
  const reqs = statusRequests(from, at).sort((a, b) => a.start - b.start);
  let stored = -1; // every frame up to this index was in a request answered 200
  const done = new Set();
  for (let k = 0; k < reqs.length; k++) {
    const q = reqs[k];
    const i = indexOf.get(q.first), j = indexOf.get(q.last);
    assert.ok(i !== undefined && j !== undefined, 'a batch of frames this test sent');
    assert.equal(j - i + 1, q.count, `request ${k}: consecutive frames ${i}..${j} (${q.count})`);
    const prev = reqs.slice(0, k).filter((r) => !(killedAt !== null && r.start < killedAt && r.end > killedAt));
    if (prev.length) assert.ok(q.start >= prev[prev.length - 1].end - 0.5,
      `request ${k} started ${(prev[prev.length - 1].end - q.start).toFixed(1)} ms before the one before it ended`);
    // Before this test's window, frames may have been stored by earlier tests' requests.
    if (stored < 0) stored = i - 1;
    assert.ok(i <= stored + 1, `request ${k} starts at frame ${i} while frame ${stored + 1} is not stored ` +
      `(${reqs.map((r) => `${indexOf.get(r.first)}..${indexOf.get(r.last)}:${r.status}`).join(' ')})`);
    if (q.status === 200) {
      for (let x = i; x <= j; x++) done.add(x);
      while (done.has(stored + 1)) stored++;
    }
  }
  return reqs;
}

// The TPM2_Sign commands that the proxy held entirely while request q was on the wire.
const signsDuring = (q, signs) => signs.filter((c) => c.at >= q.start && c.at + c.held <= q.end);

test('the next batch is signed while the previous one is on the wire; one at a time, in order', async (t) => {
  const r0 = cloud.state.requests.length, d0 = cloud.state.duplicates;
  await cloud.control.fail({ delayMs: 150, count: -1 }); // each status request 150 ms on the wire
  slow.reset();
  try {
    const frames = await publish(100); // 200 frames: 10 full batches
    await assertDelivered(frames);
  } finally {
    await cloud.control.fail('clear');
  }
  const reqs = await assertOrdered(r0);
  assert.ok(reqs.every((q) => q.status === 200), reqs.map((q) => q.status).join(' '));
  assert.equal(cloud.state.duplicates, d0, 'nothing sent twice');
  const signs = slow.commands.filter((c) => c.code === TPM2_CC_SIGN);
  // Between two full batches: the second one's request starts right after the first's answer
  // (its signature was made meanwhile), rather than a signature (>= N ms) later.
  const gaps = [], overlapped = [];
  for (let k = 1; k < reqs.length; k++) {
    if (reqs[k].count !== PER_BATCH || reqs[k - 1].count !== PER_BATCH) continue;
    gaps.push(reqs[k].start - reqs[k - 1].end);
    overlapped.push(signsDuring(reqs[k - 1], signs).length);
  }
  gaps.sort((a, b) => a - b);
  const median = gaps[Math.floor(gaps.length / 2)];
  t.diagnostic(`${reqs.length} requests (${reqs.map((q) => q.count).join(' ')}); gaps between full batches ` +
    `${gaps.map((g) => g.toFixed(1)).join(' ')} ms; TPM2_Sign held during the previous request: ${overlapped.join(' ')}`);
  assert.ok(gaps.length >= 5, `full batches back to back: ${reqs.map((q) => q.count).join(' ')}`);
  assert.ok(median < N / 2, `median gap ${median.toFixed(1)} ms between a batch's answer and the next request (serial: >= ${N} ms)`);
  assert.ok(overlapped.filter((n) => n >= 1).length >= gaps.length - 1,
    `a signature made while the previous batch was on the wire: ${overlapped.join(' ')}`);
});

// The head batch fails while the follower is signed (and held by the uplink): the follower is
// not sent; after the backoff the failed batch goes first.
for (const [name, rule] of [['503', { status: 503 }], ['500 with Retry-After', { status: 500, retryAfter: 1 }]]) {
  test(`the batch on the wire answered ${name} while the next one is signed: it goes again first, nothing lost`, async (t) => {
    const r0 = cloud.state.requests.length;
    await cloud.control.fail({ ...rule, delayMs: 400, count: 1 });
    slow.reset();
    const frames = await publish(2 * PER_BATCH); // four full batches at once (two bulbs)
    await assertDelivered(frames);
    const reqs = await assertOrdered(r0);
    const failed = reqs.findIndex((q) => q.status === rule.status);
    assert.ok(failed >= 0, `a ${rule.status}: ${reqs.map((q) => q.status).join(' ')}`);
    assert.equal(reqs[failed + 1].first, reqs[failed].first, 'the failed batch went again next');
    // Its own signature and the next batch's were both made before its answer came.
    const signed = slow.commands.filter((c) => c.code === TPM2_CC_SIGN && c.at + c.held <= reqs[failed].end).length;
    t.diagnostic(`requests ${reqs.map((q) => `${q.count}:${q.status}`).join(' ')}; signatures made before the ` +
      `failure was answered: ${signed}`);
    assert.ok(signed >= 2, 'the next batch was signed while the failing one was on the wire');
    if (rule.retryAfter) {
      const wait = reqs[failed + 1].start - reqs[failed].end;
      assert.ok(wait >= rule.retryAfter * 1000 - 100, `Retry-After honoured: ${wait.toFixed(0)} ms`);
    }
    await waitFor(async () => (await hub.status()).spool.pending === 0, 10000, 'spool empty');
  });
}

// The head answered 401 and the token file holds a new token: the uplink reads it, sends the head
// again with it; the follower, signed with the old token (the signature covers Authorization),
// is signed again with the new one before it goes: the cloud, which checks that, sees one 401.
test('the batch on the wire answered 401 and the token changed: the next one goes re-signed with the new token', async (t) => {
  const r0 = cloud.state.requests.length;
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN2}\n`, { mode: 0o600 });
  await cloud.control.fail({ status: 401, delayMs: 400, count: 1 });
  slow.reset();
  const frames = publish(2 * PER_BATCH);
  // The old token stops working once the first batch is at the cloud: a follower that went with
  // what was signed for it would be answered 401 too.
  await waitFor(() => statusRequests(r0).length >= 1, 10000, 'the first batch at the cloud');
  cloud.control.revokeToken(TOKEN);
  await assertDelivered(await frames);
  const reqs = await assertOrdered(r0);
  t.diagnostic(`requests ${reqs.map((q) => `${q.count}:${q.status}`).join(' ')}`);
  assert.equal(reqs.filter((q) => q.status === 401).length, 1, `one 401: ${reqs.map((q) => q.status).join(' ')}`);
  assert.ok(reqs.length >= 3, 'the 401, the batch again, the next batch');
});

// The uplink dies with two batches out (one at the cloud, one signed and held): iothubd sends both
// again on the new connection, in their order; the one the cloud had stored is de-duplicated.
test('iothub-uplink killed with two batches out: order kept, nothing lost', async () => {
  const r0 = cloud.state.requests.length;
  await cloud.control.fail({ delayMs: 1500, count: 1 });
  const frames = await publish(2 * PER_BATCH);
  await waitFor(() => statusRequests(r0).length >= 1, 10000, 'a batch at the cloud');
  await sleep(300); // the follower signed meanwhile (2 x 70 ms)
  const killedAt = performance.now();
  hub.uplinkProc.kill('SIGKILL');
  await hub.uplinkExited;
  frames.push(...await publish(PER_BATCH));
  await sleep(300);
  await hub.startUplink();
  await assertDelivered(frames, 40000);
  await assertOrdered(r0, killedAt);
  await waitFor(async () => (await hub.status()).spool.pending === 0, 10000, 'spool empty');
});

// iothubd stopped with two batches out: a clean exit (its calls cancelled, nothing answered into
// freed memory); the next start sends what was left, in order.
test('iothubd stopped (SIGTERM) with two batches out: clean exit, then everything arrives in order', async () => {
  const r0 = cloud.state.requests.length;
  await cloud.control.fail({ delayMs: 1500, count: 1 });
  const frames = await publish(2 * PER_BATCH);
  await waitFor(() => statusRequests(r0).length >= 1, 10000, 'a batch at the cloud');
  await sleep(300);
  const killedAt = performance.now();
  const res = await hub.stop('SIGTERM');
  assert.equal(res.code, 0, `exit ${JSON.stringify(res)}: ${hub.log.slice(-2000)}`);
  assert.doesNotMatch(hub.log + hub.uplinkLog, /AddressSanitizer|runtime error/);
  await hub.start();
  await assertDelivered(frames, 40000);
  await assertOrdered(r0, killedAt);
});

// The batch on the wire answered slowly, close to [cloud] timeout_s, and the follower behind it
// slowly too: the follower's wait in iothubd counts from the head's 200 (when the uplink sends
// it), not from when it was handed to the uplink. Counted from then (the old way), it ended
// TIMEOUT_S + MARGIN_S after the hand-over, while the uplink was still sending it: a timeout, a
// backoff, and the batch uploaded a second time once its first upload was answered.
test('a slow batch on the wire and a slow one behind it: no timeout in iothubd, no backoff, nothing sent twice', async (t) => {
  await waitFor(async () => (await hub.status()).spool.pending === 0, 20000, 'spool empty');
  const r0 = cloud.state.requests.length, d0 = cloud.state.duplicates, log0 = hub.log.length;
  const timeouts0 = (await hub.status()).uplink.timeouts;
  const HEAD_MS = (TIMEOUT_S - 1) * 1000, NEXT_MS = (MARGIN_S + 3) * 1000; // both under TIMEOUT_S, their sum over TIMEOUT_S + MARGIN_S
  await cloud.control.fail({ delayMs: HEAD_MS, count: 1 });
  await cloud.control.fail({ delayMs: NEXT_MS, count: 1 });
  const t0 = performance.now();
  const frames = await publish(PER_BATCH); // two full batches (two bulbs)
  await assertDelivered(frames, 2 * TIMEOUT_S * 1000 + 10000);
  // The old way fails here: the spool empties only after the batch went a second time.
  await waitFor(async () => (await hub.status()).spool.pending === 0, 20000, 'spool empty');
  const reqs = await assertOrdered(r0);
  const st = await hub.status();
  t.diagnostic(`requests ${reqs.map((q) => `${q.count}:${q.status}:${(q.end - q.start).toFixed(0)}ms`).join(' ')}; ` +
    `all answered ${((performance.now() - t0) / 1000).toFixed(1)} s after publishing; uplink timeouts ` +
    `${st.uplink.timeouts - timeouts0}, duplicates ${cloud.state.duplicates - d0}`);
  assert.deepEqual(reqs.map((q) => q.status), [200, 200], 'two batches, each sent once');
  assert.ok(reqs[1].end - reqs[0].start > (TIMEOUT_S + MARGIN_S) * 1000, 'the two together outlasted a wait counted from the hand-over');
  assert.equal(cloud.state.duplicates, d0, 'nothing sent twice');
  assert.equal(st.uplink.timeouts, timeouts0, 'no request timed out in iothubd');
  assert.equal(st.cloud.backoff_s, 0);
  assert.doesNotMatch(hub.log.slice(log0), /Upload of \d+ frames failed/);
});

// DPoP (RFC 9449): the cloud gives a new nonce in its 200 to the batch on the wire (8.2, 9), while
// the follower is signed and held with a proof that carries the old one. The uplink signs the
// follower again with the new nonce before it goes (as after a new token): the cloud sees no 401,
// where the old proof would have cost a 401 use_dpop_nonce and a second attempt.
describe('with a DPoP-bound token', () => {
  let tb, dcloud, dhub, dclient, dbulbs;
  const seen = new Set();

  before(async () => {
    tb = await startTestbed({ authServer: { interval: 1 } });
    dcloud = await startStrictCloud(tb.dir, tb.auth, seen);
    const overrides = {
      key: { backend: 'tpm', tcti: tb.tpm.tcti, handle: '0x81000101' },
      cloud: { url: dcloud.url, ca_file: dcloud.caFile, batch_max_frames: PER_BATCH, batch_max_delay_ms: 200, timeout_s: 10 },
      oauth: { issuer: tb.auth.issuer, client_id: tb.auth.clientId, scope: 'openid offline_access iothub', ca_file: tb.auth.caFile, dpop: 'on' },
      frames: { rate_per_device: 1000, max_clock_skew_s: 86400 },
    };
    await keyBeforeDaemon(tb.broker, overrides);
    dhub = await Hub.start(tb.broker, overrides);
    await waitFor(async () => (await dhub.status()).mqtt.connected, 10000, 'mqtt');
    await loginApproved(dhub, tb.auth);
    const st = await dhub.status();
    assert.equal(st.oauth.dpop, true, 'a DPoP-bound token');
    const r = await dhub.ctl(['register']);
    assert.equal(r.code, 0, r.stderr);
    dclient = await mqttClient(tb.broker.port);
    dbulbs = [await Bulb.create('dpop-es', 'ES256'), await Bulb.create('dpop-ed', 'EdDSA')];
    for (const b of dbulbs) {
      const f = path.join(dhub.dir, `${b.id}.pem`);
      await fs.writeFile(f, b.pem);
      assert.equal((await dhub.ctl(['bulb', 'add', b.id, '--key', f])).code, 0);
    }
    await waitFor(() => dcloud.state.hubs.get('test-hub')?.devices?.size === 2, 10000, 'device list at the cloud');
  });

  after(async () => {
    await stopTestbed({ clients: [dclient], hub: dhub, cloud: dcloud, ...tb });
  });

  test('the cloud gives a new DPoP nonce in the 200 to the batch on the wire: the next one goes with it, no 401', async (t) => {
    const r0 = dcloud.state.requests.length, ch0 = dcloud.state.dpop.nonceChallenges;
    const oldNonce = dcloud.state.dpop.nonce;
    assert.ok(oldNonce, 'the cloud asks for its nonce');
    // The head held at the cloud long enough for the follower to be signed and held meanwhile.
    await dcloud.control.fail({ delayMs: 1500, newDpopNonce: true, count: 1 });
    const frames = await publish(PER_BATCH, { via: dclient, of: dbulbs }); // two full batches (two bulbs)
    await assertDelivered(frames, 30000, { at: dcloud, of: dbulbs });
    const reqs = await assertOrdered(r0, null, dcloud);
    const all = dcloud.state.requests.slice(r0).filter((q) => q.endpoint === 'status');
    t.diagnostic(`status requests ${all.map((q) => `${q.count}:${q.status}${q.kind ? `:${q.kind}` : ''}`).join(' ')}; ` +
      `nonce challenges ${dcloud.state.dpop.nonceChallenges - ch0}`);
    assert.equal(dcloud.state.dpop.nonceRotations, 1, 'the nonce changed with the first batch\'s 200');
    assert.notEqual(dcloud.state.dpop.nonce, oldNonce);
    assert.ok(reqs.length === 2 && reqs[0].count === PER_BATCH && reqs[1].count === PER_BATCH, 'two full batches');
    // Status requests only: an events POST (its own interval) is not this test's.
    assert.deepEqual(all.map((q) => `${q.status}${q.kind ? ` ${q.kind}` : ''}`), ['200', '200'],
      'no status request answered 401 (use_dpop_nonce)');
    await waitFor(async () => (await dhub.status()).spool.pending === 0, 10000, 'spool empty');
  });
});
