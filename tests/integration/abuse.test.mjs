// Abuse at scale (issue 12): 10,000 enrolled bulbs of which 1,000 flood at 100 times their rate
// while 100 honest bulbs keep every frame; frames on 100,000 unknown topics (memory bounded,
// log lines rate limited); 16 slow control clients (the socket still answers others).
//
// Real parts only: mosquitto, the daemon, the C load generator (build/tools/loadgen, its own
// OpenSSL signing) for the flood, jose-signed honest bulbs that keep and resend unacknowledged
// frames (PROTOCOL.md 1, end-to-end acks). Bulbs are enrolled with the control socket's
// documented `bulb-add` request (iothub-protocol(7), "Control socket"), the request that
// `iothubctl bulb add` sends, one connection each, so that 10,000 take seconds, not minutes.
//
// Sizes: ABUSE_BULBS (10000), ABUSE_FLOODERS (1000), ABUSE_HONEST (100), ABUSE_RATE
// (rate_per_device, 0.1/s), ABUSE_FLOOD_SECONDS (10), ABUSE_UNKNOWN (100000).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { BUILD, Broker, Hub, mqttClient, tempDir, waitFor, sleep } from './lib/harness.mjs';
import { Bulb, b64u } from './lib/bulb.mjs';
import { CtlProbe, privateKiB } from '../bench/probes.mjs';

const run = promisify(execFile);
const LOADGEN = path.join(BUILD, 'tools', 'loadgen');
const PREFIX = 'iothub/v1/bulbs';
const env = (k, d) => (process.env[k] ? Number(process.env[k]) : d);
const N_BULBS = env('ABUSE_BULBS', 10000);
const N_FLOOD = env('ABUSE_FLOODERS', 1000);
const N_HONEST = env('ABUSE_HONEST', 100);
const RATE = env('ABUSE_RATE', 0.1);
const FLOOD_S = env('ABUSE_FLOOD_SECONDS', 10);
const N_UNKNOWN = env('ABUSE_UNKNOWN', 100000);

let dir, broker, hub, sock;
const cleanups = []; // run by after(), so that a failed test does not keep node alive
const report = {};

// One request on the control socket: a JSON line in, a JSON line out, then the daemon closes.
function ctlRequest(obj, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    const s = net.connect(sock);
    let buf = '';
    const timer = setTimeout(() => { s.destroy(); reject(new Error('control socket: no answer')); }, timeoutMs);
    s.setEncoding('utf8');
    s.on('connect', () => s.write(`${JSON.stringify(obj)}\n`));
    s.on('data', (d) => { buf += d; });
    s.on('error', (e) => { clearTimeout(timer); reject(e); });
    s.on('close', () => { clearTimeout(timer); try { resolve(JSON.parse(buf)); } catch (e) { reject(e); } });
  });
}

async function enrol(id, pem) {
  const r = await ctlRequest({ cmd: 'bulb-add', id, key: pem });
  assert.equal(r.ok, true, `enrol ${id}: ${JSON.stringify(r)}`);
}

async function rssKiB(pid) {
  const s = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/^VmRSS:\s+(\d+)/m.exec(s)[1]);
}

// The hub's status once frames.received reached 'target', or stopped moving for 5 s.
// Frames accepted, refused by the database or rejected: the received ones not held for a commit.
const decided = (s) => s.frames.accepted + s.frames.store_failed + Object.values(s.frames.rejected).reduce((a, b) => a + b, 0);

// A status snapshot to count from: frames held for their commit at this moment (group commit,
// [frames] commit_delay_ms) count as not yet received, since they are decided after it.
async function baseline() {
  const st = await hub.status();
  st.frames.received = decided(st);
  return st;
}

async function settled(target, timeoutMs) {
  const end = Date.now() + timeoutMs;
  let st = await hub.status(), last = st.frames.received, since = Date.now();
  while (st.frames.received < target && Date.now() < end && Date.now() - since < 5000) {
    await sleep(250);
    st = await hub.status();
    if (st.frames.received !== last) { last = st.frames.received; since = Date.now(); }
  }
  // A frame counts as received when it arrives and as accepted at its commit, up to [frames]
  // commit_delay_ms later (group commit): wait until every received frame is decided.
  for (let i = 0; i < 40 && decided(st) < st.frames.received; i++) {
    await sleep(50);
    st = await hub.status();
  }
  return st;
}

