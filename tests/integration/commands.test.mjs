// Commands from the cloud to the bulbs (PROTOCOL.md 2 and 3): the long poll, the checks, the
// hub-signed JWS verified by a bulb simulator with jose and the hub's public JWK (taken with
// `iothubctl key show --jwk` before the daemon starts), delivery over MQTT, acks through status
// frames, results reported in order, de-duplication, expiry, a restart between delivery and
// ack, and an ack whose row a power cut lost found again in the spool. Real swtpm, mosquitto and the reference cloud.
//
// Run twice (PROTOCOL.md 3 and 4): with the fixed Bearer token of [cloud] bearer_token_file
// (this file), and with DPoP-bound tokens from the real authorization server (oidc-provider,
// tests/oauth/) signed in with the device grant, at a cloud that checks DPoP as a strict
// resource server does (RFC 9449 4.3: htu without query, htm, ath, jti, iat) and wants its own
// DPoP-Nonce (RFC 9449 9): commands-dpop.test.mjs sets IOTHUB_COMMANDS_AUTH=dpop and imports
// this file.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import * as jose from 'jose';
import { Hub, mqttClient, waitFor, sleep } from './lib/harness.mjs';
import { Bulb } from './lib/bulb.mjs';
import { startCloud } from '../cloud/server.mjs';
import { loginApproved } from './lib/login.mjs';
import { startTestbed, startStrictCloud, stopTestbed, keyBeforeDaemon } from './lib/testbed.mjs';

const PREFIX = 'iothub/v1/bulbs';
const HUB_ID = 'test-hub';
const TOKEN = 'tok-commands-test-0123456789';
const DPOP = process.env.IOTHUB_COMMANDS_AUTH === 'dpop';
let dir, tpm, broker, cloud, hub, pub, keyJwk, hubKey, auth;
const seenTokens = new Set([TOKEN]);
let lamp, desk, spare; // bulb simulators
let seq = 0;

const run = promisify(execFile);
const nowS = () => Math.floor(Date.now() / 1000);
const nextId = (what) => `${what}-${++seq}`;
const hubState = () => cloud.state.hubs.get(HUB_ID);
const resultsOf = (id) => cloud.state.results.filter((r) => r.id === id);
const statusesOf = (id) => resultsOf(id).map((r) => r.status);

function hubOverrides() {
  const cloudConf = { url: cloud.url, ca_file: cloud.caFile, batch_max_frames: 20, batch_max_delay_ms: 200, timeout_s: 5 };
  if (!DPOP) {
    return { key: { backend: 'tpm', tcti: tpm.tcti, handle: '0x81000101' },
      cloud: { ...cloudConf, bearer_token_file: path.join(dir, 'token') } };
  }
  return {
    key: { backend: 'tpm', tcti: tpm.tcti, handle: '0x81000101' },
    cloud: cloudConf,
    oauth: { issuer: auth.issuer, client_id: auth.clientId, scope: 'openid offline_access iothub', ca_file: auth.caFile, dpop: 'on' },
  };
}

// 'iothubctl login' as a user runs it (lib/login.mjs).
const login = (h) => loginApproved(h, auth);

// Hub signatures the cloud (and, with DPoP, the authorization server) checked: request
// signatures (RFC 9421), plus DPoP proofs (RFC 9449) at both servers.
// The hub's signatures, key.signatures: iothubd's (command JWS) and iothub-uplink's (request
// signatures, DPoP proofs), as each counts what the signer made for it.
const hubSignatures = (st) => {
  assert.equal(st.key.signatures, st.signer.signatures + (st.uplink?.remote?.signer?.signatures ?? 0));
  return st.key.signatures;
};
const verifiedSignatures = () => cloud.state.signatures + (DPOP ? cloud.state.dpop.proofs + auth.state.dpopProofs : 0);

async function enrol(bulb) {
  const f = path.join(hub.dir, `${bulb.id}.pem`);
  await fs.writeFile(f, bulb.pem);
  const r = await hub.ctl(['bulb', 'add', bulb.id, '--key', f]);
  assert.equal(r.code, 0, r.stderr);
}

