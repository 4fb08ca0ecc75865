// The daemon's foundation (issue 2): options and exit codes, configuration errors, the
// sd_notify sequence, the watchdog, reload, the control socket and its peer check.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Broker, Hub, IOTHUBD, IOTHUBCTL, confText, tempDir, waitFor, sleep } from './lib/harness.mjs';

function run(bin, args, opts = {}) {
  return new Promise((resolve) => {
    execFile(bin, args, { encoding: 'utf8', ...opts }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr }));
  });
}

let dir, broker;
before(async () => { dir = await tempDir(); broker = await Broker.start(dir); });
after(async () => { await broker.stop(); await fs.rm(dir, { recursive: true, force: true }); });

test('--version prints the version and exits 0', async () => {
  const r = await run(IOTHUBD, ['--version']);
  assert.equal(r.code, 0);
  assert.match(r.stdout, /^iothubd \d+\.\d+\.\d+\n$/);
});

test('bad usage exits 64', async () => {
  assert.equal((await run(IOTHUBD, ['--no-such-option'])).code, 64);
  assert.equal((await run(IOTHUBD, ['extra-argument'])).code, 64);
  assert.equal((await run(IOTHUBD, ['--log-level', 'loud'])).code, 64);
});

test('--check-config accepts a good file and refuses a bad one with file, line and reason (78)', async () => {
  const good = path.join(dir, 'good.conf');
  await fs.writeFile(good, confText({ hub: { id: 'h1', state_dir: dir, runtime_dir: dir }, mqtt: { port: 1883 } }));
  const ok = await run(IOTHUBD, ['--config', good, '--check-config']);
  assert.equal(ok.code, 0, ok.stderr);

  const bad = path.join(dir, 'bad.conf');
  await fs.writeFile(bad, '[hub]\nid = h1\n\n[mqtt]\nport = 70000\n');
  const r = await run(IOTHUBD, ['--config', bad, '--check-config']);
  assert.equal(r.code, 78);
  assert.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  assert.match(r.stderr, new RegExp(`${bad.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:5: .*port.*70000`));

  const unknown = path.join(dir, 'unknown.conf');
  await fs.writeFile(unknown, '[hub]\nid = h1\n[mqtt]\nprot = 1\n');
  const u = await run(IOTHUBD, ['--config', unknown, '--check-config']);
  assert.equal(u.code, 78);
  assert.match(u.stderr, /unknown.conf:4: .*prot/);

  const missing = await run(IOTHUBD, ['--config', path.join(dir, 'nope.conf'), '--check-config']);
  assert.equal(missing.code, 78);
  assert.match(missing.stderr, /nope\.conf: No such file or directory/);
});

test('a bad configuration stops the daemon with 78 before READY', async () => {
  const d = await tempDir();
  const conf = path.join(d, 'iothub.conf');
  await fs.writeFile(conf, '[hub]\nid = h1\n[cloud]\nurl = http://example.invalid/\n');
  const r = await run(IOTHUBD, ['--config', conf]);
  assert.equal(r.code, 78);
  assert.match(r.stderr, /iothub\.conf:4: .*https/);
  await fs.rm(d, { recursive: true, force: true });
});

test('notify sequence: READY, RELOADING+MONOTONIC_USEC then READY on SIGHUP, STOPPING on SIGTERM', async () => {
  const hub = await Hub.start(broker);
  try {
    const ready = await hub.waitNotify((l) => l.split('|').includes('READY=1'));
    // STATUS= follows READY=1 in a datagram of its own: wait for it (under valgrind the gap
    // between the two is long enough for the old immediate check to miss it).
    await hub.waitNotify((l) => l.includes('STATUS='));
    assert.ok(hub.notifications.some((l) => l.includes('STATUS=')), 'a STATUS= line');
    const mark = hub.notifications.length;
    hub.proc.kill('SIGHUP');
    const reloading = await hub.waitNotify((l) => l.split('|').includes('RELOADING=1'), 5000, 'RELOADING=1', mark);
    const mono = reloading.line.split('|').find((f) => f.startsWith('MONOTONIC_USEC='));
    assert.ok(mono && /^MONOTONIC_USEC=\d+$/.test(mono), `MONOTONIC_USEC in ${reloading.line}`);
    const again = await hub.waitNotify((l) => l.split('|').includes('READY=1'), 5000, 'READY=1 after reload', reloading.i);
    assert.ok(again.i > ready.i);
    const mark2 = hub.notifications.length;
    hub.proc.kill('SIGTERM');
    const res = await hub.exited;
    assert.equal(res.code, 0, `clean stop, log: ${hub.log}`);
    await hub.waitNotify((l) => l.split('|').includes('STOPPING=1'), 2000, 'STOPPING=1', mark2);
  } finally {
    await hub.cleanup();
  }
});

test('SIGINT stops cleanly too', async () => {
  const hub = await Hub.start(broker);
  try {
    hub.proc.kill('SIGINT');
    assert.equal((await hub.exited).code, 0);
  } finally { await hub.cleanup(); }
});

test('WATCHDOG=1 at half of WATCHDOG_USEC', async () => {
  const hub = await Hub.start(broker, {}, { env: { WATCHDOG_USEC: '400000' } });
  try {
    const t0 = Date.now();
    await waitFor(() => hub.notifications.filter((l) => l.split('|').includes('WATCHDOG=1')).length >= 3, 3000, 'three WATCHDOG=1');
    const elapsed = Date.now() - t0;
    // Three pings at 200 ms intervals take about 600 ms; far more would mean the wrong period.
    assert.ok(elapsed < 2000, `three pings took ${elapsed} ms`);
  } finally { await hub.cleanup(); }
});

