// iothubd and iothub-signer (issue 14): the daemon holds no key and no token file, and asks the
// signer over its socket. What the link must survive: the signer killed with requests out and
// started again (as systemd restarts it; its socket unit keeps the socket, here the harness
// starts it again on the same path), a signer that is not there when the daemon starts, and a
// daemon stopped while its requests are out. The reference cloud checks every signature with
// independent code (tests/cloud), the bulbs check the command JWS with jose.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import * as jose from 'jose';
import { Hub, mqttClient, waitFor, sleep, IOTHUBD } from './lib/harness.mjs';
import { Bulb } from './lib/bulb.mjs';
import { startCloud } from '../cloud/server.mjs';
import { startTestbed, stopTestbed, keyBeforeDaemon } from './lib/testbed.mjs';

const PREFIX = 'iothub/v1/bulbs';
const TOKEN = 'tok-signerlink-0123456789';
const HUB_ID = 'test-hub';
let dir, tpm, broker, cloud, hub, client, bulbs, hubKey, keyJwk;

const nowS = () => Math.floor(Date.now() / 1000);

function overrides() {
  return {
    key: { backend: 'tpm', tcti: tpm.tcti, handle: '0x81000103' },
    cloud: { url: cloud.url, ca_file: cloud.caFile, bearer_token_file: path.join(dir, 'token'),
      batch_max_frames: 20, batch_max_delay_ms: 200, timeout_s: 5 },
  };
}

async function enrol(h, bulb) {
  const f = path.join(h.dir, `${bulb.id}.pem`);
  await fs.writeFile(f, bulb.pem);
  const r = await h.ctl(['bulb', 'add', bulb.id, '--key', f]);
  assert.equal(r.code, 0, r.stderr);
}

// Every frame sent is at the cloud exactly once, byte for byte.
async function assertExactlyOnce(sent, timeoutMs = 30000) {
  const has = (s) => cloud.state.frames.some((f) => f.dev === s.dev && f.seq === s.seq);
  await waitFor(() => sent.every(has), timeoutMs,
    `all ${sent.length} frames at the cloud (${sent.filter(has).length} there)`);
  for (const s of sent) {
    const got = cloud.state.frames.filter((f) => f.dev === s.dev && f.seq === s.seq);
    assert.equal(got.length, 1, `frame ${s.dev}/${s.seq} stored once`);
    assert.equal(got[0].jws, s.jws);
  }
}

async function publish(n, gapMs = 0) {
  const sent = [];
  for (let i = 0; i < n; i++) {
    for (const b of bulbs) {
      const jws = await b.frame();
      sent.push({ dev: b.id, seq: b.seq, jws });
      await client.publishAsync(`${PREFIX}/${b.id}/status`, jws, { qos: 1 });
    }
    if (gapMs) await sleep(gapMs);
  }
  return sent;
}

before(async () => {
  ({ dir, tpm, broker } = await startTestbed());
  cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'alice' } });
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  keyJwk = (await keyBeforeDaemon(broker, overrides())).jwk;
  const { kid, ...pub } = keyJwk;
  hubKey = await jose.importJWK(pub, 'ES256');
  hub = await Hub.start(broker, overrides());
  await waitFor(async () => (await hub.status()).key.id, 10000, 'the hub key, named by the signer');
  const r = await hub.ctl(['register']);
  assert.equal(r.code, 0, r.stderr);
  client = await mqttClient(broker.port);
  bulbs = [await Bulb.create('link-a', 'ES256'), await Bulb.create('link-b', 'EdDSA')];
  for (const b of bulbs) await enrol(hub, b);
  await waitFor(() => cloud.state.hubs.get(HUB_ID)?.devices?.size === 2, 10000, 'device list at the cloud');
});

after(async () => {
  await stopTestbed({ clients: [client], hub, cloud, broker, tpm, dir });
});

test('iothubd links no tpm2-tss and holds none of the signer\'s code', async () => {
  const ldd = await new Promise((resolve, reject) =>
    execFile('ldd', [IOTHUBD], { encoding: 'utf8' }, (e, out) => (e ? reject(e) : resolve(out))));
  assert.doesNotMatch(ldd, /libtss2/, ldd);
  const nm = await new Promise((resolve, reject) =>
    execFile('nm', ['--defined-only', IOTHUBD], { encoding: 'utf8', maxBuffer: 16 << 20 },
      (e, out) => (e ? reject(e) : resolve(out))));
  for (const sym of ['hubkey_open', 'hubkey_sign', 'tokenstore_load', 'tokenstore_save', 'attest_begin', 'Esys_Initialize'])
    assert.doesNotMatch(nm, new RegExp(`\\b${sym}\\b`), `${sym} in iothubd`);
  assert.match(nm, /\bsigner_sign_http\b/);
});

