// Self-test of the reference cloud: shows that each of its checks can FAIL, and that each
// failure mode works. Requests are signed here by a tiny RFC 9421 signer written in this
// file from the RFC text (node:crypto only), independent of the server's own code and of
// the http-message-signatures library the server also uses.
//
//   cd tests && node --test cloud/
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { startCloud } from './server.mjs';
import { Bulb } from '../integration/lib/bulb.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const now = () => Math.floor(Date.now() / 1000);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------
// An independent hub: key, RFC 7638 thumbprint, RFC 9530 digest, RFC 9421 signature.

function makeHubKey() {
  const { privateKey, publicKey } = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const { kty, crv, x, y } = publicKey.export({ format: 'jwk' });
  const jwk = { kty, crv, x, y };
  // RFC 7638 3.2: required members in lexicographic order, no whitespace.
  const kid = crypto.createHash('sha256').update(`{"crv":"${crv}","kty":"${kty}","x":"${x}","y":"${y}"}`).digest('base64url');
  return { privateKey, jwk, kid };
}

function sign({ method, target, authorization, body, key, kid, created = now(), expires, nonce, components, alg = 'ecdsa-p256-sha256', label = 'hub' }) {
  const digest = body !== undefined ? `sha-256=:${crypto.createHash('sha256').update(body).digest('base64')}:` : undefined;
  const comps = components ?? (body !== undefined
    ? ['@method', '@target-uri', 'content-digest', 'authorization']
    : ['@method', '@target-uri', 'authorization']);
  const value = { '@method': method, '@target-uri': target, 'content-digest': digest, authorization };
  const params = `(${comps.map((c) => `"${c}"`).join(' ')});created=${created};expires=${expires ?? created + 60}` +
    `;nonce="${nonce ?? crypto.randomBytes(16).toString('base64url')}";keyid="${kid}";alg="${alg}"`;
  const base = [...comps.map((c) => `"${c}": ${value[c]}`), `"@signature-params": ${params}`].join('\n');
  const sig = crypto.sign('sha256', Buffer.from(base), { key, dsaEncoding: 'ieee-p1363' });
  const h = { 'Signature-Input': `${label}=${params}`, Signature: `${label}=:${sig.toString('base64')}:` };
  if (authorization !== undefined) h.Authorization = authorization;
  if (digest) h['Content-Digest'] = digest;
  return h;
}

function httpsRequest(url, { method = 'GET', headers = {}, body, ca, timeoutMs = 30000 }) {
  return new Promise((resolve, reject) => {
    const r = https.request(url, { method, headers, ca, agent: false, timeout: timeoutMs }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        let json;
        try { json = text ? JSON.parse(text) : undefined; } catch { /* not JSON */ }
        resolve({ status: res.statusCode, headers: res.headers, text, json });
      });
    });
    r.on('timeout', () => r.destroy(new Error('client timeout')));
    r.on('error', reject);
    if (body !== undefined) r.write(body);
    r.end();
  });
}

// A signed call as the hub makes it. `tamper` may change headers or body after signing.
async function call(cloud, hub, method, p, { json, token = 'tok-alice', scheme = 'Bearer', signOpts = {}, tamper, key = hub.privateKey, headers: extra = {} } = {}) {
  const target = `${cloud.url}${p}`;
  const body = json === undefined ? undefined : (typeof json === 'string' ? json : JSON.stringify(json));
  const authorization = token === null ? undefined : `${scheme} ${token}`;
  const headers = { ...sign({ method, target, authorization, body, key, kid: hub.kid, ...signOpts }), ...extra };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const req = { headers, body };
  if (tamper) tamper(req);
  return httpsRequest(target, { method, headers: req.headers, body: req.body, ca: fs.readFileSync(cloud.caFile) });
}

const HUB = 'hub-1';
const devicesBody = async (bulbs, revoked = []) => ({
  devices: await Promise.all(bulbs.map(async (b) => {
    const { exportJWK } = await import('jose');
    return { id: b.id, jwk: await exportJWK(b.publicKey), revoked: revoked.includes(b.id) };
  })),
});

async function setup() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloud-selftest-'));
  const cloud = await startCloud({ dir, tokens: { 'tok-alice': 'alice', 'tok-alice-2': 'alice', 'tok-bob': 'bob' } });
  const hub = makeHubKey();
  const reg = await call(cloud, hub, 'POST', `/v1/hubs/${HUB}`, { json: { jwk: hub.jwk } });
  assert.equal(reg.status, 201, reg.text);
  const bulbs = [await Bulb.create('bulb-1'), await Bulb.create('bulb-2'), await Bulb.create('bulb-ed', 'EdDSA'), await Bulb.create('bulb-rev')];
  const dv = await call(cloud, hub, 'PUT', `/v1/hubs/${HUB}/devices`, { json: await devicesBody(bulbs, ['bulb-rev']) });
  assert.equal(dv.status, 200, dv.text);
  return {
    cloud, hub, bulbs, dir,
    status: (frames, o = {}) => call(cloud, hub, 'POST', `/v1/hubs/${HUB}/status`, { json: { frames }, ...o }),
    async close() { await cloud.close(); fs.rmSync(dir, { recursive: true, force: true }); },
  };
}

