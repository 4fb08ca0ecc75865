// Security events (PROTOCOL.md 5, iothub-protocol(7) "Security events"): a forging bulb and a
// flood are reported to the cloud with counts, aggregated per interval, by reason and bulb;
// enrolments, revocations, refused control peers and reloads too; no byte of any frame in any
// event; events spooled while the cloud refuses them survive a restart of the daemon; a slow
// events endpoint never holds up status. Real swtpm, mosquitto and the reference cloud, which
// checks every events POST like any request (RFC 9421 signature, token) and stores its body.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import * as jose from 'jose';
import { Hub, Swtpm, mqttClient, waitFor, IOTHUBCTL } from './lib/harness.mjs';
import { Bulb } from './lib/bulb.mjs';
import { startCloud } from '../cloud/server.mjs';
import { startTestbed, stopTestbed, keyBeforeDaemon } from './lib/testbed.mjs';

const PREFIX = 'iothub/v1/bulbs';
const HUB_ID = 'test-hub';
const TOKEN = 'tok-events-test-0123456789';
const INTERVAL_S = 2;
let dir, tpm, broker, cloud, hub, pub, overrides;
const sentFrames = []; // every frame (or junk) published in this file: none may show up in an event

const eventsAt = (pred = () => true) => cloud.state.events.filter((e) => e.hub === HUB_ID && pred(e));
const countOf = (pred) => eventsAt(pred).reduce((n, e) => n + e.count, 0);

async function enrol(bulb) {
  const f = path.join(hub.dir, `${bulb.id}.pem`);
  await fs.writeFile(f, bulb.pem);
  const r = await hub.ctl(['bulb', 'add', bulb.id, '--key', f]);
  assert.equal(r.code, 0, r.stderr);
}

async function publishFrame(jws, dev) {
  sentFrames.push(jws);
  await pub.publishAsync(`${PREFIX}/${dev}/status`, jws, { qos: 1 });
}

before(async () => {
  ({ dir, tpm, broker } = await startTestbed());
  cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'alice' } });
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  overrides = {
    key: { backend: 'tpm', tcti: tpm.tcti, handle: '0x81000101' },
    cloud: { url: cloud.url, ca_file: cloud.caFile, batch_max_delay_ms: 100, timeout_s: 10,
      bearer_token_file: path.join(dir, 'token'), events_interval_s: INTERVAL_S },
    frames: { rate_per_device: 20 },
  };
  await keyBeforeDaemon(broker, overrides);
  hub = await Hub.start(broker, overrides);
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt');
  const r = await hub.ctl(['register']);
  assert.equal(r.code, 0, r.stderr);
  pub = await mqttClient(broker.port);
});

after(async () => {
  await stopTestbed({ clients: [pub], hub, cloud, broker, tpm, dir });
});

test('a forging bulb: its rejected frames are reported by reason and bulb, with their count, aggregated', async () => {
  const target = await Bulb.create('forge-target');
  await enrol(target);
  const forger = await Bulb.create('forge-target'); // same id, another key
  // Signed first, then published together: on a loaded machine signing one by one between the
  // publishes spread the seven over more intervals than the aggregation check below allows.
  const forged = [];
  for (let i = 0; i < 7; i++) forged.push(await forger.frame());
  const t0 = Date.now();
  await Promise.all(forged.map((f) => publishFrame(f, target.id)));
  await waitFor(async () => (await hub.status()).frames.rejected.bad_signature >= 7, 5000, 'rejections at the hub');
  await waitFor(() => countOf((e) => e.type === 'frame_rejected' && e.reason === 'bad_signature' && e.dev === target.id) === 7,
    5000 + 2000 * INTERVAL_S, 'bad_signature events at the cloud');
  const evs = eventsAt((e) => e.type === 'frame_rejected' && e.dev === target.id);
  // Aggregated: seven frames within a second make one or two events (an interval boundary), not seven.
  assert.ok(evs.length <= 2, JSON.stringify(evs));
  for (const e of evs) {
    assert.ok(Math.abs(e.at * 1000 - t0) < 10000, `at ${e.at}`);
    assert.deepEqual(Object.keys(e).sort(), ['at', 'count', 'dev', 'hub', 'reason', 'receivedAt', 'type']);
  }
  // The enrolment is an event too.
  assert.equal(countOf((e) => e.type === 'bulb_enrolled' && e.dev === target.id), 1);
});

