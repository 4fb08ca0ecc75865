// Issue 13: no round trip from iothubd to iothub-signer blocks the daemon's loop. Each path that
// needs the signer (the DPoP proofs of the token endpoint's requests: device authorization, poll,
// refresh, revocation; KEY_INFO and ATTEST_BEGIN/ANSWER for 'iothubctl register') runs while the
// signer is frozen (SIGSTOP: a signer stuck behind a queue of signatures at a chip's 70 ms each,
// or in a slow TPM command), and meanwhile the control socket ('iothubctl status') and the bulb
// side (a frame committed and acked end to end) answer within BOUND_MS, far below the 10 s that
// the blocking round trips of round 4 could take. After SIGCONT the path completes. Real parts:
// swtpm, mosquitto, oidc-provider (tests/oauth), the reference cloud checking DPoP strictly.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Hub, mqttClient, waitFor, sleep, IOTHUBCTL } from './lib/harness.mjs';
import { Bulb } from './lib/bulb.mjs';
import { deviceLogin } from './lib/login.mjs';
import { startCloud } from '../cloud/server.mjs';
import { startTestbed, stopTestbed, keyBeforeDaemon } from './lib/testbed.mjs';

const HUB_ID = 'test-hub';
const TOKEN = 'tok-signerwait-0123456789';
// Generous: the machine is shared. Round 4's blocking round trips held the loop up to 10 s.
const BOUND_MS = 1000;
const FREEZE_MS = 2000; // at least this long frozen in each test, probing all along
let dir, tpm, broker, auth, cloud, hub, client, bulb;
const worst = { status: 0, ack: 0, probes: 0 };

function overrides({ oauth = true } = {}) {
  const o = {
    key: { backend: 'tpm', tcti: tpm.tcti, handle: '0x81000105' },
    cloud: { url: cloud.url, ca_file: cloud.caFile, batch_max_frames: 20, batch_max_delay_ms: 200, timeout_s: 5 },
  };
  if (oauth) {
    o.oauth = { issuer: auth.issuer, client_id: auth.clientId, scope: 'openid offline_access iothub',
      ca_file: auth.caFile, dpop: 'on' };
  } else {
    o.cloud.bearer_token_file = path.join(dir, 'token');
  }
  return o;
}

// The signer frozen while fn(probe) runs (at least FREEZE_MS), then thawed whatever happens.
// probe(): 'iothubctl status' and one frame, each within BOUND_MS; resolves to the status.
// stopped: the signer is frozen already (SIGSTOP before the daemon started).
// minMs: how long at least (FREEZE_MS), probing all along.
async function frozen(fn, { stopped = false, minMs = FREEZE_MS } = {}) {
  const pid = hub.signerProc.pid;
  const probe = async () => {
    const t0 = performance.now();
    const st = await hub.status();
    const ms = performance.now() - t0;
    worst.status = Math.max(worst.status, ms);
    assert.ok(ms < BOUND_MS, `iothubctl status took ${ms.toFixed(0)} ms with the signer frozen`);
    const t1 = performance.now();
    const f = await bulb.send();
    await waitFor(() => bulb.ackedSeq >= f.seq, BOUND_MS, `the ack of frame ${f.seq} with the signer frozen`);
    worst.ack = Math.max(worst.ack, performance.now() - t1);
    worst.probes++;
    return st;
  };
  if (!stopped) process.kill(pid, 'SIGSTOP');
  const t0 = Date.now();
  try {
    await fn(probe);
    while (Date.now() - t0 < minMs) await probe();
  } finally {
    process.kill(pid, 'SIGCONT');
  }
}