const failures = (cloud) => ({ ...cloud.state.failures });
function assertRejected(r, kind, before, cloud) {
  assert.equal(r.status, 401, `expected 401 ${kind}, got ${r.status} ${r.text}`);
  assert.equal(r.json?.error, kind, r.text);
  assert.equal((cloud.state.failures[kind] ?? 0) - (before[kind] ?? 0), 1, `failure ${kind} counted once`);
}

// ---------------------------------------------------------------------------------------

describe('test PKI', () => {
  let s;
  before(async () => { s = await setup(); });
  after(() => s.close());

  test('server certificate chains to the CA and names 127.0.0.1 and localhost', async () => {
    const ca = new crypto.X509Certificate(fs.readFileSync(s.cloud.caFile));
    const crt = new crypto.X509Certificate(fs.readFileSync(path.join(s.dir, 'server.pem')));
    assert.ok(crt.verify(ca.publicKey));
    assert.ok(ca.ca);
    assert.match(crt.subjectAltName, /IP Address:127\.0\.0\.1/);
    assert.match(crt.subjectAltName, /DNS:localhost/);
    assert.equal(crt.publicKey.asymmetricKeyDetails.namedCurve, 'prime256v1');
  });

  test('TLS is refused without the test CA, accepted with it by IP and by name', async () => {
    await assert.rejects(httpsRequest(`${s.cloud.url}/v1/hubs/${HUB}/commands`, {}), /self[- ]signed|unable to verify|certificate/i);
    const byName = await httpsRequest(`https://localhost:${s.cloud.port}/nope`, { ca: fs.readFileSync(s.cloud.caFile) });
    assert.equal(byName.status, 404);
  });
});

