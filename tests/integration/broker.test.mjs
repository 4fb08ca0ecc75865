// The broker as the first wall (issue 15): a real mosquitto with the dynamic security plugin,
// configured by the drop-in the package ships (lib/dynsec.mjs), administered by the hub over its
// own MQTT connection ([broker] dynsec = on). What a bulb may not do is refused by the broker
// itself (MQTT 5 reason codes), not filtered by the hub after the fact.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import path from 'node:path';
import readline from 'node:readline';
import * as jose from 'jose';
import mqtt from 'mqtt';
import { Hub, IOTHUBCTL, tempDir, waitFor, sleep } from './lib/harness.mjs';
import { Bulb } from './lib/bulb.mjs';
import { DynsecBroker, makePki } from './lib/dynsec.mjs';

const PREFIX = 'iothub/v1/bulbs';
let dir, pki, broker, hub;
const clients = [];

async function hubStart() {
  const h = await Hub.start(null, {
    mqtt: { host: '127.0.0.1', port: broker.port, username: broker.adminUser, password_file: path.join(dir, 'hub.pw') },
    broker: { dynsec: 'on', timeout_s: 3 },
    bulbs: { ca_file: pki.ca },
  });
  await waitFor(async () => {
    const st = await h.status();
    return st.mqtt.connected && st.broker.in_sync;
  }, 10000, 'the hub connected and its broker clients in sync');
  return h;
}

before(async () => {
  dir = await tempDir('iothub-broker-');
  pki = await makePki(path.join(dir, 'pki'));
  broker = await DynsecBroker.start(dir, pki);
  await fs.writeFile(path.join(dir, 'hub.pw'), `${broker.adminPassword}\n`, { mode: 0o600 });
  hub = await hubStart();
});

after(async () => {
  for (const c of clients) c.end(true);
  if (hub) await hub.cleanup();
  if (broker) await broker.stop();
  await fs.rm(dir, { recursive: true, force: true });
});

async function addBulb(id, extra = []) {
  const b = await Bulb.create(id);
  const pem = path.join(dir, `${id}.pub.pem`);
  await fs.writeFile(pem, b.pem);
  const r = await hub.ctl(['--json', 'bulb', 'add', id, '--key', pem, ...extra]);
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout);
  assert.equal(out.broker.ok, true);
  b.password = out.broker_password;
  return b;
}

async function connectAs(user, password, opts) {
  const c = await broker.client(user, password, opts);
  clients.push(c);
  return c;
}