// A bulb: signs its status frames with jose (lib/bulb.mjs), subscribes to its command topic on
// a persistent session, and checks every command it gets with the hub's public key, as a real
// bulb paired with `iothubctl key show --jwk` would.
class CmdBulb {
  constructor(bulb, client) {
    this.bulb = bulb; this.id = bulb.id; this.client = client; this.got = []; this.autoAck = false;
    this.sending = Promise.resolve();
  }

  static async create(id) {
    const bulb = await Bulb.create(id, 'ES256');
    const client = await mqttClient(broker.port, { clean: false, clientId: `cmd-bulb-${id}-${process.pid}` });
    const b = new CmdBulb(bulb, client);
    client.on('message', (topic, payload, packet) => { b.#onMessage(topic, payload, packet); });
    await client.subscribeAsync(`${PREFIX}/${id}/cmd`, { qos: 1 });
    return b;
  }

  async #onMessage(topic, payload, packet) {
    const e = { at: Date.now(), topic, jws: payload.toString(), retain: packet.retain, qos: packet.qos };
    this.got.push(e);
    try {
      const v = await jose.compactVerify(e.jws, hubKey, { algorithms: ['ES256'] });
      e.header = v.protectedHeader;
      e.rawHeader = Buffer.from(e.jws.split('.')[0], 'base64url').toString();
      e.rawPayload = Buffer.from(v.payload).toString();
      e.payload = JSON.parse(e.rawPayload);
      e.verified = true;
    } catch (err) {
      e.verified = false;
      e.error = err.message;
    }
    if (this.autoAck && e.verified) await this.ack(e.payload.id);
  }

  received(id) { return this.got.filter((e) => e.payload?.id === id); }

  // The ack rides on the bulb's next status frame (PROTOCOL.md 2). A bulb sends its frames one
  // after the other: signed concurrently, a later seq could overtake an earlier one, and the
  // hub would (rightly) refuse the earlier frame as a replay, its ack with it.
  ack(id, ok = true, err = undefined) {
    const ack = err === undefined ? { id, ok } : { id, ok, err };
    const send = async () => {
      const jws = await this.bulb.frame({ ack });
      await pub.publishAsync(`${PREFIX}/${this.id}/status`, jws, { qos: 1 });
    };
    this.sending = this.sending.then(send, send);
    return this.sending;
  }

  async end() { await this.client.endAsync(); }
}

// The hub's long poll is parked at the cloud: a command queued now goes out at once.
async function pollParked(timeoutMs = 15000) {
  await waitFor(() => hubState()?.waiters?.size === 1, timeoutMs, 'the hub long poll parked at the cloud');
}

function queue(cmd) {
  return cloud.control.queueCommand({ hub: HUB_ID, exp: nowS() + 60, ...cmd });
}

async function commandsStatus() {
  return (await hub.status()).commands;
}

before(async () => {
  ({ dir, tpm, broker, auth } = await startTestbed({ authServer: DPOP ? { interval: 1 } : null }));
  if (DPOP) {
    cloud = await startStrictCloud(dir, auth, seenTokens);
  } else {
    cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'alice' } });
  }
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  // The key, and the public JWK a bulb is paired with, before the daemon runs.
  keyJwk = (await keyBeforeDaemon(broker, hubOverrides())).jwk;
  const { kid, ...pubJwk } = keyJwk;
  assert.equal(kid, await jose.calculateJwkThumbprint(pubJwk, 'sha256'));
  hubKey = await jose.importJWK(pubJwk, 'ES256');

  hub = await Hub.start(broker, hubOverrides());
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt');
  if (DPOP) {
    await login(hub);
    const st = await hub.status();
    assert.equal(st.oauth.state, 'ok');
    assert.equal(st.oauth.dpop, true, 'a DPoP-bound token');
  }
  const r = await hub.ctl(['register']);
  assert.equal(r.code, 0, r.stderr);
  pub = await mqttClient(broker.port);
  lamp = await CmdBulb.create('cmd-lamp');
  desk = await CmdBulb.create('cmd-desk');
  spare = await CmdBulb.create('cmd-spare');
  for (const b of [lamp, desk, spare]) await enrol(b.bulb);
  await waitFor(() => hubState()?.devices?.size === 3, 5000, 'device list at the cloud');
  await pollParked();
});

