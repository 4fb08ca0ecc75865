// Helpers of the fault campaign (faults.test.mjs, issue 12): the daemon as systemd runs it
// (journal through the native protocol, in a mount namespace of its own) optionally under
// libfaketime with a clock the test moves; a size-limited tmpfs for the state directory;
// bulbs that keep and resend their frames and answer commands; and the tally of what reached
// the cloud. Everything on loopback, every mount undone by the test that made it.
import { execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import { openSync, closeSync, fstatSync, readFileSync } from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { promisify } from 'node:util';
import * as jose from 'jose';
import { BUILD, Hub, IOTHUBD, NOTIFY_LISTEN, SLOW, tempDir, waitFor } from './harness.mjs';
import { Bulb } from './bulb.mjs';

export const run = promisify(execFile);

// The journal's MESSAGE_IDs, by name, from the daemon's own header.
export const MID = {};
{
  const h = readFileSync(new URL('../../../include/iothub/log.h', import.meta.url), 'utf8');
  for (const m of h.matchAll(/#define IOTHUB_MID_(\w+) "([0-9a-f]{32})"/g)) MID[m[1]] = m[2];
}

// libfaketime's preload library (Debian: package faketime), or null when it is not installed.
export async function faketimeLib() {
  for (const p of ['/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1', '/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1',
    '/usr/lib/arm-linux-gnueabihf/faketime/libfaketime.so.1']) {
    try { await fs.access(p); return p; } catch { /* next */ }
  }
  return null;
}

// LD_PRELOAD for a daemon on the test's clock: tools/faketime-monotonic.so first (its
// timerfd_settime() wins), then libfaketime, then what was there. libfaketime 0.9.10 shifts
// absolute CLOCK_MONOTONIC timerfd deadlines by its offset even with DONT_FAKE_MONOTONIC
// (wolfcw/libfaketime#378): on a machine up for less than the offset, sd-event's deadline went
// negative and the daemon's loop ended with EINVAL; up longer, every timer fired early. A real
// clock step moves neither (tests/tools/preload/faketime-monotonic.c).
export async function faketimePreload(rest) {
  const shim = path.join(BUILD, 'tools', 'faketime-monotonic.so');
  await fs.access(shim).catch(() => { throw new Error(`${shim} is missing: make tools`); });
  return [shim, await faketimeLib(), rest].filter(Boolean).join(':');
}

// The daemon under test as under systemd: stderr is the journal stream, so it logs through
// sd_journal_sendv() to /run/systemd/journal/socket, which in its own mount namespace is a
// socket of this test (entries collected in .journal, parsed into fields). STATUS= lines still
// arrive on the harness's NOTIFY_SOCKET, iothubctl works as for Hub. The signer logs the same
// way, into the same journal (SYSLOG_IDENTIFIER=iothub-signer: signerEntries()), its stderr
// kept in signerStderrText (a sanitizer's report, nothing else).
// opts.clockFile: run under libfaketime with FAKETIME_TIMESTAMP_FILE, read again at every
// call (FAKETIME_NO_CACHE), so that the test moves the daemon's clock while it runs.
// The helpers' SYSLOG_IDENTIFIERs: their entries are not the daemon's.
const HELPERS = ['iothub-signer', 'iothub-uplink'];

export class FaultHub extends Hub {
  static async create(broker, overrides = {}, opts = {}) {
    const h = new FaultHub(opts.dir ?? await tempDir(), broker, overrides);
    await fs.chmod(h.dir, 0o755);
    await fs.mkdir(h.stateDir, { recursive: true, mode: 0o700 });
    await fs.mkdir(h.signerStateDir, { recursive: true, mode: 0o700 });
    await h.writeConfig();
    h.journal = [];
    h.errPath = path.join(h.dir, 'stderr');
    h.signerErrPath = path.join(h.dir, 'signer-stderr');
    h.uplinkErrPath = path.join(h.dir, 'uplink-stderr');
    h.clockFile = opts.clockFile ?? null;
    h.starts = [];
    const fakerun = path.join(h.dir, 'fakerun');
    await fs.mkdir(path.join(fakerun, 'systemd/journal'), { recursive: true });
    h.fakerun = fakerun;
    h.jlistener = spawn(NOTIFY_LISTEN, [path.join(fakerun, 'systemd/journal/socket')], { stdio: ['ignore', 'pipe', 'inherit'] });
    const rl = readline.createInterface({ input: h.jlistener.stdout });
    await new Promise((resolve) => rl.on('line', (l) => {
      if (l === 'LISTENING') { resolve(); return; }
      const e = {};
      for (const kv of l.split('|')) { const i = kv.indexOf('='); if (i > 0) e[kv.slice(0, i)] = kv.slice(i + 1); }
      h.journal.push(e);
    }));
    return h;
  }

  // The daemon's journal entries with this MESSAGE_ID (name from log.h) and pred, from index
  // 'from' on (the signer's, some with the same MESSAGE_IDs: signerEntries()).
  entries(mid, pred = () => true, from = 0) {
    return this.journal.slice(from).filter((e) => e.MESSAGE_ID === MID[mid] && !HELPERS.includes(e.SYSLOG_IDENTIFIER) && pred(e));
  }

  async waitEntry(mid, pred = () => true, from = 0, timeoutMs = 10000) {
    return waitFor(() => this.entries(mid, pred, from)[0], timeoutMs,
      `journal entry ${mid} (journal: ${JSON.stringify(this.journal.slice(from).map((e) => e.MESSAGE))})`);
  }

  get stderrText() { try { return readFileSync(this.errPath, 'utf8'); } catch { return ''; } }

  get signerStderrText() { try { return readFileSync(this.signerErrPath, 'utf8'); } catch { return ''; } }

  get uplinkStderrText() { try { return readFileSync(this.uplinkErrPath, 'utf8'); } catch { return ''; } }

  // iothub-uplink's journal entries (pred, from index 'from' on): HTTPS, sign-in, registration.
  uplinkEntries(pred = () => true, from = 0) {
    return this.journal.slice(from).filter((e) => e.SYSLOG_IDENTIFIER === 'iothub-uplink' && pred(e));
  }

  // The signer's journal entries (pred, from index 'from' on).
  signerEntries(pred = () => true, from = 0) {
    return this.journal.slice(from).filter((e) => e.SYSLOG_IDENTIFIER === 'iothub-signer' && pred(e));
  }

  // Runs the program in a mount namespace whose /run is the test's (fakerun), its stderr the
  // journal stream: as the unit runs it, logging to the journal.
  #journalSpawn(envIn, errPath) {
    const fd = openSync(errPath, 'a');
    const st = fstatSync(fd, { bigint: true });
    return {
      fd,
      env: { ...envIn, JOURNAL_STREAM: `${st.dev}:${st.ino}` },
      wrap: (cmd, argv) => ['unshare', ['-m', '--propagation', 'private', '--', 'sh', '-c',
        'mount --bind "$1" /run && shift && exec "$@"', 'sh', this.fakerun, cmd, ...argv]],
    };
  }

  // A helper (the signer, the uplink) as its unit runs it: logging to the test's journal, on the
  // same clock as the daemon (one system clock on a hub).
  async #startHelper(start, errPath, envIn) {
    const senv = { ...(envIn ?? {}) };
    if (this.clockFile) {
      senv.LD_PRELOAD = await faketimePreload(process.env.LD_PRELOAD);
      senv.FAKETIME_TIMESTAMP_FILE = this.clockFile;
      senv.FAKETIME_NO_CACHE = '1';
      senv.DONT_FAKE_MONOTONIC = '1';
      senv.ASAN_OPTIONS = [process.env.ASAN_OPTIONS, 'verify_asan_link_order=0'].filter(Boolean).join(':');
    }
    const j = this.#journalSpawn(senv, errPath);
    try {
      await start({ env: j.env, wrap: j.wrap, stderrFd: j.fd });
    } finally {
      closeSync(j.fd);
    }
  }

  // iothub-uplink, the same way (as Hub.startUplink(), the journal for its log).
  async startUplink(opts = {}) {
    if (opts.stderrFd !== undefined) return super.startUplink(opts);
    return this.#startHelper((o) => super.startUplink({ ...opts, ...o }), this.uplinkErrPath, opts.env);
  }

  async start(opts = {}) {
    if (opts.signer !== false)
      await this.#startHelper((o) => this.startSigner(o), this.signerErrPath, opts.env);
    if (opts.uplink !== false && this.hasCloud) await this.startUplink({ env: opts.env });
    this.notifySock = path.join(this.dir, `notify-${Date.now()}`);
    this.notify = spawn(NOTIFY_LISTEN, [this.notifySock], { stdio: ['ignore', 'pipe', 'inherit'] });
    const rl = readline.createInterface({ input: this.notify.stdout });
    await new Promise((resolve) => rl.on('line', (line) => {
      if (line === 'LISTENING') { resolve(); return; }
      this.notifications.push(line);
    }));
    const mark = this.notifications.length;
    const j = this.#journalSpawn({ ...process.env, NOTIFY_SOCKET: this.notifySock }, this.errPath);
    const env = { ...j.env, ...(opts.env ?? {}) };
    if (this.clockFile) {
      env.LD_PRELOAD = await faketimePreload(env.LD_PRELOAD);
      env.FAKETIME_TIMESTAMP_FILE = this.clockFile;
      env.FAKETIME_NO_CACHE = '1';
      // CLOCK_MONOTONIC stays the kernel's (a date jump does not move it, as on a real hub).
      env.DONT_FAKE_MONOTONIC = '1';
      // Under make asan, the sanitizer's runtime is not first in the preload list any more.
      env.ASAN_OPTIONS = [env.ASAN_OPTIONS, 'verify_asan_link_order=0'].filter(Boolean).join(':');
    }
    const [cmd, argv] = j.wrap(IOTHUBD, ['--config', this.configPath, ...(opts.args ?? [])]);
    this.proc = spawn(cmd, argv, { env, stdio: ['ignore', 'ignore', j.fd] });
    closeSync(j.fd);
    this.starts.push(Date.now());
    this.exited = once(this.proc, 'exit').then(([code, signal]) => ({ code, signal }));
    if (opts.waitReady !== false)
      await this.waitNotify((l) => l.split('|').includes('READY=1'), 8000 * SLOW, 'READY=1', mark);
  }

  // The last STATUS= the daemon sent.
  get lastStatus() {
    for (let i = this.notifications.length - 1; i >= 0; i--) {
      const s = this.notifications[i].split('|').find((x) => x.startsWith('STATUS='));
      if (s) return s.slice(7);
    }
    return '';
  }

  // CPU time (user + system, in clock ticks of 10 ms) the daemon used so far.
  async cpuTicks() {
    const s = await fs.readFile(`/proc/${this.proc.pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  }

  async cleanup() {
    await this.stop();
    if (this.jlistener) {
      this.jlistener.kill('SIGTERM');
      await once(this.jlistener, 'exit').catch(() => {});
      this.jlistener = null;
    }
    await fs.rm(this.dir, { recursive: true, force: true });
  }
}

// The slow-storage preload (slowwrite.c beside this file), built into dir; returns the
// environment that makes every database write of the daemon wait ms milliseconds.
export async function slowWriteEnv(dir, ms) {
  const so = path.join(dir, 'slowwrite.so');
  await run('cc', ['-shared', '-fPIC', '-O2', '-o', so, new URL('./slowwrite.c', import.meta.url).pathname, '-ldl']);
  return { LD_PRELOAD: [so, process.env.LD_PRELOAD].filter(Boolean).join(':'), SLOWWRITE_MS: String(ms),
    // Under make asan, the sanitizer's runtime is not first in the preload list any more.
    ASAN_OPTIONS: [process.env.ASAN_OPTIONS, 'verify_asan_link_order=0'].filter(Boolean).join(':') };
}

// A size-limited tmpfs on dir (the test runs as root), filled, made read-only and back, and
// unmounted by the test that made it.
export class Tmpfs {
  constructor(dir) { this.dir = dir; this.filler = path.join(dir, 'filler'); }

  static async mount(dir, size) {
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    await run('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700,nosuid,nodev`, 'tmpfs', dir]);
    return new Tmpfs(dir);
  }

  // Fills every free byte with one file (a full disk); returns the bytes written.
  async fill() {
    const fh = await fs.open(this.filler, 'a');
    const chunk = Buffer.alloc(64 * 1024, 0x5a);
    let n = 0;
    try {
      for (let size = 64 * 1024; size >= 512; size = size >> 1) {
        for (;;) {
          try { await fh.write(chunk, 0, size); n += size; } catch (e) { if (e.code === 'ENOSPC') break; throw e; }
        }
      }
    } finally {
      await fh.close();
    }
    return n;
  }

  async free() { await fs.rm(this.filler, { force: true }); }
  async readOnly() { await run('mount', ['-o', 'remount,ro', this.dir]); }
  async readWrite() { await run('mount', ['-o', 'remount,rw', this.dir]); }
  async unmount() { await run('umount', ['-l', this.dir]).catch(() => {}); }
}

