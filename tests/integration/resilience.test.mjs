// Bulb frames under stress (issue 3): a flooding bulb cannot starve the others, a broker
// restart loses no frame the broker kept, and enrolment from a device certificate.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { Broker, Hub, mqttClient, tempDir, waitFor, sleep } from './lib/harness.mjs';
import { Bulb } from './lib/bulb.mjs';
import { makeCerts } from '../cloud/server.mjs';

const PREFIX = 'iothub/v1/bulbs';
const run = promisify(execFile);
let dir;

before(async () => { dir = await tempDir(); });
after(async () => { await fs.rm(dir, { recursive: true, force: true }); });

async function enrol(h, bulb) {
  const f = path.join(h.dir, `${bulb.id}.pem`);
  await fs.writeFile(f, bulb.pem);
  const r = await h.ctl(['bulb', 'add', bulb.id, '--key', f]);
  assert.equal(r.code, 0, r.stderr);
}

test('a bulb flooding at 100x its rate cannot starve the others', async () => {
  const broker = await Broker.start(await tempDir());
  let hub, client;
  try {
    hub = await Hub.start(broker, { frames: { rate_per_device: 5 } });
    client = await mqttClient(broker.port);
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'connected');
    const flooder = await Bulb.create('bulb-flood', 'EdDSA');
    const quiet = await Bulb.create('bulb-quiet', 'ES256');
    await enrol(hub, flooder);
    await enrol(hub, quiet);
    // Pre-sign so that signing speed does not pace the flood: 500 frames/s for 2 s = 100x.
    const flood = [];
    for (let i = 0; i < 1000; i++) flood.push(await flooder.frame());
    const t0 = Date.now();
    const floodDone = (async () => {
      for (let i = 0; i < flood.length; i += 50) {
        await Promise.all(flood.slice(i, i + 50).map((f) => client.publishAsync(`${PREFIX}/${flooder.id}/status`, f, { qos: 1 })));
        const due = t0 + ((i + 50) / 500) * 1000;
        if (due > Date.now()) await sleep(due - Date.now());
      }
    })();
    const quietFrames = 10;
    for (let i = 0; i < quietFrames; i++) {
      await client.publishAsync(`${PREFIX}/${quiet.id}/status`, await quiet.frame(), { qos: 1 });
      await sleep(200);
    }
    await floodDone;
    const elapsed = (Date.now() - t0) / 1000;
    await waitFor(async () => (await hub.status()).frames.received >= flood.length + quietFrames, 10000, 'all counted');
    const st = await hub.status();
    const list = JSON.parse((await hub.ctl(['bulb', 'list', '--json'])).stdout).bulbs;
    const q = list.find((b) => b.id === quiet.id);
    assert.equal(q.last_seq, quietFrames, 'every frame of the quiet bulb accepted');
    // The flooder gets its bucket (capacity 10) plus 5/s, nothing more.
    const floodAccepted = st.frames.accepted - quietFrames;
    assert.ok(floodAccepted <= 10 + Math.ceil(5 * (elapsed + 1)), `flooder got ${floodAccepted} in ${elapsed}s`);
    assert.ok(floodAccepted >= 10, `flooder still gets its own rate (${floodAccepted})`);
    assert.equal(st.frames.rejected.rate_limited, flood.length - floodAccepted);
    // Counted every time, logged a few times per window only.
    const logged = hub.log.split('\n').filter((l) => l.includes('bulb-flood: rate_limited')).length;
    assert.ok(logged <= 10, `rate-limited log lines: ${logged}`);
    assert.match(hub.log, /Suppressed \d+ more rejection messages for bulb-flood|bulb-flood: rate_limited/);
  } finally {
    await client?.endAsync();
    await hub?.cleanup();
    await broker.stop();
  }
});

test('a broker restart mid-stream loses no frame the broker kept', async () => {
  const bdir = await tempDir();
  const broker = await Broker.start(bdir);
  const hub = await Hub.start(broker);
  const bulb = await Bulb.create('bulb-steady', 'ES256');
  try {
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'connected');
    await enrol(hub, bulb);
    const N = 300;
    const frames = [];
    for (let i = 0; i < N; i++) frames.push(await bulb.frame());
    // A persistent-session publisher resends what the broker did not acknowledge.
    const pub = await mqttClient(broker.port, { clean: false, clientId: `pub-${process.pid}`, reconnectPeriod: 100 });
    const sending = (async () => {
      for (let i = 0; i < N; i++) {
        pub.publish(`${PREFIX}/${bulb.id}/status`, frames[i], { qos: 1 });
        if (i % 20 === 19) await sleep(20);
      }
    })();
    await sleep(150);
    await broker.restart(300);
    await sending;
    await waitFor(async () => {
      const l = JSON.parse((await hub.ctl(['bulb', 'list', '--json'])).stdout).bulbs;
      // last_seq moves when a frame is taken, accepted counts at its commit (group commit).
      return l.find((b) => b.id === bulb.id)?.last_seq === N && (await hub.status()).frames.accepted === N;
    }, 20000, 'the last frame accepted');
    const st = await hub.status();
    // Frames are spooled once each: duplicates from the resend are replays, never twice.
    assert.equal(st.spool.pending, N, `spooled ${st.spool.pending} of ${N}`);
    assert.equal(st.frames.accepted, N);
    await pub.endAsync();
  } finally {
    await hub.cleanup();
    await broker.stop();
    await fs.rm(bdir, { recursive: true, force: true });
  }
});