describe('request checks', () => {
  let s;
  before(async () => { s = await setup(); });
  after(() => s.close());

  test('correctly signed register, devices and status succeed', async () => {
    const { cloud, hub, bulbs } = s;
    const again = await call(cloud, hub, 'POST', `/v1/hubs/${HUB}`, { json: { jwk: hub.jwk }, token: 'tok-alice-2' });
    assert.equal(again.status, 200, 'same account registers again: 200');
    const frames = [await bulbs[0].frame(), await bulbs[1].frame(), await bulbs[2].frame()];
    const r = await s.status(frames);
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.json, { accepted: 3, rejected: [] });
    const stored = cloud.state.frames.slice(-3);
    assert.deepEqual(stored.map((f) => f.jws), frames, 'frames stored byte for byte, in order');
    assert.deepEqual(stored.map((f) => f.dev), ['bulb-1', 'bulb-2', 'bulb-ed']);
    assert.ok(cloud.state.signatures >= 4);
    assert.equal(cloud.state.failures.verifier_disagreement, undefined);
  });

  test('register to another account -> 409', async () => {
    const r = await call(s.cloud, s.hub, 'POST', `/v1/hubs/${HUB}`, { json: { jwk: s.hub.jwk }, token: 'tok-bob' });
    assert.equal(r.status, 409, r.text);
  });

  test('another account cannot use the hub -> 403', async () => {
    const r = await s.status([await s.bulbs[0].frame()], { token: 'tok-bob' });
    assert.equal(r.status, 403, r.text);
  });

  test('register must be signed by the key it registers', async () => {
    const other = makeHubKey();
    const b = failures(s.cloud);
    // body names `other`, request signed by a fresh key with its own kid
    const mallory = makeHubKey();
    const r = await call(s.cloud, mallory, 'POST', '/v1/hubs/hub-2', { json: { jwk: other.jwk } });
    assertRejected(r, 'keyid', b, s.cloud);
    // right keyid, signed by another key
    const b2 = failures(s.cloud);
    const r2 = await call(s.cloud, other, 'POST', '/v1/hubs/hub-2', { json: { jwk: other.jwk }, key: mallory.privateKey });
    assertRejected(r2, 'bad_signature', b2, s.cloud);
    assert.equal(s.cloud.state.hubs.has('hub-2'), false);
  });

  test('signed by a different key -> 401', async () => {
    const b = failures(s.cloud);
    const r = await s.status([await s.bulbs[0].frame()], { key: makeHubKey().privateKey });
    assertRejected(r, 'bad_signature', b, s.cloud);
  });

  test('keyid of another key -> 401', async () => {
    const b = failures(s.cloud);
    const r = await s.status([await s.bulbs[0].frame()], { signOpts: { kid: makeHubKey().kid } });
    assertRejected(r, 'keyid', b, s.cloud);
  });

  test('tampered body (Content-Digest mismatch) -> 401', async () => {
    const b = failures(s.cloud);
    const f = await s.bulbs[0].frame();
    const r = await s.status([f], { tamper: (q) => { q.body = JSON.stringify({ frames: [f, f] }); } });
    assertRejected(r, 'content_digest', b, s.cloud);
  });

  test('body changed and digest recomputed (signature mismatch) -> 401', async () => {
    const b = failures(s.cloud);
    const f = await s.bulbs[0].frame();
    const r = await s.status([f], {
      tamper: (q) => {
        q.body = JSON.stringify({ frames: [f, f] });
        q.headers['Content-Digest'] = `sha-256=:${crypto.createHash('sha256').update(q.body).digest('base64')}:`;
      },
    });
    assertRejected(r, 'bad_signature', b, s.cloud);
  });

  test('missing Content-Digest -> 401', async () => {
    const b = failures(s.cloud);
    const r = await s.status([await s.bulbs[0].frame()], { tamper: (q) => { delete q.headers['Content-Digest']; } });
    assertRejected(r, 'content_digest', b, s.cloud);
  });

  test('expired, future-dated or wrongly-bounded signatures -> 401', async () => {
    let b = failures(s.cloud);
    assertRejected(await s.status([await s.bulbs[0].frame()], { signOpts: { created: now() - 120 } }), 'expired', b, s.cloud);
    b = failures(s.cloud);
    assertRejected(await s.status([await s.bulbs[0].frame()], { signOpts: { created: now() + 30 } }), 'created_future', b, s.cloud);
    b = failures(s.cloud);
    assertRejected(await s.status([await s.bulbs[0].frame()], { signOpts: { expires: now() + 300 } }), 'signature_params', b, s.cloud);
    // 3 s ahead is within the 5 s allowance
    const ok = await s.status([await s.bulbs[0].frame()], { signOpts: { created: now() + 3 } });
    assert.equal(ok.status, 200, ok.text);
  });

  test('reused nonce -> 401', async () => {
    const nonce = crypto.randomBytes(16).toString('base64url');
    const r1 = await s.status([await s.bulbs[0].frame()], { signOpts: { nonce } });
    assert.equal(r1.status, 200, r1.text);
    const b = failures(s.cloud);
    const r2 = await s.status([await s.bulbs[0].frame()], { signOpts: { nonce } });
    assertRejected(r2, 'replay', b, s.cloud);
  });

  test('replayed request byte for byte -> 401', async () => {
    const { cloud, hub } = s;
    const target = `${cloud.url}/v1/hubs/${HUB}/commands`;
    const headers = sign({ method: 'GET', target, authorization: 'Bearer tok-alice', key: hub.privateKey, kid: hub.kid });
    const ca = fs.readFileSync(cloud.caFile);
    assert.equal((await httpsRequest(target, { headers, ca })).status, 204);
    const b = failures(cloud);
    assertRejected(await httpsRequest(target, { headers, ca }), 'replay', b, cloud);
  });

  test('short or non-base64url nonce -> 401', async () => {
    let b = failures(s.cloud);
    assertRejected(await s.status([await s.bulbs[0].frame()], { signOpts: { nonce: crypto.randomBytes(12).toString('base64url') } }), 'nonce_format', b, s.cloud);
    b = failures(s.cloud);
    assertRejected(await s.status([await s.bulbs[0].frame()], { signOpts: { nonce: 'abc+def/ghijklmnopqrstuvwx==' } }), 'nonce_format', b, s.cloud);
  });

  test('missing Authorization, unknown token, other scheme -> 401', async () => {
    const f = await s.bulbs[0].frame();
    let b = failures(s.cloud);
    assertRejected(await s.status([f], { token: null, signOpts: { components: ['@method', '@target-uri', 'content-digest'] } }), 'authorization_missing', b, s.cloud);
    b = failures(s.cloud);
    assertRejected(await s.status([f], { token: 'tok-mallory' }), 'unknown_token', b, s.cloud);
    b = failures(s.cloud);
    assertRejected(await s.status([f], { scheme: 'Basic' }), 'authorization_malformed', b, s.cloud);
    b = failures(s.cloud);
    assertRejected(await s.status([f], { scheme: 'DPoP' }), 'dpop_unsupported', b, s.cloud);
  });

  test('Authorization swapped after signing (covered component) -> 401', async () => {
    const b = failures(s.cloud);
    const r = await s.status([await s.bulbs[0].frame()], { tamper: (q) => { q.headers.Authorization = 'Bearer tok-alice-2'; } });
    assertRejected(r, 'bad_signature', b, s.cloud);
  });

  test('target URI differs from the one signed -> 401', async () => {
    const b = failures(s.cloud);
    const r = await s.status([await s.bulbs[0].frame()], { signOpts: { target: `https://localhost:${s.cloud.port}/v1/hubs/${HUB}/status` } });
    assertRejected(r, 'bad_signature', b, s.cloud);
  });

  test('wrong covered components -> 401', async () => {
    const f = await s.bulbs[0].frame();
    const cases = [
      ['@method', '@target-uri', 'content-digest'], // authorization not covered
      ['@method', '@target-uri', 'authorization', 'content-digest'], // order
      ['@method', '@path', 'content-digest', 'authorization'], // @path instead of @target-uri
      ['@method', '@target-uri', 'content-digest', 'authorization', 'content-type'], // extra
    ];
    for (const components of cases) {
      const b = failures(s.cloud);
      assertRejected(await s.status([f], { signOpts: { components } }), 'components', b, s.cloud);
    }
    // a request without a body must not cover content-digest
    const b = failures(s.cloud);
    const r = await call(s.cloud, s.hub, 'GET', `/v1/hubs/${HUB}/commands`, {
      signOpts: { components: ['@method', '@target-uri', 'content-digest', 'authorization'] },
    });
    assertRejected(r, 'components', b, s.cloud);
  });

  test('wrong label, alg, or extra signatures -> 401', async () => {
    const f = await s.bulbs[0].frame();
    let b = failures(s.cloud);
    assertRejected(await s.status([f], { signOpts: { label: 'sig1' } }), 'signature_input', b, s.cloud);
    b = failures(s.cloud);
    assertRejected(await s.status([f], { signOpts: { alg: 'ecdsa-p384-sha384' } }), 'signature_params', b, s.cloud);
    b = failures(s.cloud);
    assertRejected(await s.status([f], { tamper: (q) => { delete q.headers.Signature; } }), 'signature_missing', b, s.cloud);
    b = failures(s.cloud);
    assertRejected(await s.status([f], {
      tamper: (q) => { q.headers.Signature = q.headers.Signature.replace(/=:(.*):$/, (m, v) => `=:${crypto.createSign('sha256').update('x').sign({ key: s.hub.privateKey, dsaEncoding: 'der' }).toString('base64')}:`); },
    }), 'signature_header', b, s.cloud);
  });

  test('unregistered hub -> 401', async () => {
    const b = failures(s.cloud);
    const r = await call(s.cloud, s.hub, 'GET', '/v1/hubs/hub-unknown/commands');
    assertRejected(r, 'unknown_hub', b, s.cloud);
  });

  test('body checks: content type, JSON, shape, private key material', async () => {
    const f = await s.bulbs[0].frame();
    let r = await s.status([f], { tamper: (q) => { q.headers['Content-Type'] = 'text/plain'; } });
    assert.equal(r.status, 415, r.text);
    r = await call(s.cloud, s.hub, 'POST', `/v1/hubs/${HUB}/status`, { json: '{"frames":["a"],"frames":["b"]}' });
    assert.equal(r.status, 400, r.text);
    assert.match(r.json.error_description, /duplicate/);
    r = await call(s.cloud, s.hub, 'POST', `/v1/hubs/${HUB}/status`, { json: '{"frames":[' });
    assert.equal(r.status, 400, r.text);
    r = await call(s.cloud, s.hub, 'POST', `/v1/hubs/${HUB}/status`, { json: { frames: [] } });
    assert.equal(r.status, 400, r.text);
    const { privateKey } = await import('jose').then((j) => j.generateKeyPair('ES256', { extractable: true }));
    const leaked = await import('jose').then((j) => j.exportJWK(privateKey));
    r = await call(s.cloud, s.hub, 'PUT', `/v1/hubs/${HUB}/devices`, { json: { devices: [{ id: 'x', jwk: leaked, revoked: false }] } });
    assert.equal(r.status, 400, r.text);
    assert.match(r.json.error_description, /private key/);
    assert.equal(s.cloud.state.hubs.get(HUB).devices.size, 4, 'a refused list leaves the old one');
  });

  test('a request signed by an off-the-shelf RFC 9421 library (http-message-signatures) is accepted', async () => {
    const { httpbis, createSigner } = await import('http-message-signatures');
    const { cloud, hub } = s;
    const url = `${cloud.url}/v1/hubs/${HUB}/status`;
    const body = JSON.stringify({ frames: [await s.bulbs[1].frame()] });
    const created = new Date();
    const signed = await httpbis.signMessage({
      key: createSigner(hub.privateKey, 'ecdsa-p256-sha256', hub.kid),
      name: 'hub',
      fields: ['@method', '@target-uri', 'content-digest', 'authorization'],
      params: ['created', 'expires', 'nonce', 'keyid', 'alg'],
      paramValues: { created, expires: new Date(created.getTime() + 60_000), nonce: crypto.randomBytes(16).toString('base64url') },
    }, {
      method: 'POST', url,
      headers: {
        'content-type': 'application/json',
        'content-digest': `sha-256=:${crypto.createHash('sha256').update(body).digest('base64')}:`,
        authorization: 'Bearer tok-alice',
      },
    });
    const r = await httpsRequest(url, { method: 'POST', headers: signed.headers, body, ca: fs.readFileSync(cloud.caFile) });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.json, { accepted: 1, rejected: [] });
  });

  test('every request signature was cross-checked by both verifiers without disagreement', () => {
    assert.equal(s.cloud.state.failures.verifier_disagreement, undefined);
    assert.equal(s.cloud.state.failures.internal, undefined);
  });
});

