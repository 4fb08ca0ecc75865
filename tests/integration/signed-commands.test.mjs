// Cloud-signed commands (PROTOCOL.md 5, iothub-protocol(7) "Cloud-signed commands"): with
// [cloud] command_key_file the hub acts only on commands whose "sig" is a JWS (ES256) by the
// vendor's key over that very command, refuses every other one as rejected/bad_signature before
// any other check, and passes the vendor's JWS on to the bulb inside its own command ("cloud"),
// where the bulb simulator verifies both signatures with jose (lib/bulb.mjs verifyCommand()).
// The reference cloud signs with jose too (tests/cloud/server.mjs signCloudCommand()).
//
// Also here, on the same set-up (it was commands-window.test.mjs, with a set-up of its own): a
// command is not held back behind the hub's other QoS 1 publishes while their PUBACKs are late
// (issue 13). libmosquitto sends at most "send maximum" QoS 1 messages before the broker's
// PUBACKs (its default is 20) and keeps the rest in its own queue, in order. Under load, the
// end-to-end acks (up to 10/s per bulb) filled that window while the loop stalled (a commit's
// fdatasync, a read burst), and a command waited seconds before its first byte left the hub
// (tests/bench/commands.mjs: published -> at broker p99 570 ms, max 1.7 s). So the hub's MQTT
// connection runs through a proxy (lib/cutproxy.mjs), which forwards everything until the
// window test has it keep back what the broker sends to the hub, PUBACKs included, while the
// hub's own publishes pass. 30 commands for one bulb then all reach it (each verified with the
// paired key and the vendor's) with not one PUBACK read by the hub; once the proxy lets go,
// every one is "delivered".
//
// Real swtpm, mosquitto and the reference cloud.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import * as jose from 'jose';
import { Hub, mqttClient, waitFor, sleep } from './lib/harness.mjs';
import { Bulb, verifyCommand, b64u } from './lib/bulb.mjs';
import { CutProxy } from './lib/cutproxy.mjs';
import { startCloud, signCloudCommand } from '../cloud/server.mjs';
import { startTestbed, stopTestbed, keyBeforeDaemon } from './lib/testbed.mjs';

const PREFIX = 'iothub/v1/bulbs';
const HUB_ID = 'test-hub';
const TOKEN = 'tok-signed-commands-0123456789';
const WINDOW_N = 30; // more than libmosquitto's default window of 20
let dir, tpm, broker, cloud, hub, proxy, pub, hubKey, hubKid, vendor, stranger, lamp;
let seq = 0;

const nowS = () => Math.floor(Date.now() / 1000);
const nextId = (what) => `${what}-${++seq}`;
const resultsOf = (id) => cloud.state.results.filter((r) => r.id === id);
const hubState = () => cloud.state.hubs.get(HUB_ID);

async function vendorKey() {
  const { privateKey, publicKey } = await jose.generateKeyPair('ES256', { extractable: true });
  const kid = await jose.calculateJwkThumbprint(await jose.exportJWK(publicKey), 'sha256');
  return { privateKey, publicKey, kid, pem: await jose.exportSPKI(publicKey) };
}

