// Bulb frames (issue 3): genuine frames from an independent signer (jose) are accepted, and
// each rejection reason of PROTOCOL.md 1 has cases that hit it and only it.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { Broker, Hub, mqttClient, publish, tempDir, waitFor, sleep } from './lib/harness.mjs';
import { Bulb, b64u, derSign } from './lib/bulb.mjs';

const REASONS = ['too_large', 'malformed', 'unknown_device', 'revoked', 'bad_signature', 'replay', 'stale',
  'rate_limited', 'topic_mismatch'];
const PREFIX = 'iothub/v1/bulbs';

let dir, broker, hub, client, es, ed, other, stranger;

async function enrol(h, bulb) {
  const f = path.join(h.dir, `${bulb.id}.pem`);
  await fs.writeFile(f, bulb.pem);
  const r = await h.ctl(['bulb', 'add', bulb.id, '--key', f]);
  assert.equal(r.code, 0, r.stderr);
}

before(async () => {
  dir = await tempDir();
  broker = await Broker.start(dir);
  hub = await Hub.start(broker);
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt connected');
  client = await mqttClient(broker.port);
  es = await Bulb.create('bulb-es', 'ES256');
  ed = await Bulb.create('bulb-ed', 'EdDSA');
  other = await Bulb.create('bulb-other', 'ES256');
  stranger = await Bulb.create('bulb-stranger', 'ES256');
  for (const b of [es, ed, other]) await enrol(hub, b);
});

after(async () => {
  await client?.endAsync();
  await hub?.cleanup();
  await broker?.stop();
  await fs.rm(dir, { recursive: true, force: true });
});

function counters(st) {
  return { received: st.frames.received, accepted: st.frames.accepted, ...st.frames.rejected };
}

// Publishes one message and waits until the daemon has counted it; returns the change of
// every counter.
async function send(topicDev, payload, h = hub) {
  const before = counters(await h.status());
  await publish(client, `${PREFIX}/${topicDev}/status`, payload);
  let after;
  // Counted as received at once; as accepted only after its commit, up to [frames]
  // commit_delay_ms later (group commit): wait until every received frame is decided.
  const decided = (c) => c.accepted - before.accepted + REASONS.reduce((n, r) => n + c[r] - before[r], 0);
  await waitFor(async () => {
    after = counters(await h.status());
    return after.received > before.received && decided(after) >= after.received - before.received;
  }, 5000, 'frame counted and decided');
  // Nothing more to come: give a stray second count a moment to show.
  await sleep(20);
  after = counters(await h.status());
  const delta = {};
  for (const k of Object.keys(after)) if (after[k] !== before[k]) delta[k] = after[k] - before[k];
  return delta;
}

async function expectAccepted(topicDev, payload) {
  assert.deepEqual(await send(topicDev, payload), { received: 1, accepted: 1 });
}

async function expectRejected(topicDev, payload, reason) {
  assert.ok(REASONS.includes(reason));
  assert.deepEqual(await send(topicDev, payload), { received: 1, [reason]: 1 }, `expected only ${reason}`);
}

const hdr = (b, over = {}) => JSON.stringify({ alg: b.alg, kid: b.id, typ: 'iothub-status', ...over });
const body = (b, over = {}) => JSON.stringify(b.payload(over));

test('status lists every rejection reason of PROTOCOL.md', async () => {
  const st = await hub.status();
  assert.deepEqual(Object.keys(st.frames.rejected).sort(), [...REASONS].sort());
});

test('genuine ES256 and EdDSA frames signed by jose are accepted and spooled byte for byte', async () => {
  const before = (await hub.status()).spool;
  const f1 = await es.frame();
  await expectAccepted(es.id, f1);
  await expectAccepted(ed.id, await ed.frame({ state: { on: false, bri: 0, ct: 153, xy: [0.3, 0.31] } }));
  await expectAccepted(es.id, await es.frame({ ack: { id: 'cmd-1', ok: false, err: 'overheated' } }));
  const after = (await hub.status()).spool;
  assert.equal(after.pending, before.pending + 3);
  assert.ok(after.bytes - before.bytes >= f1.length * 2);
  const list = JSON.parse((await hub.ctl(['bulb', 'list', '--json'])).stdout);
  assert.equal(list.bulbs.find((b) => b.id === es.id).last_seq, es.seq);
});