describe('status frames', () => {
  let s;
  before(async () => { s = await setup(); });
  after(() => s.close());

  test('forged, unknown, revoked and malformed frames get per-frame rejections', async () => {
    const [b1, b2, bed, brev] = s.bulbs;
    const forger = await Bulb.create('bulb-1');
    const stranger = await Bulb.create('bulb-9');
    const good1 = await b1.frame();
    const frames = [
      good1,
      await forger.frame(), // bulb-1 by the wrong key
      await stranger.frame(), // not enrolled
      await brev.frame(), // revoked
      await b2.signRaw('{"alg":"ES256","kid":"bulb-2","typ":"iothub-status","crit":["x"]}', JSON.stringify(b2.payload())), // extra header member
      await b2.signRaw('{"alg":"ES256","kid":"bulb-2","typ":"iothub-status"}', `{"dev":"bulb-2","seq":${b2.seq + 1},"seq":${b2.seq + 2},"iat":${now()},"state":{"on":true}}`), // dup member
      await b2.frame({ dev: 'bulb-1' }), // dev != kid
      'not-a-jws',
      await bed.frame(), // Ed25519, fine
      await b1.signRaw('{"alg":"EdDSA","kid":"bulb-1","typ":"iothub-status"}', JSON.stringify(b1.payload())), // alg not the enrolled key's
      good1.slice(0, -4) + (good1.endsWith('AAAA') ? 'BBBB' : 'AAAA'), // bit flip in the signature
    ];
    const r = await s.status(frames);
    assert.equal(r.status, 200, r.text);
    const reasons = Object.fromEntries(r.json.rejected.map((x) => [x.index, x.reason]));
    assert.deepEqual(reasons, {
      1: 'bad_signature', 2: 'unknown_device', 3: 'revoked', 4: 'malformed', 5: 'malformed',
      6: 'malformed', 7: 'malformed', 9: 'bad_signature', 10: 'bad_signature',
    });
    assert.equal(r.json.accepted, 2);
    assert.deepEqual(s.cloud.state.frames.map((f) => f.jws), [good1, frames[8]]);
  });

  test('duplicate (dev, seq) is accepted but stored once; a different frame with the same seq is refused', async () => {
    const b1 = s.bulbs[0];
    const f = await b1.frame();
    const before = s.cloud.state.frames.length;
    const r1 = await s.status([f, f]);
    assert.deepEqual(r1.json, { accepted: 2, rejected: [] });
    const r2 = await s.status([f]);
    assert.deepEqual(r2.json, { accepted: 1, rejected: [] });
    assert.equal(s.cloud.state.frames.length, before + 1);
    assert.equal(s.cloud.control.framesOf('bulb-1').filter((x) => x.jws === f).length, 1);
    b1.seq--; // same seq, other bytes
    const clash = await b1.frame({ state: { on: false } });
    const r3 = await s.status([clash]);
    assert.deepEqual(r3.json, { accepted: 0, rejected: [{ index: 0, reason: 'replay' }] });
    const last = s.cloud.state.batches.at(-1);
    assert.equal(last.count, 1);
    assert.ok(s.cloud.state.batches.some((x) => x.count === 2 && x.duplicates === 1 && x.stored === 1));
  });

  test('a new devices list applies at once (removed -> unknown_device, revoked -> revoked)', async () => {
    const [b1, b2] = s.bulbs;
    const r = await call(s.cloud, s.hub, 'PUT', `/v1/hubs/${HUB}/devices`, { json: await devicesBody([b1], ['bulb-1']) });
    assert.equal(r.status, 200, r.text);
    const st = await s.status([await b1.frame(), await b2.frame()]);
    assert.deepEqual(st.json.rejected, [{ index: 0, reason: 'revoked' }, { index: 1, reason: 'unknown_device' }]);
    await call(s.cloud, s.hub, 'PUT', `/v1/hubs/${HUB}/devices`, { json: await devicesBody(s.bulbs, ['bulb-rev']) });
  });
});

