// The fault campaign of issue 12 (daemon side): SIGKILLs at random points with frames, uploads
// and commands in flight; the state directory full, read-only, its database deleted and
// corrupted; the TPM absent, killed and back, replaced; the clock jumping. Every case counts
// what the bulbs sent against what reached the cloud (after its de-duplication) and prints a
// row of the report table ("# FAULT | ..."). Real mosquitto, swtpm, the reference cloud;
// bulbs signed with jose that keep and resend their frames (lib/bulb.mjs, lib/faults.mjs).
//
// IOTHUB_FAULTS_LONG=1: the long form (200 SIGKILLs, more bulbs); the CI form stays < 60 s
// per case.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import * as jose from 'jose';
import { Broker, Swtpm, mqttClient, tempDir, waitFor, sleep } from './lib/harness.mjs';
import { keyBeforeDaemon } from './lib/testbed.mjs';
import { FaultHub, FaultBulb, Tmpfs, tally, reportRow, run, FAULT_TABLE } from './lib/faults.mjs';
import { startCloud } from '../cloud/server.mjs';

const PREFIX = 'iothub/v1/bulbs';
const TOKEN = 'tok-faults-test-0123456789';
const LONG = process.env.IOTHUB_FAULTS_LONG === '1';
const HANDLE = '0x81010001';
let dir, tpm, broker, cloud, hubKey;
const clients = [];

const nowS = () => Math.floor(Date.now() / 1000);

function overrides(hubId, extra = {}) {
  return {
    hub: { id: hubId },
    key: { backend: 'tpm', tcti: tpm.tcti, handle: HANDLE },
    cloud: { url: cloud.url, ca_file: cloud.caFile, bearer_token_file: path.join(dir, 'token'),
      batch_max_frames: 50, batch_max_delay_ms: 100, timeout_s: 5 },
    ...extra,
  };
}

// A daemon for one case: created, its state directory prepared by prepare() (a tmpfs), started,
// registered at the cloud.
async function startHub(hubId, { prepare = null, extra = {}, clockFile = null, register = true } = {}) {
  const h = await FaultHub.create(broker, overrides(hubId, extra), { clockFile });
  if (prepare) await prepare(h);
  await h.start();
  await waitFor(async () => (await h.status()).mqtt.connected, 5000, 'mqtt');
  if (register) {
    await waitFor(async () => (await h.status()).key.id, 10000, 'the hub key');
    const r = await h.ctl(['register']);
    assert.equal(r.code, 0, r.stderr);
  }
  return h;
}

async function bulbs(h, prefix, n, opts = {}) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const c = await mqttClient(broker.port);
    clients.push(c);
    const b = await FaultBulb.create(`${prefix}-${i}`, c, hubKey, { prefix: PREFIX, ...opts });
    const f = path.join(h.dir, `${b.id}.pem`);
    await fs.writeFile(f, b.bulb.pem);
    const r = await h.ctl(['bulb', 'add', b.id, '--key', f]);
    assert.equal(r.code, 0, r.stderr);
    out.push(b);
  }
  return out;
}

// Bulbs publishing while ctl.stop is false: each keeps at most 'depth' frames in flight.
function produce(bs, ctl, { depth = 3, everyMs = 20 } = {}) {
  return Promise.all(bs.map(async (b) => {
    while (!ctl.stop) {
      if (!ctl.paused && b.inFlight < depth) await b.send();
      await sleep(everyMs);
    }
  }));
}

// Waits until every frame is acked by the hub and at the cloud; returns the tally.
async function drain(bs, timeoutMs = 30000) {
  await waitFor(() => bs.every((b) => b.inFlight === 0), timeoutMs,
    `every frame acked (in flight: ${bs.map((b) => `${b.id}:${b.inFlight}`)})`);
  await waitFor(() => tally(cloud, bs).lost === 0, timeoutMs, `every frame at the cloud: ${JSON.stringify(tally(cloud, bs))}`);
  return tally(cloud, bs);
}

async function stopClean(h) {
  const r = await h.stop();
  assert.doesNotMatch(h.stderrText, /AddressSanitizer|LeakSanitizer|runtime error/, h.stderrText);
  assert.equal(r.code, 0, `exit ${r.code} ${r.signal}: ${h.stderrText}`);
}

before(async () => {
  dir = await tempDir();
  await fs.chmod(dir, 0o755);
  tpm = await Swtpm.start(path.join(dir, 'tpm'));
  broker = await Broker.start(dir);
  cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'alice' } });
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  const { jwk } = await keyBeforeDaemon(broker, overrides('pre'));
  const { kid, ...pub } = jwk;
  hubKey = await jose.importJWK(pub, 'ES256');
});