const logLines = (re) => hub.log.split('\n').filter((l) => re.test(l)).length;

before(async () => {
  dir = await tempDir();
  broker = await Broker.start(dir);
  // ack resends must not be starved by the acks of 10,000 bulbs: defaults otherwise.
  // Under ASan (make asan) freed memory waits in a quarantine of 256 MiB by default, which
  // would read as growth in the memory check: a small one keeps the check meaningful there. It
  // is an ASan option: without ASan it does nothing.
  hub = await Hub.start(broker, { frames: { rate_per_device: RATE } },
    { env: { ASAN_OPTIONS: [process.env.ASAN_OPTIONS, 'quarantine_size_mb=1'].filter(Boolean).join(':') } });
  sock = path.join(hub.runtimeDir, 'control');
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt');
});

after(async () => {
  for (const c of cleanups) await c().catch(() => {});
  await hub?.cleanup();
  await broker?.stop();
  if (dir) await fs.rm(dir, { recursive: true, force: true });
  if (Object.keys(report).length) console.log(`# abuse report ${JSON.stringify(report)}`);
});

test(`${N_BULBS} enrolled, ${N_FLOOD} flood at 100x their rate, ${N_HONEST} honest bulbs lose nothing`, async () => {
  // Flooders: keys and frames from the C load generator (ES256, raw r||s).
  const fdir = path.join(dir, 'flood');
  await run(LOADGEN, ['keys', '--dir', fdir, '--bulbs', String(N_FLOOD), '--alg', 'ES256', '--id-prefix', 'flood-']);
  const perFlooder = Math.ceil(100 * RATE * FLOOD_S);
  const floodFile = path.join(dir, 'flood.txt');
  await run(LOADGEN, ['frames', '--dir', fdir, '--bulbs', String(N_FLOOD), '--frames', String(perFlooder * N_FLOOD),
    '--out', floodFile, '--id-prefix', 'flood-'], { maxBuffer: 1 << 20 });
  // Honest bulbs sign with jose; idle bulbs only need a public key.
  const honest = [];
  for (let i = 0; i < N_HONEST; i++) honest.push(await Bulb.create(`honest-${i}`, i % 2 ? 'EdDSA' : 'ES256'));
  const nIdle = N_BULBS - N_FLOOD - N_HONEST;
  const t0 = performance.now();
  for (let i = 0; i < N_FLOOD; i++) await enrol(`flood-${i}`, await fs.readFile(path.join(fdir, `flood-${i}.pub.pem`), 'utf8'));
  for (const b of honest) await enrol(b.id, b.pem);
  for (let i = 0; i < nIdle; i++) {
    const { publicKey } = crypto.generateKeyPairSync('ed25519');
    await enrol(`idle-${i}`, publicKey.export({ type: 'spki', format: 'pem' }));
  }
  report.enrol_s = +((performance.now() - t0) / 1000).toFixed(1);
  const list = await hub.ctl(['bulb', 'list', '--json'], { maxBuffer: 64 << 20 });
  assert.equal(list.code, 0, list.stderr);
  assert.equal(JSON.parse(list.stdout).bulbs.length, N_BULBS);
  report.rss_enrolled_kib = await rssKiB(hub.proc.pid);

  // Honest bulbs keep their unacknowledged frames and resend them (PROTOCOL.md 1), and send
  // at exactly their allowed rate: one frame each 1/RATE seconds (the bucket holds one).
  const client = await mqttClient(broker.port);
  cleanups.push(() => client.endAsync());
  client.setMaxListeners(0); // one ack listener per honest bulb
  for (const b of honest) await b.attach(client, { resendMs: 3000 });
  const honestPeriodMs = 1000 / RATE;
  let sending = true;
  const honestLoop = (async () => {
    for (let round = 0; sending || round < 2; round++) { // at least two frames each
      const due = performance.now() + honestPeriodMs + 100;
      for (const b of honest) await b.send();
      while ((sending || round < 1) && performance.now() < due) await sleep(100);
    }
  })();

  // The flood: every flooder at 100 x RATE, paced by loadgen, all at QoS 1.
  const offered = 100 * RATE * N_FLOOD;
  const before = await baseline();
  const tf = performance.now();
  const { stdout } = await run(LOADGEN, ['publish', '--host', '127.0.0.1', '--port', String(broker.port),
    '--file', floodFile, '--rate', String(offered), '--timeout', String(FLOOD_S * 6)]);
  const pub = JSON.parse(stdout);
  const floodSeconds = (performance.now() - tf) / 1000;
  assert.equal(pub.acked, perFlooder * N_FLOOD);
  sending = false;
  await honestLoop;
  // Every honest frame acknowledged end to end (resent where the hub had refused one).
  await waitFor(() => honest.every((b) => b.ackedSeq === b.seq), 30000,
    `every honest frame acked (${honest.filter((b) => b.ackedSeq !== b.seq).map((b) => `${b.id}:${b.ackedSeq}/${b.seq}`).join(' ')})`);
  for (const b of honest) b.detach();
  // Then every publish (flood, honest frames, their resends) has reached the hub.
  const published = pub.acked + honest.reduce((n, b) => n + b.seq + b.resent, 0);
  const st = await settled(before.frames.received + published, 60000);
  await client.endAsync();
  // Every honest frame reached the hub (they are acked); of the flood, a handful of the 100,000
  // frames mosquitto acknowledged to the load generator have been seen not to reach the hub in
  // some runs (4 to 100; no disconnect, no "dropped" notice from the broker; not explained
  // yet, see the issue's note). They are the flooders' and are counted here, never hidden.
  const received = st.frames.received - before.frames.received;
  report.flood_not_delivered_by_broker = published - received;
  assert.ok(received <= published && published - received <= published * 0.001,
    `${published - received} of ${published} published frames never reached the hub`);

  const bulbs = JSON.parse((await hub.ctl(['bulb', 'list', '--json'], { maxBuffer: 64 << 20 })).stdout).bulbs;
  const byId = new Map(bulbs.map((b) => [b.id, b]));
  const honestSent = honest.reduce((n, b) => n + b.seq, 0);
  for (const b of honest) assert.equal(byId.get(b.id).last_seq, b.seq, `${b.id}: every frame committed`);
  const accepted = st.frames.accepted - before.frames.accepted;
  // Every honest frame was committed exactly once (a resend of a committed one is a replay), so
  // the rest of the accepted frames are the flooders'.
  const floodAccepted = accepted - honestSent;
  const rejected = {};
  for (const [k, v] of Object.entries(st.frames.rejected)) if (v - before.frames.rejected[k]) rejected[k] = v - before.frames.rejected[k];
  // Each flooder gets its bucket (one frame) plus RATE per second of the flood, nothing more.
  const allowance = N_FLOOD * (Math.max(1, 2 * RATE) + RATE * (floodSeconds + 5));
  assert.ok(floodAccepted > 0 && floodAccepted <= allowance, `flooders got ${floodAccepted}, allowance ${allowance}`);
  assert.deepEqual(Object.keys(rejected).filter((k) => !['rate_limited', 'replay'].includes(k)), [],
    `only rate_limited and replay: ${JSON.stringify(rejected)}`);
  assert.equal(Object.values(rejected).reduce((a, b) => a + b, 0), received - accepted,
    `every frame not accepted is counted by reason: ${JSON.stringify({ store_failed: st.frames.store_failed, storage: st.storage, spool: st.spool })}`);
  // Rejections: counted every time; logged a few times per bulb and window, and at most 50
  // lines per window for all bulbs together (src/ingest.c), "Suppressed" summaries included.
  const floodLogged = logLines(/Rejected frame from|Suppressed \d+ more rejection/);
  report.flood = {
    offered_per_s: offered, published: pub.acked, publish_s: +floodSeconds.toFixed(1),
    achieved_per_s: Math.round(pub.acked / floodSeconds), achieved_x_rate: +(pub.acked / floodSeconds / N_FLOOD / RATE).toFixed(1),
    flood_accepted: floodAccepted, rejected,
    honest_sent: honestSent, honest_lost: honest.reduce((n, b) => n + (b.seq - byId.get(b.id).last_seq), 0),
    honest_resent: honest.reduce((n, b) => n + b.resent, 0), flood_log_lines: floodLogged,
  };
  const windows = Math.ceil((performance.now() - t0) / 10000) + 1;
  assert.ok(floodLogged <= 52 * windows, `rejection log lines: ${floodLogged} in ${windows} windows`);
});

