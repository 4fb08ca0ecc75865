// `make system-test`: the installed-system test (issue 9). Boots a debootstrapped bookworm, once
// under systemd-nspawn and once under QEMU (software emulation, a real /dev/tpmrm0 from swtpm),
// installs the freshly built .deb with apt inside and walks the user's path (guest.sh, run as a
// oneshot unit in the guest). This host side runs the parts the guest talks to, all on 127.0.0.1:
// a mosquitto broker, the reference cloud (tests/cloud/server.mjs, which verifies every request
// signature and every bulb frame with independent code) and swtpm; it signs the bulb's frames
// with jose, and afterwards checks at the cloud what the guest's hub uploaded.
//
//   node system/run.mjs --deb build/deb/iothub_V_amd64.deb --cache build/system-test [--only nspawn|qemu]
//
// Prints TAP and "N passed, N failed"; exits non-zero on any failure. On a failure the guest's
// journal is kept under CACHE/logs/. Every wait is bounded; everything started is stopped on exit.
import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Broker, sleep } from '../integration/lib/harness.mjs';
import { Bulb } from '../integration/lib/bulb.mjs';
import { startCloud } from '../cloud/server.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const HUB_ID = 'systest-hub';
const DEV = 'sys-bulb-1';
const TOKEN = 'tok-system-test-0123456789abcdef';
// Frames 1..FIRST_FRAMES are relayed first; the next KILL_FRAMES are published right after the
// signer is killed, the KILL_FRAMES after those right after the uplink is killed (guest.sh); nspawn
// uses the next two for the reload and restart checks; the last KILL_FRAMES are published right
// after iothubd is killed (QEMU skips the two).
const FIRST_FRAMES = 6;
const KILL_FRAMES = 3;
const N_FRAMES = FIRST_FRAMES + 2 * KILL_FRAMES + 2 + KILL_FRAMES;
const QEMU_SEQS = [...Array(N_FRAMES).keys()].map((i) => i + 1)
  .filter((i) => i <= FIRST_FRAMES + 2 * KILL_FRAMES || i > FIRST_FRAMES + 2 * KILL_FRAMES + 2);
const NSPAWN_TIMEOUT_S = 240;
const QEMU_TIMEOUT_S = 900;

function args() {
  const a = { only: null };
  const v = process.argv.slice(2);
  for (let i = 0; i < v.length; i++) {
    if (v[i] === '--deb') a.deb = path.resolve(v[++i]);
    else if (v[i] === '--cache') a.cache = path.resolve(v[++i]);
    else if (v[i] === '--only') a.only = v[++i];
    else throw new Error(`unknown argument ${v[i]}`);
  }
  if (!a.deb || !a.cache) throw new Error('usage: run.mjs --deb FILE.deb --cache DIR [--only nspawn|qemu]');
  if (a.only && !['nspawn', 'qemu'].includes(a.only)) throw new Error('--only nspawn or qemu');
  return a;
}

// --- TAP -------------------------------------------------------------------------------------------
let n = 0, failed = 0;
const failures = [];
function result(ok, desc, detail) {
  n++;
  console.log(`${ok ? 'ok' : 'not ok'} ${n} - ${desc}`);
  if (!ok) {
    failed++;
    failures.push(desc);
    if (detail) console.log(String(detail).split('\n').map((l) => `#   ${l}`).join('\n'));
  }
}
const note = (s) => console.log(`# ${s}`);
function check(desc, fn) {
  try {
    const r = fn();
    result(r === undefined || r === true, desc, r === false ? 'false' : r);
  } catch (e) {
    result(false, desc, e.message);
  }
}

// --- processes we start: each is stopped by its own pid on exit --------------------------------------
const children = new Set();
function start(cmd, argv, opts = {}) {
  const p = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  children.add(p);
  p.on('exit', () => children.delete(p));
  return p;
}
function killAll() {
  for (const p of children) try { p.kill('SIGKILL'); } catch { /* gone */ }
}
process.on('exit', killAll);
// Interrupted: SIGTERM first (systemd-nspawn then powers its container off, QEMU and swtpm exit),
// SIGKILL whatever is left after 10 s.
async function interrupted() {
  for (const p of children) try { p.kill('SIGTERM'); } catch { /* gone */ }
  const end = Date.now() + 10_000;
  while (children.size && Date.now() < end) await sleep(100);
  killAll();
  process.exit(130);
}
for (const s of ['SIGINT', 'SIGTERM']) process.once(s, interrupted);