after(async () => {
  for (const b of [lamp, desk, spare]) await b?.end();
  await stopTestbed({ clients: [pub], hub, cloud, auth, broker, tpm, dir });
});

test('a command reaches its bulb as a JWS the bulb verifies with the paired key; delivered, then acked', async () => {
  const st0 = await commandsStatus();
  const k0 = hubSignatures(await hub.status());
  await pollParked();
  const id = nextId('ok');
  const exp = nowS() + 60;
  const t0 = nowS();
  queue({ id, dev: lamp.id, set: { bri: 200, on: true, xy: [0.3127, 0.329] }, exp });
  await waitFor(() => lamp.received(id).length === 1, 10000, 'the command at the bulb');
  const e = lamp.received(id)[0];
  assert.ok(e.verified, e.error);
  assert.equal(e.topic, `${PREFIX}/${lamp.id}/cmd`);
  assert.equal(e.qos, 1);
  assert.equal(e.retain, false);
  // Header and payload exactly as PROTOCOL.md 2 says, members in the contract's order.
  assert.equal(e.rawHeader, `{"alg":"ES256","kid":"${keyJwk.kid}","typ":"iothub-cmd"}`);
  assert.deepEqual(Object.keys(e.payload), ['hub', 'dev', 'id', 'iat', 'exp', 'set']);
  const { iat } = e.payload;
  assert.ok(Number.isSafeInteger(iat) && iat >= t0 - 1 && iat <= nowS() + 1, `iat ${iat}`);
  assert.equal(e.rawPayload,
    `{"hub":"${HUB_ID}","dev":"${lamp.id}","id":"${id}","iat":${iat},"exp":${exp},"set":{"on":true,"bri":200,"xy":[0.3127,0.329]}}`);
  // A bulb refuses anything it cannot verify: one changed byte of the payload.
  const [h, p, s] = e.jws.split('.');
  const forged = Buffer.from(p, 'base64url').toString().replace('"bri":200', '"bri":254');
  await assert.rejects(jose.compactVerify(`${h}.${Buffer.from(forged).toString('base64url')}.${s}`, hubKey));

  await waitFor(() => statusesOf(id).includes('delivered'), 10000, 'delivered at the cloud');
  await lamp.ack(id);
  await waitFor(() => statusesOf(id).length === 2, 10000, 'acked at the cloud');
  assert.deepEqual(statusesOf(id), ['delivered', 'acked']);
  for (const r of resultsOf(id)) assert.ok(Number.isSafeInteger(r.at) && Math.abs(r.at - nowS()) < 30);
  assert.equal(resultsOf(id)[1].detail, undefined);
  const st1 = await commandsStatus();
  assert.equal(st1.signatures - st0.signatures, 1, 'one TPM signature for the command itself');
  assert.equal(st1.delivered - st0.delivered, 1);
  assert.equal(st1.acked - st0.acked, 1);
  assert.ok(hubSignatures(await hub.status()) - k0 >= 4, 'poll, JWS and two results all signed');
});

