// Hub key attestation at registration (issue 16, PROTOCOL.md 5, iothub-protocol(7)
// "Attestation"): two software TPMs manufactured by swtpm_setup with EK certificates from a local
// test CA, the real daemon, and the reference cloud verifying with its own code (tests/cloud/
// attest.mjs). The cloud's hooks stand for an attacker who controls what a hub sends: each
// refusal is checked by the reason the cloud gives.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { Broker, Hub, IOTHUBCTL, Swtpm, sleep, tempDir, waitFor } from './lib/harness.mjs';
import { SlowTpm } from './lib/slowtpm.mjs';
import { startCloud } from '../cloud/server.mjs';
import { parseCertifyInfo, parseEccPublic } from '../cloud/attest.mjs';
import { stopTestbed, keyBeforeDaemon } from './lib/testbed.mjs';

const run = promisify(execFile);
const TOKEN = 'tok-attest-test-0123456789';
const HANDLE = '0x81000101'; // not 0x81010001: swtpm_setup keeps the EK there (TCG provisioning guidance)
let dir, tpmA, tpmB, broker, cloud, hubA, hubB, hubF, ca;

const tpmKey = (tpm) => ({ backend: 'tpm', tcti: tpm.tcti, handle: HANDLE });
const cloudConf = () => ({ url: cloud.url, ca_file: cloud.caFile, bearer_token_file: path.join(dir, 'token'), timeout_s: 10 });

async function startHub(id, key) {
  const overrides = { hub: { id }, key, cloud: cloudConf() };
  if (key.backend === 'tpm') await keyBeforeDaemon(broker, overrides);
  const h = await Hub.start(broker, overrides);
  if (key.backend === 'file') {
    const r = await h.ctl(['key', 'init']);
    assert.equal(r.code, 0, r.stderr);
    await h.restart();
  }
  return h;
}

const lastFailure = () => cloud.state.failureLog.at(-1);
const seenOf = (hub) => cloud.attest.state.seen.filter((s) => s.hub === hub);

before(async () => {
  dir = await tempDir();
  await fs.chmod(dir, 0o755);
  const caDir = path.join(dir, 'tpm-ca');
  tpmA = await Swtpm.start(path.join(dir, 'tpmA'), { ekCa: caDir });
  tpmB = await Swtpm.start(path.join(dir, 'tpmB'), { ekCa: caDir });
  ca = { root: path.join(caDir, 'swtpm-localca-rootca-cert.pem'), issuer: path.join(caDir, 'issuercert.pem') };
  broker = await Broker.start(dir);
  cloud = await startCloud({
    dir: path.join(dir, 'cloud'),
    tokens: { [TOKEN]: 'alice' },
    attestation: { trustedRoots: [await fs.readFile(ca.root)], intermediates: [await fs.readFile(ca.issuer)], require: true },
  });
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  hubA = await startHub('hub-a', tpmKey(tpmA));
  hubB = await startHub('hub-b', tpmKey(tpmB));
  hubF = await startHub('hub-f', { backend: 'file', file: path.join(dir, 'hub-f.key') });
});

after(async () => {
  await hubB?.cleanup();
  await hubF?.cleanup();
  await tpmB?.stop();
  await stopTestbed({ hub: hubA, cloud, broker, tpm: tpmA, dir });
});

test('a TPM key registers with evidence the cloud verifies; five times in a row (every object flushed)', async () => {
  for (let i = 0; i < 5; i++) {
    const r = await hubA.ctl(['register']);
    assert.equal(r.code, 0, `registration ${i + 1}: ${r.stdout}${r.stderr}\n${hubA.log}`);
  }
  const h = cloud.state.hubs.get('hub-a');
  assert.equal(h.attested.ekIssuer, 'CN=swtpm-localca');
  assert.equal(cloud.attest.state.verified, 5);
  // What the cloud took: the certified object is the registered key, with the attributes that
  // keep it in its TPM, certified with the nonce of the challenge.
  const { attestation } = seenOf('hub-a').at(-1);
  const key = parseEccPublic(Buffer.from(attestation.key_public, 'base64url'), 'key_public');
  assert.equal(Buffer.from(key.x).toString('base64url'), h.jwk.x);
  const info = parseCertifyInfo(Buffer.from(attestation.certify_info, 'base64url'));
  assert.deepEqual(info.name, key.name);
  assert.equal(info.extraData.toString('base64url'), attestation.nonce);
  // A swtpm (libtpms) has 3 transient object slots: a leak would have failed by the third run.
});