// A bulb on its own MQTT connection that keeps and resends its frames (Bulb.attach), sends one
// frame at a time in seq order, and answers every command it can verify with the hub's public
// key by an ack in its next frame, once per id. .cmds maps a command id to its receipts,
// .ackSeqs to the seq of the frame that carried its ack.
export class FaultBulb {
  constructor(bulb, client, hubKey, prefix) {
    this.bulb = bulb; this.id = bulb.id; this.client = client; this.hubKey = hubKey; this.prefix = prefix;
    this.cmds = new Map(); this.ackSeqs = new Map(); this.unverified = 0; this.chain = Promise.resolve();
  }

  static async create(id, client, hubKey, { prefix = 'iothub/v1/bulbs', resendMs = 300, window = 1 } = {}) {
    const bulb = await Bulb.create(id, 'EdDSA');
    const b = new FaultBulb(bulb, client, hubKey, prefix);
    await bulb.attach(client, { prefix, resendMs, window });
    client.on('message', (topic, payload) => { if (topic === `${prefix}/${id}/cmd`) b.#onCommand(payload.toString()); });
    await client.subscribeAsync(`${prefix}/${id}/cmd`, { qos: 1 });
    return b;
  }

  // Frames are signed and queued one after the other: two concurrent sends could be queued
  // out of seq order, and a window of 1 would then skip the lower one as acked.
  send(over = {}) {
    const p = this.chain.then(() => this.bulb.send(over));
    this.chain = p.catch(() => {});
    return p;
  }

  async #onCommand(jws) {
    let payload;
    try {
      payload = JSON.parse(new TextDecoder().decode((await jose.compactVerify(jws, this.hubKey, { algorithms: ['ES256'] })).payload));
    } catch {
      this.unverified++;
      return;
    }
    const seen = this.cmds.get(payload.id);
    if (seen) { seen.push({ at: Date.now(), jws }); return; }
    this.cmds.set(payload.id, [{ at: Date.now(), jws }]);
    const f = await this.send({ ack: { id: payload.id, ok: true } });
    this.ackSeqs.set(payload.id, f.seq);
  }

  get sent() { return this.bulb.sent; }
  get inFlight() { return this.bulb.inFlight; }
  detach() { this.bulb.detach(); }
}

// What reached the cloud of what the bulbs sent: per bulb sent, at the cloud (distinct),
// duplicates (must be none after the cloud's de-duplication), lost with the reason.
export function tally(cloud, bulbs) {
  const rows = [];
  for (const b of bulbs) {
    const got = cloud.state.frames.filter((f) => f.dev === b.id).map((f) => f.seq);
    const set = new Set(got);
    const lost = b.sent.filter((f) => !set.has(f.seq));
    const notAcked = lost.filter((f) => f.seq > b.bulb.ackedSeq).length;
    rows.push({ dev: b.id, sent: b.sent.length, atCloud: set.size, duplicates: got.length - set.size,
      lost: lost.length, lostNotAcked: notAcked, lostAfterAck: lost.length - notAcked, resent: b.bulb.resent });
  }
  const sum = (k) => rows.reduce((a, r) => a + r[k], 0);
  return { rows, sent: sum('sent'), atCloud: sum('atCloud'), duplicates: sum('duplicates'), lost: sum('lost'),
    lostNotAcked: sum('lostNotAcked'), lostAfterAck: sum('lostAfterAck'), resent: sum('resent') };
}

export function lostReason(t) {
  if (t.lost === 0) return '-';
  const r = [];
  if (t.lostNotAcked) r.push(`${t.lostNotAcked} never acked by the hub (still with the bulb)`);
  if (t.lostAfterAck) r.push(`${t.lostAfterAck} acked by the hub, not at the cloud`);
  return r.join('; ');
}

// One row of the report table (printed as a TAP comment and collected in FAULT_TABLE).
export const FAULT_TABLE = [];
export function reportRow(fault, outcome, t) {
  const row = { fault, outcome, in: t.sent, atCloud: t.atCloud, lost: t.lost, reason: lostReason(t) };
  FAULT_TABLE.push(row);
  console.log(`FAULT | ${fault} | ${outcome} | in ${t.sent} | at cloud ${t.atCloud} | lost ${t.lost} | ${row.reason}`);
  return row;
}

// A small ext4 file system on a loop device, mounted with errors=remount-ro as a hub's root
// file system would be: trigger_fs_error makes the kernel turn it read-only under the running
// daemon (what a disk error does), which no remount can undo; the operator's way back is
// unmount, fsck, mount again.
export class LoopExt4 {
  constructor(dir, image) { this.dir = dir; this.image = image; }