test('invalid commands are rejected with a reason and never reach a bulb', async () => {
  const st0 = await commandsStatus();
  const revoked = await CmdBulb.create('cmd-revoked');
  await enrol(revoked.bulb);
  let r = await hub.ctl(['bulb', 'remove', revoked.id]);
  assert.equal(r.code, 0, r.stderr);
  await pollParked();
  const cases = [
    { id: nextId('color'), dev: lamp.id, set: { on: true, color: 'red' }, detail: 'bad_set' },
    { id: nextId('bri999'), dev: lamp.id, set: { bri: 999 }, detail: 'bad_set' },
    { id: nextId('empty'), dev: lamp.id, set: {}, detail: 'bad_set' },
    { id: nextId('brireal'), dev: lamp.id, set: { bri: 12.5 }, detail: 'bad_set' },
    { id: nextId('xy3'), dev: lamp.id, set: { xy: [0.1, 0.2, 0.3] }, detail: 'bad_set' },
    { id: nextId('old'), dev: lamp.id, set: { on: true }, exp: nowS() - 10, detail: 'expired' },
    { id: nextId('far'), dev: lamp.id, set: { on: true }, exp: nowS() + 10 * 86400, detail: 'bad_exp' },
    { id: nextId('expstr'), dev: lamp.id, set: { on: true }, exp: 'soon', detail: 'malformed' },
    { id: nextId('setarr'), dev: lamp.id, set: [1], detail: 'malformed' },
    { id: nextId('nobulb'), dev: 'no-such-bulb', set: { on: true }, detail: 'unknown_device' },
    { id: nextId('baddev'), dev: '../../etc', set: { on: true }, detail: 'unknown_device' },
    { id: nextId('revoked'), dev: revoked.id, set: { on: true }, detail: 'revoked' },
  ];
  // A command without a usable id cannot be reported (the id is in the result URL): it is
  // counted and ignored. The reference cloud refuses such ids, so it goes into its map directly.
  hubState().commands.set('bad id', { id: 'bad id', dev: lamp.id, set: { on: true }, exp: nowS() + 60,
    queuedAt: Date.now(), deliveries: 0, results: [] });
  for (const c of cases) queue({ id: c.id, dev: c.dev, set: c.set, ...(c.exp !== undefined ? { exp: c.exp } : {}) });
  await waitFor(() => cases.every((c) => resultsOf(c.id).length === 1), 15000, 'a result for every invalid command');
  for (const c of cases) {
    assert.deepEqual(resultsOf(c.id).map((x) => [x.status, x.detail]), [['rejected', c.detail]], c.id);
  }
  await sleep(300);
  for (const b of [lamp, desk, spare, revoked]) {
    for (const c of cases) assert.equal(b.received(c.id).length, 0, `${c.id} reached ${b.id}`);
    assert.ok(!b.got.some((e) => !e.verified), 'every message on a command topic verified');
  }
  const st1 = await commandsStatus();
  const d = (k) => st1.rejected_reasons[k] - st0.rejected_reasons[k];
  assert.equal(d('bad_set'), 5);
  assert.equal(d('expired'), 1);
  assert.equal(d('bad_exp'), 1);
  assert.equal(d('malformed'), 2);
  assert.equal(d('unknown_device'), 2);
  assert.equal(d('revoked'), 1);
  assert.equal(d('bad_id'), 1);
  assert.equal(st1.rejected - st0.rejected, cases.length + 1);
  assert.equal(st1.signatures, st0.signatures, 'nothing was signed for them');
  assert.equal(resultsOf('bad id').length, 0);
  hubState().commands.delete('bad id');
  await revoked.end();
  // The reasons name the command and the device only in the log, never the payload.
  assert.match(hub.log, /Rejected command bri999-\d+ for cmd-lamp: bad_set/);
});

test('a duplicate id (queued twice) is published once and not reported again', async () => {
  await pollParked();
  const id = nextId('dup');
  lamp.autoAck = true;
  try {
    queue({ id, dev: lamp.id, set: { on: false } });
    await waitFor(() => statusesOf(id).length === 2, 10000, 'delivered and acked');
    const st0 = await commandsStatus();
    // The cloud hands the same id out again (as after a lost result): the hub ignores it.
    hubState().commands.delete(id);
    await pollParked();
    queue({ id, dev: lamp.id, set: { on: true } });
    await waitFor(async () => (await commandsStatus()).duplicates > st0.duplicates, 10000, 'the duplicate counted');
    await sleep(500);
    assert.equal(lamp.received(id).length, 1, 'published once');
    assert.equal(lamp.received(id)[0].payload.set.on, false, 'the first one');
    assert.deepEqual(statusesOf(id), ['delivered', 'acked'], 'not reported again');
    const st1 = await commandsStatus();
    assert.equal(st1.signatures, st0.signatures);
    assert.equal(st1.duplicates - st0.duplicates, 1);
  } finally {
    lamp.autoAck = false;
  }
});