test('bulb add --broker-password: shown once, and the bulb may use only its own topics', async () => {
  const a = await addBulb('bulb-a', ['--broker-password']);
  const b = await addBulb('bulb-b', ['--broker-password']);
  assert.match(a.password, /^[A-Za-z0-9_-]{24}$/);
  assert.notEqual(a.password, b.password);
  // The password is in no log line of the daemon, and in no bulb listing.
  assert.ok(!hub.log.includes(a.password), 'the password was logged');
  const list = await hub.ctl(['--json', 'bulb', 'list']);
  assert.ok(!list.stdout.includes(a.password));

  // A wrong password, and no password, are refused by the broker.
  await assert.rejects(connectAs('bulb-a', 'not-the-password'), /Not authorized|Bad User Name or Password/i);
  await assert.rejects(connectAs('bulb-a', undefined), /Not authorized|Bad User Name or Password/i);

  const ca = await connectAs('bulb-a', a.password);
  const before = (await hub.status()).frames;
  // Its own status topic: the hub gets the frame and accepts it.
  await ca.publishAsync(`${PREFIX}/bulb-a/status`, await a.frame(), { qos: 1 });
  await waitFor(async () => (await hub.status()).frames.accepted === before.accepted + 1, 5000, 'frame of bulb-a accepted');

  // Another bulb's status topic: the broker answers "not authorized" and delivers nothing.
  await assert.rejects(ca.publishAsync(`${PREFIX}/bulb-b/status`, await b.frame(), { qos: 1 }), (e) => e.code === 0x87);
  await assert.rejects(ca.publishAsync(`${PREFIX}/bulb-b/hello`, 'x', { qos: 1 }), (e) => e.code === 0x87);
  await assert.rejects(ca.publishAsync(`${PREFIX}/bulb-b/cmd`, 'x', { qos: 1 }), (e) => e.code === 0x87);
  // Nor may it forge the hub's commands or acks to itself.
  await assert.rejects(ca.publishAsync(`${PREFIX}/bulb-a/cmd`, 'x', { qos: 1 }), (e) => e.code === 0x87);
  await sleep(300);
  const after1 = (await hub.status()).frames;
  assert.equal(after1.received, before.received + 1, 'the hub saw only the bulb\'s own frame');

  // Subscriptions: its own cmd and ack only; no other bulb's, no wildcard over the bulbs.
  const own = await ca.subscribeAsync([`${PREFIX}/bulb-a/cmd`, `${PREFIX}/bulb-a/ack`], { qos: 1 });
  assert.deepEqual(own.map((g) => g.qos), [1, 1]);
  for (const t of [`${PREFIX}/bulb-b/cmd`, `${PREFIX}/bulb-b/ack`, `${PREFIX}/+/cmd`, `${PREFIX}/+/status`, `${PREFIX}/#`, '#',
    '$CONTROL/dynamic-security/v1/response']) {
    // The broker's SUBACK carries a failure reason code (0x87 not authorized), which mqtt.js
    // turns into a rejection with the SUBACK packet.
    await assert.rejects(ca.subscribeAsync(t, { qos: 1 }), (e) => e.packet?.granted?.[0] === 0x87, `subscribe ${t}`);
  }

  // The hub's own client may send commands and acks (its role iothub-hub): bulb-a receives
  // what the hub's identity publishes on its cmd topic.
  const hubc = await connectAs(broker.adminUser, broker.adminPassword, { clientId: 'hub-side-check' });
  const got = new Promise((resolve) => ca.on('message', (t, p) => { if (t.endsWith('/cmd')) resolve(p.toString()); }));
  await hubc.publishAsync(`${PREFIX}/bulb-a/cmd`, 'hello-from-hub', { qos: 1 });
  assert.equal(await got, 'hello-from-hub');

  const st = await hub.status();
  assert.equal(st.broker.enabled, true);
  assert.equal(st.broker.in_sync, true);
});

test('bulb remove: the broker deletes the client and disconnects the bulb within a second', async () => {
  const c = await addBulb('bulb-c', ['--broker-password']);
  const cc = await connectAs('bulb-c', c.password);
  const closed = new Promise((resolve) => cc.once('close', () => resolve(performance.now())));
  const t0 = performance.now();
  const r = await hub.ctl(['bulb', 'remove', 'bulb-c']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /broker client is deleted/);
  const ms = (await Promise.race([closed, sleep(1000).then(() => null)]));
  assert.ok(ms !== null, 'bulb-c still connected 1 s after bulb remove');
  console.log(`# bulb remove -> bulb disconnected in ${(ms - t0).toFixed(1)} ms (iothubctl included)`);
  await assert.rejects(connectAs('bulb-c', c.password), /Not authorized|Bad User Name or Password/i);
  const names = (await broker.listClients()).map((x) => x.username);
  assert.ok(!names.includes('bulb-c'));
});

test('bulb add --broker-password in human form: the password printed once works', async () => {
  const h = await Bulb.create('bulb-h');
  const pem = path.join(dir, 'bulb-h.pub.pem');
  await fs.writeFile(pem, h.pem);
  const r = await hub.ctl(['bulb', 'add', 'bulb-h', '--key', pem, '--broker-password']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^Enrolled bulb-h\nBroker client bulb-h created\nBroker user name: bulb-h\n/);
  const [, pw] = r.stdout.match(/^Broker password: {2}([A-Za-z0-9_-]{24})$/m);
  const c = await connectAs('bulb-h', pw);
  await c.publishAsync(`${PREFIX}/bulb-h/hello`, 'not a certificate', { qos: 1 });
  assert.ok(!hub.log.includes(pw));
});