test('bad_signature: wrong key, DER signature, wrong lengths, alg not matching the enrolled key', async () => {
  await expectRejected(es.id, await es.signRaw(hdr(es), body(es), other.privateKey), 'bad_signature');
  const h = b64u(hdr(es)), p = b64u(body(es));
  await expectRejected(es.id, `${h}.${p}.${b64u(await derSign(es, `${h}.${p}`))}`, 'bad_signature');
  const good = (await es.signRaw(hdr(es), body(es))).split('.');
  const sig = Buffer.from(good[2], 'base64url');
  await expectRejected(es.id, `${good[0]}.${good[1]}.${b64u(sig.subarray(0, 63))}`, 'bad_signature');
  await expectRejected(es.id, `${good[0]}.${good[1]}.${b64u(Buffer.concat([sig, Buffer.from([0])]))}`, 'bad_signature');
  const flipped = Buffer.from(sig); flipped[10] ^= 1;
  await expectRejected(es.id, `${good[0]}.${good[1]}.${b64u(flipped)}`, 'bad_signature');
  // An Ed25519 signature with an EdDSA header, for a bulb enrolled with a P-256 key.
  const impostor = await Bulb.create(es.id, 'EdDSA');
  impostor.seq = es.seq + 100;
  await expectRejected(es.id, await impostor.frame(), 'bad_signature');
});

test('malformed: alg none, HS256 keyed with the public key, RS256, extra header members, crit', async () => {
  await expectRejected(es.id, await es.signRaw(hdr(es, { alg: 'none' }), body(es), null), 'malformed');
  const h = b64u(hdr(es, { alg: 'HS256' })), p = b64u(body(es));
  const mac = crypto.createHmac('sha256', es.pem).update(`${h}.${p}`).digest();
  await expectRejected(es.id, `${h}.${p}.${b64u(mac)}`, 'malformed');
  await expectRejected(es.id, await es.signRaw(hdr(es, { alg: 'RS256' }), body(es)), 'malformed');
  await expectRejected(es.id, await es.signRaw(hdr(es, { crit: ['exp'] }), body(es)), 'malformed');
  await expectRejected(es.id, await es.signRaw(hdr(es, { jku: 'https://evil/' }), body(es)), 'malformed');
  await expectRejected(es.id, await es.signRaw(hdr(es, { typ: 'JWT' }), body(es)), 'malformed');
});

test('malformed: duplicate members, trailing data, non-UTF-8, deep nesting, huge numbers, unknown members', async () => {
  const seq = es.seq + 1, iat = Math.floor(Date.now() / 1000);
  const dup = `{"dev":"${es.id}","seq":${seq},"seq":${seq + 1},"iat":${iat},"state":{"on":true}}`;
  await expectRejected(es.id, await es.signRaw(hdr(es), dup), 'malformed');
  const duph = `{"alg":"ES256","kid":"${es.id}","typ":"iothub-status","alg":"ES256"}`;
  await expectRejected(es.id, await es.signRaw(duph, body(es)), 'malformed');
  const good = await es.frame();
  await expectRejected(es.id, `${good}\n`, 'malformed');
  await expectRejected(es.id, `${good}.AAAA`, 'malformed');
  await expectRejected(es.id, `${good}garbage!`, 'malformed');
  await expectRejected(es.id, ` ${await es.frame()}`, 'malformed');
  const nonUtf8 = Buffer.concat([Buffer.from(`{"dev":"${es.id}","seq":${es.seq + 10},"iat":${iat},"state":{"on":true},"ack":{"id":"c1","ok":true,"err":"`),
    Buffer.from([0xff, 0xfe]), Buffer.from('"}}')]);
  await expectRejected(es.id, await es.signRaw(hdr(es), nonUtf8), 'malformed');
  const deep = `{"dev":"${es.id}","seq":${es.seq + 11},"iat":${iat},"state":{"on":true,"xy":[[[[[[[[0]]]]]]]]}}`;
  await expectRejected(es.id, await es.signRaw(hdr(es), deep), 'malformed');
  for (const big of ['1e400', '99999999999999999999999', '9007199254740992', '1.5', '"7"', '0', '-3']) {
    const p = `{"dev":"${es.id}","seq":${big},"iat":${iat},"state":{"on":true}}`;
    await expectRejected(es.id, await es.signRaw(hdr(es), p), 'malformed');
  }
  await expectRejected(es.id, await es.signRaw(hdr(es), body(es, { extra: 1 })), 'malformed');
  await expectRejected(es.id, await es.signRaw(hdr(es), body(es, { state: { on: true, colour: 'red' } })), 'malformed');
  await expectRejected(es.id, await es.signRaw(hdr(es), body(es, { state: { on: true, bri: 255 } })), 'malformed');
  await expectRejected(es.id, await es.signRaw(hdr(es), body(es, { state: { bri: 3 } })), 'malformed');
  await expectRejected(es.id, await es.signRaw(hdr(es), body(es, { ack: { id: 'c', ok: true, err: 'x'.repeat(129) } })), 'malformed');
  await expectRejected(es.id, 'not a jws at all', 'malformed');
  await expectRejected(es.id, '', 'malformed');
});