test('a flood: rate limiting raises one urgent flood event, and every rejection is counted', async (t) => {
  const flooder = await Bulb.create('flooder');
  await enrol(flooder);
  const st0 = (await hub.status()).frames;
  const before = st0.rejected.rate_limited;
  const frames = [];
  for (let i = 0; i < 300; i++) frames.push(await flooder.frame());
  await Promise.all(frames.map((f) => publishFrame(f, flooder.id)));
  // All 300 at the hub (the counter counts the earlier tests' frames too): only then is the
  // rate_limited count below final.
  await waitFor(async () => (await hub.status()).frames.received >= st0.received + 300, 20000, 'the flood at the hub');
  await waitFor(() => countOf((e) => e.type === 'flood' && e.dev === flooder.id) > 0, 10000, 'a flood event');
  const flood = eventsAt((e) => e.type === 'flood' && e.dev === flooder.id);
  assert.equal(flood.length, 1, JSON.stringify(flood));
  assert.equal(flood[0].reason, 'rate_limited');
  const limited = (await hub.status()).frames.rejected.rate_limited - before;
  assert.ok(limited > 100, `only ${limited} frames were rate limited`);
  await waitFor(() => countOf((e) => e.type === 'frame_rejected' && e.reason === 'rate_limited' && e.dev === flooder.id) === limited,
    5000 + 2000 * INTERVAL_S, `${limited} rate_limited rejections reported`);
  const rows = eventsAt((e) => e.type === 'frame_rejected' && e.dev === flooder.id);
  t.diagnostic(`flood: 300 frames, ${limited} rate_limited, reported in ${rows.length} frame_rejected events + 1 flood event; ` +
    `flood event ${flood[0].receivedAt - flood[0].at * 1000} ms after its first second`);
});

test('junk, unknown devices and replays are reported; no event carries a byte of any frame', async (t) => {
  const MARKER = 'zq-MARKER-7f3a9c-SECRET';
  const junk = `not.a.jws-${MARKER}`;
  sentFrames.push(junk, MARKER);
  await pub.publishAsync(`${PREFIX}/junk-bulb/status`, junk, { qos: 1 });
  const stranger = await Bulb.create('never-enrolled');
  await publishFrame(await stranger.frame({ state: { on: true, bri: 77 } }), stranger.id);
  const known = await Bulb.create('replayer');
  await enrol(known);
  const f = await known.frame();
  await publishFrame(f, known.id);
  await publishFrame(f, known.id);
  await waitFor(() => countOf((e) => e.type === 'frame_rejected' && e.reason === 'malformed' && e.dev === 'junk-bulb') === 1 &&
    countOf((e) => e.type === 'frame_rejected' && e.reason === 'unknown_device' && e.dev === stranger.id) === 1 &&
    countOf((e) => e.type === 'frame_rejected' && e.reason === 'replay' && e.dev === known.id) === 1,
  5000 + 2000 * INTERVAL_S, 'malformed, unknown_device and replay events');

  // The bodies as posted: neither a whole frame, nor any of its three parts, nor its payload.
  const bodies = cloud.state.eventBodies.join('\n');
  assert.ok(bodies.length > 0);
  let checked = 0;
  for (const jws of sentFrames) {
    assert.ok(!bodies.includes(jws), 'a frame in an event');
    for (const part of jws.split('.')) {
      if (part.length < 8) continue;
      assert.ok(!bodies.includes(part), `a part of a frame in an event: ${part.slice(0, 20)}`);
      checked++;
      const decoded = Buffer.from(part, 'base64url').toString('latin1');
      if (decoded.length >= 16 && /^[\x20-\x7e]+$/.test(decoded)) assert.ok(!bodies.includes(decoded), 'a decoded part in an event');
    }
  }
  assert.ok(checked > 600, `checked ${checked} parts`);
  assert.ok(!bodies.includes(MARKER));
  assert.ok(!bodies.includes('"bri":77') && !bodies.includes('"state"') && !bodies.includes('"seq"'));
  // Every body is exactly the contract's shape (the reference cloud checked each strictly).
  for (const b of cloud.state.eventBodies) assert.deepEqual(Object.keys(JSON.parse(b)), ['events']);
  t.diagnostic(`${cloud.state.eventBodies.length} events POSTs so far, ${bodies.length} bytes, ${cloud.state.events.length} events; ` +
    `${checked} frame parts searched for`);
});