  static async mount(dir, image, size = '16M') {
    await run('truncate', ['-s', size, image]);
    await run('mkfs.ext4', ['-q', '-F', image]);
    const l = new LoopExt4(dir, image);
    await l.mountAgain();
    return l;
  }

  // The loop device is set up and torn down here, not by mount -o loop. The daemon runs in a
  // mount namespace of its own (unshare -m, FaultHub.start), which holds a copy of this mount;
  // the kernel releases that copy (and with it the superblock and the loop device) after the
  // process is gone, from delayed work, later still on a loaded machine. Until then umount here
  // only detaches our view, fsck would repair a file system still in use, and mount -o loop
  // reuses the loop device still attached to the image, so the mount gets the old superblock in
  // its error state: read-only (EROFS in full runs, never alone). Checked by hand with
  // `unshare -m sleep 3` holding the mount: the image stays attached those 3 s.
  async mountAgain() {
    await fs.mkdir(this.dir, { recursive: true });
    const { stdout: loop } = await run('losetup', ['--find', '--show', this.image]);
    this.loop = loop.trim();
    await run('mount', ['-t', 'ext4', '-o', 'errors=remount-ro,nosuid,nodev', this.loop, this.dir]);
    if (await this.readOnly()) {
      const { stdout } = await run('findmnt', ['-no', 'OPTIONS', this.dir]);
      throw new Error(`${this.image} on ${this.loop} mounted read-only: ${stdout.trim()}`);
    }
    await fs.chmod(this.dir, 0o700);
    this.dev = path.basename(this.loop);
  }