test('bulb add without --broker-password: a client marked as the hub\'s, with its role and no password', async () => {
  const d = await addBulb('bulb-d');
  assert.equal(d.password, undefined);
  const cl = (await broker.listClients()).find((x) => x.username === 'bulb-d');
  assert.equal(cl.textname, 'iothub bulb');
  assert.deepEqual(cl.roles.map((r) => r.rolename), ['iothub-bulb-bulb-d']);
  // No password set: no password logs it in.
  await assert.rejects(connectAs('bulb-d', ''), /Not authorized|Bad User Name or Password/i);
});

test('a bulb with a manufacturer certificate connects on the TLS listener as its CN', async () => {
  const dev = await pki.device('bulb-cert-1');
  const r = await hub.ctl(['--json', 'bulb', 'add', '--cert', dev.cert]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).broker.ok, true);
  const key = await jose.importPKCS8(await fs.readFile(dev.key, 'utf8'), 'ES256');
  const bulb = new Bulb('bulb-cert-1', 'ES256', { privateKey: key, publicKey: null }, null);
  const tls = {
    ca: await fs.readFile(pki.ca), cert: await fs.readFile(dev.cert), key: await fs.readFile(dev.key),
  };
  const c = mqtt.connect(`mqtts://127.0.0.1:${broker.certPort}`, { protocolVersion: 5, reconnectPeriod: 0, ...tls });
  clients.push(c);
  await new Promise((resolve, reject) => { c.once('connect', resolve); c.once('error', reject); });
  const before = (await hub.status()).frames.accepted;
  await c.publishAsync(`${PREFIX}/bulb-cert-1/status`, await bulb.frame(), { qos: 1 });
  await waitFor(async () => (await hub.status()).frames.accepted === before + 1, 5000, 'certificate bulb frame accepted');
  await assert.rejects(c.publishAsync(`${PREFIX}/bulb-a/status`, 'x', { qos: 1 }), (e) => e.code === 0x87);

  // A certificate from another CA does not get in at all.
  const other = await pki.device('bulb-self', { selfSigned: true });
  const bad = mqtt.connect(`mqtts://127.0.0.1:${broker.certPort}`, {
    protocolVersion: 5, reconnectPeriod: 0, connectTimeout: 2000,
    ca: await fs.readFile(pki.ca), cert: await fs.readFile(other.cert), key: await fs.readFile(other.key),
  });
  clients.push(bad);
  await assert.rejects(new Promise((resolve, reject) => {
    bad.once('connect', resolve); bad.once('error', reject); bad.once('close', () => reject(new Error('closed')));
  }));
});

test('on start the hub repairs the broker: creates missing bulb clients, deletes its stale ones only', async () => {
  await hub.stop();
  // Behind the hub's back: bulb-a's client gone, a stale client of the hub's scheme, and
  // someone else's client that must be left alone.
  const res = await broker.admin([
    { command: 'deleteClient', username: 'bulb-a' },
    { command: 'createClient', username: 'bulb-ghost', textname: 'iothub bulb' },
    { command: 'createClient', username: 'someone-else', textname: 'not ours' },
  ]);
  assert.deepEqual(res.map((x) => x.error), [undefined, undefined, undefined]);
  const before = await broker.listClients();
  assert.ok(!before.some((x) => x.username === 'bulb-a'));

  await hub.start();
  await waitFor(async () => {
    const st = await hub.status();
    return st.mqtt.connected && st.broker.in_sync && st.broker.created === 1 && st.broker.deleted === 1 ? st : null;
  }, 10000, 'reconciled: 1 created, 1 deleted');
  const now = await broker.listClients();
  const names = now.map((x) => x.username);
  assert.ok(names.includes('bulb-a'), 'bulb-a recreated');
  assert.ok(!names.includes('bulb-ghost'), 'stale client of the hub deleted');
  assert.ok(names.includes('someone-else'), 'another administrator\'s client kept');
  assert.ok(!names.includes('bulb-c'), 'the removed bulb stays removed');
  const a = now.find((x) => x.username === 'bulb-a');
  assert.deepEqual(a.roles.map((r) => r.rolename), ['iothub-bulb-bulb-a']);
  // Recreated without a password: the old one no longer works (the hub never kept it).
  const st = await hub.status();
  assert.equal(st.broker.last_error, null);
});