test(`frames on ${N_UNKNOWN} unknown topics: counted, memory bounded, log lines rate limited`, async () => {
  // Well-formed frames of devices never enrolled: refused as unknown_device before any
  // signature check, so a random signature does. Written in the load generator's format, in
  // two halves of distinct topics, so that memory is read in between.
  const iat = Math.floor(Date.now() / 1000);
  const files = [];
  for (const [from, to] of [[0, N_UNKNOWN >> 1], [N_UNKNOWN >> 1, N_UNKNOWN]]) {
    const file = path.join(dir, `unknown-${from}.txt`);
    const fh = await fs.open(file, 'w');
    let chunk = '';
    for (let i = from; i < to; i++) {
      const id = `ghost-${i}`;
      const h = b64u(JSON.stringify({ alg: 'ES256', kid: id, typ: 'iothub-status' }));
      const p = b64u(JSON.stringify({ dev: id, seq: 1, iat, state: { on: true } }));
      chunk += `${PREFIX}/${id}/status ${h}.${p}.${b64u(crypto.randomBytes(64))}\n`;
      if (chunk.length > 1 << 20) { await fh.write(chunk); chunk = ''; }
    }
    await fh.write(chunk);
    await fh.close();
    files.push({ file, n: to - from });
  }
  const pid = hub.proc.pid;
  const rss = [await rssKiB(pid)], priv = [await privateKiB(pid)];
  const before = await baseline();
  const logBefore = logLines(/ghost-|unknown_device|unknown device/);
  const t0 = performance.now();
  let done = 0;
  for (const { file, n } of files) {
    const { stdout } = await run(LOADGEN, ['publish', '--host', '127.0.0.1', '--port', String(broker.port),
      '--file', file, '--timeout', '120']);
    assert.equal(JSON.parse(stdout).acked, n);
    done += n;
    await waitFor(async () => (await hub.status()).frames.rejected.unknown_device - before.frames.rejected.unknown_device >= done,
      60000, `${done} unknown frames counted`);
    rss.push(await rssKiB(pid));
    priv.push(await privateKiB(pid));
  }
  const seconds = (performance.now() - t0) / 1000;
  const st = await hub.status();
  assert.equal(st.frames.rejected.unknown_device - before.frames.rejected.unknown_device, N_UNKNOWN);
  assert.equal(st.frames.accepted, before.frames.accepted, 'nothing accepted');
  assert.equal(st.spool.pending, before.spool.pending, 'nothing spooled');
  const logged = logLines(/ghost-|unknown_device|unknown device/) - logBefore;
  report.unknown = { frames: N_UNKNOWN, seconds: +seconds.toFixed(1), per_s: Math.round(N_UNKNOWN / seconds),
    rss_kib: rss, private_kib: priv, log_lines: logged };
  // Nothing is kept per unknown device: the second half (new topics all) adds at most 1 MiB
  // (allocator noise), and both together at most 4 MiB (ASan's allocator warms up in the
  // first; without ASan both were 0 when this was written).
  assert.ok(rss[2] - rss[1] <= 1024, `RSS grew ${rss[2] - rss[1]} KiB over the second ${N_UNKNOWN >> 1} topics`);
  assert.ok(priv[2] - priv[1] <= 1024, `private memory grew ${priv[2] - priv[1]} KiB over the second half`);
  assert.ok(rss[2] - rss[0] <= 4096, `RSS grew ${rss[2] - rss[0]} KiB over ${N_UNKNOWN} unknown topics`);
  // One limit for every unknown device together (src/ingest.c: 5 lines per 10 s window, plus
  // one "Suppressed" line per window).
  assert.ok(logged <= 6 * Math.ceil(seconds / 10 + 1), `${logged} log lines for ${N_UNKNOWN} unknown frames in ${seconds} s`);
});