test('revocations, a reload and a refused control peer are reported', async () => {
  const r = await hub.ctl(['bulb', 'remove', 'replayer']);
  assert.equal(r.code, 0, r.stderr);
  hub.proc.kill('SIGHUP');
  // iothubctl as an unprivileged user (nobody), past the socket's file mode (opened up here, as
  // a careless administrator might): SO_PEERCRED, the real check, refuses it.
  await fs.chmod(hub.dir, 0o755);
  await fs.chmod(hub.configPath, 0o644);
  await fs.chmod(hub.runtimeDir, 0o755);
  await fs.chmod(path.join(hub.runtimeDir, 'control'), 0o666);
  const ctl = spawn(IOTHUBCTL, ['--config', hub.configPath, 'status', '--json'], { uid: 65534, gid: 65534, stdio: 'ignore' });
  const [code] = await once(ctl, 'exit');
  assert.notEqual(code, 0, 'nobody must not get the status');
  await waitFor(() => countOf((e) => e.type === 'bulb_revoked' && e.dev === 'replayer') === 1 &&
    countOf((e) => e.type === 'config_reloaded' && e.reason === 'ok') === 1 &&
    countOf((e) => e.type === 'control_refused') >= 1,
  5000 + 2000 * INTERVAL_S, `revoked, reloaded, refused (have ${JSON.stringify(eventsAt((e) => e.type !== 'frame_rejected'))})`);
  assert.match(hub.log, /Refused control connection from pid \d+ uid 65534/);
});

test('a slow events endpoint never holds up status', async (t) => {
  const bulb = await Bulb.create('steady');
  await enrol(bulb);
  await cloud.control.fail({ endpoint: 'events', delayMs: 6000, count: -1 });
  // Also when an assertion fails: a failure left armed at the cloud made the later tests fail too.
  t.after(() => cloud.control.clearFailures());
  // Something to report, and an events request parked at the cloud.
  await pub.publishAsync(`${PREFIX}/nobody-here/status`, await bulb.frame(), { qos: 1 });
  await waitFor(() => cloud.state.requests.some((q) => q.endpoint === 'events' && q.status === 0), 5000 + 1000 * INTERVAL_S, 'an events request in flight');
  const t0 = Date.now();
  await publishFrame(await bulb.frame(), bulb.id);
  await waitFor(() => cloud.control.framesOf(bulb.id).length === 1, 3000, 'the status frame at the cloud');
  const ms = Date.now() - t0;
  // The proof is the order, not a time: the frame reached the cloud while the events POST
  // (parked for 6 s) was still unanswered. A wall-clock bound here would only measure the machine.
  assert.ok(cloud.state.requests.some((q) => q.endpoint === 'events' && q.status === 0), 'the events request is still in flight');
  t.diagnostic(`a status frame reached the cloud in ${ms} ms while an events POST was parked (batch_max_delay_ms 100)`);
  cloud.control.clearFailures();
});

test('events the cloud has not taken are spooled and survive a restart of the daemon', async (t) => {
  await waitFor(async () => (await hub.status()).events.in_flight === 0, 15000, 'no events request in flight');
  await cloud.control.fail({ endpoint: 'events', status: 503, count: -1 });
  t.after(() => cloud.control.clearFailures());
  const target = await Bulb.create('restart-target');
  await enrol(target);
  const forger = await Bulb.create('restart-target');
  for (let i = 0; i < 4; i++) await publishFrame(await forger.frame(), target.id);
  await waitFor(async () => (await hub.status()).events.spooled > 0 && (await hub.status()).events.failed > 0,
    10000 + 2000 * INTERVAL_S, 'events spooled after a refused POST');
  assert.equal(countOf((e) => e.dev === target.id && e.type === 'frame_rejected'), 0);
  await hub.stop();
  cloud.control.clearFailures();
  await hub.start();
  await waitFor(() => countOf((e) => e.type === 'frame_rejected' && e.reason === 'bad_signature' && e.dev === target.id) === 4,
    15000 + 2000 * INTERVAL_S, 'the spooled events after the restart');
  assert.equal(countOf((e) => e.type === 'bulb_enrolled' && e.dev === target.id), 1);
  await waitFor(async () => (await hub.status()).events.spooled === 0, 5000, 'the spool emptied');
});