test('the key comes from the signer; status has its signer object', async () => {
  const st = await hub.status();
  assert.equal(st.key.id, keyJwk.kid);
  assert.equal(st.key.backend, 'tpm');
  assert.equal(st.signer.connected, true);
  assert.equal(st.signer.socket, hub.signerSock);
  const sent = await publish(3);
  await assertExactlyOnce(sent);
  const st2 = await hub.status();
  assert.ok(st2.uplink.remote.signer.signatures > st.uplink.remote.signer.signatures, 'uploads signed through the signer (by the uplink)');
  await waitFor(async () => (await hub.status()).signer.remote?.signatures > 0, 10000, 'the signer\'s own counters');
});

test('kill -9 of the signer with bulbs publishing: restarted, uploads resume, every frame once, commands signed', async () => {
  const st0 = await hub.status();
  const publishing = publish(60, 25); // about 3 s of frames from both bulbs
  await sleep(500);
  // Stopped first, so that requests are surely out when it dies (swtpm answers in a
  // millisecond): the kill then loses them, and the client must send them again.
  process.kill(hub.signerProc.pid, 'SIGSTOP');
  await waitFor(async () => (await hub.status()).signer.pending > 0, 5000, 'requests out to the stopped signer');
  const killed = await hub.stopSigner('SIGKILL');
  assert.equal(killed.signal, 'SIGKILL');
  await sleep(500); // a restart delay, as RestartSec= would give
  await hub.startSigner();
  const sent = await publishing;
  await assertExactlyOnce(sent);
  const st1 = await hub.status();
  console.log(`signer killed mid-run: ${sent.length} frames, reconnects ${st1.signer.reconnects - st0.signer.reconnects}, ` +
    `resent ${st1.signer.resent - st0.signer.resent}, spool ${st1.spool.pending}`);
  assert.ok(st1.signer.reconnects > st0.signer.reconnects, 'the client saw the signer go and connected again');
  assert.ok(st1.signer.resent > st0.signer.resent, 'what was out went again on the new connection');
  assert.equal(st1.spool.pending, 0);

  // Commands are still signed: the long poll parked, a command queued, the bulb verifies it.
  const bulbClient = await mqttClient(broker.port, { clean: true, clientId: `link-bulb-${process.pid}` });
  try {
    const got = [];
    bulbClient.on('message', (topic, payload) => got.push(payload.toString()));
    await bulbClient.subscribeAsync(`${PREFIX}/${bulbs[0].id}/cmd`, { qos: 1 });
    await waitFor(() => cloud.state.hubs.get(HUB_ID)?.waiters?.size === 1, 20000, 'the long poll parked');
    const id = `after-kill-${Date.now()}`;
    cloud.control.queueCommand({ hub: HUB_ID, id, dev: bulbs[0].id, set: { on: true, bri: 100 }, exp: nowS() + 60 });
    await waitFor(() => got.length > 0, 10000, 'the command at the bulb');
    const v = await jose.compactVerify(got[0], hubKey, { algorithms: ['ES256'] });
    const payload = JSON.parse(Buffer.from(v.payload).toString());
    assert.equal(payload.id, id);
    assert.equal(v.protectedHeader.kid, keyJwk.kid);
  } finally {
    await bulbClient.endAsync();
  }
});

test('the signer absent when the daemon starts: READY at once, frames spooled, uploads start once it comes', async () => {
  await hub.stop();
  const t0 = Date.now();
  await hub.start({ signer: false });
  const readyMs = Date.now() - t0;
  const sent = await publish(5);
  await waitFor(async () => (await hub.status()).spool.pending >= sent.length, 5000, 'frames spooled');
  await sleep(1500);
  const st = await hub.status();
  assert.equal(st.key.id, null, 'no key without the signer');
  assert.equal(st.signer.connected, false);
  assert.ok(!sent.some((s) => cloud.state.frames.some((f) => f.dev === s.dev && f.seq === s.seq)), 'nothing uploaded');
  const t1 = Date.now();
  await hub.startSigner();
  await assertExactlyOnce(sent);
  const t2 = Date.now();
  // iothubd's own signer connection (command signatures, KEY_INFO) reconnects on its own backoff,
  // independent of the uplink's, which made the uploads: it may name the key a little later.
  await waitFor(async () => (await hub.status()).key.id === keyJwk.kid, 5000, 'iothubd names the key');
  console.log(`signer absent at start: READY in ${readyMs} ms; uploads ${t2 - t1} ms after the signer came; ` +
    `iothubd named the key ${Date.now() - t2} ms after the uploads`);
});