// `iothubctl --json bulb pair`: its event lines as they arrive, then its answer.
function startPair(seconds) {
  const p = spawn(IOTHUBCTL, ['--config', hub.configPath, '--json', 'bulb', 'pair', '--for', String(seconds)],
    { stdio: ['ignore', 'pipe', 'pipe'] });
  const events = [];
  let rest = '', stderr = '';
  p.stderr.on('data', (d) => { stderr += d; });
  readline.createInterface({ input: p.stdout }).on('line', (l) => {
    if (l.startsWith('{"event"')) events.push({ ...JSON.parse(l), at: performance.now() });
    else rest += `${l}\n`;
  });
  const done = once(p, 'exit').then(([code]) => ({ code, stderr, answer: rest ? JSON.parse(rest) : null, at: performance.now() }));
  return { events, done, proc: p };
}

const waitEvent = (events, pred, what) => waitFor(() => events.find(pred), 5000, what);

test('pairing: only valid chains, only inside the window; the broker identity in the same step', async () => {
  const good = await pki.device('bulb-p1');
  const chain = `${await fs.readFile(good.cert, 'utf8')}${await fs.readFile(pki.ca, 'utf8')}`;
  const self = await pki.device('bulb-p2', { selfSigned: true });
  const e = await addBulb('bulb-e', ['--broker-password']);

  // Outside a window: an anonymous client may not publish a hello at all (the broker refuses),
  // and an enrolled bulb's own hello is counted and ignored by the hub.
  const anon0 = await connectAs(undefined, undefined);
  await assert.rejects(anon0.publishAsync(`${PREFIX}/bulb-p1/hello`, chain, { qos: 1 }), (x) => x.code === 0x87);
  const ec = await connectAs('bulb-e', e.password);
  const outside = (await hub.status()).pair.hellos_outside_window;
  await ec.publishAsync(`${PREFIX}/bulb-e/hello`, chain, { qos: 1 });
  await waitFor(async () => (await hub.status()).pair.hellos_outside_window === outside + 1, 5000, 'hello counted');
  assert.ok(!(await hub.ctl(['bulb', 'list'])).stdout.includes('bulb-p1'));

  const { events, done } = startPair(4);
  await waitEvent(events, (x) => x.event === 'open', 'window open');
  await waitEvent(events, (x) => x.event === 'broker' && /lets bulbs/.test(x.message), 'broker open for hellos');
  const anon = await connectAs(undefined, undefined);
  // Refused by the broker still: anything but a hello.
  await assert.rejects(anon.publishAsync(`${PREFIX}/bulb-p1/status`, 'x', { qos: 1 }), (x) => x.code === 0x87);
  // Refused by the hub: a chain from another CA, a CN that is not the topic's id, a hello too large.
  await anon.publishAsync(`${PREFIX}/bulb-p2/hello`, await fs.readFile(self.cert, 'utf8'), { qos: 1 });
  await anon.publishAsync(`${PREFIX}/bulb-p3/hello`, chain, { qos: 1 });
  await anon.publishAsync(`${PREFIX}/bulb-p4/hello`, 'A'.repeat(16385), { qos: 1 });
  await waitFor(() => events.filter((x) => x.event === 'refused').length === 3, 5000, '3 refusals');
  assert.match(events.find((x) => x.id === 'bulb-p2').message, /certificate refused/);
  assert.match(events.find((x) => x.id === 'bulb-p3').message, /does not match/);
  assert.match(events.find((x) => x.id === 'bulb-p4').message, /larger than 16384/);
  // The valid chain enrols, and its broker client is created, while the window is still open.
  await anon.publishAsync(`${PREFIX}/bulb-p1/hello`, chain, { qos: 1 });
  const enrolled = await waitEvent(events, (x) => x.event === 'enrolled' && x.id === 'bulb-p1', 'bulb-p1 enrolled');
  await waitEvent(events, (x) => x.event === 'broker' && x.id === 'bulb-p1' && /created/.test(x.message), 'broker client');
  await anon.publishAsync(`${PREFIX}/bulb-p1/hello`, chain, { qos: 1 });
  await waitEvent(events, (x) => x.event === 'refused' && x.id === 'bulb-p1' && /already enrolled/.test(x.message), 'again');

  const res = await done;
  assert.equal(res.code, 0, res.stderr);
  assert.deepEqual(res.answer.enrolled, ['bulb-p1']);
  assert.equal(res.answer.refused, 4);
  // Shown as it happened: the enrolment line came well before the window closed.
  assert.ok(res.at - enrolled.at > 1000, `enrolled line ${res.at - enrolled.at} ms before the end`);
  console.log(`# pairing: enrolment line ${(res.at - enrolled.at).toFixed(0)} ms before the window closed`);

  // The window is closed: hellos are refused by the broker again, and the hub would ignore them.
  const anon2 = await connectAs(undefined, undefined);
  await waitFor(async () => {
    try { await anon2.publishAsync(`${PREFIX}/bulb-p5/hello`, chain, { qos: 1 }); return false; } catch (x) { return x.code === 0x87; }
  }, 3000, 'anonymous hellos refused after the window');
  const st = await hub.status();
  assert.equal(st.pair.window_open, false);
  assert.equal(st.pair.enrolled, 1);

  // The paired bulb connects with its certificate and its frames are accepted.
  const key = await jose.importPKCS8(await fs.readFile(good.key, 'utf8'), 'ES256');
  const bulb = new Bulb('bulb-p1', 'ES256', { privateKey: key, publicKey: null }, null);
  const c = mqtt.connect(`mqtts://127.0.0.1:${broker.certPort}`, {
    protocolVersion: 5, reconnectPeriod: 0,
    ca: await fs.readFile(pki.ca), cert: await fs.readFile(good.cert), key: await fs.readFile(good.key),
  });
  clients.push(c);
  await new Promise((resolve, reject) => { c.once('connect', resolve); c.once('error', reject); });
  const before = st.frames.accepted;
  await c.publishAsync(`${PREFIX}/bulb-p1/status`, await bulb.frame(), { qos: 1 });
  await waitFor(async () => (await hub.status()).frames.accepted === before + 1, 5000, 'paired bulb frame accepted');
});

