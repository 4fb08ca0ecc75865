// make soak (issue 12): the daemon at a steady load for SOAK_SECONDS (3600) with the hub key in a
// TPM at a real chip's pace (lib/slowtpm.mjs, SOAK_TPM_DELAY_MS = 70), sampling every
// SOAK_SAMPLE_S (60) seconds its RSS, open fds, spool depth and CPU; prints the curves as a
// table and fails (exit 1) if they are not flat or if a frame was lost. Not part of CI.
//
// Load: SOAK_BULBS (50) jose-signed bulbs that keep and resend unacknowledged frames
// (PROTOCOL.md 1), SOAK_RATE (100) frames/s in all, through mosquitto to the daemon and on to the
// reference cloud (tests/cloud), which checks every request signature.
//
// "Flat", over the samples after the first (warm-up: SQLite's cache, the allocator's arenas
// and the TLS session fill once):
//   - RSS: the least-squares slope, projected over the whole run, at most max(1 MiB, 5 % of the
//     median), and max - min at most 20 % of the median;
//   - open fds: max - min at most 2 (a connection being opened or closed when sampled);
//   - spool depth: never above what the batching holds in flight, SOAK_RATE x
//     (batch_max_delay_ms + 2 s) + batch_max_frames, so the hub keeps up and nothing piles up;
//   - CPU (% of one core per interval): every interval at most 1.5 x the median + 2 points.
// And: every frame sent is at the cloud exactly once (after its de-duplication) at the end.
import fs from 'node:fs/promises';
import path from 'node:path';
import { Hub, mqttClient, sleep, waitFor } from '../integration/lib/harness.mjs';
import { Bulb } from '../integration/lib/bulb.mjs';
import { SlowTpm } from '../integration/lib/slowtpm.mjs';
import { startTestbed, stopTestbed, keyBeforeDaemon } from '../integration/lib/testbed.mjs';
import { startCloud } from '../cloud/server.mjs';

const env = (k, d) => (process.env[k] ? Number(process.env[k]) : d);
const SECONDS = env('SOAK_SECONDS', 3600);
const SAMPLE_S = env('SOAK_SAMPLE_S', 60);
const N_BULBS = env('SOAK_BULBS', 50);
const RATE = env('SOAK_RATE', 100);
const TPM_DELAY = env('SOAK_TPM_DELAY_MS', 70);
const BATCH_DELAY_MS = 2000, BATCH_MAX = 256; // the daemon's defaults (DESIGN.md)
const TOKEN = 'tok-soak-0123456789abcdef';
const CLK_TCK = 100; // sysconf(_SC_CLK_TCK) on Linux

async function procSample(pid) {
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  const rss = Number(/^VmRSS:\s+(\d+)/m.exec(status)[1]);
  const fds = (await fs.readdir(`/proc/${pid}/fd`)).length;
  const stat = (await fs.readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1].split(' ');
  const ticks = Number(stat[11]) + Number(stat[12]); // utime + stime (fields 14, 15)
  return { rss, fds, ticks };
}

function slope(ys) { // least squares, per sample
  const n = ys.length, mx = (n - 1) / 2, my = ys.reduce((a, b) => a + b, 0) / n;
  let num = 0, den = 0;
  for (let i = 0; i < n; i++) { num += (i - mx) * (ys[i] - my); den += (i - mx) ** 2; }
  return den ? num / den : 0;
}
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };

async function main() {
  const { dir, tpm, broker } = await startTestbed();
  const slow = await SlowTpm.start(tpm, TPM_DELAY);
  const cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'soak' }, storeJws: false });
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  const overrides = {
    key: { backend: 'tpm', tcti: slow.tcti, handle: '0x81010001' },
    cloud: { url: cloud.url, ca_file: cloud.caFile, bearer_token_file: path.join(dir, 'token') },
  };
  await keyBeforeDaemon(broker, overrides);
  const hub = await Hub.start(broker, overrides);
  let client;
  try {
    await waitFor(async () => (await hub.status()).mqtt.connected, 10000, 'mqtt');
    const reg = await hub.ctl(['register']);
    if (reg.code !== 0) throw new Error(`register: ${reg.stderr}`);
    client = await mqttClient(broker.port);
    client.setMaxListeners(0);
    const bulbs = [];
    for (let i = 0; i < N_BULBS; i++) {
      const b = await Bulb.create(`soak-${i}`, i % 2 ? 'EdDSA' : 'ES256');
      const f = path.join(dir, `${b.id}.pem`);
      await fs.writeFile(f, b.pem);
      const r = await hub.ctl(['bulb', 'add', b.id, '--key', f]);
      if (r.code !== 0) throw new Error(`bulb add: ${r.stderr}`);
      await b.attach(client, { resendMs: 5000 });
      bulbs.push(b);
    }
    const pid = hub.proc.pid;
    console.log(`soak: ${SECONDS} s, ${N_BULBS} bulbs, ${RATE} frames/s, TPM ${TPM_DELAY} ms, sample every ${SAMPLE_S} s, daemon pid ${pid}`);

    // The load: RATE frames/s, round robin over the bulbs, paced against the clock.
    let running = true, sent = 0;
    const t0 = performance.now();
    const load = (async () => {
      for (let k = 0; running; k++) {
        const due = t0 + (k * 1000) / RATE;
        const wait = due - performance.now();
        if (wait > 0) await sleep(wait);
        await bulbs[k % N_BULBS].send();
        bulbs[k % N_BULBS].sent.length = 0; // the bulb keeps its unacked frames; we count by seq
        sent++;
      }
    })();

    const samples = [];
    let prev = await procSample(pid), prevAt = performance.now();
    console.log('min | RSS KiB | fds | spool | CPU % | frames sent | at cloud | uploaded | backoff s');
    while (performance.now() - t0 < SECONDS * 1000) {
      await sleep(Math.min(SAMPLE_S * 1000, SECONDS * 1000 - (performance.now() - t0)));
      const p = await procSample(pid), at = performance.now();
      const st = await hub.status();
      const s = {
        min: +((at - t0) / 60000).toFixed(1), rss: p.rss, fds: p.fds, spool: st.spool.pending,
        cpu: +(((p.ticks - prev.ticks) / CLK_TCK) / ((at - prevAt) / 1000) * 100).toFixed(1),
        sent, cloud: cloud.state.frames.length, uploaded: st.cloud.uploaded, backoff: st.cloud.backoff_s,
      };
      prev = p; prevAt = at;
      samples.push(s);
      console.log(`${s.min} | ${s.rss} | ${s.fds} | ${s.spool} | ${s.cpu} | ${s.sent} | ${s.cloud} | ${s.uploaded} | ${s.backoff}`);
    }
    running = false;
    await load;

    // Drain: every frame acked by the hub and at the cloud once.
    await waitFor(() => bulbs.every((b) => b.ackedSeq === b.seq), 60000, 'every frame acked');
    const want = bulbs.reduce((n, b) => n + b.seq, 0);
    await waitFor(() => cloud.state.frames.length >= want, 120000, `all ${want} frames at the cloud`).catch(() => {});
    const seen = new Map(bulbs.map((b) => [b.id, new Set()]));
    let dup = 0;
    for (const f of cloud.state.frames) { const s = seen.get(f.dev); if (s?.has(f.seq)) dup++; s?.add(f.seq); }
    const lost = bulbs.reduce((n, b) => { let m = 0; for (let q = 1; q <= b.seq; q++) if (!seen.get(b.id).has(q)) m++; return n + m; }, 0);

    // Flatness, after the warm-up sample.
    const v = samples.length > 2 ? samples.slice(1) : samples;
    const fails = [];
    const rssMed = median(v.map((s) => s.rss));
    const rssDrift = slope(v.map((s) => s.rss)) * samples.length;
    const rssSpan = Math.max(...v.map((s) => s.rss)) - Math.min(...v.map((s) => s.rss));
    if (rssDrift > Math.max(1024, 0.05 * rssMed)) fails.push(`RSS drifts ${rssDrift.toFixed(0)} KiB over the run`);
    if (rssSpan > 0.2 * rssMed) fails.push(`RSS spans ${rssSpan} KiB (median ${rssMed})`);
    const fdSpan = Math.max(...v.map((s) => s.fds)) - Math.min(...v.map((s) => s.fds));
    if (fdSpan > 2) fails.push(`open fds span ${fdSpan}`);
    const spoolBound = Math.ceil(RATE * (BATCH_DELAY_MS / 1000 + 2) + BATCH_MAX);
    const spoolMax = Math.max(...samples.map((s) => s.spool));
    if (spoolMax > spoolBound) fails.push(`spool depth ${spoolMax} above ${spoolBound}`);
    const cpuMed = median(v.map((s) => s.cpu));
    const cpuMax = Math.max(...v.map((s) => s.cpu));
    if (cpuMax > 1.5 * cpuMed + 2) fails.push(`CPU peaks at ${cpuMax} % (median ${cpuMed} %)`);
    if (lost > 0) fails.push(`${lost} frames lost`);
    if (!samples.length) fails.push('no sample taken (SOAK_SECONDS < SOAK_SAMPLE_S)');
    const summary = { seconds: SECONDS, samples: samples.length, frames_sent: want, at_cloud_distinct: want - lost, lost,
      cloud_duplicates: dup, resent: bulbs.reduce((n, b) => n + b.resent, 0), rss_median_kib: rssMed,
      rss_drift_kib: Math.round(rssDrift), rss_span_kib: rssSpan, fd_span: fdSpan, spool_max: spoolMax, spool_bound: spoolBound,
      cpu_median: cpuMed, cpu_max: cpuMax, tpm_commands: slow.commands.length, flat: fails.length === 0 };
    console.log(`soak summary ${JSON.stringify(summary)}`);
    for (const b of bulbs) b.detach();
    if (fails.length) { console.log(`soak: NOT FLAT: ${fails.join('; ')}`); process.exitCode = 1; } else console.log('soak: flat');
  } finally {
    await client?.endAsync();
    await hub.cleanup();
    await slow.stop();
    await stopTestbed({ cloud, broker, tpm, dir });
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
