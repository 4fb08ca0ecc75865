// Network faults (issue 12): the broker dropping connections and restarting, the broker with a
// certificate from another CA, the cloud with a wrong certificate or a wrong host name, the
// cloud answering slowly or cutting connections mid-answer, the cloud's name not resolving.
// Every scenario counts: frames the bulbs sent, frames at the cloud (distinct, after its
// de-duplication by dev and seq), frames lost (must be 0), and uploads resume by themselves.
//
// Real parts: swtpm (the hub key), mosquitto, the reference cloud (tests/cloud, which checks
// every signature with independent code), resending bulbs (PROTOCOL.md 1, end-to-end acks), and
// a TCP proxy (lib/cutproxy.mjs) between the hub and the broker and between the hub and the
// cloud, with which the faults are made. Everything binds 127.0.0.1; the name that must not
// resolve is under .invalid (RFC 6761 6.4).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import fsSync from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { once } from 'node:events';
import { Broker, Hub, mqttClient, tempDir, waitFor, sleep } from './lib/harness.mjs';
import { Bulb } from './lib/bulb.mjs';
import { CutProxy } from './lib/cutproxy.mjs';
import { startCloud, makeCerts } from '../cloud/server.mjs';
import { startTestbed, stopTestbed, keyBeforeDaemon } from './lib/testbed.mjs';

const TOKEN = 'tok-netfaults-0123456789';
let dir, tpm, broker, cloud, hub, client, bulbs, brokerProxy, cloudProxy;
const table = []; // fault, outcome, frames in, at the cloud, lost

function hubOverrides(cloudExtra = {}) {
  return {
    mqtt: { port: brokerProxy.port },
    key: { backend: 'tpm', tcti: tpm.tcti, handle: '0x81010001' },
    cloud: { url: `https://127.0.0.1:${cloudProxy.port}`, ca_file: cloud.caFile,
      bearer_token_file: path.join(dir, 'token'), batch_max_frames: 20, batch_max_delay_ms: 300, timeout_s: 2,
      ...cloudExtra },
  };
}

async function restartHub(cloudExtra = {}, opts = {}) {
  await hub.stop();
  hub.overrides = hubOverrides(cloudExtra);
  await hub.writeConfig();
  await hub.start(opts);
}

const atCloud = (dev, seq) => cloud.state.frames.some((f) => f.dev === dev && f.seq === seq);

// Each bulb sends n frames, one every periodMs, keeping unacknowledged ones for resending;
// fault() runs meanwhile. Returns the frames sent.
let mark = { resent: 0, dup: 0 }; // the counters when the scenario's traffic began
async function traffic(n, periodMs, fault = async () => {}) {
  const start = bulbs.map((b) => b.sent.length);
  mark = { resent: bulbs.reduce((m, b) => m + b.resent, 0), dup: cloud.state.duplicates };
  const sending = (async () => {
    for (let i = 0; i < n; i++) {
      for (const b of bulbs) await b.send();
      await sleep(periodMs);
    }
  })();
  await fault();
  await sending;
  return bulbs.flatMap((b, i) => b.sent.slice(start[i]).map((f) => ({ dev: b.id, seq: f.seq, jws: f.jws })));
}

// Waits until every frame is at the cloud, then checks exactly once after the cloud's
// de-duplication, byte for byte, and records the row of the table.
async function account(fault, outcome, sent, timeoutMs = 30000) {
  await waitFor(() => sent.every((s) => atCloud(s.dev, s.seq)), timeoutMs,
    `${fault}: all ${sent.length} frames at the cloud (missing ${sent.filter((s) => !atCloud(s.dev, s.seq)).length})`);
  for (const b of bulbs) {
    const seqs = cloud.state.frames.filter((f) => f.dev === b.id).map((f) => f.seq);
    assert.equal(seqs.length, new Set(seqs).size, `${fault}: ${b.id} stored once each`);
  }
  for (const s of sent) assert.equal(cloud.state.frames.find((f) => f.dev === s.dev && f.seq === s.seq).jws, s.jws);
  await waitFor(async () => (await hub.status()).spool.pending === 0, 10000, `${fault}: spool drained`);
  const lost = sent.filter((s) => !atCloud(s.dev, s.seq)).length;
  table.push({ fault, outcome, in: sent.length, at_cloud: sent.length - lost, lost,
    resent: bulbs.reduce((n, b) => n + b.resent, 0) - mark.resent, cloud_duplicates: cloud.state.duplicates - mark.dup });
}