test('bulb pair: one window at a time, at most 300 s, and Ctrl-C closes it', async () => {
  let r = await hub.ctl(['bulb', 'pair', '--for', '301']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /1 to 300/);
  const first = startPair(30);
  await waitEvent(first.events, (x) => x.event === 'open', 'window open');
  r = await hub.ctl(['bulb', 'pair', '--for', '5']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /already/);
  assert.equal((await hub.status()).pair.window_open, true);
  // The client going away (as Ctrl-C does) closes the window at once.
  first.proc.kill('SIGINT');
  await waitFor(async () => (await hub.status()).pair.window_open === false, 3000, 'window closed');
});

test('a broker without the plugin: requests time out, status says so, bulb add says what failed', async () => {
  const { Broker } = await import('./lib/harness.mjs');
  const d = await tempDir('iothub-broker-plain-');
  const plain = await Broker.start(d);
  const h = await Hub.start(plain, { broker: { dynsec: 'on', timeout_s: 1 } });
  try {
    const st = await waitFor(async () => {
      const s = await h.status();
      return s.mqtt.connected && s.broker.last_error ? s : null;
    }, 8000, 'the reconciliation timed out');
    assert.equal(st.broker.in_sync, false);
    assert.match(st.broker.last_error, /did not answer within 1 s/);
    const b = await Bulb.create('bulb-t');
    const pem = path.join(d, 'bulb-t.pem');
    await fs.writeFile(pem, b.pem);
    const t0 = performance.now();
    const r = await h.ctl(['bulb', 'add', 'bulb-t', '--key', pem]);
    assert.equal(r.code, 1);
    assert.match(r.stdout, /Enrolled bulb-t/);
    assert.match(r.stderr, /broker client was not created: .*did not answer within 1 s/);
    assert.ok(performance.now() - t0 < 3000);
    // Enrolled all the same: its frames are the hub's to check.
    assert.match((await h.ctl(['bulb', 'list'])).stdout, /bulb-t/);
  } finally {
    await h.cleanup();
    await plain.stop();
    await fs.rm(d, { recursive: true, force: true });
  }
});