test('a file-backed key registers without evidence, and a cloud that requires attestation refuses it', async () => {
  const before = cloud.state.registrations.length;
  const r = await hubF.ctl(['register']);
  assert.notEqual(r.code, 0, r.stdout);
  assert.match(r.stdout + r.stderr, /HTTP 403: attestation_required/);
  assert.equal(lastFailure().kind, 'attestation_required');
  assert.equal(cloud.state.registrations.length, before);
  assert.ok(!cloud.state.hubs.has('hub-f'));
  assert.equal(seenOf('hub-f').length, 0, 'no evidence sent for a file key');
  // A cloud that does not require attestation takes it, marked as not attested.
  cloud.attest.require = false;
  try {
    const ok = await hubF.ctl(['register']);
    assert.equal(ok.code, 0, ok.stdout + ok.stderr);
    assert.equal(cloud.state.hubs.get('hub-f').attested, null);
  } finally {
    cloud.attest.require = true;
  }
});

test('a replayed challenge is refused: the earlier evidence as it was, and with the new nonce', async () => {
  const old = seenOf('hub-a').at(-1).attestation;
  try {
    cloud.attest.hooks.evidence = () => old;
    let r = await hubA.ctl(['register']);
    assert.notEqual(r.code, 0);
    assert.match(r.stdout + r.stderr, /HTTP 403: attest_replay/);
    assert.match(lastFailure().message, /no open challenge has this nonce/);

    cloud.attest.hooks.evidence = (att) => ({ ...old, nonce: att.nonce });
    r = await hubA.ctl(['register']);
    assert.notEqual(r.code, 0);
    assert.match(r.stdout + r.stderr, /HTTP 403: attest_replay/);
    assert.match(lastFailure().message, /extraData is another nonce/);
  } finally {
    cloud.attest.hooks.evidence = null;
  }
  const r = await hubA.ctl(['register']);
  assert.equal(r.code, 0, r.stdout + r.stderr);
});