// A TLS server that should never be talked to: counts TCP connections and completed
// handshakes. A hub that refuses its certificate completes none.
async function impostor(certFile, keyFile) {
  const stats = { tcp: 0, handshakes: 0, bytes: 0 };
  const server = tls.createServer({ cert: await fs.readFile(certFile), key: await fs.readFile(keyFile) }, (s) => {
    stats.handshakes++;
    s.on('data', (d) => { stats.bytes += d.length; });
    s.on('error', () => {});
  });
  server.on('connection', () => { stats.tcp++; });
  server.on('tlsClientError', () => {});
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { stats, port: server.address().port, close: () => new Promise((r) => server.close(r)) };
}

// A server certificate for 'san' signed by the CA in caDir (the cloud's own CA: only the name
// is wrong). The openssl CLI, no shell.
function leafFor(caDir, outDir, san) {
  fsSync.mkdirSync(outDir, { recursive: true });
  const f = (n) => path.join(outDir, n);
  fsSync.writeFileSync(f('ext.cnf'), `[v3]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n`
    + `extendedKeyUsage=serverAuth\nsubjectAltName=${san}\n`);
  const o = (args) => execFileSync('openssl', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  o(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', f('server.key')]);
  o(['req', '-new', '-key', f('server.key'), '-subj', '/CN=wrong.example', '-out', f('server.csr')]);
  o(['x509', '-req', '-in', f('server.csr'), '-CA', path.join(caDir, 'ca.pem'), '-CAkey', path.join(caDir, 'ca.key'),
    '-set_serial', `0x${crypto.randomBytes(8).toString('hex')}`, '-sha256', '-days', '2',
    '-extfile', f('ext.cnf'), '-extensions', 'v3', '-out', f('server.pem')]);
  return { certFile: f('server.pem'), keyFile: f('server.key') };
}

before(async () => {
  ({ dir, tpm, broker } = await startTestbed());
  cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'alice' } });
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  brokerProxy = await CutProxy.start({ host: '127.0.0.1', port: broker.port });
  cloudProxy = await CutProxy.start({ host: '127.0.0.1', port: cloud.port ?? Number(new URL(cloud.url).port) });
  await keyBeforeDaemon(broker, hubOverrides());
  hub = await Hub.start(broker, hubOverrides());
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt');
  const r = await hub.ctl(['register']);
  assert.equal(r.code, 0, r.stderr);
  // The bulbs talk to the broker directly; only the hub's connection goes through the proxy.
  client = await mqttClient(broker.port, { reconnectPeriod: 100 });
  client.setMaxListeners(0);
  bulbs = [await Bulb.create('net-es', 'ES256'), await Bulb.create('net-ed', 'EdDSA'), await Bulb.create('net-es2', 'ES256')];
  for (const b of bulbs) {
    const f = path.join(hub.dir, `${b.id}.pem`);
    await fs.writeFile(f, b.pem);
    const e = await hub.ctl(['bulb', 'add', b.id, '--key', f]);
    assert.equal(e.code, 0, e.stderr);
    await b.attach(client, { resendMs: 1000 });
  }
  await waitFor(() => cloud.state.hubs.get('test-hub')?.devices?.size === bulbs.length, 10000, 'device list at the cloud');
});

after(async () => {
  for (const b of bulbs ?? []) b.detach();
  await brokerProxy?.close();
  await cloudProxy?.close();
  await stopTestbed({ clients: [client], hub, cloud, broker, tpm, dir });
  if (table.length) {
    console.log('# fault | outcome | frames in | at the cloud (distinct) | lost | bulb resends | duplicates the cloud dropped');
    for (const r of table) console.log(`# ${r.fault} | ${r.outcome} | ${r.in} | ${r.at_cloud} | ${r.lost} | ${r.resent} | ${r.cloud_duplicates}`);
  }
});