test('16 slow control clients (silent, or a byte a second): the socket still answers the others', async () => {
  const SLOW_CLIENTS = 16, SECONDS = 12;
  let running = true, opened = 0, closedByHub = 0;
  cleanups.push(async () => { running = false; });
  // A slow client reconnects as soon as the daemon closes it, to keep its slot taken.
  async function slowClient(i) {
    while (running) {
      await new Promise((resolve) => {
        const s = net.connect(sock);
        opened++;
        let timer = null;
        s.on('connect', () => {
          if (i % 2) timer = setInterval(() => { if (running) s.write('{'); else s.destroy(); }, 1000);
        });
        const poll = setInterval(() => { if (!running) s.destroy(); }, 100);
        s.on('error', () => {});
        s.on('close', () => { clearInterval(timer); clearInterval(poll); if (running) closedByHub++; resolve(); });
      });
    }
  }
  const slow = Array.from({ length: SLOW_CLIENTS }, (_, i) => slowClient(i));
  await sleep(1000);
  const probe = new CtlProbe(hub, 200);
  const ctlRuns = [];
  for (let t = 0; t < SECONDS; t += 3) {
    await sleep(3000);
    ctlRuns.push(await hub.ctl(['status', '--json']));
  }
  const { answers, errors } = await probe.stop();
  running = false;
  await Promise.all(slow);
  const sorted = [...answers].sort((a, b) => a - b);
  const pct = (q) => +sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))].toFixed(1);
  report.slow_clients = { slow: SLOW_CLIENTS, slow_connections: opened, closed_by_hub: closedByHub,
    probe_answers: answers.length, probe_errors: errors, p50_ms: pct(0.5), p99_ms: pct(0.99), max_ms: pct(1),
    iothubctl_ok: ctlRuns.filter((r) => r.code === 0).length, iothubctl_runs: ctlRuns.length,
    log_lines: logLines(/Control socket full|Too many control connections/) };
  assert.equal(errors, 0, 'every status request answered');
  assert.ok(answers.length >= SECONDS * 2, `${answers.length} answers`);
  for (const r of ctlRuns) assert.equal(r.code, 0, r.stderr);
  assert.ok(closedByHub >= SLOW_CLIENTS, 'slow clients were closed to make room');
  // Said in the log, not once per eviction.
  assert.ok(report.slow_clients.log_lines >= 1 && report.slow_clients.log_lines <= 2 * Math.ceil(SECONDS / 10 + 1),
    `${report.slow_clients.log_lines} log lines`);
  assert.equal((await hub.status()).mqtt.connected, true);
});

