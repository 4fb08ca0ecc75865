// Sign-in (issue 5), against a real authorization server (oidc-provider, tests/oauth/): the
// device grant run by the daemon for iothubctl, tokens sealed by the TPM, refresh with
// rotation, revocation leading to login_required without losing a frame, DPoP with the hub
// key, and no secret in the log or in clear on disk.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import path from 'node:path';
import readline from 'node:readline';
import { Broker, Hub, Swtpm, IOTHUBCTL, mqttClient, tempDir, waitFor, sleep } from './lib/harness.mjs';
import { Bulb } from './lib/bulb.mjs';
import { startCloud } from '../cloud/server.mjs';
import { startAuthServer } from '../oauth/server.mjs';

const PREFIX = 'iothub/v1/bulbs';
let dir, tpm, broker, auth, cloud, hub, client, bulb;
const seenTokens = new Set();

function overrides(t, as, extra = {}) {
  return {
    key: { backend: 'tpm', tcti: t.tcti },
    cloud: { url: cloud.url, ca_file: cloud.caFile, batch_max_delay_ms: 200, timeout_s: 5 },
    oauth: { issuer: as.issuer, client_id: as.clientId, scope: 'openid offline_access iothub', ca_file: as.caFile,
      dpop: 'auto', ...extra },
  };
}

async function keyInit(h) {
  const r = await h.ctl(['key', 'init']);
  assert.equal(r.code, 0, r.stderr);
}