test('topic_mismatch: another device\'s kid or dev on this topic', async () => {
  await expectRejected(es.id, await other.frame(), 'topic_mismatch');
  await expectRejected(es.id, await es.signRaw(hdr(es), body(es, { dev: other.id })), 'topic_mismatch');
});

test('unknown_device: a bulb that was never enrolled', async () => {
  await expectRejected(stranger.id, await stranger.frame(), 'unknown_device');
});

test('replay: equal and lower seq are refused; seq only advances after a whole frame passed', async () => {
  const f = await es.frame();
  await expectAccepted(es.id, f);
  await expectRejected(es.id, f, 'replay');
  await expectRejected(es.id, await es.frame({ seq: es.seq - 1 }), 'replay');
  // A frame with a higher seq but a bad signature must not advance the seq.
  const high = es.seq + 50;
  const forged = await es.signRaw(hdr(es), JSON.stringify({ dev: es.id, seq: high, iat: Math.floor(Date.now() / 1000),
    state: { on: true } }), other.privateKey);
  await expectRejected(es.id, forged, 'bad_signature');
  assert.ok(es.seq + 1 < high);
  await expectAccepted(es.id, await es.frame());
});

test('stale: iat outside the clock window, past and future', async () => {
  const now = Math.floor(Date.now() / 1000);
  await expectRejected(es.id, await es.frame({ iat: now - 301 - 5 }), 'stale');
  await expectRejected(es.id, await es.frame({ iat: now + 301 + 5 }), 'stale');
  await expectAccepted(es.id, await es.frame({ iat: now - 200 }));
});

test('too_large: a frame over [frames] max_bytes is refused before it is parsed', async () => {
  const f = await es.frame();
  const pad = 'A'.repeat(4097 - f.length);
  await expectRejected(es.id, f + pad, 'too_large');
  await expectRejected(es.id, Buffer.alloc(60000, 0x41), 'too_large');
});

test('revoked: frames of a removed bulb are refused at once; a restart keeps it revoked', async () => {
  const b = await Bulb.create('bulb-revoke', 'EdDSA');
  await enrol(hub, b);
  await expectAccepted(b.id, await b.frame());
  const r = await hub.ctl(['bulb', 'remove', b.id]);
  assert.equal(r.code, 0, r.stderr);
  await expectRejected(b.id, await b.frame(), 'revoked');
  const list = JSON.parse((await hub.ctl(['bulb', 'list', '--json'])).stdout);
  assert.equal(list.bulbs.find((x) => x.id === b.id).revoked, true);
});

test('a replay after a daemon restart is still refused', async () => {
  const f = await ed.frame();
  await expectAccepted(ed.id, f);
  await hub.restart();
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'reconnected');
  await expectRejected(ed.id, f, 'replay');
  await expectAccepted(ed.id, await ed.frame());
});

// Issue 13: a commit writes the bulbs' seqs to bulb_seqs only every 10 s (and when frames leave
// the spool); in between, the spool's rows are the record. A frame committed right after the
// first commit of a run has its seq only in the spool: a restart must still refuse its replay.
test('a replay after a restart is refused when its seq is only in the spool, not yet in bulb_seqs', async () => {
  await hub.restart();
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'reconnected');
  const first = await ed.frame();
  await expectAccepted(ed.id, first); // the run's first commit: seqs stored, spool marked
  const second = await ed.frame();
  await expectAccepted(ed.id, second);
  const { stdout } = await promisify(execFile)('sqlite3', [path.join(hub.stateDir, 'iothub.db'),
    `SELECT last_seq FROM bulb_seqs WHERE id = '${ed.id}'`]);
  assert.ok(Number(stdout.trim()) < ed.seq, `bulb_seqs ${stdout.trim()} is behind seq ${ed.seq}: the case this test is about`);
  await hub.restart();
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'reconnected');
  await expectRejected(ed.id, second, 'replay');
  await expectRejected(ed.id, first, 'replay');
  await expectAccepted(ed.id, await ed.frame());
});