test('an ack from another bulb, or for an unknown id, changes nothing', async () => {
  await pollParked();
  const id = nextId('other');
  queue({ id, dev: lamp.id, set: { ct: 300 } });
  await waitFor(() => statusesOf(id).includes('delivered'), 10000, 'delivered');
  const st0 = await commandsStatus();
  await desk.ack(id); // desk did not get this command
  await desk.ack('never-sent');
  await waitFor(async () => (await commandsStatus()).acks_ignored >= st0.acks_ignored + 2, 5000, 'acks ignored');
  await sleep(300);
  assert.deepEqual(statusesOf(id), ['delivered']);
  await lamp.ack(id, false, 'lamp too hot');
  await waitFor(() => statusesOf(id).length === 2, 10000, 'failed at the cloud');
  assert.deepEqual(resultsOf(id).map((r) => [r.status, r.detail]), [['delivered', undefined], ['failed', 'lamp too hot']]);
});

test('a command never acked expires; the cloud hears delivered, then expired', async () => {
  await pollParked();
  const st0 = await commandsStatus();
  const id = nextId('noack');
  queue({ id, dev: spare.id, set: { on: true }, exp: nowS() + 3 });
  await waitFor(() => spare.received(id).length === 1, 10000, 'at the bulb');
  await waitFor(() => statusesOf(id).length === 2, 15000, 'expired at the cloud');
  assert.deepEqual(resultsOf(id).map((r) => [r.status, r.detail]), [['delivered', undefined], ['expired', 'not_acked']]);
  const st1 = await commandsStatus();
  assert.equal(st1.expired - st0.expired, 1);
  // An ack after that is too late.
  await spare.ack(id);
  await waitFor(async () => (await commandsStatus()).acks_ignored > st1.acks_ignored, 5000, 'late ack ignored');
  assert.equal(statusesOf(id).length, 2);
});

test('results are retried with backoff until the cloud takes them; a refused one is not sent again', async () => {
  await pollParked();
  const r0 = cloud.state.requests.length;
  await cloud.control.fail({ status: 503, endpoint: 'result', count: 2 });
  const id = nextId('retry');
  lamp.autoAck = true;
  try {
    queue({ id, dev: lamp.id, set: { on: true } });
    await waitFor(() => statusesOf(id).length === 2, 20000, 'both results after the 503s');
    assert.deepEqual(statusesOf(id), ['delivered', 'acked']);
    const injected = cloud.state.requests.slice(r0).filter((q) => q.endpoint === 'result' && q.status === 503);
    assert.equal(injected.length, 2);
    assert.ok(injected[1].at - injected[0].at >= 900, 'backed off (at least 1 s) between attempts');

    const st0 = await commandsStatus();
    await pollParked();
    await cloud.control.fail({ status: 400, endpoint: 'result', count: 1 });
    const id2 = nextId('refused');
    queue({ id: id2, dev: lamp.id, set: { on: true } });
    await waitFor(() => statusesOf(id2).length === 1, 10000, 'the final result');
    await sleep(1500);
    // "delivered" was refused with a 400: final, not retried; "acked" went on.
    assert.deepEqual(statusesOf(id2), ['acked']);
    assert.equal((await commandsStatus()).results_refused - st0.results_refused, 1);
    assert.match(hub.log, /refused the result "delivered" of command refused-\d+ with HTTP 400/);
  } finally {
    lamp.autoAck = false;
  }
});