test('the broker dropping the hub\'s connection 3 times and restarting once: nothing lost, uploads resume', async () => {
  const lost0 = hub.log.split('\n').filter((l) => /Connection to MQTT broker .* lost/.test(l)).length;
  const sent = await traffic(40, 100, async () => {
    for (let i = 0; i < 3; i++) {
      // Each cut hits a live connection: the hub reconnects with backoff (0.5 s and up).
      await waitFor(async () => brokerProxy.conns.size > 0 && (await hub.status()).mqtt.connected, 15000, 'reconnected');
      await sleep(500);
      brokerProxy.cutAll();
    }
    await sleep(700);
    await broker.restart(500);
  });
  await account('broker: 3 connection resets + 1 restart', 'reconnected, resent, all delivered', sent);
  assert.ok(brokerProxy.stats.cuts >= 3, `connections cut: ${brokerProxy.stats.cuts}`);
  const lostLines = hub.log.split('\n').filter((l) => /Connection to MQTT broker .* lost/.test(l)).length - lost0;
  assert.ok(lostLines >= 3, `the hub logged ${lostLines} lost connections`);
  assert.equal((await hub.status()).mqtt.connected, true);
});

test('a broker with a certificate from another CA: refused, never a plain-text fallback', async () => {
  // Two TLS brokers: one with a certificate of an unrelated CA, one with ours.
  const tdir = path.join(dir, 'tls');
  const ours = makeCerts(path.join(tdir, 'ours'));
  const theirs = makeCerts(path.join(tdir, 'theirs'));
  const bad = await Broker.start(await tempDir(), { tls: theirs });
  const good = await Broker.start(await tempDir(), { tls: ours });
  const proxy = await CutProxy.start({ host: '127.0.0.1', port: bad.port });
  const h = await Hub.start(null, { mqtt: { host: '127.0.0.1', port: proxy.port, ca_file: ours.caFile } });
  try {
    await waitFor(() => proxy.stats.connections >= 2, 10000, 'two attempts');
    assert.equal((await h.status()).mqtt.connected, false);
    // Every attempt began with a TLS handshake record (0x16), none in plain MQTT (0x10).
    assert.ok(proxy.stats.firstBytes.length >= 2);
    assert.deepEqual([...new Set(proxy.stats.firstBytes)], [0x16], `first bytes ${proxy.stats.firstBytes}`);
    assert.match(h.log, /Connection to MQTT broker 127\.0\.0\.1:\d+ lost: A TLS error occurred. \(OpenSSL Error.*certificate verify failed\)/, h.log);
    // The right certificate behind the same address: connected, without a restart.
    proxy.switchTo({ host: '127.0.0.1', port: good.port });
    await waitFor(async () => (await h.status()).mqtt.connected, 40000, 'connected to the right broker');
    const why = /lost: (A TLS error.*)/.exec(h.log)[1];
    table.push({ fault: 'broker: certificate of another CA', outcome: `refused: "${why}" (${proxy.stats.connections - 1} attempts, all TLS), connected once right`,
      in: 0, at_cloud: 0, lost: 0, resent: '-', cloud_duplicates: '-' });
  } finally {
    await h.cleanup();
    await proxy.close();
    await bad.stop();
    await good.stop();
  }
});