// iothub-uplink(8), CANCEL. A signer that does not answer holds the uplink's status upload in its
// signing, past iothubd's wait ([cloud] timeout_s 5 + 15 s). iothubd gives up, tells the uplink,
// and sends the batch again later. Without the CANCEL the abandoned request would still go once
// the signer answers, and the new one, chained behind it, after it: the batch twice.
test('an upload iothubd gave up on ends in the uplink too (CANCEL): the signer frozen 20 s, the batch still reaches the cloud once', async () => {
  const st0 = await hub.status();
  const dup0 = cloud.state.duplicates;
  const remote0 = st0.uplink.remote?.uplink?.cancelled ?? 0;
  let sent;
  process.kill(hub.signerProc.pid, 'SIGSTOP');
  try {
    sent = await publish(3);
    await waitFor(async () => (await hub.status()).uplink.cancelled > st0.uplink.cancelled, 45000,
      'iothubd gave up on an upload and cancelled it');
    await waitFor(async () => (await hub.status()).uplink.remote?.uplink?.cancelled > remote0, 10000,
      'the uplink ended the request');
  } finally {
    process.kill(hub.signerProc.pid, 'SIGCONT');
  }
  await assertExactlyOnce(sent);
  // The cloud stores a frame once whatever comes (PROTOCOL.md 3: it drops duplicates by (dev,
  // seq)); what came twice, it counts.
  await sleep(1000);
  assert.equal(cloud.state.duplicates - dup0, 0, 'no frame reached the cloud twice');
  const st = await hub.status();
  assert.ok(st.uplink.timeouts > st0.uplink.timeouts, 'iothubd\'s wait for the answer passed');
  await waitFor(async () => (await hub.status()).uplink.pending === st0.uplink.pending, 10000,
    `iothubd's requests to the uplink back to what they were (${st0.uplink.pending}: the long polls)`);
  console.log(`signer frozen past iothubd's wait: ${st.uplink.cancelled - st0.uplink.cancelled} request(s) cancelled, ` +
    `${st.uplink.timeouts - st0.uplink.timeouts} timed out, batch once at the cloud`);
});

test('the daemon stopped while its requests are out to a signer that does not answer: a clean exit', async () => {
  // SIGSTOP: the signer's socket takes the connection and the requests, and nothing answers.
  process.kill(hub.signerProc.pid, 'SIGSTOP');
  try {
    const sent = await publish(20);
    await waitFor(async () => (await hub.status()).signer.pending > 0, 5000, 'requests out to the signer');
    const t0 = Date.now();
    const proc = hub.proc;
    proc.kill('SIGTERM');
    const { code, signal } = await hub.exited;
    assert.equal(signal, null);
    assert.equal(code, 0, hub.log.slice(-2000));
    assert.ok(Date.now() - t0 < 3000, 'the stop did not wait for the signer');
    assert.doesNotMatch(hub.log, /AddressSanitizer|LeakSanitizer|runtime error/);
    void sent;
  } finally {
    process.kill(hub.signerProc.pid, 'SIGCONT');
  }
  // Started again, the spooled frames go.
  await hub.stop();
  await hub.start();
  await waitFor(async () => (await hub.status()).spool.pending === 0, 20000, 'the spool drained');
});

test('a clean stop of both: exit 0, nothing from the sanitizers (under make asan)', async () => {
  const sent = await publish(3);
  await assertExactlyOnce(sent);
  const proc = hub.signerProc;
  const r = await hub.stop();
  assert.equal(r.code, 0, hub.log.slice(-2000));
  assert.equal(proc.exitCode, 0, hub.signerLog.slice(-2000));
  for (const log of [hub.log, hub.signerLog]) assert.doesNotMatch(log, /AddressSanitizer|LeakSanitizer|runtime error/);
  await hub.start();
});