test('poll errors back off, then commands flow again', async () => {
  await pollParked();
  const st0 = await commandsStatus();
  const r0 = cloud.state.requests.length;
  await cloud.control.fail({ status: 503, endpoint: 'commands', count: 2 });
  lamp.autoAck = true;
  try {
    const a = nextId('poll-a');
    queue({ id: a, dev: lamp.id, set: { on: true } }); // answers the parked poll; the next two fail
    await waitFor(() => statusesOf(a).length === 2, 10000, 'first command done');
    await waitFor(async () => (await commandsStatus()).poll_errors >= st0.poll_errors + 2, 10000, 'two poll errors');
    const b = nextId('poll-b');
    queue({ id: b, dev: lamp.id, set: { on: false } });
    await waitFor(() => statusesOf(b).length === 2, 15000, 'second command done after the backoff');
    const polls = cloud.state.requests.slice(r0).filter((q) => q.endpoint === 'commands');
    const failed = polls.filter((q) => q.status === 503);
    assert.equal(failed.length, 2);
    assert.ok(failed[1].at - failed[0].at >= 900, 'backed off (at least 1 s) between polls');
  } finally {
    lamp.autoAck = false;
  }
});

test('every signature is accounted for: requests the cloud verified plus one per command', async () => {
  // hub signatures - signatures the cloud verified - command JWS: constant whenever nothing is
  // in flight. Read it when it has been steady for a moment (an upload may be on its way).
  const offset = async () => {
    let last;
    return waitFor(async () => {
      await pollParked();
      const k = hubSignatures(await hub.status()), s = (await commandsStatus()).signatures;
      const v = { off: k - verifiedSignatures() - s, s };
      const steady = last && last.off === v.off && last.s === v.s;
      last = v;
      if (!steady) await sleep(250);
      return steady ? v : null;
    }, 10000, 'a steady signature count');
  };
  const before = await offset();
  const ids = [nextId('sig'), nextId('sig'), nextId('sig')];
  desk.autoAck = true;
  try {
    for (const id of ids) queue({ id, dev: desk.id, set: { bri: 10 } });
    await waitFor(() => ids.every((id) => statusesOf(id).length === 2), 15000, 'three commands done');
  } finally {
    desk.autoAck = false;
  }
  const afterwards = await offset();
  assert.equal(afterwards.s - before.s, 3, 'one JWS signature per command');
  assert.equal(afterwards.off, before.off, 'every other hub signature is a request the cloud verified');
});

test('a command queued while the broker is down goes out once it is back', async () => {
  await pollParked();
  const st0 = await commandsStatus();
  await broker.stop();
  await waitFor(async () => !(await hub.status()).mqtt.connected, 10000, 'hub sees the broker gone');
  const id = nextId('offline');
  queue({ id, dev: desk.id, set: { on: true } });
  await waitFor(async () => (await commandsStatus()).signatures > st0.signatures, 10000, 'signed and stored');
  assert.equal((await commandsStatus()).in_flight >= 1, true);
  assert.equal(desk.received(id).length, 0);
  await broker.restart();
  await waitFor(() => desk.received(id).length === 1, 20000, 'published after the reconnect');
  assert.ok(desk.received(id)[0].verified);
  await desk.ack(id);
  await waitFor(() => statusesOf(id).length === 2, 15000, 'delivered and acked');
  assert.deepEqual(statusesOf(id), ['delivered', 'acked']);
});