after(async () => {
  for (const c of clients) await c.endAsync(true).catch(() => {});
  await cloud?.close();
  await broker?.stop();
  await tpm?.stop();
  await fs.rm(dir, { recursive: true, force: true });
  if (FAULT_TABLE.length) {
    console.log('| fault | outcome | frames in | at the cloud | lost (reason) |');
    for (const r of FAULT_TABLE) console.log(`| ${r.fault} | ${r.outcome} | ${r.in} | ${r.atCloud} | ${r.lost} (${r.reason}) |`);
  }
});

test('crash: SIGKILLs at random points with frames, uploads and commands in flight', { timeout: LONG ? 3600000 : 120000 }, async () => {
  const KILLS = LONG ? 200 : 20;
  const hubId = 'crash-hub';
  const h = await startHub(hubId);
  try {
    const bs = await bulbs(h, 'crash', LONG ? 6 : 3);
    await waitFor(() => cloud.state.hubs.get(hubId)?.devices?.size === bs.length, 5000, 'device list at the cloud');
    const ctl = { stop: false };
    const producers = produce(bs, ctl);
    // Commands: one every 150 ms to a random bulb, each valid for 15 s.
    const cmds = [];
    const commander = (async () => {
      while (!ctl.stop) {
        const b = bs[Math.floor(Math.random() * bs.length)];
        const id = `crash-cmd-${cmds.length}`;
        cloud.control.queueCommand({ hub: hubId, id, dev: b.id, set: { on: true, bri: cmds.length % 255 }, exp: nowS() + 15 });
        cmds.push({ id, dev: b.id, queuedAt: Date.now() });
        await sleep(150);
      }
    })();
    const kills = [];
    try {
      for (let k = 0; k < KILLS; k++) {
        await sleep(150 + Math.random() * 700);
        kills.push(Date.now());
        h.proc.kill('SIGKILL');
        await h.exited;
        await h.stop();
        await h.start();
      }
      await sleep(500);
    } finally {
      ctl.stop = true;
      await Promise.all([producers, commander]);
    }
    const t = await drain(bs);

    // Every command ends with a final result at the cloud; a bulb gets one more copy of it at
    // most for every restart of the daemon while it was under way (iothub-protocol(7): after a
    // restart, commands published without a recorded PUBACK go out again, same bytes).
    const hubAtCloud = () => cloud.state.hubs.get(hubId);
    const final = (id) => hubAtCloud().commands.get(id)?.results.map((r) => r.status).find((s) => s !== 'delivered');
    await waitFor(() => cmds.every((c) => final(c.id)), 40000,
      `a final result for every command: ${JSON.stringify(cmds.filter((c) => !final(c.id)).map((c) => [c.id, hubAtCloud().commands.get(c.id)?.results]))}`);
    const outcomes = {};
    let extraCopies = 0, maxCopies = 0, notReached = 0;
    for (const c of cmds) {
      const f = final(c.id);
      outcomes[f] = (outcomes[f] ?? 0) + 1;
      assert.ok(['acked', 'expired'].includes(f), `${c.id}: ${f}`);
      const got = bs.find((b) => b.id === c.dev).cmds.get(c.id) ?? [];
      if (f === 'acked') assert.ok(got.length >= 1, `${c.id} acked but never at its bulb`);
      if (got.length === 0) { notReached++; continue; }
      const restarts = h.starts.filter((s) => s >= c.queuedAt && s <= got.at(-1).at).length;
      assert.ok(got.length <= 1 + restarts, `${c.id} reached its bulb ${got.length} times with ${restarts} restarts meanwhile`);
      extraCopies += got.length - 1;
      maxCopies = Math.max(maxCopies, got.length);
    }
    for (const b of bs) assert.equal(b.unverified, 0, `${b.id} got a command it could not verify`);
    assert.equal(t.duplicates, 0);
    assert.equal(t.lost, 0);
    console.log(`crash: ${KILLS} SIGKILLs; frames ${JSON.stringify(t.rows)}; commands ${cmds.length}: ${JSON.stringify(outcomes)}, ` +
      `${notReached} never at the bulb, ${extraCopies} extra copies (max ${maxCopies} of one)`);
    reportRow(`${KILLS} SIGKILLs + restarts, ${cmds.length} commands`, `commands ${JSON.stringify(outcomes)}; ${extraCopies} repeated deliveries`, t);
    for (const b of bs) b.detach();
    await stopClean(h);
  } finally {
    await h.cleanup();
  }
});