for (const kind of ['another CA', 'a wrong host name']) {
  test(`the cloud presenting a certificate of ${kind}: refused, no request sent, clear log line; then all delivered`, async () => {
    const certs = kind === 'another CA'
      ? makeCerts(path.join(dir, 'other-ca'))
      : leafFor(path.join(dir, 'cloud'), path.join(dir, 'wrong-name'), 'DNS:wrong.example');
    const imp = await impostor(certs.certFile, certs.keyFile);
    const real = cloudProxy.target;
    const logMark = hub.log.length;
    try {
      cloudProxy.switchTo({ host: '127.0.0.1', port: imp.port });
      const sent = await traffic(10, 50);
      // The first failure may be the cut of the connection that was open; then the refusal.
      const refusal = kind === 'another CA' ? /Upload of \d+ frames failed \(.*certificate/i
        : /Upload of \d+ frames failed \(.*(name|certificate)/i;
      await waitFor(() => refusal.test(hub.log.slice(logMark)), 15000, 'the refusal logged');
      const line = hub.log.slice(logMark).split('\n').find((l) => refusal.test(l));
      assert.ok(imp.stats.tcp >= 1, 'the hub tried');
      // Not one byte of application data (no request, no token) reached the impostor. With
      // another CA the handshake fails; with the right CA and a wrong name, curl (7.88 with
      // OpenSSL) completes the handshake and checks the name after it, then hangs up.
      assert.equal(imp.stats.bytes, 0, 'no request sent to the impostor');
      if (kind === 'another CA') assert.equal(imp.stats.handshakes, 0, 'no TLS session with the impostor');
      const st = await hub.status();
      assert.ok(st.spool.pending >= 1);
      assert.match(st.cloud.last_error ?? '', /upload failed/);
      cloudProxy.switchTo(real);
      await account(`cloud: certificate of ${kind}`, `refused: "${line.replace(/^.*failed \(/, '').replace(/\), retrying later.*$/, '')}"`, sent, 60000);
    } finally {
      cloudProxy.switchTo(real);
      await imp.close();
    }
  });
}

test('the cloud answering slower than [cloud] timeout_s: timeout, backoff, then all delivered once', async () => {
  const failures0 = hub.log.split('\n').filter((l) => /Upload of \d+ frames failed/.test(l)).length;
  await cloud.control.fail({ delayMs: 3500, count: 3 });
  const sent = await traffic(10, 50);
  await waitFor(async () => /timed out|Timeout/i.test((await hub.status()).cloud.last_error ?? ''), 15000, 'a timeout reported');
  const st = await hub.status();
  assert.ok(st.cloud.backoff_s >= 0);
  await account('cloud: answers after 3.5 s, timeout_s = 2 (3 times)', 'timed out, backed off, resent', sent, 60000);
  const failures = hub.log.split('\n').filter((l) => /Upload of \d+ frames failed/.test(l)).length - failures0;
  // Backoff: 3 slow answers cost at most a few attempts, not a storm.
  assert.ok(failures >= 1 && failures <= 6, `${failures} failed uploads`);
});

test('the cloud cutting connections mid-answer: retried, stored once', async () => {
  const cuts0 = cloudProxy.stats.answerCuts;
  cloudProxy.cutAnswers(3);
  const sent = await traffic(15, 50);
  await account('cloud: 3 answers cut half-way', 'retried; the cloud de-duplicated what it had stored', sent, 60000);
  assert.ok(cloudProxy.stats.answerCuts - cuts0 >= 1, `answers cut: ${cloudProxy.stats.answerCuts - cuts0}`);
  cloudProxy.cutAnswers(0);
});

test('the cloud\'s name not resolving (.invalid, RFC 6761): said clearly, spooled, delivered once the name is right', async () => {
  const port = cloudProxy.port;
  const conns0 = cloudProxy.stats.connections;
  // The lookup must not leave the machine: glibc does not answer .invalid by itself (RFC 6761
  // 6.4 asks resolvers to, glibc's stub sends it to /etc/resolv.conf's nameserver). The daemon
  // gets a resolv.conf of its own that names only a loopback nameserver where nothing listens.
  const resolvConf = path.join(hub.dir, 'resolv.conf');
  await fs.writeFile(resolvConf, 'nameserver 127.0.0.1\noptions attempts:1 timeout:1\n');
  await restartHub({ url: `https://iothub-cloud.invalid:${port}` }, { resolvConf });
  const logMark = hub.log.length;
  const sent = await traffic(10, 50);
  await waitFor(async () => /resolve/i.test((await hub.status()).cloud.last_error ?? ''), 15000, 'name not resolved');
  const line = hub.log.slice(logMark).split('\n').find((l) => /Upload of \d+ frames failed/.test(l));
  assert.match(line ?? '', /resolve/i, hub.log.slice(logMark));
  assert.equal(cloudProxy.stats.connections, conns0, 'nothing connected anywhere');
  assert.ok((await hub.status()).spool.pending >= 1);
  await restartHub();
  await account('cloud: name under .invalid', 'not resolved, spooled; delivered after the fix (restart)', sent, 60000);
});

test('a clean stop after all of it: exit status 0, nothing from the sanitizers, no token in the log', async () => {
  const r = await hub.stop();
  assert.deepEqual(r, { code: 0, signal: null });
  assert.doesNotMatch(hub.log, /Sanitizer|runtime error|LeakSanitizer/);
  assert.ok(!hub.log.includes(TOKEN), 'the access token never reaches the log');
});