test('after a restart, an unpublished command goes out and unreported results are sent', async () => {
  await pollParked();
  await cloud.control.fail({ status: 503, endpoint: 'result', count: -1 }); // no result gets through
  const a = nextId('unrep');
  queue({ id: a, dev: desk.id, set: { on: true } });
  await waitFor(() => desk.received(a).length === 1, 10000, 'A at the bulb');
  await desk.ack(a);
  await waitFor(async () => (await commandsStatus()).acked >= 1 && (await commandsStatus()).unreported >= 1, 10000,
    'A acked, its results not taken');
  await broker.stop();
  await waitFor(async () => !(await hub.status()).mqtt.connected, 10000, 'hub sees the broker gone');
  const s0 = (await commandsStatus()).signatures;
  const b = nextId('unpub');
  queue({ id: b, dev: desk.id, set: { on: false } });
  await waitFor(async () => (await commandsStatus()).signatures > s0, 10000, 'B signed and stored');
  assert.equal(statusesOf(a).length, 0);
  const res = await hub.stop();
  assert.equal(res.code, 0);
  cloud.control.clearFailures();
  await broker.restart();
  await hub.start();
  await waitFor(() => desk.received(b).length === 1, 20000, 'B published after the restart');
  await desk.ack(b);
  await waitFor(() => statusesOf(a).length === 2 && statusesOf(b).length === 2, 20000, 'all results');
  assert.deepEqual(statusesOf(a), ['delivered', 'acked']);
  assert.deepEqual(statusesOf(b), ['delivered', 'acked']);
  assert.equal(desk.received(a).length, 1, 'A not published again');
  assert.equal(desk.received(b).length, 1);
});

test('a restart of the daemon between delivery and ack still ends in acked', async () => {
  await pollParked();
  const id = nextId('restart');
  queue({ id, dev: spare.id, set: { bri: 77 }, exp: nowS() + 120 });
  await waitFor(() => statusesOf(id).includes('delivered'), 10000, 'delivered');
  const res = await hub.stop();
  assert.equal(res.code, 0, hub.log.slice(-2000));
  await hub.start();
  await waitFor(async () => (await hub.status()).mqtt.connected, 10000, 'mqtt after the restart');
  const st = await commandsStatus();
  assert.equal(st.in_flight, 1, 'the command waits for its ack again');
  await spare.ack(id);
  await waitFor(() => statusesOf(id).length === 2, 15000, 'acked after the restart');
  assert.deepEqual(statusesOf(id), ['delivered', 'acked']);
  assert.equal(spare.received(id).length, 1, 'not published again');
  assert.ok((await commandsStatus()).acked >= 1);
  // Known ids stay known across the restart.
  await pollParked();
  hubState().commands.delete(id);
  queue({ id, dev: spare.id, set: { bri: 1 } });
  await waitFor(async () => (await commandsStatus()).duplicates >= 1, 10000, 'duplicate after restart');
  assert.equal(spare.received(id).length, 1);
});