// A bulb that records every command on its topic and verifies it as a real one would.
class CmdBulb {
  constructor(bulb, client) { this.bulb = bulb; this.id = bulb.id; this.client = client; this.got = []; }
  static async create(id) {
    const bulb = await Bulb.create(id, 'ES256');
    const client = await mqttClient(broker.port, { clean: false, clientId: `signed-bulb-${id}-${process.pid}` });
    const b = new CmdBulb(bulb, client);
    client.on('message', (topic, payload) => { b.#onMessage(payload.toString()); });
    await client.subscribeAsync(`${PREFIX}/${id}/cmd`, { qos: 1 });
    return b;
  }
  async #onMessage(jws) {
    const e = { jws };
    this.got.push(e);
    try {
      Object.assign(e, await verifyCommand(jws, hubKey, vendor.publicKey));
      e.verified = true;
    } catch (err) {
      e.verified = false; e.error = err.message;
    }
  }
  received(id) { return this.got.filter((e) => e.payload?.id === id || (!e.payload && e.jws.includes(id))); }
  async ack(id) {
    const jws = await this.bulb.frame({ ack: { id, ok: true } });
    await pub.publishAsync(`${PREFIX}/${this.id}/status`, jws, { qos: 1 });
  }
  async end() { await this.client.endAsync(); }
}

async function pollParked(timeoutMs = 15000) {
  await waitFor(() => hubState()?.waiters?.size === 1, timeoutMs, 'the hub long poll parked at the cloud');
}

// A command as the cloud hands it out; sig undefined: the reference cloud signs it with the
// vendor's key; a string: exactly that; null: no sig member.
function queue(cmd, sig) {
  return cloud.control.queueCommand({ hub: HUB_ID, exp: nowS() + 60, set: { on: true }, dev: lamp.id, ...cmd, sig });
}

async function rejectedReasons() {
  return (await hub.status()).commands.rejected_reasons;
}

// Queues a command the hub must refuse, and checks the whole refusal: one result "rejected"
// with detail bad_signature, nothing at the bulb, the counter up by one.
async function expectRefused(what, cmd, sig) {
  const before = (await rejectedReasons()).bad_signature;
  await pollParked();
  queue(cmd, sig);
  await waitFor(() => resultsOf(cmd.id).length >= 1, 10000, `the result of ${what}`);
  const r = resultsOf(cmd.id);
  assert.equal(r.length, 1, `${what}: one result`);
  assert.equal(r[0].status, 'rejected', what);
  assert.equal(r[0].detail, 'bad_signature', what);
  assert.equal((await rejectedReasons()).bad_signature, before + 1, `${what}: counted`);
  await sleep(200);
  assert.equal(lamp.received(cmd.id).length, 0, `${what}: never reaches the bulb`);
}

before(async () => {
  ({ dir, tpm, broker } = await startTestbed());
  vendor = await vendorKey();
  stranger = await vendorKey();
  cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'alice' },
    commandKey: { privateKey: vendor.privateKey, kid: vendor.kid } });
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  const keyFile = path.join(dir, 'vendor-command-key.pem');
  await fs.writeFile(keyFile, vendor.pem, { mode: 0o644 });
  proxy = await CutProxy.start({ host: '127.0.0.1', port: broker.port });
  const overrides = {
    key: { backend: 'tpm', tcti: tpm.tcti, handle: '0x81000101' },
    cloud: { url: cloud.url, ca_file: cloud.caFile, batch_max_delay_ms: 200, timeout_s: 5,
      bearer_token_file: path.join(dir, 'token'), command_key_file: keyFile },
    mqtt: { port: proxy.port },
  };
  const { kid, ...pubJwk } = (await keyBeforeDaemon(broker, overrides)).jwk;
  hubKid = kid;
  hubKey = await jose.importJWK(pubJwk, 'ES256');
  hub = await Hub.start(broker, overrides);
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt');
  const r = await hub.ctl(['register']);
  assert.equal(r.code, 0, r.stderr);
  pub = await mqttClient(broker.port);
  lamp = await CmdBulb.create('signed-lamp');
  const f = path.join(hub.dir, 'lamp.pem');
  await fs.writeFile(f, lamp.bulb.pem);
  assert.equal((await hub.ctl(['bulb', 'add', lamp.id, '--key', f])).code, 0);
  await waitFor(() => hubState()?.devices?.size === 1, 5000, 'device list at the cloud');
  await pollParked();
});

after(async () => {
  proxy?.release();
  await lamp?.end();
  await stopTestbed({ clients: [pub], hub, cloud, broker, tpm, dir });
  await proxy?.close();
});

test('a command signed by the vendor reaches the bulb, which verifies both signatures; delivered, acked', async () => {
  const id = nextId('signed');
  await pollParked();
  const cmd = queue({ id, set: { on: true, bri: 200, xy: [0.3127, 0.329] } });
  await waitFor(() => lamp.received(id).length === 1, 10000, 'the command at the bulb');
  const e = lamp.received(id)[0];
  assert.ok(e.verified, e.error);
  // The vendor's JWS byte for byte, as the last member of the hub's payload.
  assert.equal(e.payload.cloud, cmd.sig);
  assert.deepEqual(Object.keys(e.payload), ['hub', 'dev', 'id', 'iat', 'exp', 'set', 'cloud']);
  assert.deepEqual(e.cloudHeader, { alg: 'ES256', typ: 'iothub-cloud-cmd', kid: vendor.kid });
  assert.deepEqual(e.cloudPayload, { hub: HUB_ID, id, dev: lamp.id, exp: cmd.exp, set: { on: true, bri: 200, xy: [0.3127, 0.329] } });
  // The bulb's check can fail: another vendor key, or the hub's JWS with one byte changed.
  await assert.rejects(verifyCommand(e.jws, hubKey, stranger.publicKey));
  const [h, p, s] = e.jws.split('.');
  const other = Buffer.from(p, 'base64url').toString().replace('"bri":200', '"bri":201');
  await assert.rejects(verifyCommand(`${h}.${b64u(other)}.${s}`, hubKey, vendor.publicKey));
  await waitFor(() => resultsOf(id).some((r) => r.status === 'delivered'), 10000, 'delivered');
  await lamp.ack(id);
  await waitFor(() => resultsOf(id).length === 2, 10000, 'acked');
  assert.deepEqual(resultsOf(id).map((r) => r.status), ['delivered', 'acked']);
});

test('a command without sig is rejected (bad_signature)', async () => {
  await expectRefused('no sig', { id: nextId('nosig') }, null);
});

test('a sig by another key is rejected, with its own kid or with the vendor key id', async () => {
  const c1 = { id: nextId('stranger'), dev: lamp.id, set: { on: true }, exp: nowS() + 60 };
  await expectRefused('another key, its kid', c1, await signCloudCommand(stranger, HUB_ID, c1));
  const c2 = { id: nextId('stranger'), dev: lamp.id, set: { on: true }, exp: nowS() + 60 };
  await expectRefused('another key, the vendor kid', c2,
    await signCloudCommand({ privateKey: stranger.privateKey, kid: vendor.kid }, HUB_ID, c2));
});

