// iothub-signer(8) throughput, CPU and memory against swtpm: SIGN_HTTP (4 KiB and 1 MiB bodies) and
// SIGN_DPOP, 32 requests in flight on one connection. Run: cd tests && IOTHUB_BUILD=$PWD/../build node bench/signer.mjs
import fs from 'node:fs/promises';
import path from 'node:path';
import { spawn, execFileSync } from 'node:child_process';
import { Swtpm, confText, tempDir, waitFor, sleep } from '../integration/lib/harness.mjs';
import { SignerClient, OP, TAG } from '../integration/lib/signerclient.mjs';
import { SlowTpm } from '../integration/lib/slowtpm.mjs';
const B = process.env.IOTHUB_BUILD ?? new URL('../../build', import.meta.url).pathname;
const dir = await tempDir('sbench-');
const tpm = await Swtpm.start(path.join(dir, 'tpm'));
const conf = path.join(dir, 'c.conf');
await fs.writeFile(conf, confText({ hub: { id: 'h', state_dir: path.join(dir, 'hs') }, key: { backend: 'tpm', tcti: tpm.tcti },
  cloud: { url: 'https://c.example' }, signer: { client_user: 'root', command_user: 'root', state_dir: path.join(dir, 'ss'), rate_per_s: 10000, burst: 100000 } }));
execFileSync(`${B}/iothubctl`, ['--config', conf, 'key', 'init']);
const sock = path.join(dir, 's.sock');
const p = spawn(`${B}/iothub-signer`, ['--config', conf, '--listen', sock], { stdio: ['ignore', 'ignore', 'pipe'] });
let log = ''; p.stderr.on('data', (d) => { log += d; });
await waitFor(() => /started on/.test(log), 10000);
const st = (pid = p.pid) => {
  const s = execFileSync('cat', [`/proc/${pid}/status`]).toString(); const g = (k) => +new RegExp(`${k}:\\s+(\\d+)`).exec(s)[1];
  const r = execFileSync('cat', [`/proc/${pid}/smaps_rollup`]).toString(); const h = (k) => +new RegExp(`${k}:\\s+(\\d+)`).exec(r)[1];
  return { rss_kib: g('VmRSS'), peak_rss_kib: g('VmHWM'), private_kib: h('Private_Clean') + h('Private_Dirty') };
};
const cpu = () => { const f = execFileSync('cat', [`/proc/${p.pid}/stat`]).toString().split(') ')[1].split(' '); return (+f[11] + +f[12]) / 100; };
await sleep(300);
console.log('idle', st());
const c = await SignerClient.connect(sock);
const body = Buffer.alloc(4096, 'x');
for (const [name, N, fields] of [
  ['SIGN_HTTP 4 KiB body', 2000, [[TAG.METHOD, 'POST'], [TAG.TARGET_URI, 'https://c.example/v1/x'], [TAG.AUTHORIZATION, 'Bearer t'], [TAG.BODY, body], [TAG.PRIO, { u8: 1 }]]],
  ['SIGN_DPOP', 2000, [[TAG.METHOD, 'GET'], [TAG.URL, 'https://c.example/x']]],
  ['SIGN_HTTP 1 MiB body', 50, [[TAG.METHOD, 'POST'], [TAG.TARGET_URI, 'https://c.example/v1/x'], [TAG.AUTHORIZATION, 'Bearer t'], [TAG.BODY, Buffer.alloc(1 << 20, 'y')], [TAG.PRIO, { u8: 1 }]]],
]) {
  const c0 = cpu(); const t0 = Date.now(); let bad = 0;
  for (let i = 0; i < N; i += 32) {
    const ids = []; for (let j = 0; j < 32 && i + j < N; j++) ids.push(c.send(name.startsWith('SIGN_DPOP') ? OP.SIGN_DPOP : OP.SIGN_HTTP, fields));
    for (const a of await Promise.all(ids.map((id) => c.wait(id, 60000)))) if (a.status !== 0) bad++;
  }
  const dt = (Date.now() - t0) / 1000;
  console.log(name, { n: N, bad, per_s: Math.round(N / dt), signer_cpu_ms_per_op: +((cpu() - c0) * 1000 / N).toFixed(3), ...st() });
}
c.close(); p.kill();

// A TPM at a chip's pace (70 ms a signature, TESTBED.md) behind the mssim TCTI, which has a poll
// handle: the signer's loop must keep answering (STATUS) while signatures queue in hubkey.
const slow = await SlowTpm.start(tpm, 70, { protocol: 'mssim' });
const conf2 = path.join(dir, 'slow.conf');
await fs.writeFile(conf2, (await fs.readFile(conf, 'utf8')).replace(tpm.tcti, slow.tcti));
const sock2 = path.join(dir, 's2.sock');
const t0 = Date.now();
const p2 = spawn(`${B}/iothub-signer`, ['--config', conf2, '--listen', sock2], { stdio: ['ignore', 'ignore', 'pipe'] });
let log2 = ''; p2.stderr.on('data', (d) => { log2 += d; });
await waitFor(() => /started on/.test(log2), 20000);
console.log('slow TPM: started (key opened) in ms', Date.now() - t0);
const c2 = await SignerClient.connect(sock2);
const ids = []; for (let i = 0; i < 28; i++) ids.push(c2.send(OP.SIGN_DPOP, [[TAG.METHOD, 'GET'], [TAG.URL, 'https://c.example/x']]));
const lat = [];
const tS = Date.now();
const all = Promise.all(ids.map((id) => c2.wait(id, 60000)));
let doneAll = false; all.then(() => { doneAll = true; });
while (!doneAll) { const a = Date.now(); await c2.call(OP.STATUS); lat.push(Date.now() - a); await sleep(10); }
const res = await all;
lat.sort((a, b) => a - b);
console.log('slow TPM: 28 SIGN_DPOP', { ok: res.filter((a) => a.status === 0).length, per_s: +(28 / ((Date.now() - tS) / 1000)).toFixed(1),
  status_ms_p50: lat[Math.floor(lat.length / 2)], status_ms_p99: lat[Math.floor(lat.length * 0.99)], status_ms_max: lat.at(-1), samples: lat.length, ...st(p2.pid) });
c2.close(); p2.kill(); await slow.stop(); await tpm.stop(); await fs.rm(dir, { recursive: true, force: true });