test('no WATCHDOG=1 without WATCHDOG_USEC', async () => {
  const hub = await Hub.start(broker);
  try {
    await sleep(700);
    assert.ok(!hub.notifications.some((l) => l.includes('WATCHDOG=1')));
  } finally { await hub.cleanup(); }
});

test('reload with a broken file keeps running on the old configuration', async () => {
  const hub = await Hub.start(broker);
  try {
    await fs.writeFile(hub.configPath, '[mqtt]\nport = zero\n');
    const mark = hub.notifications.length;
    hub.proc.kill('SIGHUP');
    await hub.waitNotify((l) => l.split('|').includes('READY=1'), 5000, 'READY=1 after failed reload', mark);
    await waitFor(() => /Reload failed.*port/.test(hub.log), 2000, 'reload error in the log');
    assert.equal(hub.proc.exitCode, null, 'still running');
    // iothubctl itself refuses a broken file; with the file mended, the same process answers.
    assert.equal((await hub.ctl(['status'])).code, 78);
    await hub.writeConfig();
    const st = await hub.status();
    assert.equal(st.hub_id, 'test-hub');
  } finally { await hub.cleanup(); }
});

test('reload applies [frames] at once and reports keys that need a restart', async () => {
  const hub = await Hub.start(broker);
  try {
    const signerSock = hub.signerSock;
    await waitFor(async () => (await hub.status()).signer.connected, 5000, 'connected to the signer');
    // [signer] socket too (issue 14): the daemon keeps asking the signer it started with.
    hub.overrides = { hub: { id: 'other-id' }, frames: { max_bytes: 1024 }, signer: { socket: path.join(hub.dir, 'elsewhere.sock') } };
    await hub.writeConfig();
    const mark = hub.notifications.length;
    hub.proc.kill('SIGHUP');
    await hub.waitNotify((l) => l.split('|').includes('READY=1'), 5000, 'READY=1', mark);
    await waitFor(() => /\[hub\] id changed.*restart/.test(hub.log), 2000, 'restart notice');
    assert.equal((await hub.status()).hub_id, 'test-hub');
    assert.match(hub.log, new RegExp(`\\[signer\\] socket changed; it takes effect after a restart, keeping '${signerSock}'`));
    assert.equal((await hub.status()).signer.socket, signerSock);
    // The signer restarted on its old socket: the daemon reconnects there.
    await hub.stopSigner();
    await waitFor(async () => !(await hub.status()).signer.connected, 5000, 'the signer gone');
    await hub.startSigner();
    await waitFor(async () => (await hub.status()).signer.connected, 15000, 'connected again on the old socket');
  } finally { await hub.cleanup(); }
});

test('iothubctl status reports hub id, version, uptime and config in the DESIGN.md shape', async () => {
  const hub = await Hub.start(broker);
  try {
    const st = await hub.status();
    assert.equal(st.hub_id, 'test-hub');
    assert.match(st.version, /^\d+\.\d+\.\d+$/);
    assert.equal(typeof st.uptime_s, 'number');
    assert.equal(st.config, hub.configPath);
    assert.equal(typeof st.mqtt.connected, 'boolean');
    const human = await hub.ctl(['status']);
    assert.equal(human.code, 0);
    assert.match(human.stdout, /Hub:\s+test-hub/);
  } finally { await hub.cleanup(); }
});

test('iothubctl without a running daemon says so and exits 69', async () => {
  const hub = await Hub.start(broker);
  await hub.stop();
  const r = await hub.ctl(['status']);
  assert.equal(r.code, 69);
  assert.match(r.stderr, /not running/);
  await hub.cleanup();
});

test('control socket: SO_PEERCRED admits root and the daemon group, refuses others', async () => {
  const hub = await Hub.start(broker);
  try {
    // Open the file-system gate wide so that only the daemon's own peer check stands.
    const sock = path.join(hub.runtimeDir, 'control');
    const st = await fs.stat(sock);
    assert.equal(st.mode & 0o777, 0o660, 'socket mode 0660');
    await fs.chmod(hub.runtimeDir, 0o755);
    await fs.chmod(sock, 0o666);
    const nobody = await hub.ctl(['status'], { uid: 65534, gid: 65534 });
    assert.notEqual(nobody.code, 0);
    assert.match(nobody.stderr, /permission denied/);
    await waitFor(() => /Refused control connection.*uid 65534/.test(hub.log), 2000, 'refusal logged');
    // Same uid, but the daemon's group (root's group 0 here) as primary group: admitted.
    const member = await hub.ctl(['status'], { uid: 65534, gid: 0 });
    assert.equal(member.code, 0, member.stderr);
  } finally { await hub.cleanup(); }
});

test('control socket: junk and oversize requests get an error and the daemon keeps serving', async () => {
  const hub = await Hub.start(broker);
  const net = await import('node:net');
  const talk = (data) => new Promise((resolve) => {
    const s = net.connect(path.join(hub.runtimeDir, 'control'));
    let out = '';
    s.on('data', (d) => { out += d; });
    s.on('close', () => resolve(out));
    s.on('error', () => resolve(out));
    s.write(data);
  });
  try {
    assert.match(await talk('not json\n'), /"ok":false/);
    assert.match(await talk('{"cmd":"format-disk"}\n'), /unknown command/);
    assert.match(await talk('x'.repeat(70000)), /longer than/);
    assert.equal((await hub.status()).hub_id, 'test-hub');
  } finally { await hub.cleanup(); }
});