test('a sig over a different command is rejected: changed set, dev, exp, id, hub', async () => {
  const changes = [
    ['set', { set: { on: false } }],
    ['set with one more member', { set: { on: true, bri: 1 } }],
    ['dev', { dev: 'other-lamp' }],
    ['exp', { exp: nowS() + 3600 }],
    ['id', { id: 'someone-elses' }],
    ['hub', { hub: 'another-hub' }],
  ];
  for (const [what, over] of changes) {
    const c = { id: nextId('over'), dev: lamp.id, set: { on: true }, exp: nowS() + 60 };
    await expectRefused(`a sig over another ${what}`, c, await signCloudCommand(vendor, HUB_ID, c, over));
  }
  // A valid sig of one command moved to another (replayed with another set).
  const a = { id: nextId('moved'), dev: lamp.id, set: { on: true }, exp: nowS() + 60 };
  await expectRefused('a sig moved to another command', { ...a, set: { on: false } }, await signCloudCommand(vendor, HUB_ID, a));
});

test('alg none, HS256 (keyed with the public key) and a header with crit are rejected', async () => {
  const c = { id: nextId('none'), dev: lamp.id, set: { on: true }, exp: nowS() + 60 };
  const payload = JSON.stringify({ hub: HUB_ID, id: c.id, dev: c.dev, exp: c.exp, set: c.set });
  await expectRefused('alg none', c, `${b64u(JSON.stringify({ alg: 'none', typ: 'iothub-cloud-cmd', kid: vendor.kid }))}.${b64u(payload)}.`);

  const d = { id: nextId('hs256'), dev: lamp.id, set: { on: true }, exp: nowS() + 60 };
  const hs = await new jose.CompactSign(new TextEncoder().encode(JSON.stringify({ hub: HUB_ID, id: d.id, dev: d.dev, exp: d.exp, set: d.set })))
    .setProtectedHeader({ alg: 'HS256', typ: 'iothub-cloud-cmd', kid: vendor.kid })
    .sign(new TextEncoder().encode(vendor.pem));
  await expectRefused('alg HS256', d, hs);

  const e = { id: nextId('crit'), dev: lamp.id, set: { on: true }, exp: nowS() + 60 };
  const crit = await new jose.CompactSign(new TextEncoder().encode(JSON.stringify({ hub: HUB_ID, id: e.id, dev: e.dev, exp: e.exp, set: e.set })))
    .setProtectedHeader({ alg: 'ES256', typ: 'iothub-cloud-cmd', kid: vendor.kid, crit: ['b64'], b64: true })
    .sign(vendor.privateKey);
  await expectRefused('crit', e, crit);
});

test('the refusals are security events (command_rejected, bad_signature)', async () => {
  const refused = (await rejectedReasons()).bad_signature;
  assert.ok(refused >= 12, `refused ${refused}`);
  await waitFor(() => cloud.state.events.filter((x) => x.type === 'command_rejected' && x.reason === 'bad_signature')
    .reduce((n, x) => n + x.count, 0) >= refused, 15000, 'command_rejected events at the cloud');
});

test(`${WINDOW_N} commands reach their bulb while the broker's PUBACKs to the hub are held back`, async () => {
  const st0 = (await hub.status()).commands;
  await pollParked();
  proxy.holdAnswers();
  const ids = Array.from({ length: WINDOW_N }, () => nextId('win'));
  for (const id of ids) queue({ id, set: { bri: 10 } });
  await waitFor(() => ids.every((id) => lamp.received(id).length >= 1), 20000,
    `all ${WINDOW_N} commands at the bulb with no PUBACK read by the hub`).catch((e) => {
    e.message += ` (got ${ids.filter((id) => lamp.received(id).length >= 1).length}: libmosquitto holds QoS 1 publishes beyond its window)`;
    throw e;
  });
  for (const id of ids) {
    const e = lamp.received(id)[0];
    assert.ok(e.verified, `${id}: ${e.error}`); // the paired key, and the vendor's
    assert.equal(e.header.kid, hubKid);
    assert.equal(e.payload.dev, lamp.id);
  }
  // The hold was real: the hub has read no PUBACK of them, so none is "delivered" yet.
  const st1 = (await hub.status()).commands;
  assert.equal(st1.published - st0.published, WINDOW_N);
  assert.equal(st1.delivered - st0.delivered, 0, 'no PUBACK reached the hub while held');
  assert.ok(ids.every((id) => resultsOf(id).length === 0), 'no result before the PUBACK');

  proxy.release();
  await waitFor(() => ids.every((id) => resultsOf(id).some((r) => r.status === 'delivered')), 20000,
    `"delivered" at the cloud for all ${WINDOW_N}`);
  assert.equal((await hub.status()).commands.delivered - st0.delivered, WINDOW_N);
});

test('a clean stop: exit status 0, no token in the log, nothing from the sanitizers', async () => {
  const res = await hub.stop();
  assert.equal(res.code, 0);
  assert.ok(!hub.log.includes(TOKEN), 'no access token in the log');
  assert.doesNotMatch(hub.log, /Sanitizer|runtime error/);
});
