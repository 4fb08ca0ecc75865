// The user's path (issue 9 items 3-4, issue 10 item 13), with the real daemon and iothubctl:
// the status key object and the file-backend warning with or without a cloud, TPM errors with a
// MESSAGE_ID and a hint in the journal (through the native journal protocol, as under systemd),
// the sign-in hint, the file key given to the daemon's user, and sealed tokens loaded when the
// TPM comes up after the daemon.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import fsSync, { openSync, closeSync, fstatSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { Broker, Hub, Swtpm, IOTHUBD, IOTHUBCTL, IOTHUB_SIGNER, NOTIFY_LISTEN, confText, freePort, tempDir, waitFor, sleep }
  from './lib/harness.mjs';
import { startCloud } from '../cloud/server.mjs';
import { startAuthServer } from '../oauth/server.mjs';
import { loginApproved } from './lib/login.mjs';

let dir, broker;

before(async () => {
  dir = await tempDir();
  await fs.chmod(dir, 0o755);
  broker = await Broker.start(dir);
});

after(async () => {
  await broker?.stop();
  await fs.rm(dir, { recursive: true, force: true });
});

const MID = {};
{
  const h = await fs.readFile(new URL('../../include/iothub/log.h', import.meta.url), 'utf8');
  for (const m of h.matchAll(/#define IOTHUB_MID_(\w+) "([0-9a-f]{32})"/g)) MID[m[1]] = m[2];
}

const count = (s, re) => (s.match(new RegExp(re, 'g')) ?? []).length;

// The daemon as systemd runs it: stderr is the journal stream (JOURNAL_STREAM names it), so
// it logs with sd_journal_sendv() to /run/systemd/journal/socket. In a mount namespace of its
// own that path is a socket of this test (notify-listen prints each datagram as a line).
class JournalHub {
  static async start(conf) {
    const j = new JournalHub();
    j.dir = await tempDir('iothub-journal-');
    await fs.chmod(j.dir, 0o755);
    j.stateDir = path.join(j.dir, 'state');
    j.runtimeDir = path.join(j.dir, 'run');
    await fs.mkdir(j.stateDir, { mode: 0o700 });
    j.configPath = path.join(j.dir, 'iothub.conf');
    // The signer (issue 14) holds the key; it runs beside the daemon, outside its namespace.
    const signerSock = path.join(j.dir, 'signer.sock');
    await fs.mkdir(path.join(j.dir, 'signer'), { mode: 0o700 });
    const c = { hub: { id: 'journal-hub', state_dir: j.stateDir, runtime_dir: j.runtimeDir },
      mqtt: { host: '127.0.0.1', port: broker.port, client_id: `journal-${process.pid}-${Date.now()}` },
      signer: { socket: signerSock, client_user: os.userInfo().username, command_user: os.userInfo().username, state_dir: path.join(j.dir, 'signer') }, ...conf };
    await fs.writeFile(j.configPath, confText(c));
    const senv = { ...process.env };
    delete senv.NOTIFY_SOCKET;
    delete senv.JOURNAL_STREAM;
    j.signer = spawn(IOTHUB_SIGNER, ['--config', j.configPath, '--listen', signerSock], { env: senv, stdio: 'ignore' });
    j.signerExited = once(j.signer, 'exit');
    await waitFor(() => fsSync.existsSync(signerSock), 5000, 'the signer\'s socket');
    const run = path.join(j.dir, 'fakerun');
    await fs.mkdir(path.join(run, 'systemd/journal'), { recursive: true });
    j.entries = [];
    j.listener = spawn(NOTIFY_LISTEN, [path.join(run, 'systemd/journal/socket')], { stdio: ['ignore', 'pipe', 'inherit'] });
    const rl = readline.createInterface({ input: j.listener.stdout });
    await new Promise((resolve) => rl.on('line', (l) => {
      if (l === 'LISTENING') { resolve(); return; }
      const e = {};
      for (const kv of l.split('|')) { const i = kv.indexOf('='); if (i > 0) e[kv.slice(0, i)] = kv.slice(i + 1); }
      j.entries.push(e);
    }));
    const errPath = path.join(j.dir, 'stderr');
    const fd = openSync(errPath, 'w');
    const st = fstatSync(fd, { bigint: true });
    const env = { ...process.env, JOURNAL_STREAM: `${st.dev}:${st.ino}` };
    delete env.NOTIFY_SOCKET;
    j.proc = spawn('unshare', ['-m', '--propagation', 'private', '--', 'sh', '-c',
      'mount --bind "$1" /run && shift && exec "$@"', 'sh', run, IOTHUBD, '--config', j.configPath],
    { env, stdio: ['ignore', 'ignore', fd] });
    closeSync(fd);
    j.exited = once(j.proc, 'exit');
    await waitFor(() => j.find(MID.STARTED), 5000, 'the start in the journal');
    return j;
  }

  find(mid, pred = () => true) { return this.entries.find((e) => e.MESSAGE_ID === mid && pred(e)); }

  ctl(args) {
    return new Promise((resolve) => execFile(IOTHUBCTL, ['--config', this.configPath, ...args], { encoding: 'utf8' },
      (err, stdout, stderr) => resolve({ code: err ? (err.code ?? 1) : 0, stdout, stderr })));
  }

  async cleanup() {
    if (this.proc.exitCode === null) { this.proc.kill('SIGTERM'); await this.exited; }
    if (this.signer.exitCode === null && this.signer.signalCode === null) { this.signer.kill('SIGTERM'); await this.signerExited; }
    this.listener.kill('SIGTERM');
    await once(this.listener, 'exit').catch(() => {});
    await fs.rm(this.dir, { recursive: true, force: true });
  }
}

// A clean stop: exit status 0, nothing from the sanitizers (under make asan).
async function stopClean(h) {
  const r = await h.stop();
  assert.doesNotMatch(h.log, /AddressSanitizer|LeakSanitizer|runtime error/, h.log);
  assert.equal(r.code, 0, `exit ${r.code} ${r.signal}: ${h.log}`);
}

async function keyInit(h) {
  const r = await h.ctl(['key', 'init']);
  assert.equal(r.code, 0, r.stderr);
  return r;
}

test('status has the key object without [cloud] url, and the file-backend warning comes at every start', async () => {
  const d = await tempDir();
  const keyFile = path.join(d, 'hub-key.pem');
  const hub = await Hub.start(broker, { key: { backend: 'file', file: keyFile } }, { dir: d });
  try {
    // No key yet: the object is there, with the reason (the signer's answer, after READY; its
    // own words for it with its STATUS answer).
    let st = await waitFor(async () => {
      const x = await hub.status();
      return x.key.reason && /hub-key\.pem|iothubctl key init/.test(x.key.error ?? '') ? x : null;
    }, 5000, 'the key\'s reason');
    assert.equal(st.cloud.configured, false);
    assert.deepEqual(Object.keys(st.key).sort(), ['backend', 'error', 'id', 'reason', 'signatures']);
    assert.equal(st.key.reason, 'no_key');
    assert.equal(st.key.backend, 'file');
    assert.equal(st.key.id, null);
    // The warning is logged when the key is opened, after READY, and stderr is read
    // asynchronously: wait for it rather than read the log at once.
    await waitFor(() => count(hub.log, 'The hub key is a file') >= 1, 5000, 'the file-backend warning');
    assert.equal(count(hub.log, 'The hub key is a file'), 1, hub.log);
    await keyInit(hub);
    const show = JSON.parse((await hub.ctl(['--json', 'key', 'show'])).stdout);
    // Picked up without a restart (the retry), and announced once.
    await waitFor(async () => (await hub.status()).key.id === show.id, 8000, 'the new key in status');
    st = await hub.status();
    assert.equal(st.key.backend, 'file');
    assert.equal(st.key.signatures, 0);
    assert.equal(st.key.error, undefined);
    assert.equal(st.key.reason, undefined);
    assert.match(hub.log, new RegExp(`Hub key ${show.id} \\(file\\)`));
    await hub.restart();
    await waitFor(() => count(hub.log, 'The hub key is a file') >= 2, 5000, 'the warning again at the second start');
    assert.equal(count(hub.log, 'The hub key is a file'), 2, 'the warning again at the second start, once');
    await waitFor(async () => (await hub.status()).key.id === show.id, 5000, 'the key named right after the start');
    await stopClean(hub);
  } finally {
    await hub.cleanup();
  }
});

test('TPM missing: the journal entry has the MESSAGE_ID, the reason, a hint and the caller\'s location', async () => {
  const j = await JournalHub.start({ key: { backend: 'tpm', tcti: 'device:/nonexistent/tpmrm0' } });
  try {
    const e = await waitFor(() => j.find(MID.KEY_UNAVAILABLE), 5000, 'KEY_UNAVAILABLE');
    assert.equal(e.IOTHUB_REASON, 'tpm_device_missing');
    assert.match(e.MESSAGE, /TPM device \/nonexistent\/tpmrm0 does not exist: is the TPM enabled\?/);
    assert.match(e.MESSAGE, /dtoverlay=tpm-slb9670/);
    assert.equal(e.CODE_FILE, 'src/hub.c');
    assert.equal(e.CODE_FUNC, 'hub_key_unavailable');
    assert.match(e.CODE_LINE, /^\d+$/);
    assert.equal(e.ERRNO, '19', 'ENODEV');
    // Every entry with a MESSAGE_ID names where it was logged (not log.c).
    for (const x of j.entries.filter((y) => y.MESSAGE_ID)) {
      assert.match(x.CODE_FILE ?? '', /^src\/(?!log\.c)/, JSON.stringify(x));
      assert.ok(x.CODE_FUNC, JSON.stringify(x));
    }
    const st = JSON.parse((await j.ctl(['--json', 'status'])).stdout);
    assert.equal(st.key.id, null);
    assert.equal(st.signer.connected, true);
    assert.match(st.key.error, /does not exist/);
    // Retries stay quiet: one entry for one kind of failure.
    await sleep(3500);
    assert.equal(j.entries.filter((x) => x.MESSAGE_ID === MID.KEY_UNAVAILABLE).length, 1);
  } finally {
    await j.cleanup();
  }
});

test('TPM simulator not running, and a TCTI string the loader cannot use: reason and hint', async () => {
  const port = await freePort();
  for (const [tcti, reason, hint] of [
    [`swtpm:host=127.0.0.1,port=${port}`, 'tpm_unreachable', /nothing answers there; is the TPM simulator running/],
    ['nosuchtcti:foo', 'bad_configuration', /check \[key\] tcti, e\.g\. 'device:\/dev\/tpmrm0'/],
  ]) {
    const j = await JournalHub.start({ key: { backend: 'tpm', tcti } });
    try {
      const e = await waitFor(() => j.find(MID.KEY_UNAVAILABLE), 5000, `KEY_UNAVAILABLE for ${tcti}`);
      assert.equal(e.IOTHUB_REASON, reason, e.MESSAGE);
      assert.match(e.MESSAGE, hint);
      assert.ok(e.MESSAGE.includes(tcti), 'the message names the TCTI');
    } finally {
      await j.cleanup();
    }
  }
});

test('TPM device without permission: iothubctl names group tss', async () => {
  const d = await tempDir();
  try {
    await fs.chmod(d, 0o755);
    const dev = path.join(d, 'tpmrm0');
    // A character device only root may open (the null device's numbers), as /dev/tpmrm0 is
    // root:tss 0660 on a Pi.
    await new Promise((resolve, reject) => spawn('mknod', ['-m', '0600', dev, 'c', '1', '3'], { stdio: 'inherit' })
      .on('exit', (c) => (c === 0 ? resolve() : reject(new Error(`mknod ${c}`)))));
    const conf = path.join(d, 'c.conf');
    await fs.writeFile(conf, confText({ hub: { id: 'x', state_dir: d, runtime_dir: d }, mqtt: { host: '127.0.0.1' },
      key: { backend: 'tpm', tcti: `device:${dev}` } }), { mode: 0o644 });
    const p = spawn('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', IOTHUBCTL, '--config', conf, 'key', 'show'],
      { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    p.stderr.on('data', (x) => { err += x; });
    const [code] = await once(p, 'exit');
    assert.equal(code, 1);
    assert.match(err, new RegExp(`permission denied on ${dev}: the process must be in group tss`));
  } finally {
    await fs.rm(d, { recursive: true, force: true });
  }
});

test('before sign-in the hint is iothubctl login, and bearer_token_file only where it is the source', async () => {
  const d = await tempDir();
  const closed = await freePort();
  const keyFile = path.join(d, 'k.pem');
  const hub = await Hub.start(broker, {
    key: { backend: 'file', file: keyFile },
    cloud: { url: `https://127.0.0.1:${closed}` },
    oauth: { issuer: `https://127.0.0.1:${closed}`, client_id: 'iothub-hub' },
  }, { dir: d });
  try {
    await keyInit(hub);
    const st = await waitFor(async () => {
      const s = await hub.status();
      return s.key.id && s.cloud.last_error?.startsWith('not signed in') ? s : null;
    }, 15000, 'the sign-in hint'); // the uplink asks the signer for the key again every 5 s
    assert.equal(st.cloud.last_error, "not signed in: run 'iothubctl login'");
    assert.equal(st.oauth.state, 'login_required');
    const reg = await hub.ctl(['register']);
    assert.notEqual(reg.code, 0);
    assert.match(reg.stderr, /not signed in: run 'iothubctl login' first/);
    assert.doesNotMatch(hub.log + reg.stderr + JSON.stringify(st), /bearer_token_file/);
    await stopClean(hub);
  } finally {
    await hub.cleanup();
  }
  // No [oauth] and no fixed token: the way to sign in, still not the development aid.
  const d2 = await tempDir();
  const h2 = await Hub.start(broker, { key: { backend: 'file', file: keyFile }, cloud: { url: `https://127.0.0.1:${closed}` } },
    { dir: d2 });
  try {
    const st = await h2.status();
    assert.match(st.cloud.last_error, /^not signed in: configure \[oauth\]/);
    assert.doesNotMatch(h2.log, /bearer_token_file/);
  } finally {
    await h2.cleanup();
  }
});

// 'iothubctl login' as a user runs it (lib/login.mjs).
const login = loginApproved;

test('issue 10 item 13: the TPM comes up after the daemon, and the sealed tokens are loaded then', async () => {
  const d = await tempDir();
  await fs.chmod(d, 0o755);
  const tpmDir = path.join(d, 'tpm');
  let tpm = await Swtpm.start(tpmDir);
  const auth = await startAuthServer({ dir: path.join(d, 'as'), accessTokenTtl: 600, interval: 1 });
  const hooks = auth.cloudHooks();
  await fs.mkdir(path.join(d, 'hub'));
  const cloud = await startCloud({ dir: path.join(d, 'cloud'), verifyToken: hooks.verifyToken, verifyDpop: hooks.verifyDpop });
  const hub = await Hub.start(broker, {
    key: { backend: 'tpm', tcti: tpm.tcti },
    cloud: { url: cloud.url, ca_file: cloud.caFile, timeout_s: 5 },
    oauth: { issuer: auth.issuer, client_id: auth.clientId, scope: 'openid offline_access iothub', ca_file: auth.caFile },
  }, { dir: path.join(d, 'hub') });
  try {
    await keyInit(hub);
    await waitFor(async () => (await hub.status()).key.id, 8000, 'the key');
    const kid = (await hub.status()).key.id;
    await login(hub, auth);
    assert.equal((await hub.status()).oauth.state, 'ok');

    // The hub restarts while the TPM is away (a module loaded late, a simulator started later).
    await hub.stop();
    await tpm.stop();
    hub.log = '';
    hub.uplinkLog = '';
    await hub.start();
    let st = await hub.status();
    assert.equal(st.key.id, null);
    assert.match(st.key.error, /nothing answers there/);
    assert.equal(st.oauth.state, 'login_required');
    assert.match(st.oauth.last_error, /no hub key yet/);

    tpm = await Swtpm.startAt(tpmDir, tpm.port);
    st = await waitFor(async () => {
      const s = await hub.status();
      return s.key.id && s.oauth.state === 'ok' ? s : null;
    }, 15000, 'the key and the stored tokens after the TPM came up');
    assert.equal(st.key.id, kid);
    // Sign-in is iothub-uplink's (issue 14 stage 2): it loads them.
    assert.match(hub.uplinkLog, /Loaded the stored sign-in tokens/);
    // The tokens work: registering needs the signed-in account.
    const reg = await hub.ctl(['register']);
    assert.equal(reg.code, 0, reg.stderr);
    assert.equal(cloud.state.hubs.get('test-hub').account, 'alice');
    await stopClean(hub);
  } finally {
    await hub.cleanup();
    await cloud.close();
    await auth.close();
    await tpm.stop();
    await fs.rm(d, { recursive: true, force: true });
  }
});

// Runs iothubctl as another user (setpriv), as a person or the daemon's user would.
async function ctlAs(user, group, configPath, args) {
  const p = spawn('setpriv', [`--reuid=${user}`, `--regid=${group}`, '--clear-groups', IOTHUBCTL, '--config', configPath, ...args],
    { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stdout.on('data', (x) => { out += x; });
  p.stderr.on('data', (x) => { err += x; });
  const [code] = await once(p, 'exit');
  return { code, stdout: out, stderr: err };
}

test('key init with backend = file, run as root, gives the key to the daemon\'s user; as another user it refuses', async () => {
  const d = await tempDir();
  try {
    await fs.chmod(d, 0o755);
    const state = path.join(d, 'state');
    await fs.mkdir(state, { mode: 0o700 });
    await fs.chown(state, 65534, 65534); // the daemon's user owns its state directory (StateDirectory=)
    const keyFile = path.join(d, 'hub-key.pem');
    const conf = path.join(d, 'c.conf');
    await fs.writeFile(conf, confText({ hub: { id: 'x', state_dir: state, runtime_dir: d }, mqtt: { host: '127.0.0.1' },
      key: { backend: 'file', file: keyFile } }), { mode: 0o644 });

    // Another user that is not the daemon's: a clear refusal, and no key file.
    await fs.chown(state, 0, 0);
    let r = await ctlAs('nobody', 'nogroup', conf, ['key', 'init']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /must belong to the daemon's user root \(the owner of .*state\): run this as root$/m);
    await assert.rejects(fs.stat(keyFile));

    await fs.chown(state, 65534, 65534);
    const hub = new Hub(d);
    hub.configPath = conf;
    r = await hub.ctl(['key', 'init']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /Key file .*hub-key\.pem now belongs to nobody, the daemon's user/);
    const st = await fs.stat(keyFile);
    assert.equal(st.uid, 65534);
    assert.equal(st.gid, 65534);
    assert.equal(st.mode & 0o777, 0o600);
    // The daemon's user can read it (as the daemon would); the id is the one root made.
    const asDaemon = await ctlAs('nobody', 'nogroup', conf, ['--json', 'key', 'show']);
    assert.equal(asDaemon.code, 0, asDaemon.stderr);
    assert.match(r.stdout, new RegExp(JSON.parse(asDaemon.stdout).id));
    // Idempotent: a second run keeps the key and its owner.
    r = await hub.ctl(['key', 'init']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /Kept the existing hub key/);
    assert.equal((await fs.stat(keyFile)).uid, 65534);
    // The daemon's user itself may run it too.
    r = await ctlAs('nobody', 'nogroup', conf, ['key', 'init']);
    assert.equal(r.code, 0, r.stderr);
  } finally {
    await fs.rm(d, { recursive: true, force: true });
  }
});

test('man pages: every iothubctl command is documented, none called unimplemented, status fields listed', async () => {
  const man = async (f) => fs.readFile(new URL(`../../man/${f}`, import.meta.url), 'utf8');
  const pages = { ctl: await man('iothubctl.1.scd'), conf: await man('iothub.conf.5.scd'), d: await man('iothubd.8.scd'),
    proto: await man('iothub-protocol.7.scd') };
  for (const [name, text] of Object.entries(pages))
    assert.doesNotMatch(text, /not yet implemented|in this version/i, `${name}: a stale claim`);
  const help = await new Promise((resolve) => execFile(IOTHUBCTL, ['--help'], { encoding: 'utf8' },
    (err, stdout, stderr) => resolve(stdout + stderr)));
  const cmds = [...help.matchAll(/^ {2}([a-z]+(?: (?:add|list|remove|pair|init|show))?)\s/gm)].map((m) => m[1]);
  assert.ok(cmds.length >= 10, help);
  const synopsis = pages.ctl.slice(pages.ctl.indexOf('# SYNOPSIS'), pages.ctl.indexOf('# DESCRIPTION'));
  const commands = pages.ctl.slice(pages.ctl.indexOf('# COMMANDS'), pages.ctl.indexOf('# ACCESS'));
  for (const c of cmds) {
    const words = c.split(' ');
    assert.ok(words.every((w) => synopsis.includes(`*${w}`) || synopsis.includes(`${w}*`) || synopsis.includes(`|${w}`)),
      `SYNOPSIS lacks '${c}'`);
    assert.match(commands, new RegExp(`^\\*${c.replace(' ', ' ')}\\*`, 'm'), `COMMANDS lacks '${c}'`);
  }
  for (const f of ['key.backend', 'key.id', 'key.signatures', 'key.error', 'key.reason', 'cloud.registered'])
    assert.ok(pages.ctl.includes(`*${f}*`), `iothubctl(1) lists ${f}`);
  // The key object is there without a cloud (the first test shows the daemon's side).
  assert.match(pages.ctl, /Present whether or\s+not a \[cloud\] \*url\* is set/);
  assert.match(pages.d, /iothub\.catalog/);
});