function spawnCtl(args) {
  const p = spawn(IOTHUBCTL, ['--config', hub.configPath, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  p.stdout.on('data', (d) => { out += d; });
  p.stderr.on('data', (d) => { out += d; });
  const done = once(p, 'exit').then(([code]) => ({ code, out }));
  return { proc: p, done };
}

before(async () => {
  ({ dir, tpm, broker, auth } = await startTestbed({ authServer: { interval: 1, accessTokenTtl: 8 } }));
  const hooks = auth.cloudHooks();
  // DPoP checked strictly with the resource server's own nonce (RFC 9449 4.3, 7.1, 9); the fixed
  // token of the last test is alice's too, so that the registration stays hers.
  cloud = await startCloud({
    dir: path.join(dir, 'cloud'),
    dpopNonce: true,
    verifyToken: async (t, req) => (t === TOKEN ? 'alice' : hooks.verifyToken(t, req)),
    verifyDpop: hooks.verifyDpop,
  });
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  await keyBeforeDaemon(broker, overrides());
  hub = await Hub.start(broker, overrides());
  await waitFor(async () => (await hub.status()).key.id, 10000, 'the hub key, named by the signer');
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt');
  bulb = await Bulb.create('wait-bulb', 'ES256');
  const pem = path.join(hub.dir, 'wait-bulb.pem');
  await fs.writeFile(pem, bulb.pem);
  const r = await hub.ctl(['bulb', 'add', bulb.id, '--key', pem]);
  assert.equal(r.code, 0, r.stderr);
  client = await mqttClient(broker.port);
  await bulb.attach(client, { resendMs: 60000 });
  // Signed in with the signer running, so that each test below stands on its own (and fails on
  // its own on a daemon with blocking round trips).
  const r2 = await deviceLogin(hub, auth);
  assert.equal(r2.code, 0, r2.out + r2.err);
});

after(async () => {
  if (hub?.signerProc?.pid) try { process.kill(hub.signerProc.pid, 'SIGCONT'); } catch { /* gone */ }
  bulb?.detach();
  console.log(`# signer frozen: ${worst.probes} probes, worst status ${worst.status.toFixed(0)} ms, ` +
    `worst frame ack ${worst.ack.toFixed(0)} ms (bound ${BOUND_MS} ms)`);
  await stopTestbed({ clients: [client], hub, cloud, auth, broker, tpm, dir });
});

test('sign-in started twice while the signer is frozen: the first ends at once, the second signs in after SIGCONT', async () => {
  const devices0 = auth.state.deviceAuthorizations;
  let first, second;
  await frozen(async (probe) => {
    // The device authorization request waits for its DPoP proof.
    first = spawnCtl(['login']);
    await sleep(300);
    await probe();
    second = deviceLogin(hub, auth);
    const r1 = await first.done;
    assert.notEqual(r1.code, 0, r1.out);
    assert.match(r1.out, /another sign-in started/);
    await probe();
    assert.equal(auth.state.deviceAuthorizations, devices0, 'no device authorization went without its proof');
  });
  const r2 = await second;
  assert.equal(r2.code, 0, r2.out + r2.err + hub.log);
  assert.equal(auth.state.deviceAuthorizations, devices0 + 1, 'the cancelled sign-in sent nothing');
  const st = await hub.status();
  assert.equal(st.oauth.state, 'ok');
  assert.equal(st.oauth.dpop, true, 'a DPoP-bound token');
});

// Issue 14 stage 2: the registration runs in iothub-uplink, and the channel has no cancel (see
// attest.test): a client that hangs up is no longer waited for, and the registration goes on
// once the signer runs again; iothubd records it from the uplink's news.
test('a control client that hangs up while register waits for the signer; the registration goes on after SIGCONT, one at a time', async () => {
  const challenges0 = cloud.state.requests.filter((q) => q.endpoint === 'challenge' || q.endpoint === 'register').length;
  await frozen(async (probe) => {
    // ATTEST_BEGIN (the signer's TPM commands) waits; the client goes away meanwhile.
    const c = spawnCtl(['register']);
    await sleep(300);
    await probe();
    c.proc.kill('SIGINT');
    await c.done;
    await probe();
  });
  await waitFor(() => cloud.state.hubs.get(HUB_ID)?.jwk, 10000, 'registered once the signer runs again');
  assert.ok(cloud.state.requests.filter((q) => q.endpoint === 'challenge' || q.endpoint === 'register').length >
    challenges0);
  await waitFor(async () => (await hub.status()).cloud.registered, 5000, 'recorded from the uplink\'s news');

  let reg;
  await frozen(async (probe) => {
    reg = spawnCtl(['register']);
    await sleep(300);
    await probe();
    const busy = await hub.ctl(['register']);
    assert.notEqual(busy.code, 0, 'one registration at a time');
    assert.match(busy.stdout + busy.stderr, /busy/i);
  });
  const r = await reg.done;
  assert.equal(r.code, 0, r.out + hub.log);
  assert.ok(cloud.state.hubs.get(HUB_ID)?.jwk, 'registered');
});

test('a refresh while the signer is frozen waits for its proof on the loop; it completes after SIGCONT', async () => {
  const refreshes0 = auth.state.refreshes;
  await frozen(async (probe) => {
    // 8 s tokens: refreshed 4 s ahead of expiry.
    await waitFor(async () => (await probe()).oauth.state === 'refreshing', 10000, 'a refresh waiting for its DPoP proof');
    await probe();
    assert.equal(auth.state.refreshes, refreshes0, 'no refresh went without its proof');
  });
  await waitFor(() => auth.state.refreshes > refreshes0, 10000, 'the refresh, once the signer runs again');
  await waitFor(async () => (await hub.status()).oauth.state === 'ok', 5000, 'signed in');
});

test('logout during a refresh: the refresh ends, no token comes back after SIGCONT', async () => {
  const refreshes0 = auth.state.refreshes;
  await frozen(async (probe) => {
    await waitFor(async () => (await probe()).oauth.state === 'refreshing', 10000, 'a refresh waiting for its DPoP proof');
    const r = await hub.ctl(['logout']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal((await probe()).oauth.state, 'login_required');
  });
  await sleep(2000);
  assert.equal(auth.state.refreshes, refreshes0, 'the cancelled refresh never went');
  const st = await hub.status();
  assert.equal(st.oauth.state, 'login_required', JSON.stringify(st.oauth));
});

// The daemon's exit: 0, and no sanitizer report (make asan) in what it wrote.
function assertCleanExit(res) {
  assert.equal(res.code, 0, `iothubd exit ${JSON.stringify(res)}: ${hub.log}`);
  assert.doesNotMatch(hub.log, /Sanitizer|runtime error/);
}

test('the daemon stops while a refresh waits for its proof: it exits at once and cleanly, nothing is called back', async () => {
  const r = await deviceLogin(hub, auth);
  assert.equal(r.code, 0, r.out + r.err);
  let res, stopMs;
  await frozen(async (probe) => {
    await waitFor(async () => (await probe()).oauth.state === 'refreshing', 10000, 'a refresh waiting for its DPoP proof');
    const t0 = performance.now();
    hub.proc.kill('SIGTERM');
    res = await hub.exited;
    stopMs = performance.now() - t0;
  }, { minMs: 0 });
  assertCleanExit(res);
  assert.ok(stopMs < BOUND_MS, `the stop took ${stopMs.toFixed(0)} ms with the signer frozen`);
});

test('register while the signer is frozen before the daemon knows its key (KEY_INFO): it waits on the loop', async () => {
  // Without [oauth]: the fixed token of bearer_token_file, so that only the key is missing.
  await hub.stop();
  await hub.stopSigner();
  hub.overrides = overrides({ oauth: false });
  await hub.writeConfig();
  await hub.startSigner();
  process.kill(hub.signerProc.pid, 'SIGSTOP');
  const registrations0 = cloud.state.registrations.length;
  let reg;
  await frozen(async (probe) => {
    await hub.start({ signer: false });
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt');
    assert.equal((await probe()).key?.id ?? null, null, 'the key not known yet: KEY_INFO waits');
    reg = spawnCtl(['register']);
    await sleep(300);
    await probe();
  }, { stopped: true });
  const r = await reg.done;
  assert.equal(r.code, 0, r.out + hub.log);
  assert.ok((await hub.status()).key.id, 'the key, named by the signer after SIGCONT');
  assert.equal(cloud.state.registrations.length, registrations0 + 1, 'registered once more');
  assert.equal(cloud.state.registrations.at(-1).status, 200);
  assertCleanExit(await hub.stop());
});