test('a key from another TPM: TPM B\'s EK certificate for the key of TPM A yields no credential', async () => {
  const b = await hubB.ctl(['register']);
  assert.equal(b.code, 0, b.stdout + b.stderr);
  const ekB = seenOf('hub-b').at(-1).attestation.ek_cert;
  const ekA = seenOf('hub-a').at(-1).attestation.ek_cert;
  assert.notEqual(ekA, ekB);
  const registrations = cloud.state.registrations.length, seen = cloud.attest.state.seen.length;
  const challenges = cloud.attest.state.challenges;
  try {
    // The hub of TPM A presents TPM B's certificate (public, and vouched for by the CA): the
    // cloud encrypts the credential to TPM B's EK, which TPM A cannot use.
    cloud.attest.hooks.challenge = (body) => ({ ...body, ek_cert: ekB });
    const r = await hubA.ctl(['register']);
    assert.notEqual(r.code, 0);
    // The TPM's refusal reaches the daemon as the signer's -ENOKEY (iothub-signer(8)); its decoded
    // text when the signer keeps it as its last error.
    assert.match(r.stdout + r.stderr, /attestation failed: (.*while activating the cloud's credential|signer: Required key not available)/);
  } finally {
    cloud.attest.hooks.challenge = null;
  }
  assert.equal(cloud.attest.state.challenges, challenges + 1);
  assert.equal(cloud.attest.state.seen.length, seen, 'no evidence could be made');
  assert.equal(cloud.state.registrations.length, registrations);

  // And the other way round at the cloud: TPM A's evidence with TPM B's AK is not what the
  // credential was made for.
  const akB = seenOf('hub-b').at(-1).attestation.ak_public;
  try {
    cloud.attest.hooks.evidence = (att) => ({ ...att, ak_public: akB });
    const r = await hubA.ctl(['register']);
    assert.match(r.stdout + r.stderr, /HTTP 403: attest_challenge_mismatch/);
  } finally {
    cloud.attest.hooks.evidence = null;
  }
});

test('a guessed credential and an altered certification are refused', async () => {
  try {
    // Whoever cannot activate the credential (no TPM holding the EK) can only guess it.
    cloud.attest.hooks.evidence = (att) => ({ ...att, secret: crypto.randomBytes(32).toString('base64url') });
    let r = await hubA.ctl(['register']);
    assert.match(r.stdout + r.stderr, /HTTP 403: attest_credential/);
    assert.match(lastFailure().message, /the AK is not in the TPM of the EK certificate/);
    // One octet of the TPMS_ATTEST's clock changed: the AK's signature no longer covers it.
    cloud.attest.hooks.evidence = (att) => {
      const info = Buffer.from(att.certify_info, 'base64url');
      const at = 4 + 2 + 2 + info.readUInt16BE(6); // magic, type, qualifiedSigner
      info[at + 2 + info.readUInt16BE(at)] ^= 1; // first octet after extraData: the clock
      return { ...att, certify_info: info.toString('base64url') };
    };
    r = await hubA.ctl(['register']);
    assert.match(r.stdout + r.stderr, /HTTP 403: attest_signature/);
    assert.match(lastFailure().message, /does not verify with the AK/);
  } finally {
    cloud.attest.hooks.evidence = null;
  }
});

test('evidence about a different key is refused', async () => {
  const keyB = seenOf('hub-b').at(-1).attestation.key_public;
  try {
    // Hub A's genuine evidence, naming hub B's TPM key (a real TPM key, with every attribute)
    cloud.attest.hooks.evidence = (att) => ({ ...att, key_public: keyB });
    const r = await hubA.ctl(['register']);
    assert.notEqual(r.code, 0);
    assert.match(r.stdout + r.stderr, /HTTP 403: attest_wrong_key/);
    assert.match(lastFailure().message, /about another key than key_public/);
  } finally {
    cloud.attest.hooks.evidence = null;
  }
  // Hub B's whole evidence for hub A's key: certified for another challenge and key.
  const evB = seenOf('hub-b').at(-1).attestation;
  try {
    cloud.attest.hooks.evidence = (att) => ({ ...evB, nonce: att.nonce });
    const r = await hubA.ctl(['register']);
    assert.match(r.stdout + r.stderr, /HTTP 403: attest_challenge_mismatch/);
  } finally {
    cloud.attest.hooks.evidence = null;
  }
  const ok = await hubA.ctl(['register']);
  assert.equal(ok.code, 0, ok.stdout + ok.stderr);
});

test('an EK certificate from a CA the cloud does not trust is refused at the challenge', async () => {
  // A third TPM, manufactured by another (untrusted) CA; its certificate read with tpm2-tools.
  const tpmC = await Swtpm.start(path.join(dir, 'tpmC'), { ekCa: path.join(dir, 'other-ca') });
  let der;
  try {
    const out = path.join(dir, 'ekC.der');
    await run('tpm2_nvread', ['0x01c00002', '-o', out], { env: { ...process.env, TPM2TOOLS_TCTI: tpmC.tcti } });
    der = await fs.readFile(out);
  } finally {
    await tpmC.stop();
  }
  const challenges = cloud.attest.state.challenges;
  try {
    cloud.attest.hooks.challenge = (body) => ({ ...body, ek_cert: der.toString('base64url') });
    const r = await hubA.ctl(['register']);
    assert.notEqual(r.code, 0);
    assert.match(r.stdout + r.stderr, /the cloud refused the attestation challenge: HTTP 403: attest_ek_cert/);
    assert.match(lastFailure().message, /does not chain to a trusted TPM vendor CA/);
  } finally {
    cloud.attest.hooks.challenge = null;
  }
  assert.equal(cloud.attest.state.challenges, challenges);
});

// Issue 14 stage 2: the registration runs in iothub-uplink, and the channel has no cancel (the
// uplink ends a connection's requests only when the connection closes, and iothubd keeps its
// one): a client that hangs up is no longer waited for, the registration finishes, and iothubd
// records it from the uplink's news.
test('a client that hangs up while the challenge is answered: the daemon is fine, the registration finishes and is recorded', async () => {
  await cloud.control.fail({ delayMs: 1500, endpoint: 'challenge' });
  const challenges = cloud.attest.state.challenges, verified = cloud.attest.state.verified;
  const ctl = spawn(IOTHUBCTL, ['--config', hubA.configPath, 'register'], { stdio: 'ignore' });
  await waitFor(() => cloud.state.requests.some((q) => q.endpoint === 'challenge' && q.injected && q.status === 0), 5000, 'the challenge held');
  ctl.kill('SIGINT');
  await once(ctl, 'exit');
  // The held answer arrives after the waiter went away; the uplink goes on.
  await waitFor(() => cloud.attest.state.verified === verified + 1, 10000, 'the registration finished');
  assert.equal(cloud.attest.state.challenges, challenges + 1);
  await waitFor(async () => (await hubA.status()).cloud.registered, 5000, 'recorded from the uplink\'s news');
  const r = await hubA.ctl(['register']); // the daemon is fine, and so is the TPM
  assert.equal(r.code, 0, r.stdout + r.stderr + hubA.log);
  assert.equal(cloud.attest.state.verified, verified + 2);
});

test('without a persistent EK the hub derives it from the TCG template: the key of its certificate', async (t) => {
  await hubB.stop(); // swtpm serves one client: tpm2-tools now
  const env = { ...process.env, TPM2TOOLS_TCTI: tpmB.tcti };
  const r0 = await run('tpm2_evictcontrol', ['-C', 'o', '-c', '0x81010001'], { env });
  assert.match(r0.stdout, /evicted/);
  const caps = await run('tpm2_getcap', ['handles-persistent'], { env });
  assert.doesNotMatch(caps.stdout, /0x81010001/);
  await hubB.start();
  const verified = cloud.attest.state.verified;
  const t0 = performance.now();
  const r = await hubB.ctl(['register']);
  t.diagnostic(`registration with the RSA EK made by TPM2_CreatePrimary (swtpm): ${(performance.now() - t0).toFixed(0)} ms`);
  assert.equal(r.code, 0, r.stdout + r.stderr + hubB.log);
  assert.equal(cloud.attest.state.verified, verified + 1);
});

test('[cloud] attestation: off sends no evidence, on refuses a file key, auto falls back for a cloud without the endpoint', async () => {
  const setMode = async (h, mode) => { h.overrides.cloud = { ...h.overrides.cloud, attestation: mode }; await h.writeConfig(); await h.restart(); };
  const seen = cloud.attest.state.seen.length;
  await setMode(hubA, 'off');
  let r = await hubA.ctl(['register']);
  assert.match(r.stdout + r.stderr, /HTTP 403: attestation_required/);
  assert.equal(cloud.attest.state.seen.length, seen);

  await setMode(hubF, 'on');
  const registerRequests = () => cloud.state.requests.filter((q) => /^\/v1\/hubs\/hub-f(\/attest\/challenge)?$/.test(q.url)).length;
  const requests = registerRequests();
  r = await hubF.ctl(['register']);
  assert.notEqual(r.code, 0);
  await waitFor(() => /\[cloud\] attestation = on needs a TPM key/.test(hubF.uplinkLog), 5000, 'the reason in the log');
  assert.equal(registerRequests(), requests, 'refused before any request');

  // A cloud of contract 1.0 answers 404 to the challenge: auto registers without evidence.
  await setMode(hubA, 'auto');
  cloud.attest.require = false;
  try {
    await cloud.control.fail({ status: 404, endpoint: 'challenge' });
    r = await hubA.ctl(['register']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(cloud.state.hubs.get('hub-a').attested, null);
    await waitFor(() => /no attestation endpoint; registering without attestation/.test(hubA.uplinkLog), 5000, 'the fallback in the log');
  } finally {
    cloud.attest.require = true;
    cloud.control.clearFailures();
  }
  r = await hubA.ctl(['register']);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.equal(cloud.state.hubs.get('hub-a').attested.ekIssuer, 'CN=swtpm-localca');
});

// TPM_CC (Part 2, 6.5.2) of the commands a registration sends, by name.
const CC = { 0x131: 'CreatePrimary', 0x165: 'FlushContext', 0x173: 'ReadPublic', 0x176: 'StartAuthSession',
  0x17A: 'GetCapability', 0x15D: 'Sign', 0x169: 'NV_ReadPublic', 0x14E: 'NV_Read', 0x151: 'PolicySecret',
  0x147: 'ActivateCredential', 0x148: 'Certify' };

test('registration through a TPM at a real chip\'s pace (70 ms a command): the commands and the time', async (t) => {
  const N = 70;
  await hubA.stop(); // swtpm serves one client: the proxy's
  const slow = await SlowTpm.start(tpmA, N);
  const h = await Hub.start(broker, { hub: { id: 'hub-a' }, key: { ...tpmKey(tpmA), tcti: slow.tcti }, cloud: cloudConf() });
  try {
    await waitFor(async () => (await h.status()).key?.id, 10000, 'the hub key open');
    slow.reset();
    const t0 = performance.now();
    const r = await h.ctl(['register']);
    const ms = performance.now() - t0;
    assert.equal(r.code, 0, r.stdout + r.stderr + h.log);
    // Only what was answered before register returned: once registered, the hub goes on to sign
    // its device list and uploads, and those commands may already be in the proxy's list.
    const mine = slow.commands.filter((c) => c.answered && c.at + c.held <= t0 + ms);
    const by = {};
    for (const c of mine) { const n = CC[c.code] ?? `0x${c.code.toString(16)}`; by[n] = (by[n] ?? 0) + 1; }
    t.diagnostic(slow.commands.map((c) => `${CC[c.code] ?? c.code.toString(16)}@${(c.at - t0).toFixed(0)}`).join(" "));
    t.diagnostic(`registration: ${ms.toFixed(0)} ms, ${mine.length} TPM commands (of ${slow.commands.length} seen): ${JSON.stringify(by)}`);
    assert.equal(by.ActivateCredential, 1);
    assert.equal(by.Certify, 1);
    assert.equal(by.CreatePrimary, 2, 'the AK, twice (flushed between the two steps); the EK is the persistent one');
    assert.equal(by.FlushContext, by.CreatePrimary + by.StartAuthSession, 'every object and session flushed');
    assert.ok(ms >= mine.length * (N - 1), `${ms} ms for ${mine.length} commands`);
  } finally {
    await h.cleanup();
    await slow.stop();
  }
});