  async error() { await fs.writeFile(`/sys/fs/ext4/${this.dev}/trigger_fs_error`, 'iothub fault test\n'); }

  async readOnly() {
    const { stdout } = await run('findmnt', ['-no', 'OPTIONS', this.dir]);
    return /(^|,)ro(,|$)|emergency_ro/.test(stdout);
  }

  // Unmounts, then waits until no loop device is left on the image (see mountAgain), so that
  // fsck and the next mount see the file system alone; says who holds the mount if it stays
  // busy; lazily only at the end, for the test's clean-up.
  async unmount() {
    const end = Date.now() + 10000;
    for (;;) {
      try { await run('umount', [this.dir]); break; } catch (e) {
        if (Date.now() > end) {
          const who = await run('fuser', ['-vm', this.dir]).then((r) => r.stderr + r.stdout, (x) => String(x.stderr ?? x));
          await run('umount', ['-l', this.dir]).catch(() => {});
          throw new Error(`${this.dir} stays busy: ${e.stderr ?? e.message}; ${who}`);
        }
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
    // Detach the device (autoclear: it goes when its last user lets go), and wait up to 5 s for
    // that. A mount namespace that lives on holds it longer: any process unshared while the mount
    // existed has a copy (other tests running on the same machine). The next mountAgain() then
    // still gets a device of its own, so it never meets the old superblock; the old one, in its
    // error state, is read-only and writes nothing.
    if (this.loop) await run('losetup', ['-d', this.loop]).catch(() => {});
    const old = this.loop;
    this.loop = null;
    const until = Date.now() + 5000;
    while (Date.now() < until) {
      const { stdout } = await run('losetup', ['-j', this.image]);
      if (!stdout.trim()) return;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    console.log(`LoopExt4: ${old} still holds ${this.image} after 5 s (a mount namespace that lives on); the next mount uses a new device`);
  }
  // fsck.ext4 exits 1 when it fixed errors, 0 when there were none (fsck(8)); anything else fails.
  async fsck() {
    return run('fsck.ext4', ['-y', '-f', this.image]).catch((e) => {
      if (e.code === 1) return e;
      throw new Error(`fsck.ext4 ${this.image}: exit ${e.code}: ${e.stderr ?? e.message}`);
    });
  }
}