describe('commands', () => {
  let s;
  before(async () => { s = await setup(); });
  after(() => s.close());

  test('long poll: 204 after wait, 200 as soon as a command is queued, results in order', async () => {
    const { cloud, hub } = s;
    let t = Date.now();
    const empty = await call(cloud, hub, 'GET', `/v1/hubs/${HUB}/commands?wait=1`);
    assert.equal(empty.status, 204);
    assert.ok(Date.now() - t >= 950, 'waited about 1 s');
    t = Date.now();
    const poll = call(cloud, hub, 'GET', `/v1/hubs/${HUB}/commands?wait=30`);
    await sleep(200);
    const exp = now() + 60;
    cloud.control.queueCommand({ id: 'c1', dev: 'bulb-1', set: { on: false }, exp });
    const got = await poll;
    assert.equal(got.status, 200, got.text);
    assert.ok(Date.now() - t < 5000);
    assert.deepEqual(got.json, { commands: [{ id: 'c1', dev: 'bulb-1', set: { on: false }, exp }] });
    // not handed out again while it awaits its result
    assert.equal((await call(cloud, hub, 'GET', `/v1/hubs/${HUB}/commands?wait=0`)).status, 204);
    for (const status of ['delivered', 'acked']) {
      const r = await call(cloud, hub, 'POST', `/v1/hubs/${HUB}/commands/c1/result`, { json: { status, at: now(), detail: 'ok' } });
      assert.equal(r.status, 200, r.text);
    }
    assert.deepEqual(cloud.state.results.map((x) => [x.id, x.status]), [['c1', 'delivered'], ['c1', 'acked']]);
    const bad = await call(cloud, hub, 'POST', `/v1/hubs/${HUB}/commands/c1/result`, { json: { status: 'done', at: now() } });
    assert.equal(bad.status, 400);
    const unknown = await call(cloud, hub, 'POST', `/v1/hubs/${HUB}/commands/zz/result`, { json: { status: 'failed', at: now() } });
    assert.equal(unknown.status, 404);
  });

  test('a command already queued is returned at once; wait is capped', async () => {
    s.cloud.control.queueCommand({ id: 'c2', dev: 'bulb-2', set: { bri: 10 } });
    const r = await call(s.cloud, s.hub, 'GET', `/v1/hubs/${HUB}/commands?wait=600`);
    assert.equal(r.status, 200);
    assert.equal(r.json.commands[0].id, 'c2');
    const bad = await call(s.cloud, s.hub, 'GET', `/v1/hubs/${HUB}/commands?wait=abc`);
    assert.equal(bad.status, 400);
  });
});