// Issue 13: registry_open() reads the stored keys without curve arithmetic (before READY=1); a
// key damaged behind the daemon's back is found by the bulb's first frame after the start.
test('a stored key that no longer loads refuses that bulb\'s frames, logged apart; others go on; re-enrolment mends it', async () => {
  const b = await Bulb.create('bulb-damaged', 'ES256');
  await enrol(hub, b);
  await expectAccepted(b.id, await b.frame());
  const der = crypto.createPublicKey(b.pem).export({ type: 'spki', format: 'der' });
  der[der.length - 1] ^= 1; // y changes: the point leaves the curve
  const pem = `-----BEGIN PUBLIC KEY-----\n${der.toString('base64').match(/.{1,64}/g).join('\n')}\n-----END PUBLIC KEY-----\n`;
  await promisify(execFile)('sqlite3', [path.join(hub.stateDir, 'iothub.db'),
    `UPDATE bulbs SET pubkey_pem = '${pem}' WHERE id = '${b.id}'`]);
  await hub.restart();
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'reconnected');
  const before = (await hub.status()).bulbs.key_cache;
  assert.deepEqual(before, { cached: 0, max: 256, hits: 0, misses: 0, evictions: 0, damaged: 0 }, 'nothing loaded before a frame');
  await expectRejected(b.id, await b.frame(), 'bad_signature');
  await waitFor(() => /Enrolled key of bulb-damaged in the database does not load/.test(hub.log), 2000, 'log line');
  await expectAccepted(es.id, await es.frame());
  await expectAccepted(es.id, await es.frame());
  // bulbs.key_cache (iothubctl(1)): the damaged key counted, es's loaded once, then found ready.
  const kc = (await hub.status()).bulbs.key_cache;
  assert.equal(kc.damaged, 1, JSON.stringify(kc));
  assert.equal(kc.cached, 1, JSON.stringify(kc));
  assert.equal(kc.misses, 1, JSON.stringify(kc));
  assert.equal(kc.hits, 1, JSON.stringify(kc));
  assert.match((await hub.ctl(['status'])).stdout, /^Bulbs: .*; 1 stored keys DAMAGED/m);
  assert.equal((await hub.ctl(['bulb', 'remove', b.id])).code, 0);
  await enrol(hub, b);
  await expectAccepted(b.id, await b.frame());
});

test('rejections are logged with the device and reason, never with the payload', async () => {
  const secretish = 'PAYLOAD-MARKER-' + crypto.randomBytes(8).toString('hex');
  await expectRejected(stranger.id, await stranger.frame({ ack: { id: 'c9', ok: true, err: secretish } }), 'unknown_device');
  await waitFor(() => /Rejected frame from bulb-stranger: unknown_device/.test(hub.log), 2000, 'log line');
  assert.ok(!hub.log.includes(secretish), 'payload content must not reach the log');
});

test('enrolment refuses bad ids, unsupported keys, duplicates', async () => {
  const f = path.join(hub.dir, 'rsa.pem');
  const { publicKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  await fs.writeFile(f, publicKey.export({ type: 'spki', format: 'pem' }));
  let r = await hub.ctl(['bulb', 'add', 'bulb-rsa', '--key', f]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /unsupported key type/);
  const p384 = path.join(hub.dir, 'p384.pem');
  await fs.writeFile(p384, crypto.generateKeyPairSync('ec', { namedCurve: 'P-384' }).publicKey.export({ type: 'spki', format: 'pem' }));
  r = await hub.ctl(['bulb', 'add', 'bulb-384', '--key', p384]);
  assert.match(r.stderr, /unsupported key type/);
  r = await hub.ctl(['bulb', 'add', '.hidden', '--key', f]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /invalid device id/);
  const esPem = path.join(hub.dir, `${es.id}.pem`);
  r = await hub.ctl(['bulb', 'add', es.id, '--key', esPem]);
  assert.match(r.stderr, /already enrolled/);
  const junk = path.join(hub.dir, 'junk.pem');
  await fs.writeFile(junk, 'hello');
  r = await hub.ctl(['bulb', 'add', 'bulb-junk', '--key', junk]);
  assert.match(r.stderr, /not a valid PEM public key/);
});