// A power cut after the kernel wrote back the segment that holds a frame with a command's ack,
// but before the WAL page with the ack's row reached the disk (iothub-protocol(7), "Command
// acks"): at start the frame is in the spool, its seq is the bulb's, and the bulb's resend of it
// (never acked) is a replay. Staged with the real daemon: the bulb acks, the daemon is SIGKILLed
// and the command's row is put back as the lost commit leaves it (delivered, reported so); the
// next start, after the command's exp, finds the ack in the spool and the cloud hears "acked",
// not "expired".
test('an ack whose row a power cut lost is found again in the spool at start; the resend stays a replay', async () => {
  await pollParked();
  const id = nextId('lostack');
  // The test waits for exp (plus 2 s) with the daemon down, so exp is no later than needed: the
  // delivery and the ack take about a second (it was 10 s: 6 s more per run, four runs per CI).
  const exp = nowS() + 6;
  queue({ id, dev: spare.id, set: { bri: 42 }, exp });
  await waitFor(() => statusesOf(id).includes('delivered'), 10000, 'delivered, reported');
  // The final result stays at the hub, so that only the restart can bring it to the cloud.
  await cloud.control.fail({ status: 503, endpoint: 'result', count: -1 });
  const acked0 = (await commandsStatus()).acked;
  const jws = await spare.bulb.frame({ ack: { id, ok: true } });
  await pub.publishAsync(`${PREFIX}/${spare.id}/status`, jws, { qos: 1 });
  await waitFor(async () => (await commandsStatus()).acked === acked0 + 1, 10000, 'the ack taken');
  console.log(`lost ack: delivered and acked ${exp - nowS()} s before exp`);
  assert.ok(nowS() < exp, 'the ack was taken before the command\'s exp (a slow run: raise exp)');
  const res = await hub.stop('SIGKILL');
  assert.equal(res.signal, 'SIGKILL');
  cloud.control.clearFailures();
  assert.deepEqual(statusesOf(id), ['delivered']);
  // The row as the commit before the ack's left it: delivered (its time kept), reported up to
  // "delivered" (reported = 1), no outcome.
  const db = path.join(hub.stateDir, 'iothub.db');
  await run('sqlite3', [db, `UPDATE commands SET state = 'delivered', done_at = NULL, detail = NULL, reported = 1 WHERE id = '${id}'`]);
  const { stdout } = await run('sqlite3', [db, `SELECT state, reported FROM commands WHERE id = '${id}'`]);
  assert.equal(stdout.trim(), 'delivered|1');
  // Down until the command's exp and its grace passed: the ack came in time, and the start
  // looks for it before anything expires.
  while (nowS() <= exp + 2) await sleep(200);
  await hub.start();
  await waitFor(() => statusesOf(id).length === 2, 15000, 'the acked result after the restart');
  assert.deepEqual(statusesOf(id), ['delivered', 'acked']);
  const st = await commandsStatus();
  assert.equal(st.acks_recovered, 1);
  assert.equal(st.in_flight, 0);
  assert.match(hub.log, new RegExp(`Recovered the ack of command ${id} \\(acked\\) from frame \\d+ of ${spare.id}`));
  // The bulb never got its end-to-end ack for that frame and resends it: still a replay, and
  // the command's outcome does not change.
  await waitFor(async () => (await hub.status()).mqtt.connected, 10000, 'mqtt after the restart');
  const replays0 = (await hub.status()).frames.rejected.replay ?? 0;
  await pub.publishAsync(`${PREFIX}/${spare.id}/status`, jws, { qos: 1 });
  await waitFor(async () => ((await hub.status()).frames.rejected.replay ?? 0) === replays0 + 1, 10000, 'the resend refused');
  await sleep(300);
  assert.deepEqual(statusesOf(id), ['delivered', 'acked']);
  assert.equal((await commandsStatus()).acks_recovered, 1);
});

// The latency itself is a target of DESIGN.md, measured by `make bench` (tests/bench/commands.mjs,
// quiet and beside 2,000 frames/s): here only the diagnostic. This test ran 50 commands 500 ms
// apart and held p50 under 1 s: 26 s of wall clock, four times per CI run (this file and
// commands-dpop.test.mjs, plain and under ASan), for a bound the bench measures 10x tighter.
test('cloud -> bulb: 20 commands one after another, each verified by its bulb', async (t) => {
  const N = 20, SPACING_MS = 100;
  await pollParked();
  lamp.autoAck = true;
  const lat = [];
  try {
    for (let i = 0; i < N; i++) {
      await pollParked();
      const id = nextId('lat');
      const t0 = Date.now();
      queue({ id, dev: lamp.id, set: { bri: i % 255 } });
      await waitFor(() => lamp.received(id).length === 1, 10000, `command ${i} at the bulb`);
      lat.push(lamp.received(id)[0].at - t0);
      assert.ok(lamp.received(id)[0].verified);
      await sleep(Math.max(0, SPACING_MS - (Date.now() - t0)));
    }
  } finally {
    lamp.autoAck = false;
  }
  const sorted = [...lat].sort((a, b) => a - b);
  const q = (p) => sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)];
  t.diagnostic(`cloud->bulb latency over ${N} commands (one every ${SPACING_MS} ms, each acked, swtpm): `
    + `p50 ${q(0.5)} ms, p99 ${q(0.99)} ms, max ${sorted[sorted.length - 1]} ms`);
  assert.equal(lat.length, N);
});

test('a clean stop: exit status 0, no access token in the log, nothing from the sanitizers', async () => {
  const res = await hub.stop();
  assert.equal(res.code, 0);
  for (const t of seenTokens) assert.ok(!hub.log.includes(t), 'no access token in the log');
  assert.doesNotMatch(hub.log, /Sanitizer|runtime error/);
});