describe('failure modes', () => {
  let s;
  before(async () => { s = await setup(); });
  after(() => s.close());
  const frame = () => s.bulbs[0].frame();

  test('503 for the next n status POSTs, then normal', async () => {
    await s.cloud.control.fail({ status: 503, count: 2 });
    assert.equal((await s.status([await frame()])).status, 503);
    // other endpoints are not affected
    assert.equal((await call(s.cloud, s.hub, 'GET', `/v1/hubs/${HUB}/commands`)).status, 204);
    assert.equal((await s.status([await frame()])).status, 503);
    assert.equal((await s.status([await frame()])).status, 200);
    assert.equal(s.cloud.state.injected['503'], 2);
  });

  test('429 with Retry-After', async () => {
    await s.cloud.control.fail({ status: 429, retryAfter: 3, count: 1 });
    const r = await s.status([await frame()]);
    assert.equal(r.status, 429);
    assert.equal(r.headers['retry-after'], '3');
  });

  test('401 and 400', async () => {
    await s.cloud.control.fail({ status: 401, count: 1 });
    assert.equal((await s.status([await frame()])).status, 401);
    await s.cloud.control.fail({ status: 400, count: 1 });
    assert.equal((await s.status([await frame()])).status, 400);
    assert.equal((await s.status([await frame()])).status, 200);
  });

  test('slow responses', async () => {
    await s.cloud.control.fail({ delayMs: 700, count: 1 });
    const t = Date.now();
    const r = await s.status([await frame()]);
    assert.equal(r.status, 200);
    assert.ok(Date.now() - t >= 690, `took ${Date.now() - t} ms`);
  });

  test('drop: socket destroyed without an answer (before or after storing)', async () => {
    await s.cloud.control.fail({ drop: true, count: 1 });
    const f1 = await frame();
    await assert.rejects(s.status([f1]), /socket hang up|ECONNRESET/);
    assert.equal(s.cloud.state.frames.some((x) => x.jws === f1), false);
    await s.cloud.control.fail({ drop: true, after: true, count: 1 });
    const f2 = await frame();
    await assert.rejects(s.status([f2]), /socket hang up|ECONNRESET/);
    assert.equal(s.cloud.state.frames.some((x) => x.jws === f2), true, 'stored before the drop');
    const again = await s.status([f2]);
    assert.deepEqual(again.json, { accepted: 1, rejected: [] }, 'the retry is a duplicate: accepted');
    assert.equal(s.cloud.state.frames.filter((x) => x.jws === f2).length, 1);
  });

  test('rejectFrames by index and by predicate', async () => {
    await s.cloud.control.fail({ rejectFrames: [1], reason: 'quota', count: 1 });
    const fs1 = [await frame(), await frame(), await frame()];
    const r = await s.status(fs1);
    assert.deepEqual(r.json, { accepted: 2, rejected: [{ index: 1, reason: 'quota' }] });
    await s.cloud.control.fail({ rejectFrames: ({ seq }) => seq % 2 === 0, count: 1 });
    const fs2 = [await frame(), await frame()];
    const r2 = await s.status(fs2);
    assert.equal(r2.json.accepted, 1);
    assert.equal(r2.json.rejected[0].reason, 'rejected_by_test');
    const f3 = [await frame(), await s.bulbs[1].frame(), await frame()];
    await s.cloud.control.fail({ rejectFrames: { dev: 'bulb-2' }, reason: 'quota', count: 1 });
    assert.deepEqual((await s.status(f3)).json, { accepted: 2, rejected: [{ index: 1, reason: 'quota' }] });
    assert.equal(s.cloud.state.frames.some((x) => x.jws === f3[1]), false, 'a rejected frame is not stored');
  });

  test('down stops accepting connections; up re-opens the same port', async () => {
    await s.cloud.control.down();
    await assert.rejects(s.status([await frame()]), /ECONNREFUSED/);
    await s.cloud.control.up();
    const r = await s.status([await frame()]);
    assert.equal(r.status, 200);
  });

  test('down cuts a long poll in progress', async () => {
    const poll = call(s.cloud, s.hub, 'GET', `/v1/hubs/${HUB}/commands?wait=20`);
    await sleep(200);
    await s.cloud.control.down();
    await assert.rejects(poll, /socket hang up|ECONNRESET/);
    await s.cloud.control.up();
  });

  test('injection on another endpoint, and until cleared', async () => {
    await s.cloud.control.fail({ status: 503, endpoint: 'commands', count: -1 });
    for (let i = 0; i < 3; i++) assert.equal((await call(s.cloud, s.hub, 'GET', `/v1/hubs/${HUB}/commands`)).status, 503);
    assert.equal((await s.status([await frame()])).status, 200);
    s.cloud.control.clearFailures();
    assert.equal((await call(s.cloud, s.hub, 'GET', `/v1/hubs/${HUB}/commands`)).status, 204);
  });
});