test('frames published while the daemon is down arrive after it comes back (persistent session)', async () => {
  const bdir = await tempDir();
  const broker = await Broker.start(bdir);
  const hub = await Hub.start(broker);
  const bulb = await Bulb.create('bulb-offline', 'EdDSA');
  const client = await mqttClient(broker.port);
  try {
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'connected');
    await enrol(hub, bulb);
    await hub.stop();
    for (let i = 0; i < 20; i++) await client.publishAsync(`${PREFIX}/${bulb.id}/status`, await bulb.frame(), { qos: 1 });
    await broker.restart();
    await hub.start();
    await waitFor(async () => (await hub.status()).spool.pending === 20, 10000, '20 frames spooled');
  } finally {
    await client.endAsync();
    await hub.cleanup();
    await broker.stop();
    await fs.rm(bdir, { recursive: true, force: true });
  }
});

test('bulb add --cert: must chain to [bulbs] ca_file; the id comes from the certificate', async () => {
  const d = await tempDir();
  const broker = await Broker.start(d);
  const ca = path.join(d, 'ca');
  await fs.mkdir(ca);
  const o = (args) => run('openssl', args, { cwd: ca });
  await o(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key',
    '-out', 'ca.pem', '-days', '30', '-subj', '/CN=Test Bulb Maker CA']);
  await o(['genpkey', '-algorithm', 'ed25519', '-out', 'dev.key']);
  await o(['req', '-new', '-key', 'dev.key', '-out', 'dev.csr', '-subj', '/CN=bulb-cert-1']);
  await o(['x509', '-req', '-in', 'dev.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'dev.pem', '-days', '30']);
  await o(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'self.key',
    '-out', 'self.pem', '-days', '30', '-subj', '/CN=bulb-cert-2']);
  const hub = await Hub.start(broker, { bulbs: { ca_file: path.join(ca, 'ca.pem') } });
  try {
    let r = await hub.ctl(['bulb', 'add', '--cert', path.join(ca, 'self.pem')]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /certificate refused/);
    r = await hub.ctl(['bulb', 'add', 'bulb-wrong', '--cert', path.join(ca, 'dev.pem')]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /does not match/);
    r = await hub.ctl(['bulb', 'add', '--cert', path.join(ca, 'dev.pem')]);
    assert.equal(r.code, 0, r.stderr);
    const list = JSON.parse((await hub.ctl(['bulb', 'list', '--json'])).stdout).bulbs;
    assert.deepEqual(list.map((b) => [b.id, b.alg]), [['bulb-cert-1', 'EdDSA']]);
  } finally {
    await hub.cleanup();
    await broker.stop();
    await fs.rm(d, { recursive: true, force: true });
  }
});

test('TLS to the broker with [mqtt] ca_file, and a username with a password file', async () => {
  const d = await tempDir();
  const pki = makeCerts(path.join(d, 'pki'));
  const pw = path.join(d, 'passwd');
  await run('mosquitto_passwd', ['-c', '-b', pw, 'hub', 'correct horse']);
  const broker = await Broker.start(d, { tls: pki, passwordFile: pw });
  await fs.writeFile(path.join(d, 'hub.pw'), 'correct horse\n', { mode: 0o600 });
  await fs.writeFile(path.join(d, 'bad.pw'), 'wrong\n', { mode: 0o600 });
  const hub = await Hub.start(broker, { mqtt: { ca_file: pki.caFile, username: 'hub', password_file: path.join(d, 'hub.pw') } });
  try {
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'connected over TLS with a password');
    const bulb = await Bulb.create('bulb-tls', 'ES256');
    await enrol(hub, bulb);
    const client = await mqttClient(broker.port, { protocol: 'mqtts', ca: await fs.readFile(pki.caFile),
      username: 'hub', password: 'correct horse' });
    for (let i = 0; i < 30; i++) await client.publishAsync(`${PREFIX}/${bulb.id}/status`, await bulb.frame(), { qos: 1 });
    await waitFor(async () => (await hub.status()).frames.accepted === 30, 5000, '30 frames over TLS');
    await client.endAsync();
    assert.ok(!hub.log.includes('correct horse'), 'the password never reaches the log');
  } finally { await hub.cleanup(); }
  // A wrong password: refused by the broker, said in the log, never connected.
  const bad = await Hub.start(broker, { mqtt: { ca_file: pki.caFile, username: 'hub', password_file: path.join(d, 'bad.pw') } });
  try {
    await waitFor(() => /refused the connection/.test(bad.log), 5000, 'refusal logged');
    assert.equal((await bad.status()).mqtt.connected, false);
    assert.ok(!bad.log.includes('wrong'));
  } finally { await bad.cleanup(); }
  // Without the CA the broker's certificate is not trusted.
  const untrusted = await Hub.start(broker, { mqtt: { ca_file: '/etc/ssl/certs/ca-certificates.crt', username: 'hub', password_file: path.join(d, 'hub.pw') } });
  try {
    await sleep(1500);
    assert.equal((await untrusted.status()).mqtt.connected, false);
  } finally { await untrusted.cleanup(); await broker.stop(); await fs.rm(d, { recursive: true, force: true }); }
});