test('slow control clients of an unprivileged uid (setpriv nobody) never hold a slot: operators get answers, nobody is evicted', async () => {
  // Issue 14: a peer that SO_PEERCRED refuses is answered and closed at accept (iothubd(8),
  // CONTROL SOCKET). Before, it held one of the 16 slots until it sent a line or was evicted,
  // so any local user could apply the pressure of the test above. Here 24 such clients, half
  // silent and half a byte a second, reconnect as soon as they are closed, while the operator
  // side (root) polls status and runs iothubctl.
  const SLOW_CLIENTS = 24, SECONDS = 9;
  // Open the file-system gate (0660 in the unit) so that the daemon's own check is what stands.
  const ctlSock = path.join(hub.runtimeDir, 'control');
  await fs.chmod(hub.dir, 0o755);
  await fs.chmod(hub.runtimeDir, 0o755);
  await fs.chmod(ctlSock, 0o666);
  const script = path.join(hub.dir, 'slow-nobody.mjs');
  await fs.writeFile(script, `import net from 'node:net';
const [sock, n, seconds] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
const PAUSE_MS = 100; // a slow client, not a connection flood: it reconnects 100 ms after each close
const end = Date.now() + seconds * 1000;
const st = { opened: 0, closed: 0, answered: 0, errors: {}, maxHeldMs: 0, notClosed: 0 };
async function client(i) {
  while (Date.now() < end) {
    await new Promise((resolve) => {
      const s = net.connect(sock);
      let t0 = 0, buf = '', timer = null;
      st.opened++;
      s.on('connect', () => {
        t0 = Date.now();
        if (i % 2) timer = setInterval(() => s.write('{'), 1000);
      });
      const stop = setTimeout(() => { st.notClosed++; s.destroy(); }, Math.max(0, end - Date.now()));
      s.setEncoding('utf8');
      s.on('data', (d) => { buf += d; });
      s.on('error', (e) => { st.errors[e.code] = (st.errors[e.code] || 0) + 1; });
      s.on('close', () => {
        clearInterval(timer); clearTimeout(stop);
        if (t0) st.maxHeldMs = Math.max(st.maxHeldMs, Date.now() - t0);
        st.closed++;
        if (buf === '{"ok":false,"error":"permission denied"}\\n') st.answered++;
        setTimeout(resolve, PAUSE_MS);
      });
    });
  }
}
await Promise.all(Array.from({ length: n }, (_, i) => client(i)));
console.log(JSON.stringify(st));
`, { mode: 0o644 });
  const logged = logLines(/Control socket full/);
  const logStart = hub.log.length;
  const nobody = run('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', process.execPath, script,
    ctlSock, String(SLOW_CLIENTS), String(SECONDS)]);
  await sleep(1000);
  const probe = new CtlProbe(hub, 200);
  const ctlRuns = [];
  for (let t = 0; t < SECONDS - 3; t += 2) {
    await sleep(2000);
    ctlRuns.push(await hub.ctl(['status', '--json']));
  }
  const { answers, errors } = await probe.stop();
  const st = JSON.parse((await nobody).stdout);
  await fs.chmod(ctlSock, 0o660);
  await fs.chmod(hub.runtimeDir, 0o750);
  report.refused_slow_clients = { slow: SLOW_CLIENTS, ...st, probe_answers: answers.length, probe_errors: errors,
    iothubctl_ok: ctlRuns.filter((r) => r.code === 0).length, iothubctl_runs: ctlRuns.length,
    refusal_log_lines: hub.log.slice(logStart).split('\n').filter((l) => /Refused control connection|more refused control/.test(l)).length };
  // The operators' side: every request answered, no iothubctl failure.
  assert.equal(errors, 0, 'every status request answered');
  assert.ok(answers.length >= (SECONDS - 3) * 3, `${answers.length} answers`);
  for (const r of ctlRuns) assert.equal(r.code, 0, r.stderr);
  // The refused side: each connection got the one-line refusal and was closed at once, none
  // held until its deadline or an eviction; and no connection was closed to make room.
  assert.ok(st.opened >= SLOW_CLIENTS * 10, `${st.opened} unprivileged connections`);
  assert.equal(st.notClosed, 0, 'every unprivileged connection was closed by the daemon');
  assert.equal(st.answered, st.closed, `${st.answered} of ${st.closed} got "permission denied"`);
  assert.ok(st.maxHeldMs < 1000, `an unprivileged connection was held ${st.maxHeldMs} ms`);
  assert.equal(logLines(/Control socket full/), logged, 'no connection closed to make room');
  // Counted in full, logged within a bound (a burst and one "Suppressed" line per window).
  assert.ok(report.refused_slow_clients.refusal_log_lines <= 6 * Math.ceil(SECONDS / 10 + 1),
    `${report.refused_slow_clients.refusal_log_lines} refusal log lines`);
  assert.equal((await hub.status()).mqtt.connected, true);
});

test('a clean stop after the abuse: exit status 0, nothing from the sanitizers', async () => {
  const r = await hub.stop();
  assert.deepEqual(r, { code: 0, signal: null });
  assert.doesNotMatch(hub.log, /Sanitizer|runtime error/);
});