test('the event spool is bounded: the oldest events are dropped, counted and reported', async (t) => {
  await waitFor(async () => (await hub.status()).events.in_flight === 0, 15000, 'no events request in flight');
  await cloud.control.fail({ endpoint: 'events', status: 503, count: -1 });
  t.after(() => cloud.control.clearFailures());
  // The sum of the daemon's own "dropped the N oldest events" lines, over its runs: the counter
  // in status does not outlive a run, and the flush at exit drops too.
  const droppedInLog = () => [...hub.log.matchAll(/dropped the (\d+) oldest events/g)].reduce((n, m) => n + Number(m[1]), 0);
  const logged0 = droppedInLog();
  const reported0 = countOf((e) => e.type === 'events_dropped' && e.reason === 'spool_full');
  // Junk from 330 made-up devices per interval: 256 entries with a bulb, the rest in one entry
  // without; at least 257 rows per interval, 9 intervals: more than the 2000 rows the spool keeps.
  // Each round waits until the hub has taken all of it and written it (pending 0): a round that
  // went on while the hub, slow on a loaded machine, still had the previous one in the same
  // interval would make fewer rows (two rounds in one interval are 257 rows, not 514).
  const received0 = (await hub.status()).frames.received;
  const junkRound = async (round) => {
    await Promise.all(Array.from({ length: 330 }, (_, i) => pub.publishAsync(`${PREFIX}/u${round}x${i}/status`, 'junk', { qos: 1 })));
    await waitFor(async () => (await hub.status()).frames.received >= received0 + 330 * (round + 1), 30000, `round ${round} at the hub`);
  };
  for (let round = 0; round < 9; round++) {
    await junkRound(round);
    await waitFor(async () => (await hub.status()).events.pending === 0, 10000 + 2000 * INTERVAL_S, `round ${round} spooled`)
      .catch(async (e) => { throw new Error(`${e.message}: ${JSON.stringify((await hub.status()).events)}`); });
  }
  const st = (await hub.status()).events;
  assert.ok(st.dropped > 0, JSON.stringify(st));
  // Full to the row: a drop leaves exactly the cap, its events_dropped row included.
  assert.equal(st.spooled, 2000, JSON.stringify(st));
  assert.equal(droppedInLog() - logged0, st.dropped);
  // One more round, and the daemon stopped as soon as it has it: the flush at exit drops the
  // oldest rows again (unless the interval's flush came first), and that drop must be reported too.
  await junkRound(9);
  const before = cloud.state.events.length;
  const stderr = hub.proc.stderr;
  await hub.stop();
  // The line of the drop at exit is in hub.log once the daemon's stderr ended ('exit' can come first).
  await waitFor(() => stderr.readableEnded || stderr.destroyed, 5000, "the daemon's stderr closed");
  const dropped = droppedInLog() - logged0;
  assert.ok(dropped > st.dropped, `dropped ${dropped}, before the last round ${st.dropped}`);
  cloud.control.clearFailures();
  await hub.start();
  // The backlog goes in consecutive requests of at most 200 events, and every drop is reported.
  await waitFor(async () => (await hub.status()).events.spooled === 0, 30000, 'the backlog sent');
  const got = cloud.state.events.length - before;
  assert.ok(got >= 2000, `got ${got}`);
  assert.equal(countOf((e) => e.type === 'events_dropped' && e.reason === 'spool_full') - reported0, dropped);
  assert.ok(eventsAt((e) => e.type === 'frame_rejected' && e.reason === 'malformed' && e.dev === undefined).length > 0,
    'devices beyond the table counted without their id');
  t.diagnostic(`spool cap: ${st.spooled} rows kept, ${st.dropped} dropped in 9 intervals, ${dropped - st.dropped} more by ` +
    `the 10th round and the flush at exit, all reported; ${got} events sent after the restart`);
});

test('a hub key that cannot be opened is an urgent key_error event, sent once the key opens', async () => {
  await hub.stop();
  const tpmDir = tpm.dir, port = tpm.port;
  await tpm.stop();
  await hub.start();
  await waitFor(async () => (await hub.status()).key.reason === 'tpm_unreachable', 10000, 'the key error');
  assert.equal((await hub.status()).events.noted > 0, true);
  // The TPM comes back: the key opens on the hub's retry timer and the event goes.
  tpm = await Swtpm.startAt(tpmDir, port);
  await waitFor(async () => (await hub.status()).key.id !== null, 20000, 'the key opened');
  await waitFor(() => countOf((e) => e.type === 'key_error' && e.reason === 'tpm_unreachable') === 1, 10000, 'the key_error event');
});