describe('CLI and control API', () => {
  test('node cloud/server.mjs prints {url, caFile}; the control API injects failures', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloud-cli-'));
    const child = spawn(process.execPath, [path.join(here, 'server.mjs'), '--port', '0', '--dir', dir, '--token', 'tok-alice=alice'], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      const line = await new Promise((resolve, reject) => {
        readline.createInterface({ input: child.stdout }).once('line', resolve);
        child.once('exit', (c) => reject(new Error(`cloud exited ${c}`)));
      });
      const info = JSON.parse(line);
      assert.match(info.url, /^https:\/\/127\.0\.0\.1:\d+$/);
      assert.equal(info.caFile, path.join(dir, 'ca.pem'));
      const cloud = { url: info.url, caFile: info.caFile };
      const hub = makeHubKey();
      assert.equal((await call(cloud, hub, 'POST', `/v1/hubs/${HUB}`, { json: { jwk: hub.jwk } })).status, 201);
      const ctl = (p, body) => fetch(`${info.controlUrl}${p}`, { method: body ? 'POST' : 'GET', body: body && JSON.stringify(body) }).then((r) => r.json());
      await ctl('/control/fail', { mode: { status: 503, count: 1, endpoint: 'any' } });
      assert.equal((await call(cloud, hub, 'GET', `/v1/hubs/${HUB}/commands`)).status, 503);
      await ctl('/control/commands', { id: 'k1', dev: 'bulb-1', set: { on: true } });
      const got = await call(cloud, hub, 'GET', `/v1/hubs/${HUB}/commands?wait=5`);
      assert.equal(got.json.commands[0].id, 'k1');
      await ctl('/control/fail', { mode: 'down' });
      await assert.rejects(call(cloud, hub, 'GET', `/v1/hubs/${HUB}/commands`), /ECONNREFUSED/);
      await ctl('/control/up', {});
      assert.equal((await call(cloud, hub, 'GET', `/v1/hubs/${HUB}/commands`)).status, 204);
      const st = await ctl('/control/state');
      assert.equal(st.hubs[0].id, HUB);
      assert.equal(st.injected['503'], 1);
      assert.ok(st.signatures >= 4);
    } finally {
      child.kill('SIGTERM');
      await new Promise((r) => (child.exitCode !== null ? r() : child.once('exit', r)));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

// ---------------------------------------------------------------------------------------
// DPoP (RFC 9449) at the resource server: every check of the strict reference cloud can fail.
// Proofs are made here with jose (../oauth/dpop.mjs createDpopProof), tokens bound to a key by
// the verifyDpop hook (as the cloudHooks of the OAuth test server do with introspection).

describe('DPoP-bound tokens (RFC 9449 4.3, 7.1, 9)', () => {
  let cloud, hub, dir, key, other;
  const HUBD = 'hub-dpop';
  const TOKEN = 'tok-dpop-alice';
  const pollPath = `/v1/hubs/${HUBD}/commands?wait=0`;
  let dpopLib;

  before(async () => {
    dpopLib = await import('../oauth/dpop.mjs');
    key = await dpopLib.generateDpopKey();
    other = await dpopLib.generateDpopKey();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloud-selftest-dpop-'));
    cloud = await startCloud({
      dir, tokens: { 'tok-alice': 'alice' },
      verifyDpop: ({ token, jkt }) => (token === TOKEN && jkt === key.jkt ? 'alice' : null),
    });
    hub = makeHubKey();
    const reg = await call(cloud, hub, 'POST', `/v1/hubs/${HUBD}`, { json: { jwk: hub.jwk } });
    assert.equal(reg.status, 201, reg.text);
  });
  after(async () => { await cloud.close(); fs.rmSync(dir, { recursive: true, force: true }); });

  // A long poll with a DPoP-bound token; `proof` overrides the claims of a correct proof.
  async function poll({ proof = {}, withKey = key, headers } = {}) {
    const htu = `${cloud.url}/v1/hubs/${HUBD}/commands`;
    const p = await dpopLib.createDpopProof(withKey, { method: 'GET', htu, accessToken: TOKEN, ...proof });
    return call(cloud, hub, 'GET', pollPath, { token: TOKEN, scheme: 'DPoP', headers: headers ?? { DPoP: p } });
  }
  const challenge = (r) => r.headers['www-authenticate'] ?? '';

  test('a correct proof (htu without the query, RFC 9449 4.2) is accepted', async () => {
    const r = await poll();
    assert.equal(r.status, 204, r.text);
    assert.equal(cloud.state.dpop.htus.at(-1), `${cloud.url}/v1/hubs/${HUBD}/commands`);
  });

  test('htu carrying the query or a fragment -> 401 invalid_dpop_proof (RFC 9449 4.2, 4.3 check 9)', async () => {
    for (const htu of [`${cloud.url}${pollPath}`, `${cloud.url}/v1/hubs/${HUBD}/commands#f`, `${cloud.url}/v1/hubs/other/commands`]) {
      const b = failures(cloud);
      const r = await poll({ proof: { htu } });
      assertRejected(r, 'dpop_htu', b, cloud);
      assert.match(challenge(r), /^DPoP .*error="invalid_dpop_proof"/);
    }
  });

  test('htm of another method -> 401 (RFC 9449 4.3 check 8)', async () => {
    const b = failures(cloud);
    assertRejected(await poll({ proof: { method: 'POST' } }), 'dpop_htm', b, cloud);
  });

  test('ath missing or of another token -> 401 (RFC 9449 4.3 check 11)', async () => {
    let b = failures(cloud);
    assertRejected(await poll({ proof: { accessToken: 'another-token' } }), 'dpop_ath', b, cloud);
    b = failures(cloud);
    assertRejected(await poll({ proof: { accessToken: undefined } }), 'dpop_ath', b, cloud);
  });

  test('a proof used twice (same jti) -> 401 the second time (RFC 9449 11.1)', async () => {
    const p = await dpopLib.createDpopProof(key, { method: 'GET', htu: `${cloud.url}/v1/hubs/${HUBD}/commands`, accessToken: TOKEN });
    assert.equal((await poll({ headers: { DPoP: p } })).status, 204);
    const b = failures(cloud);
    assertRejected(await poll({ headers: { DPoP: p } }), 'dpop_replay', b, cloud);
  });

  test('iat outside the window, past or future -> 401 (RFC 9449 4.3 check 10)', async () => {
    for (const iat of [now() - 120, now() + 120]) {
      const b = failures(cloud);
      assertRejected(await poll({ proof: { iat } }), 'dpop_iat', b, cloud);
    }
  });

  test('bad signature, no proof, or a key the token is not bound to -> 401', async () => {
    let b = failures(cloud);
    const p = await dpopLib.createDpopProof(key, { method: 'GET', htu: `${cloud.url}/v1/hubs/${HUBD}/commands`, accessToken: TOKEN });
    const [h, c, s] = p.split('.');
    const bad = `${h}.${c}.${s.slice(0, -4)}${s.slice(-4) === 'AAAA' ? 'BBBB' : 'AAAA'}`;
    assertRejected(await poll({ headers: { DPoP: bad } }), 'dpop_signature', b, cloud);
    b = failures(cloud);
    assertRejected(await poll({ headers: {} }), 'dpop', b, cloud);
    b = failures(cloud);
    const r = await poll({ withKey: other });
    assertRejected(r, 'dpop_token', b, cloud);
    assert.match(challenge(r), /error="invalid_token"/);
  });

  test('the server\'s own nonce: use_dpop_nonce with DPoP-Nonce, then accepted with it (RFC 9449 9)', async () => {
    const n1 = cloud.control.rotateDpopNonce();
    try {
      let b = failures(cloud);
      let r = await poll();
      assertRejected(r, 'dpop_use_nonce', b, cloud);
      assert.match(challenge(r), /^DPoP .*error="use_dpop_nonce"/);
      assert.equal(r.headers['dpop-nonce'], n1);
      assert.equal((await poll({ proof: { nonce: n1 } })).status, 204);
      const n2 = cloud.control.rotateDpopNonce();
      b = failures(cloud);
      r = await poll({ proof: { nonce: n1 } });
      assertRejected(r, 'dpop_use_nonce', b, cloud);
      assert.equal(r.headers['dpop-nonce'], n2);
      assert.equal((await poll({ proof: { nonce: n2 } })).status, 204);
    } finally {
      cloud.control.rotateDpopNonce(null);
    }
  });

  test('a new nonce in a successful answer (newDpopNonce, RFC 9449 8.2): the old one is refused after it', async () => {
    const n1 = cloud.control.rotateDpopNonce();
    try {
      await cloud.control.fail({ newDpopNonce: true, endpoint: 'commands' });
      let r = await poll({ proof: { nonce: n1 } });
      assert.equal(r.status, 204, r.text);
      const n2 = r.headers['dpop-nonce'];
      assert.ok(n2 && n2 !== n1, `a new nonce: ${n2}`);
      assert.equal(cloud.state.dpop.nonceRotations, 1);
      const b = failures(cloud);
      r = await poll({ proof: { nonce: n1 } });
      assertRejected(r, 'dpop_use_nonce', b, cloud);
      assert.equal(r.headers['dpop-nonce'], n2);
      r = await poll({ proof: { nonce: n2 } });
      assert.equal(r.status, 204, r.text);
      assert.equal(r.headers['dpop-nonce'], undefined, 'only the rule\'s answer carries one');
    } finally {
      cloud.control.rotateDpopNonce(null);
    }
  });
});