// Runs a guest (nspawn or qemu) to its end, or kills it after timeoutS: SIGTERM first (nspawn
// powers the container off), SIGKILL 20 s later.
async function runGuest(cmd, argv, logFile, timeoutS) {
  const out = fs.createWriteStream(logFile);
  const p = start(cmd, argv);
  p.stdout.pipe(out);
  p.stderr.pipe(out);
  let timedOut = false;
  const t1 = setTimeout(() => { timedOut = true; p.kill('SIGTERM'); }, timeoutS * 1000);
  const t2 = setTimeout(() => p.kill('SIGKILL'), (timeoutS + 20) * 1000);
  const [code, signal] = await once(p, 'exit');
  clearTimeout(t1);
  clearTimeout(t2);
  await new Promise((r) => out.end(r));
  return { code, signal, timedOut };
}

function sh(cmd, argv, opts = {}) {
  return execFileSync(cmd, argv, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], ...opts });
}

// --- the guest's root file systems -------------------------------------------------------------------
const SYSTEST_UNIT = `[Unit]
Description=iothub installed-system test (tests/system/guest.sh)
After=multi-user.target
RequiresMountsFor=/systest
ConditionPathExists=/systest/guest.sh

[Service]
Type=oneshot
ExecStart=/bin/bash /systest/guest.sh
ExecStopPost=/bin/systemctl --no-block poweroff
StandardOutput=journal+console
TimeoutStartSec=${QEMU_TIMEOUT_S}

[Install]
WantedBy=multi-user.target
`;

