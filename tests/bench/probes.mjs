// Probes for the DESIGN.md "Targets" table that the scenarios share: the control socket's
// answer time under load, the time from exec to READY=1, and private memory.
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { sleep, waitFor } from '../integration/lib/harness.mjs';

// One `status` request on the daemon's control socket (one JSON line in, one out, then the
// daemon closes: src/control.c), timed from connect to the end of the answer.
export function askStatus(sockPath, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const s = net.connect(sockPath);
    let got = '';
    const timer = setTimeout(() => { s.destroy(); reject(new Error(`control socket: no answer in ${timeoutMs} ms`)); }, timeoutMs);
    s.setEncoding('utf8');
    s.on('connect', () => s.write('{"cmd":"status"}\n'));
    s.on('data', (d) => { got += d; });
    s.on('error', (e) => { clearTimeout(timer); reject(e); });
    s.on('close', () => {
      clearTimeout(timer);
      const ms = performance.now() - t0;
      try { JSON.parse(got); } catch { reject(new Error(`control socket: not one JSON answer: ${got.slice(0, 200)}`)); return; }
      resolve(ms);
    });
  });
}

// A client that asks `status` every periodMs (the next one periodMs after the previous one
// started, or at once when an answer took longer) until stop(); returns the answer times.
export class CtlProbe {
  constructor(hub, periodMs = 50) {
    this.sock = path.join(hub.runtimeDir, 'control');
    this.periodMs = periodMs;
    this.ms = [];
    this.errors = 0;
    this.running = true;
    this.done = this.#loop();
  }

  async #loop() {
    while (this.running) {
      const t = performance.now();
      try { this.ms.push(await askStatus(this.sock)); } catch { this.errors++; }
      const wait = this.periodMs - (performance.now() - t);
      if (wait > 0) await sleep(wait);
    }
  }

  async stop() {
    this.running = false;
    await this.done;
    return { answers: this.ms, errors: this.errors };
  }
}

// Starts hub (a harness Hub, not running) and times exec -> READY=1 as the notify socket saw
// it. The harness spawns notify-listen first and then, synchronously, the daemon: the moment
// start() returns is the exec (child_process.spawn returns once exec succeeded).
export async function timedStart(hub, timeoutMs = 20000) {
  let readyAt = null;
  // The signer and, with a cloud, the uplink first (the harness starts them before the daemon,
  // with awaits that would leave hub.notify unset below): then start() spawns the listener
  // before its first await.
  await hub.startSigner();
  if (hub.hasCloud) await hub.startUplink();
  const p = hub.start({ waitReady: false, signer: false, uplink: false });
  let buf = '';
  try {
    hub.notify.stdout.on('data', (d) => {
      buf += d;
      if (readyAt === null && buf.split('\n').some((l) => l.split('|').includes('READY=1'))) readyAt = performance.now();
    });
  } finally {
    // start() goes on whatever happened here: wait for it before anything leaves this function,
    // so that the caller's cleanup (which stops the hub) comes after the spawn and not before it
    // (round 6: an iothubd spawned after the scenario's cleanup ran for half an hour).
    await p;
  }
  const execAt = performance.now();
  await waitFor(() => readyAt !== null || hub.proc.exitCode !== null, timeoutMs, `READY=1 (log: ${hub.log})`);
  if (readyAt === null) throw new Error(`iothubd exited before READY=1: ${hub.log}`);
  return readyAt - execAt;
}

// Private memory (Private_Clean + Private_Dirty + Private_Hugetlb of /proc/PID/smaps_rollup):
// the pages only this process holds, what DESIGN.md's memory target counts.
export async function privateKiB(pid) {
  const s = await fs.readFile(`/proc/${pid}/smaps_rollup`, 'utf8');
  let kib = 0;
  for (const m of s.matchAll(/^Private_(?:Clean|Dirty|Hugetlb):\s+(\d+) kB/gm)) kib += Number(m[1]);
  return kib;
}

// VmRSS, VmHWM, private memory, its anonymous part (Anonymous), Pss and threads of a process.
export async function procMemory(pid) {
  const s = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  const kb = (k) => Number((s.match(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm')) ?? [0, 0])[1]);
  const r = await fs.readFile(`/proc/${pid}/smaps_rollup`, 'utf8');
  const rk = (k) => Number((r.match(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm')) ?? [0, 0])[1]);
  return { rssKiB: kb('VmRSS'), hwmKiB: kb('VmHWM'), privateKiB: await privateKiB(pid), anonKiB: rk('Anonymous'),
    pssKiB: rk('Pss'), threads: Number((s.match(/^Threads:\s+(\d+)/m) ?? [0, 0])[1]) };
}

// Where private memory goes: the text of /proc/PID/smaps summed per mapping name (the file's
// base name, [heap], [stack], [anon] for a nameless mapping), as one line with the top n by
// private bytes (Private_Clean + Private_Dirty), "name private/rss" in kB. The same line
// tests/system/guest.sh logs for the installed system.
export function smapsTop(text, who, n = 8) {
  const by = new Map();
  let cur = null, rss = 0, priv = 0;
  for (const l of text.split('\n')) {
    const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+(?:\s+(\S+))?/.exec(l);
    if (head) {
      const name = head[1] ? head[1].replace(/.*\//, '') : '[anon]';
      cur = by.get(name) ?? { priv: 0, rss: 0 };
      by.set(name, cur);
      continue;
    }
    const m = /^(Rss|Private_Clean|Private_Dirty):\s+(\d+) kB/.exec(l);
    if (!m || !cur) continue;
    if (m[1] === 'Rss') { cur.rss += Number(m[2]); rss += Number(m[2]); } else { cur.priv += Number(m[2]); priv += Number(m[2]); }
  }
  const top = [...by.entries()].sort((a, b) => b[1].priv - a[1].priv || (a[0] < b[0] ? -1 : 1)).slice(0, n);
  return `${who} smaps: Rss ${rss} kB, private ${priv} kB; top by private (kB private/rss):` +
    top.map(([k, v]) => ` ${k} ${v.priv}/${v.rss}`).join('');
}