// Runs 'iothubctl login' the way a user would, and plays the user at the provider.
async function login(h, as, { act = 'approve', delayMs = 0 } = {}) {
  const p = spawn(IOTHUBCTL, ['--config', h.configPath, 'login'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stderr.on('data', (d) => { err += d; });
  const rl = readline.createInterface({ input: p.stdout });
  const code = await new Promise((resolve, reject) => {
    let next = false;
    rl.on('line', (l) => {
      out += `${l}\n`;
      if (next && l.trim()) { resolve(l.trim()); next = false; }
      if (/enter the code/.test(l)) next = true;
    });
    p.once('exit', () => reject(new Error(`iothubctl login exited early: ${out} ${err}`)));
  });
  if (delayMs) await sleep(delayMs);
  if (act === 'approve') await as.approve(code, { account: 'alice' });
  else if (act === 'deny') await as.deny(code);
  const [exitCode] = await once(p, 'exit');
  return { code: exitCode, out, err, userCode: code };
}

before(async () => {
  dir = await tempDir();
  await fs.chmod(dir, 0o755);
  tpm = await Swtpm.start(path.join(dir, 'tpm'));
  broker = await Broker.start(dir);
  auth = await startAuthServer({ dir: path.join(dir, 'as'), accessTokenTtl: 8, interval: 1 });
  const hooks = auth.cloudHooks();
  cloud = await startCloud({
    dir: path.join(dir, 'cloud'),
    verifyToken: async (t, req) => { seenTokens.add(t); return hooks.verifyToken(t, req); },
    verifyDpop: async (a) => { seenTokens.add(a.token); return hooks.verifyDpop(a); },
  });
  const pre = new Hub(await tempDir(), broker, {});
  pre.overrides = overrides(tpm, auth);
  await pre.writeConfig();
  await keyInit(pre);
  await fs.rm(pre.dir, { recursive: true, force: true });
  hub = await Hub.start(broker, overrides(tpm, auth));
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt');
  client = await mqttClient(broker.port);
  bulb = await Bulb.create('oauth-bulb', 'ES256');
  const f = path.join(hub.dir, 'b.pem');
  await fs.writeFile(f, bulb.pem);
  assert.equal((await hub.ctl(['bulb', 'add', bulb.id, '--key', f])).code, 0);
});

after(async () => {
  await client?.endAsync();
  await hub?.cleanup();
  await cloud?.close();
  await auth?.close();
  await broker?.stop();
  await tpm?.stop();
  await fs.rm(dir, { recursive: true, force: true });
});

async function publish(n) {
  const sent = [];
  for (let i = 0; i < n; i++) {
    const jws = await bulb.frame();
    sent.push(bulb.seq);
    await client.publishAsync(`${PREFIX}/${bulb.id}/status`, jws, { qos: 1 });
  }
  return sent;
}

const atCloud = (seqs) => seqs.every((s) => cloud.state.frames.some((f) => f.dev === bulb.id && f.seq === s));

test('before sign-in: login_required, frames spool, nothing is uploaded', async () => {
  await waitFor(async () => (await hub.status()).oauth?.state === 'login_required', 5000, 'login_required');
  const seqs = await publish(3);
  await sleep(500);
  const st = await hub.status();
  assert.equal(st.spool.pending, 3);
  assert.ok(!atCloud(seqs));
  assert.match(st.oauth.last_error, /iothubctl login/);
  assert.ok(hub.notifications.some((l) => l.includes('sign-in required')), 'STATUS= says so');
});

test('login: device grant with pending polls, then the daemon uploads with a DPoP-bound token', async () => {
  const pending0 = auth.state.pending;
  const r = await login(hub, auth, { delayMs: 2500 });
  assert.equal(r.code, 0, `${r.out} ${r.err}`);
  assert.match(r.out, /Signed in/);
  assert.match(r.out, /https:\/\/127\.0\.0\.1:\d+/);
  assert.ok(auth.state.pending > pending0, 'the daemon polled while the user had not approved yet');
  const st = await hub.status();
  assert.equal(st.oauth.state, 'ok', `cloud refusals: ${JSON.stringify(cloud.state.failureLog.slice(-3))}; log: ${hub.log}`);
  assert.equal(st.oauth.dpop, true);
  assert.ok(st.oauth.expires_at > Date.now() / 1000);
  const reg = await hub.ctl(['register']);
  assert.equal(reg.code, 0, reg.stderr);
  assert.equal(cloud.state.hubs.get('test-hub').account, 'alice');
  const seqs = await publish(5);
  await waitFor(() => atCloud([1, 2, 3, ...seqs]), 10000, 'frames spooled before and after sign-in at the cloud');
  assert.ok(auth.state.dpopProofs > 0);
});

test('the access token is refreshed before it expires (with rotation)', async () => {
  const refreshes0 = auth.state.refreshes;
  await waitFor(() => auth.state.refreshes > refreshes0, 15000, 'a refresh');
  await waitFor(() => auth.state.refreshes > refreshes0 + 1, 15000, 'a second refresh, with the rotated token');
  assert.equal(auth.state.refreshFailures, 0);
  const seqs = await publish(2);
  await waitFor(() => atCloud(seqs), 10000, 'uploads go on');
});

test('stored tokens: sealed by the TPM, nothing in clear, useless on another TPM', async () => {
  const enc = await fs.readFile(path.join(hub.stateDir, 'tokens.enc'));
  const key = await fs.readFile(path.join(hub.stateDir, 'tokens.key'));
  assert.ok(seenTokens.size > 0);
  for (const t of seenTokens) {
    assert.ok(!enc.includes(Buffer.from(t)), 'no access token in clear in tokens.enc');
    assert.ok(!key.includes(Buffer.from(t)));
  }
  assert.ok(!enc.includes(Buffer.from('refresh_token')), 'no JSON in clear');
  for (const f of ['tokens.enc', 'tokens.key']) assert.equal((await fs.stat(path.join(hub.stateDir, f))).mode & 0o777, 0o600);
  // A copied SD card: the same files, another TPM (with a hub key of its own).
  const other = await Swtpm.start(path.join(dir, 'tpm2'));
  const h2dir = await tempDir();
  await fs.chmod(h2dir, 0o755);
  const h2 = new Hub(h2dir, broker, {});
  h2.overrides = overrides(other, auth);
  await fs.mkdir(h2.stateDir, { mode: 0o700 });
  await fs.copyFile(path.join(hub.stateDir, 'tokens.enc'), path.join(h2.stateDir, 'tokens.enc'));
  await fs.copyFile(path.join(hub.stateDir, 'tokens.key'), path.join(h2.stateDir, 'tokens.key'));
  await h2.writeConfig();
  await keyInit(h2);
  await h2.start();
  try {
    const st = await h2.status();
    assert.equal(st.oauth.state, 'login_required');
    assert.match(st.oauth.last_error, /stored tokens unusable/);
  } finally {
    await h2.cleanup();
    await other.stop();
  }
});

test('a revoked grant leads to login_required; nothing is lost; uploads resume after a new login', async () => {
  await auth.revokeGrant('alice');
  const seqs = await publish(4);
  await waitFor(async () => (await hub.status()).oauth.state === 'login_required', 20000, 'login_required');
  await waitFor(() => /Sign-in required/.test(hub.log), 2000, 'logged');
  assert.equal(hub.log.match(/Sign-in required/g).length, 1, 'logged once');
  const more = await publish(3);
  await sleep(300);
  assert.ok((await hub.status()).spool.pending >= 3, 'frames keep spooling');
  const r = await login(hub, auth);
  assert.equal(r.code, 0, r.err);
  await waitFor(() => atCloud([...seqs, ...more]), 15000, 'every frame delivered after the new login');
});

test('login: denial and slow_down end as RFC 8628 says', async () => {
  const denied = await login(hub, auth, { act: 'deny' });
  assert.equal(denied.code, 1);
  assert.match(denied.err, /denied/);
  assert.equal((await hub.status()).oauth.state, 'ok', 'the previous sign-in stays');
});

test('login: an expired code, and slow_down, with a stricter server', async () => {
  const t2 = await Swtpm.start(path.join(dir, 'tpm3'));
  const as2 = await startAuthServer({ dir: path.join(dir, 'as2'), deviceCodeTtl: 5, interval: 1, slowDownToleranceMs: -2000 });
  const h = new Hub(await tempDir(), broker, {});
  await fs.chmod(h.dir, 0o755);
  h.overrides = overrides(t2, as2);
  await fs.mkdir(h.stateDir, { mode: 0o700 });
  await h.writeConfig();
  await keyInit(h);
  await h.start();
  try {
    const r = await login(h, as2, { act: 'none' });
    assert.equal(r.code, 1);
    assert.match(r.err, /expired/);
    assert.ok(as2.state.slowDowns >= 1, `the server said slow_down and the daemon slowed down: ${JSON.stringify(as2.state.log)}`);
    assert.equal((await h.status()).oauth.state, 'login_required');
  } finally {
    await h.cleanup();
    await as2.close();
    await t2.stop();
  }
});

test('logout revokes the refresh token and erases the stored tokens', async () => {
  const rev0 = auth.state.revocations;
  const r = await hub.ctl(['logout']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(auth.state.revocations, rev0 + 1);
  await assert.rejects(fs.stat(path.join(hub.stateDir, 'tokens.enc')));
  await assert.rejects(fs.stat(path.join(hub.stateDir, 'tokens.key')));
  assert.equal((await hub.status()).oauth.state, 'login_required');
});

test('no token ever reaches the log or stderr', async () => {
  for (const t of seenTokens) assert.ok(!hub.log.includes(t));
  assert.ok(!/eyJ[\w-]{20,}\.[\w-]{20,}/.test(hub.log), 'nothing that looks like a JWT in the log');
});