// Whether a path exists, without following a symlink (the guest's links point into the guest).
function lexists(p) { try { fs.lstatSync(p); return true; } catch { return false; } }
function writeIfChanged(file, text) {
  if (fs.existsSync(file) && fs.readFileSync(file, 'utf8') === text) return false;
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, text);
  return true;
}
function enable(root, unit, target = 'multi-user.target') {
  const link = path.join(root, `etc/systemd/system/${target}.wants/${unit}`);
  fs.mkdirSync(path.dirname(link), { recursive: true });
  if (!lexists(link)) fs.symlinkSync(`/etc/systemd/system/${unit}`, link);
}
function prepareRoot(root) {
  let changed = writeIfChanged(path.join(root, 'etc/systemd/system/systest.service'), SYSTEST_UNIT);
  enable(root, 'systest.service');
  fs.mkdirSync(path.join(root, 'systest'), { recursive: true });
  return changed;
}
function prepareVm(cache) {
  const root = path.join(cache, 'vm/rootfs');
  let changed = prepareRoot(root);
  // The 9p share with the host (test inputs in, results and journal out).
  changed = writeIfChanged(path.join(root, 'etc/fstab'),
    'systest /systest 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0\n') || changed;
  changed = writeIfChanged(path.join(root, 'etc/modules-load.d/systest.conf'), '9pnet_virtio\n9p\n') || changed;
  // QEMU user networking (restrict=on): a fixed address; the host is reachable only through the
  // guestfwd rules at 10.0.2.100.
  changed = writeIfChanged(path.join(root, 'etc/systemd/network/10-systest.network'),
    '[Match]\nName=en* eth*\n\n[Network]\nAddress=10.0.2.15/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n') || changed;
  for (const [u, t] of [['systemd-networkd.service', 'multi-user.target'], ['systemd-networkd.socket', 'sockets.target']]) {
    const link = path.join(root, `etc/systemd/system/${t}.wants/${u}`);
    fs.mkdirSync(path.dirname(link), { recursive: true });
    if (!lexists(link)) { fs.symlinkSync(`/lib/systemd/system/${u}`, link); changed = true; }
  }
  changed = writeIfChanged(path.join(root, 'etc/hostname'), 'iothub-vm\n') || changed;
  const img = path.join(cache, 'vm/root.img');
  if (changed || !fs.existsSync(img)) {
    const t0 = Date.now();
    fs.rmSync(img, { force: true });
    sh('truncate', ['-s', '3G', img]);
    sh('mkfs.ext4', ['-q', '-F', '-L', 'root', '-d', root, img]);
    note(`VM image ${img} built in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  }
  return img;
}

// --- one guest run -----------------------------------------------------------------------------------
async function hostParts(dir) {
  fs.mkdirSync(dir, { recursive: true });
  const broker = await Broker.start(dir);
  const cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'systest' } });
  return { broker, cloud };
}

// The container's TPM: swtpm on a unix socket (data, and control at SOCK.ctrl, as tpm2-tss's
// swtpm TCTI expects with path=), mode 0660 with the group tss of the guest's /etc/group, so
// that in the guest, as on a real hub's /dev/tpmrm0, only the signer (SupplementaryGroups=tss)
// may connect. nspawn has no TPM device; the socket's directory is bound at /systest-tpm.
async function unixSwtpm(dir, root) {
  const gid = fs.readFileSync(path.join(root, 'etc/group'), 'utf8').match(/^tss:x:(\d+):/m)?.[1];
  if (!gid) throw new Error(`no group tss in ${root}/etc/group (tpm-udev)`);
  const state = path.join(dir, 'state');
  const sockDir = path.join(dir, 'sock');
  fs.mkdirSync(state, { recursive: true });
  fs.mkdirSync(sockDir, { recursive: true, mode: 0o755 });
  const sock = path.join(sockDir, 'swtpm.sock');
  const p = start('swtpm', ['socket', '--tpm2', '--flags', 'not-need-init,startup-clear', '--tpmstate', `dir=${state}`,
    '--server', `type=unixio,path=${sock},mode=0660,gid=${gid}`, '--ctrl', `type=unixio,path=${sock}.ctrl,mode=0660,gid=${gid}`,
    '--log', `file=${path.join(dir, 'swtpm.log')},level=1`]);
  for (let i = 0; i < 100 && !(fs.existsSync(sock) && fs.existsSync(`${sock}.ctrl`)); i++) await sleep(50);
  if (!fs.existsSync(sock)) throw new Error('swtpm did not create its socket');
  return { sockDir, tcti: 'swtpm:path=/systest-tpm/swtpm.sock', stop: () => p.kill('SIGTERM') };
}

// The MESSAGE_IDs of the tree the package was built from (make system-test builds it from this
// checkout), so that the guest looks for the ids the daemon logs: MIDS="A B ..", MID_A=<id>, ...
function messageIds() {
  const h = fs.readFileSync(path.join(here, '../../include/iothub/log.h'), 'utf8');
  const ids = {};
  for (const m of h.matchAll(/^#define IOTHUB_MID_([A-Z0-9_]+) "([0-9a-f]{32})"$/gm)) ids[`MID_${m[1]}`] = m[2];
  for (const k of ['STARTED', 'STOPPING', 'RELOADED', 'FRAME_REJECTED', 'BULB_ENROLLED']) {
    if (!ids[`MID_${k}`]) throw new Error(`include/iothub/log.h has no IOTHUB_MID_${k}`);
  }
  return { MIDS: `"${Object.keys(ids).map((k) => k.slice(4)).join(' ')}"`, ...ids };
}

// The share: the package, the guest script, the bulb's public key and frames (signed with jose),
// and a forgery (signed by another key).
async function makeShare(share, deb, env) {
  fs.rmSync(share, { recursive: true, force: true });
  fs.mkdirSync(path.join(share, 'frames'), { recursive: true });
  fs.mkdirSync(path.join(share, 'out'), { recursive: true });
  fs.chmodSync(share, 0o755);
  fs.copyFileSync(deb, path.join(share, 'iothub.deb'));
  fs.copyFileSync(path.join(here, 'guest.sh'), path.join(share, 'guest.sh'));
  fs.copyFileSync(env.caFile, path.join(share, 'cloud-ca.pem'));
  fs.writeFileSync(path.join(share, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  const bulb = await Bulb.create(DEV, 'ES256');
  fs.writeFileSync(path.join(share, 'bulb.pem'), bulb.pem);
  // iat a little ahead: a QEMU guest publishes a few minutes after this (the hub allows 300 s).
  const iat = Math.floor(Date.now() / 1000) + 120;
  const frames = [];
  for (let i = 1; i <= N_FRAMES; i++) {
    const jws = await bulb.frame({ iat, state: { on: i % 2 === 1, bri: 10 * i, ct: 300, xy: [0.3127, 0.329] } });
    frames.push({ seq: bulb.seq, jws });
    fs.writeFileSync(path.join(share, 'frames', String(i)), jws);
  }
  // The walls' probe (probe.c), static: it runs in the guest in place of iothubd and the signer.
  sh('cc', ['-std=c11', '-O2', '-Wall', '-Wextra', '-Werror', '-static', '-o', path.join(share, 'probe'), path.join(here, 'probe.c')]);
  const forger = await Bulb.create(DEV, 'ES256');
  forger.seq = 1000;
  fs.writeFileSync(path.join(share, 'forged'), await forger.frame({ iat }));
  const lines = Object.entries({ ...env.vars, N_FRAMES, FIRST_FRAMES, KILL_FRAMES, DEV, ...messageIds() }).map(([k, v]) => `${k}=${v}`);
  fs.writeFileSync(path.join(share, 'env'), `${lines.join('\n')}\n`);
  return frames;
}

function guestTap(share, phase) {
  const f = path.join(share, 'out/tap');
  if (!fs.existsSync(f)) { result(false, `[${phase}] the guest ran the test (no TAP output)`); return; }
  let detail = null;
  for (const l of fs.readFileSync(f, 'utf8').split('\n')) {
    const m = /^(not )?ok \d+ - (.*)$/.exec(l);
    if (m) {
      if (detail !== null) detail = null;
      const skipped = / # SKIP /.test(m[2]);
      if (skipped) { n++; console.log(`ok ${n} - [${phase}] ${m[2]}`); continue; }
      result(!m[1], `[${phase}] ${m[2]}`);
    } else if (l.startsWith('#')) console.log(l);
  }
  const done = path.join(share, 'out/done');
  check(`[${phase}] the guest script ran to its end`, () => fs.existsSync(done) || 'guest.sh did not finish');
}

// What the cloud saw: the hub registered with the key the guest showed, the device list, each
// frame the guest published (byte for byte, once), and not the forgery.
function cloudChecks(phase, cloud, share, frames, expectSeqs) {
  const hub = cloud.state.hubs.get(HUB_ID);
  check(`[${phase}] cloud: hub ${HUB_ID} registered`, () => !!hub || `hubs: ${[...cloud.state.hubs.keys()]}`);
  let kid = null;
  try { kid = JSON.parse(fs.readFileSync(path.join(share, 'out/key.jwk'), 'utf8')).kid; } catch { /* below */ }
  check(`[${phase}] cloud: registered key id = the guest's iothubctl key show (${kid})`, () => (hub && kid && hub.kid === kid) || `cloud ${hub?.kid}, guest ${kid}`);
  check(`[${phase}] cloud: device list has ${DEV}`, () => !!hub?.devices?.has(DEV) || 'missing');
  const got = cloud.state.frames.filter((f) => f.hub === HUB_ID && f.dev === DEV);
  const seqs = got.map((f) => f.seq);
  check(`[${phase}] cloud: frames ${expectSeqs.join(',')} uploaded once each, signatures verified`,
    () => JSON.stringify(seqs) === JSON.stringify(expectSeqs) || `got ${JSON.stringify(seqs)}`);
  check(`[${phase}] cloud: each frame byte for byte as the bulb signed it`,
    () => got.every((f) => f.jws === frames.find((x) => x.seq === f.seq)?.jws) || 'a frame differs');
  check(`[${phase}] cloud: the forgery never reached it`, () => !got.some((f) => f.seq === 1000) || 'seq 1000 stored');
  check(`[${phase}] cloud: requests signed by the hub key verified (${cloud.state.signatures ?? '?'})`,
    () => (typeof cloud.state.signatures === 'number' ? cloud.state.signatures > 0 : !!hub) || 'no verified signature');
}

function startTimes(phase, share) {
  const f = path.join(share, 'out/start-ms');
  if (!fs.existsSync(f)) return;
  for (const l of fs.readFileSync(f, 'utf8').trim().split('\n')) {
    const m = /^(.*) (\d+) (\d+)$/.exec(l);
    if (m) note(`[${phase}] systemctl start -> active (${m[1]}): ${m[2]} ms (exec -> READY=1: ${m[3]} ms)`);
  }
}

function keepLogs(cache, phase, share, extra = []) {
  const d = path.join(cache, 'logs', phase);
  fs.rmSync(d, { recursive: true, force: true });
  fs.mkdirSync(d, { recursive: true });
  for (const f of fs.readdirSync(path.join(share, 'out'))) fs.cpSync(path.join(share, 'out', f), path.join(d, f), { recursive: true });
  for (const f of extra) if (fs.existsSync(f)) fs.copyFileSync(f, path.join(d, path.basename(f)));
  note(`[${phase}] logs and the guest's journal kept in ${d}`);
}

// systemd-nspawn --ephemeral boots a copy of the root beside it (.#machine.rootfs<random>) and
// removes it on exit, but not when it was killed: drop what an interrupted run left.
function removeEphemeralCopies(cache) {
  for (const f of fs.readdirSync(cache)) {
    if (/^\.#(\.#)?machine\.rootfs[0-9a-f]+(\.lck)?$/.test(f)) fs.rmSync(path.join(cache, f), { recursive: true, force: true });
  }
}

async function phaseNspawn(a) {
  const t0 = Date.now();
  const root = path.join(a.cache, 'rootfs');
  prepareRoot(root);
  removeEphemeralCopies(a.cache);
  const work = path.join(a.cache, 'run-nspawn');
  fs.rmSync(work, { recursive: true, force: true });
  const { broker, cloud } = await hostParts(path.join(work, 'host'));
  const tpm = await unixSwtpm(path.join(work, 'tpm'), root);
  try {
    const share = path.join(work, 'share');
    const frames = await makeShare(share, a.deb, {
      caFile: cloud.caFile,
      vars: { MODE: 'nspawn', MQTT_PORT: broker.port, CLOUD_URL: cloud.url, TCTI: tpm.tcti },
    });
    // The guest's journal goes to the host (persistent), so that it survives the ephemeral copy.
    const journal = path.join(work, 'journal');
    fs.mkdirSync(journal, { recursive: true });
    const log = path.join(work, 'console.log');
    const r = await runGuest('systemd-nspawn', ['-q', '-D', root, '--ephemeral', '--boot', '--console=pipe',
      '--register=no', '--keep-unit', `--bind=${share}:/systest`, `--bind=${journal}:/var/log/journal`,
      `--bind-ro=${tpm.sockDir}:/systest-tpm`,
      '--hostname=iothub-nspawn'], log, NSPAWN_TIMEOUT_S);
    removeEphemeralCopies(a.cache);
    check('[nspawn] the container booted, ran the test and powered off in time',
      () => (!r.timedOut && r.code === 0) || `exit ${r.code} ${r.signal ?? ''}${r.timedOut ? `, killed after ${NSPAWN_TIMEOUT_S} s` : ''}`);
    guestTap(share, 'nspawn');
    cloudChecks('nspawn', cloud, share, frames, [...Array(N_FRAMES).keys()].map((i) => i + 1));
    startTimes('nspawn', share);
    if (failed) {
      try { fs.writeFileSync(path.join(share, 'out/journal-host-copy.txt'), sh('journalctl', ['-D', journal, '--no-pager', '-o', 'short-monotonic'], { maxBuffer: 64 << 20 })); } catch { /* best effort */ }
      keepLogs(a.cache, 'nspawn', share, [log]);
    }
  } finally {
    await cloud.close();
    await broker.stop();
    tpm.stop();
  }
  note(`[nspawn] phase took ${((Date.now() - t0) / 1000).toFixed(1)} s`);
}

async function phaseQemu(a) {
  const t0 = Date.now();
  const img = prepareVm(a.cache);
  const vm = path.join(a.cache, 'vm');
  const work = path.join(a.cache, 'run-qemu');
  fs.rmSync(work, { recursive: true, force: true });
  const { broker, cloud } = await hostParts(path.join(work, 'host'));
  // swtpm behind QEMU's TPM emulator (control channel on a unix socket, data over it too).
  const tpmDir = path.join(work, 'tpm');
  fs.mkdirSync(tpmDir, { recursive: true });
  const sock = path.join(tpmDir, 'swtpm.sock');
  const swtpm = start('swtpm', ['socket', '--tpm2', '--ctrl', `type=unixio,path=${sock}`, '--tpmstate', `dir=${tpmDir}`,
    '--log', `file=${path.join(tpmDir, 'swtpm.log')},level=1`, '--terminate']);
  try {
    for (let i = 0; i < 100 && !fs.existsSync(sock); i++) await sleep(50);
    if (!fs.existsSync(sock)) throw new Error('swtpm did not create its socket');
    const share = path.join(work, 'share');
    const frames = await makeShare(share, a.deb, {
      caFile: cloud.caFile,
      // The guest's view: its own loopback, forwarded (see guest.sh) to 10.0.2.100 -> the host.
      vars: { MODE: 'qemu', MQTT_PORT: 1883, CLOUD_URL: 'https://127.0.0.1:8443', TCTI: '' },
    });
    const log = path.join(work, 'console.log');
    // Each guest connection to 10.0.2.100 runs bridge.mjs, which connects to the host's loopback.
    const bridge = `${process.execPath} ${path.join(here, 'bridge.mjs')}`;
    const r = await runGuest('qemu-system-x86_64', [
      '-accel', 'tcg,thread=multi', '-cpu', 'max', '-m', '1024', '-smp', '2', '-nographic', '-no-reboot',
      '-kernel', path.join(vm, 'vmlinuz'), '-initrd', path.join(vm, 'initrd.img'),
      '-append', 'root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=0',
      '-drive', `file=${img},format=raw,if=virtio,snapshot=on`,
      '-virtfs', `local,path=${share},mount_tag=systest,security_model=none,id=systest`,
      // restrict=on: no route out of the guest; only the two guestfwd channels to the host's
      // loopback broker and cloud. QEMU listens on no host port.
      '-netdev', `user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:1883-cmd:${bridge} ${broker.port},guestfwd=tcp:10.0.2.100:8443-cmd:${bridge} ${cloud.port}`,
      '-device', 'virtio-net-pci,netdev=n0',
      '-chardev', `socket,id=chrtpm,path=${sock}`, '-tpmdev', 'emulator,id=tpm0,chardev=chrtpm', '-device', 'tpm-tis,tpmdev=tpm0',
    ], log, QEMU_TIMEOUT_S);
    check('[qemu] the VM booted, ran the test and powered off in time',
      () => (!r.timedOut && r.code === 0) || `exit ${r.code} ${r.signal ?? ''}${r.timedOut ? `, killed after ${QEMU_TIMEOUT_S} s` : ''}`);
    guestTap(share, 'qemu');
    cloudChecks('qemu', cloud, share, frames, QEMU_SEQS);
    startTimes('qemu', share);
    if (failed) keepLogs(a.cache, 'qemu', share, [log]);
  } finally {
    swtpm.kill('SIGTERM');
    await cloud.close();
    await broker.stop();
  }
  note(`[qemu] phase took ${((Date.now() - t0) / 1000).toFixed(1)} s`);
}

async function main() {
  const a = args();
  if (process.getuid() !== 0) throw new Error('run as root (debootstrap, systemd-nspawn)');
  fs.mkdirSync(a.cache, { recursive: true });
  const t0 = Date.now();
  const want = a.only ? [a.only] : ['nspawn', 'qemu'];
  // Cached root file systems: debootstrap (and the VM's kernel) only on the first run.
  sh(path.join(here, 'rootfs.sh'), [a.cache, want.includes('qemu') ? 'vm' : ''], { stdio: ['ignore', 'inherit', 'inherit'] });
  note(`root file systems ready in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  if (want.includes('nspawn')) await phaseNspawn(a);
  if (want.includes('qemu')) await phaseQemu(a);
  console.log(`1..${n}`);
  console.log(`# ${n - failed} passed, ${failed} failed (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
  if (failed) console.log(`# failed: ${failures.join('; ')}`);
  process.exitCode = failed ? 1 : 0;
}

main().catch((e) => {
  console.log(`not ok ${++n} - system test aborted: ${e.message}`);
  console.log(`1..${n}`);
  console.log(`# ${n - failed - 1} passed, ${failed + 1} failed`);
  killAll();
  process.exit(1);
});
