// The relay scenario of `make bench` (tests/bench/README.md, "The relay scenario"): frames
// from loadgen through mosquitto and the real iothubd, uploaded in batches signed by the hub
// key in a software TPM (swtpm), to the reference cloud (tests/cloud/server.mjs), which checks
// every request and every frame with its own code. Measured against DESIGN.md "Targets":
// frames/s end to end, TPM signatures per batch / per 1,000 frames / per second, latency
// bulb -> cloud (p50/p99/max against batch_max_delay_ms + 100 ms), daemon CPU per frame, and
// RSS with 200 and 5,000 enrolled bulbs.
//
// The cloud runs in a worker thread of this process (this same file is the worker's script),
// so that its frame checks never delay the main thread, which timestamps a sample of the
// frames at the broker (an MQTT subscriber to a few bulbs' status topics).
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Broker, Hub, Swtpm, mqttClient, sleep, waitFor } from '../integration/lib/harness.mjs';
import { SlowTpm } from '../integration/lib/slowtpm.mjs';
import { CtlProbe, smapsTop, timedStart } from './probes.mjs';
import { startWearTrace } from './wear.mjs';

// hub.c trims the heap on its 5 s status timer; a reading this long after a burst has seen it run.
const MEMORY_SETTLE_MS = 6000;
// The 200-bulb reading after the load, a second time this long after the first (above).
const RELAY_SETTLE_MS = 1000;
const WORKER_TAG = 'iothub-bench-cloud';
const PREFIX = 'iothub/v1/bulbs';
const TOKEN = 'tok-bench-relay-0123456789abcdef';
const ID_PREFIX = 'bulb-';

// DESIGN.md defaults of [cloud]; the bench writes neither key unless a knob asks for it.
export const DEFAULT_BATCH_MAX_FRAMES = 256;
export const DEFAULT_BATCH_MAX_DELAY_MS = 2000;
export const RELAY_TARGET = { sigsPerBatch: 1, sigsPerSecondAt5000: 2, latencySlackMs: 100, rss200MiB: 12, rss5000MiB: 16 };

// ---------------------------------------------------------------------------------------
// The worker: the reference cloud, and a compact record of every status batch it took.

if (!isMainThread && workerData?.tag === WORKER_TAG) await cloudWorker(workerData);

// Also the cloud thread of other scenarios (commands.mjs): extraOps(cloud) returns more ops
// ({ name: async (arg) => result }) that the worker answers beside its own.
export async function cloudWorker({ dir, tokens }, extraOps = null) {
  const { startCloud } = await import('../cloud/server.mjs');
  // storeJws: false keeps state.frames small; its de-duplication map still keeps each frame.
  const cloud = await startCloud({ dir, tokens, storeJws: false });
  const batches = [];
  let stored = 0;
  // 'batch' is emitted synchronously at the end of the status handler, right after the
  // batch's frames were pushed to state.frames, and before the request's status is set: so
  // the stored frames are the last `stored` entries, and the request is the newest status
  // request still without a status (the hub has at most one status batch on the wire: a second
  // one may be signed and held by the uplink, but its request starts only after this one's 200
  // was sent, cloudreq.c's chained calls).
  cloud.events.on('batch', (b) => {
    const reqs = cloud.state.requests;
    let rec = null;
    for (let i = reqs.length - 1; i >= 0 && i >= reqs.length - 64; i--) {
      if (reqs[i].endpoint === 'status' && reqs[i].status === 0) { rec = reqs[i]; break; }
    }
    const fr = cloud.state.frames;
    const n = b.stored;
    const devs = new Int32Array(n), seqs = new Float64Array(n);
    for (let j = 0; j < n; j++) {
      const f = fr[fr.length - n + j];
      devs[j] = f.dev.startsWith(ID_PREFIX) ? Number(f.dev.slice(ID_PREFIX.length)) : -1;
      seqs[j] = f.seq;
    }
    stored += n;
    batches.push({ rec, at: b.at, count: b.count, stored: n, duplicates: b.duplicates, rejected: b.rejected.length, bytes: b.bytes, devs, seqs });
  });
  const extra = extraOps ? extraOps(cloud) : {};
  const stats = () => {
    const requests = {};
    for (const r of cloud.state.requests) {
      const k = `${r.endpoint ?? 'other'}:${r.status}`;
      requests[k] = (requests[k] ?? 0) + 1;
    }
    const hub = cloud.state.hubs.get('test-hub');
    return {
      batches: batches.length, stored, signatures: cloud.state.signatures, duplicates: cloud.state.duplicates,
      failures: { ...cloud.state.failures }, frameRejections: { ...cloud.state.frameRejections }, requests,
      registered: Boolean(hub?.kid), devices: hub?.devices?.size ?? 0, deviceLists: hub?.deviceLists?.length ?? 0,
    };
  };
  parentPort.on('message', async ({ id, op, arg }) => {
    try {
      let result;
      if (op === 'stats') result = stats();
      else if (op === 'batches') {
        result = batches.slice(arg.from).map((b) => ({
          reqAt: b.rec?.at ?? null, ms: b.rec?.ms ?? null, status: b.rec?.status ?? null,
          at: b.at, count: b.count, stored: b.stored, duplicates: b.duplicates, rejected: b.rejected, bytes: b.bytes,
          devs: b.devs, seqs: b.seqs,
        }));
      } else if (Object.hasOwn(extra, op)) {
        result = await extra[op](arg);
      } else if (op === 'close') {
        await cloud.close();
        result = true;
      } else throw new Error(`unknown op ${op}`);
      parentPort.postMessage({ id, result });
    } catch (e) {
      parentPort.postMessage({ id, error: String(e.stack ?? e) });
    }
  });
  parentPort.postMessage({ id: 0, result: { url: cloud.url, caFile: cloud.caFile } });
}

export class CloudThread {
  constructor(worker) {
    this.worker = worker;
    this.pending = new Map();
    this.nextId = 1;
  }

  // script and tag: another module that runs cloudWorker() when its workerData.tag is tag.
  static async start(dir, tokens, { script = new URL(import.meta.url), tag = WORKER_TAG } = {}) {
    const w = new Worker(script, { workerData: { tag, dir, tokens } });
    const c = new CloudThread(w);
    const failAll = (e) => {
      for (const p of c.pending.values()) p.reject(e);
      c.pending.clear();
    };
    w.on('message', (m) => {
      const p = c.pending.get(m.id);
      if (!p) return;
      c.pending.delete(m.id);
      clearTimeout(p.timer);
      if (m.error) p.reject(new Error(`cloud worker: ${m.error}`));
      else p.resolve(m.result);
    });
    w.on('error', (e) => failAll(e));
    w.on('exit', (code) => failAll(new Error(`cloud worker exited (${code})`)));
    const info = await c.#wait(0, 30000, 'start');
    Object.assign(c, info);
    return c;
  }

  #wait(id, timeoutMs, what) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`cloud worker: no answer to ${what} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
    });
  }

  call(op, arg = null, timeoutMs = 30000) {
    const id = this.nextId++;
    const p = this.#wait(id, timeoutMs, op);
    this.worker.postMessage({ id, op, arg });
    return p;
  }

  async close() {
    try {
      await this.call('close', null, 10000);
    } finally {
      await this.worker.terminate();
    }
  }
}

// ---------------------------------------------------------------------------------------
// The broker-side sample: an MQTT subscriber (QoS 0) to the status topics of a few bulbs
// spread over the round robin, stamping each frame when the broker hands it out.

class Sampler {
  constructor(client) {
    this.client = client;
    this.raw = [];
  }

  static async start(port, ids) {
    const c = await mqttClient(port, { clientId: `bench-sampler-${process.pid}` });
    const s = new Sampler(c);
    c.on('message', (topic, payload) => { s.raw.push([Date.now(), topic, payload]); });
    await c.subscribeAsync(ids.map((i) => `${PREFIX}/${ID_PREFIX}${i}/status`), { qos: 0 });
    return s;
  }

  reset() { this.raw = []; }

  // [{ t, d, seq }] of the frames seen since the last reset.
  take() {
    const out = [];
    for (const [t, topic, payload] of this.raw) {
      const id = topic.split('/').at(-2);
      try {
        const p = JSON.parse(Buffer.from(payload.toString().split('.')[1], 'base64url').toString());
        out.push({ t, d: Number(id.slice(ID_PREFIX.length)), seq: p.seq });
      } catch { /* not a loadgen frame: ignored */ }
    }
    this.raw = [];
    return out;
  }

  async close() { await this.client.endAsync(); }
}

// ---------------------------------------------------------------------------------------
// Small statistics

export function dist(values) {
  const a = Float64Array.from(values.filter((v) => Number.isFinite(v))).sort();
  if (!a.length) return { n: 0, min: null, p50: null, p90: null, p99: null, max: null, mean: null };
  const q = (p) => a[Math.min(a.length - 1, Math.max(0, Math.ceil((p / 100) * a.length) - 1))];
  let sum = 0;
  for (const v of a) sum += v;
  return { n: a.length, min: a[0], p50: q(50), p90: q(90), p99: q(99), max: a[a.length - 1], mean: sum / a.length };
}

const diffCounts = (a, b) => {
  const out = {};
  for (const [k, v] of Object.entries(b)) if (v - (a[k] ?? 0)) out[k] = v - (a[k] ?? 0);
  return out;
};

// ---------------------------------------------------------------------------------------
// The scenario

// The hub is three processes (issue 14): iothubd, iothub-uplink (HTTPS, the requests' signing
// round trips) and iothub-signer (the TPM commands it sends); a relayed frame costs CPU in all
// three, and DESIGN.md's CPU target is for the hub's work, so all three are counted.
async function cpuAll(ctx) {
  const nsOf = (proc) => (proc?.pid ? ctx.h.cpuNs(proc.pid) : 0);
  const [daemon, tpm, mosq, uplink, signer, machine] = await Promise.all([ctx.h.snapshot(ctx.pid), ctx.h.cpuNs(ctx.tpm.proc.pid),
    ctx.h.cpuNs(ctx.broker.proc.pid), nsOf(ctx.hub.uplinkProc), nsOf(ctx.hub.signerProc), machineCpu()]);
  const node = process.cpuUsage();
  return { daemon, tpmNs: tpm, mosqNs: mosq, uplinkNs: uplink, signerNs: signer, nodeUs: node.user + node.system, machine, t: Date.now() };
}

// The whole machine's CPU (/proc/stat's "cpu" line, proc(5)): busy and total jiffies over every
// core, whoever used them: the hub, the broker, loadgen, the cloud, swtpm, and anything else on
// this shared machine. Busy over total, times the cores, is how many cores were busy: when it is
// near os.availableParallelism(), a run's throughput is the test bed's, not the hub's.
async function machineCpu() {
  const line = (await fs.readFile('/proc/stat', 'utf8')).split('\n', 1)[0];
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal (guest and guest_nice are inside user and nice)
  const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
  return { busy: total - v[3] - v[4], total };
}

// One measured run: frames file for `bulbs` bulbs starting at seqStart, published by loadgen
// BENCH_LOOP: from `perf script` of the tracepoints, the loop thread's iterations (from an
// epoll_wait's return to the next epoll_wait call), the longest of them with the fdatasync time
// inside each, and every thread's fdatasyncs (count, longest).
async function loopIterations(data, pid) {
  const out = await new Promise((resolve, reject) => {
    const p = spawn('perf', ['script', '-i', data, '-F', 'tid,time,event'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let buf = '';
    p.stdout.setEncoding('utf8');
    p.stdout.on('data', (d) => { buf += d; });
    p.on('error', reject);
    p.on('exit', () => resolve(buf));
  });
  const iters = [], syncs = { loop: [], other: [] };
  let wake = null, syncAt = new Map(), syncIn = 0;
  for (const line of out.split('\n')) {
    const m = /^\s*(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+)/.exec(line);
    if (!m) continue;
    const tid = Number(m[1]), t = Number(m[2]) * 1000, what = `${m[3]}_${m[4]}`;
    if (what === 'enter_fdatasync') syncAt.set(tid, t);
    else if (what === 'exit_fdatasync' && syncAt.has(tid)) {
      const d = t - syncAt.get(tid);
      syncAt.delete(tid);
      (tid === pid ? syncs.loop : syncs.other).push(d);
      if (tid === pid) syncIn += d;
    } else if (tid === pid && what === 'exit_epoll_wait') { wake = t; syncIn = 0; }
    else if (tid === pid && what === 'enter_epoll_wait' && wake !== null) { iters.push({ ms: t - wake, fdatasyncMs: syncIn }); wake = null; }
  }
  iters.sort((a, b) => b.ms - a.ms);
  const r2 = (x) => Math.round(x * 10) / 10;
  const sum = (a) => ({ n: a.length, max: r2(a.length ? Math.max(...a) : 0), total: r2(a.reduce((x, y) => x + y, 0)) });
  return { iterations: iters.length, longest: iters.slice(0, 5).map((i) => ({ ms: r2(i.ms), fdatasync_ms: r2(i.fdatasyncMs) })),
    fdatasync_loop_thread: sum(syncs.loop), fdatasync_other_threads: sum(syncs.other) };
}

// (paced at `rate`/s, or as fast as the broker takes them when rate is 0), until the cloud
// stored every one of them.
async function relayRun(ctx, o) {
  const { h, hub, cloud, sampler, keys, dir, opt } = ctx;
  const file = path.join(dir, 'frames.txt');
  const gen = await h.loadgen('frames', '--dir', keys, '--bulbs', o.bulbs, '--frames', o.frames, '--seq-start', o.seqStart, '--out', file);
  const st0 = await hub.status();
  const c0 = await cloud.call('stats');
  sampler.reset();
  // BENCH_WEAR_TRACE=1: where the writes go (wear.mjs); slows the daemon while it runs.
  const wearTrace = process.env.BENCH_WEAR_TRACE === '1' ? await startWearTrace(ctx.pid, dir) : null;
  // BENCH_PERF=/tmp/prefix: the daemon under `perf record` during the run, as bench.mjs does for
  // the throughput runs (profiling costs the daemon a little: do not compare those numbers).
  let perf = null;
  if (process.env.BENCH_PERF) {
    const data = `${process.env.BENCH_PERF}-relay-${opt.tpmDelayMs ?? 0}-${o.label.replace(/[^A-Za-z0-9]+/g, '-')}.data`;
    perf = spawn('perf', ['record', '-q', '-e', 'cpu-clock', '-F', '2000', '-g', '-p', String(ctx.pid), '-o', data], { stdio: 'ignore' });
    await sleep(300);
  } else if (process.env.BENCH_LOOP) {
    // BENCH_LOOP=/tmp/prefix: the loop's iterations (issue 13): epoll_wait and fdatasync
    // tracepoints of every thread of the daemon; loopIterations() reads them after the run.
    const data = `${process.env.BENCH_LOOP}-relay-${opt.tpmDelayMs ?? 0}-${o.label.replace(/[^A-Za-z0-9]+/g, '-')}.data`;
    perf = spawn('perf', ['record', '-q', '-e', 'syscalls:sys_enter_epoll_wait', '-e', 'syscalls:sys_exit_epoll_wait',
      '-e', 'syscalls:sys_enter_fdatasync', '-e', 'syscalls:sys_exit_fdatasync', '-p', String(ctx.pid), '-o', data], { stdio: 'ignore' });
    perf.data = data;
    await sleep(300);
  } else if (process.env.BENCH_STRACE) {
    // BENCH_STRACE=/tmp/prefix: the daemon's system calls counted (strace -c) during the run
    // instead; it slows the daemon much more than perf.
    const out = `${process.env.BENCH_STRACE}-relay-${opt.tpmDelayMs ?? 0}-${o.label.replace(/[^A-Za-z0-9]+/g, '-')}.txt`;
    perf = spawn('strace', ['-c', '-f', '-p', String(ctx.pid), '-o', out], { stdio: 'ignore' });
    await sleep(300);
  }
  const before = await cpuAll(ctx);
  // A control client asking `status` every 50 ms while the load is on (DESIGN.md: the control
  // socket answers within 50 ms at p99 meanwhile); only in the runs that ask for it, since each
  // status costs the daemon CPU (it counts the spool).
  const probe = o.probe ? new CtlProbe(hub, 50) : null;
  const args = ['publish', '--host', '127.0.0.1', '--port', ctx.broker.port, '--file', file, '--window', 1000,
    '--timeout', Math.ceil((o.rate ? o.frames / o.rate : 60) + 60)];
  if (o.rate) args.push('--rate', o.rate);
  const pub = await h.loadgen(...args);
  const tPubDone = Date.now();
  // Until the cloud stored every frame of the run (polled through the worker, which costs the
  // daemon nothing); bounded in time.
  const want = c0.stored + o.frames;
  const end = Date.now() + opt.drainTimeoutMs;
  let c1;
  for (;;) {
    c1 = await cloud.call('stats');
    if (c1.stored >= want) break;
    if (Date.now() > end) {
      const st = await hub.status().catch((e) => String(e));
      throw new Error(`relay ${o.label}: ${c1.stored - c0.stored}/${o.frames} frames at the cloud after ${opt.drainTimeoutMs} ms; hub ${JSON.stringify({ frames: st.frames, spool: st.spool, cloud: st.cloud })}`);
    }
    await sleep(50);
  }
  const after = await cpuAll(ctx);
  const wear = wearTrace ? await wearTrace.stop() : null;
  if (perf) {
    perf.kill('SIGINT');
    await once(perf, 'exit');
  }
  const ctl = probe ? await probe.stop() : null;
  const loop = perf?.data ? await loopIterations(perf.data, ctx.pid) : null;
  const st1 = await hub.status();
  const rss = await h.procStatus(ctx.pid);
  const batches = await cloud.call('batches', { from: c0.batches });
  const samples = sampler.take();
  const bare = o.bare ? await h.loadgen('verify', '--dir', keys, '--bulbs', o.bulbs, '--file', file) : null;
  await fs.rm(file);

  // Frame k of the file is bulb k % N with seq S + floor(k / N) (loadgen frames).
  const N = o.bulbs, S = o.seqStart;
  const kOf = (d, seq) => (seq - S) * N + d;
  const arrival = new Float64Array(o.frames).fill(NaN), storedAt = new Float64Array(o.frames).fill(NaN);
  let foreign = 0;
  const perBatch = [];
  for (const b of batches) {
    let kmin = Infinity, kmax = -Infinity;
    for (let j = 0; j < b.stored; j++) {
      const k = kOf(b.devs[j], b.seqs[j]);
      if (!(k >= 0 && k < o.frames) || !Number.isInteger(k)) { foreign++; continue; }
      arrival[k] = b.reqAt;
      storedAt[k] = b.at;
      if (k < kmin) kmin = k;
      if (k > kmax) kmax = k;
    }
    perBatch.push({ reqAt: b.reqAt, ms: b.ms, at: b.at, count: b.count, stored: b.stored, kmin, kmax });
  }

  // The time origin of the schedule: loadgen publishes frame k at t0 + k / rate after its
  // CONNACK. t0 is anchored on the broker sample: min over the sampled frames of (stamp -
  // k / rate), the least delayed of them. The "exit" bound (loadgen's exit time minus the
  // seconds it reports from t0 to the last PUBACK) is a check: it must be a little later.
  const msPer = o.rate ? 1000 / o.rate : 0;
  let t0 = null;
  for (const s of samples) {
    const k = kOf(s.d, s.seq);
    s.k = k;
    const off = s.t - k * msPer;
    if (o.rate ? t0 === null || off < t0 : k === 0) t0 = off;
  }
  if (!o.rate && t0 === null && samples.length) t0 = Math.min(...samples.map((s) => s.t));
  const t0Exit = tPubDone - pub.seconds * 1000;
  if (t0 === null) t0 = t0Exit;

  const lat = [], latStored = [];
  if (o.rate) {
    for (let k = 0; k < o.frames; k++) {
      const p = t0 + k * msPer;
      lat.push(arrival[k] - p);
      latStored.push(storedAt[k] - p);
    }
  }
  // The sample: how late the broker saw each sampled frame against the schedule, and its
  // latency from that stamp (independent of the schedule).
  const lag = [], latSample = [];
  for (const s of samples) {
    if (!(s.k >= 0 && s.k < o.frames)) continue;
    if (o.rate) lag.push(s.t - (t0 + s.k * msPer));
    latSample.push(arrival[s.k] - s.t);
  }

  const lastArrival = Math.max(...perBatch.map((b) => b.reqAt));
  // Paced: the frames at the cloud by the end of the publishing window (t0 + frames / rate),
  // per second of that window: what the cloud took while the load was on.
  const windowEnd = o.rate ? t0 + o.frames * msPer : null;
  const batchesInWindow = o.rate ? perBatch.filter((b) => b.reqAt <= windowEnd) : null;
  const inWindow = o.rate ? batchesInWindow.reduce((n, b) => n + b.stored, 0) : null;
  const storedN = c1.stored - c0.stored;
  const seconds = (lastArrival - t0) / 1000;
  const hubSig = st1.key.signatures - st0.key.signatures;
  const cloudSig = c1.signatures - c0.signatures;
  const nb = batches.length;
  const requests = diffCounts(c0.requests, c1.requests);
  const nonStatusSigned = cloudSig - nb;
  // Where the latency goes, per batch: the newest frame's latency is the pipeline (broker,
  // verify, commit, batch build, TPM signature, TLS upload) plus any queueing behind the one
  // batch in flight; the oldest frame's adds the wait for the batch to fill (or its timer).
  const pubAt = (k) => t0 + k * msPer;
  const newest = o.rate ? perBatch.map((b) => b.reqAt - pubAt(b.kmax)) : [];
  const oldest = o.rate ? perBatch.map((b) => b.reqAt - pubAt(b.kmin)) : [];
  const timerBatches = perBatch.filter((b) => b.count < ctx.batchMaxFrames);
  const timerOvershoot = o.rate ? timerBatches.map((b) => b.reqAt - pubAt(b.kmin) - ctx.batchMaxDelayMs) : [];
  // Between the cloud's answer to one batch and the next batch's request: the hub's turn
  // (answer handled, rows deleted, next batch read, TPM signature, request sent), when
  // frames were waiting.
  const turnaround = [];
  for (let i = 1; i < perBatch.length; i++) {
    const p = perBatch[i - 1];
    if (p.reqAt !== null && p.ms !== null && perBatch[i].count >= ctx.batchMaxFrames) turnaround.push(perBatch[i].reqAt - (p.reqAt + p.ms));
  }
  const d = after.daemon, b0 = before.daemon;
  const wb = d.io.write_bytes - b0.io.write_bytes - (d.io.cancelled - b0.io.cancelled);
  const cpuWindowS = (after.t - before.t) / 1000;
  const hubNs = (d.ns - b0.ns) + (after.uplinkNs - before.uplinkNs) + (after.signerNs - before.signerNs);
  const r = {
    label: o.label, bulbs: o.bulbs, rate: o.rate, frames: o.frames, avg_frame_bytes: gen.avg_bytes,
    batch_max_frames: ctx.batchMaxFrames, batch_max_delay_ms: ctx.batchMaxDelayMs,
    publish: pub,
    stored_at_cloud: storedN, foreign_frames: foreign,
    cloud_duplicates: c1.duplicates - c0.duplicates,
    cloud_rejections: diffCounts(c0.frameRejections, c1.frameRejections),
    cloud_failures: diffCounts(c0.failures, c1.failures),
    hub_rejected: Object.fromEntries(Object.entries(st1.frames.rejected).filter(([k, v]) => v - (st0.frames.rejected[k] ?? 0) > 0)),
    hub_accepted: st1.frames.accepted - st0.frames.accepted,
    hub_uploaded: st1.cloud.uploaded - st0.cloud.uploaded,
    hub_batches: st1.cloud.batches - st0.cloud.batches,
    seconds_t0_to_last_batch: seconds,
    cloud_frames_per_second: storedN / seconds,
    cloud_frames_per_second_while_publishing: o.rate ? inWindow / (o.frames * msPer / 1000) : null,
    t0_anchor: o.rate ? 'broker sample (min of stamp - k/rate)' : 'broker stamp of frame 0',
    t0_exit_bound_minus_anchor_ms: t0Exit - t0,
    samples: samples.length,
    publish_lag_ms: dist(lag),
    latency_ms: dist(lat),
    latency_stored_ms: dist(latStored),
    latency_sample_from_broker_ms: dist(latSample),
    latency_target_ms: ctx.batchMaxDelayMs + RELAY_TARGET.latencySlackMs,
    batches: nb,
    batch_size: dist(batches.map((x) => x.count)),
    batch_bytes: dist(batches.map((x) => x.bytes)),
    batches_by_timer: timerBatches.length,
    newest_frame_latency_ms: dist(newest),
    oldest_frame_latency_ms: dist(oldest),
    timer_overshoot_ms: dist(timerOvershoot),
    cloud_batch_ms: dist(perBatch.map((x) => x.ms)),
    hub_turnaround_ms: dist(turnaround),
    requests,
    hub_signatures: hubSig,
    cloud_signatures: cloudSig,
    signatures_per_batch: hubSig / nb,
    status_signatures_per_batch: (hubSig - nonStatusSigned) / nb,
    signatures_per_1000_frames: (hubSig / storedN) * 1000,
    signatures_per_second: hubSig / seconds,
    // One per status request (the check above): the batches that reached the cloud while the
    // load was on, per second of it. What a TPM must sustain at this frame rate.
    status_signatures_per_second_while_publishing: o.rate ? batchesInWindow.length / (o.frames * msPer / 1000) : null,
    swtpm_cpu_ms_per_signature: hubSig ? (after.tpmNs - before.tpmNs) / 1e6 / hubSig : null,
    cpu_window_seconds: cpuWindowS,
    daemon_cpu_us_per_frame: ((d.ticks - b0.ticks) / h.CLK_TCK) * 1e6 / storedN,
    daemon_cpu_us_per_frame_schedstat: (d.ns - b0.ns) / 1e3 / storedN,
    daemon_cpu_share: (d.ns - b0.ns) / 1e9 / cpuWindowS,
    uplink_cpu_us_per_frame: (after.uplinkNs - before.uplinkNs) / 1e3 / storedN,
    signer_cpu_us_per_frame: (after.signerNs - before.signerNs) / 1e3 / storedN,
    hub_cpu_us_per_frame: hubNs / 1e3 / storedN,
    bare_verify_us_per_frame: bare?.per_frame_us ?? null,
    // DESIGN.md's ratio: the three processes' CPU per frame; iothubd's alone beside it.
    cpu_ratio: bare ? (hubNs / 1e3 / storedN) / bare.per_frame_us : null,
    cpu_ratio_iothubd: bare ? ((d.ns - b0.ns) / 1e3 / storedN) / bare.per_frame_us : null,
    mosquitto_cpu_us_per_frame: (after.mosqNs - before.mosqNs) / 1e3 / storedN,
    cloud_node_cpu_us_per_frame: (after.nodeUs - before.nodeUs) / storedN,
    swtpm_cpu_share: (after.tpmNs - before.tpmNs) / 1e9 / cpuWindowS,
    // Cores busy on the whole machine over the same window, of os.availableParallelism().
    machine_cores_busy: after.machine.total > before.machine.total
      ? ((after.machine.busy - before.machine.busy) / (after.machine.total - before.machine.total)) * os.availableParallelism() : null,
    machine_cores: os.availableParallelism(),
    loadgen_cpu_us_per_frame: pub.cpu_us != null ? pub.cpu_us / storedN : null,
    write_bytes_per_frame: wb / storedN,
    write_ratio: wb / storedN / gen.avg_bytes,
    wear,
    rss_after: rss,
    spool_after: st1.spool,
    control_status_ms: ctl ? dist(ctl.answers) : null,
    control_status_errors: ctl ? ctl.errors : null,
    loop,
  };
  if (storedN !== o.frames) throw new Error(`relay ${o.label}: ${storedN}/${o.frames} stored at the cloud`);
  if (bare && bare.verified !== bare.frames) throw new Error(`relay ${o.label}: loadgen verify: ${bare.verified}/${bare.frames}`);
  return r;
}

function report(r, fmt) {
  const L = r.latency_ms;
  process.stdout.write(`  relay ${r.label}: ${r.stored_at_cloud} frames at the cloud, ` +
    (r.rate ? `${fmt(r.cloud_frames_per_second_while_publishing, 0)}/s while publishing, ` : '') +
    `${fmt(r.cloud_frames_per_second, 0)}/s to the last batch` +
    (r.rate ? `; latency p50 ${fmt(L.p50, 0)} p99 ${fmt(L.p99, 0)} max ${fmt(L.max, 0)} ms (target ${r.latency_target_ms})` : '') +
    `; ${r.batches} batches of ${fmt(r.batch_size.mean, 0)} on average, ${r.hub_signatures} signatures ` +
    `(${fmt(r.signatures_per_batch, 2)}/batch, ${fmt(r.signatures_per_1000_frames, 2)}/1000 frames, ${fmt(sigRate(r), 2)}/s); ` +
    `iothubd ${fmt(r.daemon_cpu_us_per_frame_schedstat)} + uplink ${fmt(r.uplink_cpu_us_per_frame)} + signer ` +
    `${fmt(r.signer_cpu_us_per_frame)} us/frame` + (r.cpu_ratio ? ` (${fmt(r.cpu_ratio, 2)}x a bare verify; iothubd alone ${fmt(r.cpu_ratio_iothubd, 2)}x)` : '') +
    (r.machine_cores_busy != null ? `; machine ${fmt(r.machine_cores_busy, 2)} of ${r.machine_cores} cores busy (us/frame: ` +
      `cloud ${fmt(r.cloud_node_cpu_us_per_frame)}, mosquitto ${fmt(r.mosquitto_cpu_us_per_frame)}, loadgen ${fmt(r.loadgen_cpu_us_per_frame)})` : '') +
    (r.control_status_ms ? `; control socket status every 50 ms: p50 ${fmt(r.control_status_ms.p50)} p99 ${fmt(r.control_status_ms.p99)} max ${fmt(r.control_status_ms.max)} ms (${r.control_status_ms.n} answers, ${r.control_status_errors} errors)` : '') +
    (r.loop ? `; loop: ${r.loop.iterations} iterations, longest ${r.loop.longest.map((i) => `${i.ms} (fdatasync ${i.fdatasync_ms})`).join(', ')} ms; fdatasync on the loop thread ${r.loop.fdatasync_loop_thread.n} (max ${r.loop.fdatasync_loop_thread.max} ms), on other threads ${r.loop.fdatasync_other_threads.n} (max ${r.loop.fdatasync_other_threads.max} ms)` : '') + '\n');
}

// Enrols bulbs from..n-1: all but the last concurrently (as the other scenarios do), then,
// once the hub says its list is synced (no PUT in flight), the last one alone, and waits for
// the cloud to hold all n. Checks the list the cloud held after the concurrent part: a bulb
// enrolled while a PUT of the list is in flight must still reach the cloud (the hub must not
// mark the list as sent when the answer to an older list comes back). If it did not, the
// lone last enrolment repairs it here, and the shortfall is reported as `stale_list`.
async function enrolSynced(ctx, from, n) {
  const { h, hub, cloud, keys } = ctx;
  const t = performance.now();
  const c0 = await cloud.call('stats');
  await h.enrol(hub, keys, n - 1, from);
  const concurrentS = (performance.now() - t) / 1000;
  await waitFor(async () => (await hub.status()).cloud.devices_synced, 120000, 'the hub\'s list of bulbs synced');
  await sleep(200);
  const mid = await cloud.call('stats');
  await h.enrol(hub, keys, n, n - 1);
  const seconds = (performance.now() - t) / 1000;
  await waitFor(async () => (await cloud.call('stats')).devices === n, 120000, `the list of ${n} bulbs at the cloud`);
  const c1 = await cloud.call('stats');
  const res = {
    seconds, concurrent_seconds: concurrentS, sync_seconds: (performance.now() - t) / 1000,
    lists_put: c1.deviceLists - c0.deviceLists,
    cloud_devices_when_hub_synced: mid.devices, expected: n - 1, stale_list: n - 1 - mid.devices,
  };
  if (res.stale_list > 0) {
    process.stdout.write(`  relay: WARNING: the hub reported its list of bulbs as synced with ${n - 1} enrolled, but the cloud ` +
      `held ${mid.devices}: ${res.stale_list} bulbs enrolled while a PUT of the list was in flight were never sent ` +
      `(their frames would be rejected unknown_device); repaired by one more enrolment\n`);
  }
  return res;
}

async function reload(ctx, cloudKeys) {
  const { hub } = ctx;
  hub.overrides = { ...hub.overrides, cloud: { ...hub.overrides.cloud, ...cloudKeys } };
  await hub.writeConfig();
  const mark = hub.notifications.length;
  const logMark = hub.log.length;
  hub.proc.kill('SIGHUP');
  await hub.waitNotify((l) => l.split('|').includes('READY=1'), 5000, 'READY=1 after SIGHUP', mark);
  if (/Reload failed/.test(hub.log.slice(logMark))) throw new Error(`reload failed: ${hub.log.slice(logMark)}`);
  ctx.batchMaxFrames = cloudKeys.batch_max_frames ?? ctx.defaultBatchMaxFrames;
}

// opt: { bulbs, bigBulbs, rates[], seconds, capacityFrames, bigBatch, drainTimeoutMs,
//        batchMaxFrames?, batchMaxDelayMs?, sampleBulbs }
// h: helpers of bench.mjs { loadgen, enrol, procStatus, snapshot, cpuNs, CLK_TCK, fmt }
export async function relayScenario(root, h, opt) {
  const dir = path.join(root, opt.root ?? 'relay');
  await fs.mkdir(dir);
  const keys = path.join(dir, 'keys');
  const nKeys = Math.max(opt.bulbs, opt.bigBulbs);
  await h.loadgen('keys', '--dir', keys, '--bulbs', nKeys, '--alg', 'mixed');
  const out = {
    scenario: 'relay', bulbs: opt.bulbs, big_bulbs: opt.bigBulbs, alg: 'mixed (ES256, EdDSA alternating)',
    batch_max_frames: opt.batchMaxFrames ?? DEFAULT_BATCH_MAX_FRAMES, batch_max_delay_ms: opt.batchMaxDelayMs ?? DEFAULT_BATCH_MAX_DELAY_MS,
    runs: [],
  };
  const ctx = { h, keys, dir, opt, batchMaxFrames: out.batch_max_frames, defaultBatchMaxFrames: out.batch_max_frames, batchMaxDelayMs: out.batch_max_delay_ms };
  try {
    ctx.tpm = await Swtpm.start(path.join(dir, 'tpm'));
    // opt.tpmDelayMs > 0: the TPM at a real chip's pace (TESTBED.md), through the proxy.
    // BENCH_TPM_TCTI=mssim (the default): through the proxy's simulator framing at every pace (0
    // too): a TCTI with a poll handle, as /dev/tpmrm0 has, so that asynchronous signing waits on
    // the loop. The swtpm TCTI has none: signing then blocks in Esys_Sign_Finish (hubkey.h).
    const tctiKind = process.env.BENCH_TPM_TCTI || 'mssim';
    if (opt.tpmDelayMs > 0 || tctiKind === 'mssim') ctx.slow = await SlowTpm.start(ctx.tpm, opt.tpmDelayMs ?? 0, { protocol: tctiKind });
    out.tpm_tcti = tctiKind;
    out.tpm_delay_ms = opt.tpmDelayMs ?? 0;
    ctx.broker = await Broker.start(dir);
    ctx.cloud = await CloudThread.start(path.join(dir, 'cloud'), { [TOKEN]: 'bench' });
    const tokenFile = path.join(dir, 'token');
    await fs.writeFile(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
    await fs.chmod(tokenFile, 0o600);
    const overrides = {
      key: { backend: 'tpm', tcti: (ctx.slow ?? ctx.tpm).tcti, handle: '0x81000101' },
      cloud: { url: ctx.cloud.url, ca_file: ctx.cloud.caFile, bearer_token_file: tokenFile,
        batch_max_frames: opt.batchMaxFrames, batch_max_delay_ms: opt.batchMaxDelayMs },
      frames: { rate_per_device: 1000, max_clock_skew_s: 86400,
        // The wear measurement's knob (issue 13): unset, the daemon's default.
        ...(process.env.BENCH_COMMIT_DELAY_MS !== undefined ? { commit_delay_ms: Number(process.env.BENCH_COMMIT_DELAY_MS) } : {}) },
    };
    // The key is made before the daemon starts: swtpm serves one client at a time.
    const pre = new Hub(path.join(dir, 'keyinit'), ctx.broker, overrides);
    await fs.mkdir(pre.dir);
    await pre.writeConfig();
    let r = await pre.ctl(['key', 'init']);
    if (r.code !== 0) throw new Error(`iothubctl key init: ${r.code} ${r.stderr}`);
    await fs.mkdir(path.join(dir, 'hub'), { mode: 0o755 });
    ctx.hub = new Hub(path.join(dir, 'hub'), ctx.broker, overrides);
    await fs.mkdir(ctx.hub.stateDir, { recursive: true, mode: 0o700 });
    await ctx.hub.writeConfig();
    ctx.slow?.reset();
    out.ready_ms = [await timedStart(ctx.hub)];
    out.tpm_commands_before_ready = ctx.slow ? [ctx.slow.summary()] : null;
    ctx.pid = ctx.hub.proc.pid;
    await waitFor(async () => (await ctx.hub.status()).mqtt.connected, 10000, 'MQTT connection');
    r = await ctx.hub.ctl(['register']);
    if (r.code !== 0) throw new Error(`iothubctl register: ${r.code} ${r.stderr}`);
    await waitFor(async () => (await ctx.cloud.call('stats')).registered, 10000, 'the hub registered at the cloud');
    // Spread over the round robin, both algorithms (mixed keys alternate P-256 and Ed25519).
    const sampleIds = [...new Set(Array.from({ length: Math.min(opt.sampleBulbs, opt.bulbs) },
      (_, i) => Math.min(opt.bulbs - 1, Math.floor((i * opt.bulbs) / opt.sampleBulbs) + (i % 2))))];
    ctx.sampler = await Sampler.start(ctx.broker.port, sampleIds);
    out.sample_bulbs = sampleIds;
    out.key_backend = (await ctx.hub.status()).key.backend;

    out.rss_start = await h.procStatus(ctx.pid);
    const e1 = await enrolSynced(ctx, 0, opt.bulbs);
    out.enrol_seconds = e1.seconds;
    out.enrol = e1;
    out.rss_after_enrol = await h.procStatus(ctx.pid);

    let seq = 1;
    const run = async (o) => {
      const res = await relayRun(ctx, { bulbs: opt.bulbs, seqStart: seq, ...o });
      seq += Math.ceil(o.frames / (o.bulbs ?? opt.bulbs));
      report(res, h.fmt);
      out.runs.push(res);
      return res;
    };
    const top = Math.max(...opt.rates);
    for (const rate of opt.rates) await run({ label: `${rate}/s`, rate, frames: Math.round(rate * opt.seconds), bare: rate >= 1000, probe: rate === top && rate >= 1000 });
    if (opt.capacityFrames > 0) await run({ label: 'unpaced', rate: 0, frames: opt.capacityFrames, bare: true });
    // RSS with the default batching (the big-batch run below builds bodies 16 times larger):
    // right after the cloud had the last frame, and again RELAY_SETTLE_MS later, once the
    // daemon read the last answer (its heap trim runs when an upload empties the spool, hub.c).
    out.rss_after_load = await h.procStatus(ctx.pid);
    await sleep(RELAY_SETTLE_MS);
    out.rss_after_load_settled = await h.procStatus(ctx.pid);
    // The hub's other two processes (issue 14), for the per-process and total memory.
    const others = async () => ({ uplink: ctx.hub.uplinkProc ? await h.procStatus(ctx.hub.uplinkProc.pid) : null,
      signer: ctx.hub.signerProc ? await h.procStatus(ctx.hub.signerProc.pid) : null });
    out.others_after_load = await others();
    {
      const t = [out.rss_after_load, out.others_after_load.uplink, out.others_after_load.signer].filter(Boolean);
      process.stdout.write(`  relay: memory after the load (RSS / peak / private KiB): iothubd ${t[0].rssKiB} / ${t[0].hwmKiB} / ` +
        `${t[0].privateKiB}` + (out.others_after_load.uplink ? `, uplink ${out.others_after_load.uplink.rssKiB} / ` +
        `${out.others_after_load.uplink.hwmKiB} / ${out.others_after_load.uplink.privateKiB}` : '') +
        (out.others_after_load.signer ? `, signer ${out.others_after_load.signer.rssKiB} / ${out.others_after_load.signer.hwmKiB} / ` +
        `${out.others_after_load.signer.privateKiB}` : '') +
        `; private in total ${t.reduce((n, x) => n + x.privateKiB, 0)}; iothubd ${RELAY_SETTLE_MS / 1000} s later: ` +
        `${out.rss_after_load_settled.rssKiB} / ${out.rss_after_load_settled.hwmKiB} / ${out.rss_after_load_settled.privateKiB}\n`);
      // Where iothubd's private memory is (the installed-system test logs the same line).
      process.stdout.write(`    ${smapsTop(await fs.readFile(`/proc/${ctx.pid}/smaps`, 'utf8'), 'iothubd', 10)}\n`);
    }
    if (opt.bigBatch > 0 && opt.rates.length) {
      const rate = Math.max(...opt.rates);
      await reload(ctx, { batch_max_frames: opt.bigBatch });
      await run({ label: `${rate}/s, batch ${opt.bigBatch}`, rate, frames: Math.round(rate * opt.seconds), bare: false });
      await reload(ctx, { batch_max_frames: opt.batchMaxFrames });
      out.rss_after_big_batch = await h.procStatus(ctx.pid);
    }

    if (opt.bigBulbs > opt.bulbs) {
      const e2 = await enrolSynced(ctx, opt.bulbs, opt.bigBulbs);
      out.big_enrol = e2;
      out.big_enrol_seconds = e2.seconds;
      out.rss_after_big_enrol = await h.procStatus(ctx.pid);
      // Right after the burst (4,800 enrolments, a list of every bulb built for the cloud at
      // each) the heap is full of freed blocks; the daemon gives their pages back on its 5 s
      // status timer (hub.c, issue 13). Both readings are kept: the settled one is the memory
      // of a hub with 5,000 bulbs, the first the high-water mark of the burst.
      await sleep(MEMORY_SETTLE_MS);
      out.rss_after_big_enrol_settled = await h.procStatus(ctx.pid);
      process.stdout.write(`  relay: enrolled ${opt.bigBulbs - opt.bulbs} more bulbs in ${h.fmt(e2.seconds)} s, ` +
        `the cloud had the list of ${opt.bigBulbs} after ${h.fmt(e2.sync_seconds)} s (${e2.lists_put} lists PUT)\n`);
      const rate = Math.min(2000, Math.max(...opt.rates, 100));
      await run({ label: `${rate}/s, ${opt.bigBulbs} bulbs`, bulbs: opt.bigBulbs, rate, frames: 2 * opt.bigBulbs, bare: false });
      out.rss_after_big_load = await h.procStatus(ctx.pid);
      await sleep(MEMORY_SETTLE_MS);
      out.rss_after_big_load_settled = await h.procStatus(ctx.pid);
      process.stdout.write(`  relay: ${opt.bigBulbs} bulbs, private KiB right after / ${MEMORY_SETTLE_MS / 1000} s later: ` +
        `enrolled ${out.rss_after_big_enrol.privateKiB} / ${out.rss_after_big_enrol_settled.privateKiB}, ` +
        `after the frames ${out.rss_after_big_load.privateKiB} / ${out.rss_after_big_load_settled.privateKiB}\n`);
      out.others_after_big_load = await others();
    }
    // READY again, with state (the bulbs enrolled, the token sealed): restarts, each timed.
    for (let i = 0; i < (opt.readyRestarts ?? 3); i++) {
      await ctx.hub.stop();
      ctx.slow?.reset();
      out.ready_ms.push(await timedStart(ctx.hub));
      if (ctx.slow) out.tpm_commands_before_ready.push(ctx.slow.summary());
      ctx.pid = ctx.hub.proc.pid;
    }
    process.stdout.write(`  relay: READY=1 after exec: ${out.ready_ms.map((x) => h.fmt(x)).join(', ')} ms` +
      (ctx.slow ? ` (TPM ${opt.tpmDelayMs} ms/command; commands before READY: ${out.tpm_commands_before_ready.map((c) => c.total).join(', ')})` : '') + '\n');
    out.log_warnings = ctx.hub.log.split('\n').filter((l) => /warn|error/i.test(l)).slice(0, 20);
  } catch (e) {
    // What the hub and the cloud said, for the error message.
    const st = await ctx.hub?.status().catch((x) => String(x));
    const cs = await ctx.cloud?.call('stats', null, 5000).catch((x) => String(x));
    e.message += `\nhub status: ${JSON.stringify(st?.cloud ?? st)}\ncloud: ${JSON.stringify(cs)}\nhub log (end): ${ctx.hub?.log.slice(-2000)}`;
    throw e;
  } finally {
    await ctx.sampler?.close().catch(() => {});
    await ctx.hub?.stop();
    await ctx.cloud?.close().catch(() => {});
    await ctx.broker?.stop();
    await ctx.slow?.stop();
    await ctx.tpm?.stop();
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// The table of bench.mjs

export function relayVerdicts(relay) {
  const v = {};
  const runs = relay?.runs ?? [];
  if (!runs.length) return v;
  const mark = (ok) => (ok ? 'PASS' : 'FAIL');
  v.relay_status_signatures_per_batch_max = Math.max(...runs.map((r) => r.status_signatures_per_batch));
  v.relay_tpm_per_batch = mark(v.relay_status_signatures_per_batch_max <= RELAY_TARGET.sigsPerBatch + 1e-9);
  const at5000 = runs.filter((r) => r.rate >= 5000 && r.bulbs === relay.bulbs);
  const def5000 = at5000.find((r) => r.batch_max_frames === relay.batch_max_frames);
  if (def5000) {
    v.relay_signatures_per_second_at_5000 = sigRate(def5000);
    v.relay_tpm_rate = mark(sigRate(def5000) <= RELAY_TARGET.sigsPerSecondAt5000);
  }
  const big = at5000.find((r) => r.batch_max_frames !== relay.batch_max_frames);
  if (big) {
    v.relay_signatures_per_second_at_5000_big_batch = sigRate(big);
    v.relay_big_batch_frames = big.batch_max_frames;
  }
  const paced = runs.filter((r) => r.rate > 0 && r.batch_max_frames === relay.batch_max_frames);
  if (paced.length) {
    v.relay_latency_p99_max_ms = Math.max(...paced.map((r) => r.latency_ms.p99));
    v.relay_latency_target_ms = relay.batch_max_delay_ms + RELAY_TARGET.latencySlackMs;
    v.relay_latency = mark(v.relay_latency_p99_max_ms <= v.relay_latency_target_ms);
  }
  const MiB = (k) => k / 1024;
  if (relay.rss_after_enrol) {
    v.relay_rss_200_mib = MiB(Math.max(relay.rss_after_enrol.rssKiB, relay.rss_after_load?.rssKiB ?? 0));
    v.relay_rss_200 = mark(v.relay_rss_200_mib <= RELAY_TARGET.rss200MiB);
  }
  if (relay.rss_after_big_enrol) {
    v.relay_rss_5000_mib = MiB(Math.max(relay.rss_after_big_enrol.rssKiB, relay.rss_after_big_load?.rssKiB ?? 0));
    v.relay_rss_5000 = mark(v.relay_rss_5000_mib <= RELAY_TARGET.rss5000MiB);
  }
  return v;
}

// TPM signatures a second: of the status batches while publishing (paced runs), else of all
// requests from the start of publishing to the last batch.
function sigRate(r) { return r.status_signatures_per_second_while_publishing ?? r.signatures_per_second; }

export function relayTable(relay, fmt) {
  const mark = (ok) => (ok ? 'PASS' : 'FAIL');
  const grid = (head, rows, left = 1) => {
    const w = head.map((x, i) => Math.max(x.length, ...rows.map((r) => r[i].length)));
    const line = (r) => r.map((c, i) => (i < left ? c.padEnd(w[i]) : c.padStart(w[i]))).join('  ');
    return `${line(head)}\n${w.map((n) => '-'.repeat(n)).join('  ')}\n${rows.map((r) => `${line(r)}\n`).join('')}`;
  };
  let s = `\nRelay through the cloud (${relay.bulbs} bulbs, ${relay.alg}; hub key in swtpm${relay.tpm_delay_ms ? ` slowed to ${relay.tpm_delay_ms} ms per command` : ''}; [cloud] batch_max_frames ${relay.batch_max_frames}, ` +
    `batch_max_delay_ms ${relay.batch_max_delay_ms})\n`;
  const rows = relay.runs.map((r) => [r.label, r.rate ? String(r.rate) : 'max', fmt(r.cloud_frames_per_second_while_publishing, 0),
    fmt(r.cloud_frames_per_second, 0), String(r.batches),
    `${fmt(r.batch_size.mean, 0)} (${r.batch_size.min}-${r.batch_size.max})`, String(r.hub_signatures),
    fmt(r.status_signatures_per_batch, 2), fmt(r.signatures_per_1000_frames, 2), fmt(sigRate(r), 2),
    r.rate >= 5000 ? mark(sigRate(r) <= RELAY_TARGET.sigsPerSecondAt5000) : '',
    fmt(r.swtpm_cpu_ms_per_signature, 2), fmt(r.cloud_batch_ms.p50, 0), fmt(r.hub_turnaround_ms.p50, 0),
    fmt(r.daemon_cpu_us_per_frame_schedstat), fmt(r.cpu_ratio, 2),
    fmt(r.cloud_node_cpu_us_per_frame), fmt(r.mosquitto_cpu_us_per_frame), fmt(r.write_bytes_per_frame, 0), fmt(r.write_ratio, 1)]);
  s += grid(['run', 'rate', 'cloud f/s', '(to last)', 'batches', 'frames/batch', 'sigs', 'sigs/batch', 'sigs/1000f', 'sigs/s', '<=2/s@5k',
    'swtpm ms/sig', 'cloud ms/b', 'gap ms', 'daemon us/f', 'xbare', 'cloud us/f', 'mosq us/f', 'write B/f', 'w-ratio'], rows);
  const traced = relay.runs.filter((r) => r.wear);
  if (traced.length) {
    s += `\nWhere the writes went (BENCH_WEAR_TRACE=1, strace of pwrite64/fdatasync; per accepted frame; "dirtied" estimates write_bytes: 4 KiB per page made dirty between syncs)\n`;
    const per = (r, k, f) => (r.wear.files[k] ? fmt(r.wear.files[k][f] / r.frames, 0) : '0');
    s += grid(['run', 'segments B/f', 'seg dirtied B/f', 'seg syncs', 'WAL B/f', 'WAL dirtied B/f', 'WAL syncs', 'DB (checkpoint) B/f', 'DB dirtied B/f', 'commits', 'frames/commit', 'WAL frames/commit p50/p90/max', 'distinct pages', 'hottest page:frames'],
      traced.map((r) => [r.label, per(r, 'segments', 'bytes'), per(r, 'segments', 'dirtied_bytes'), String(r.wear.files.segments?.syncs ?? 0),
        per(r, 'wal', 'bytes'), per(r, 'wal', 'dirtied_bytes'), String(r.wear.files.wal?.syncs ?? 0),
        per(r, 'db', 'bytes'), per(r, 'db', 'dirtied_bytes'), String(r.wear.commits), fmt(r.frames / Math.max(1, r.wear.commits), 1),
        `${r.wear.pages_per_commit.p50}/${r.wear.pages_per_commit.p90}/${r.wear.pages_per_commit.max}`, String(r.wear.distinct_pages),
        r.wear.hottest_pages.join(' ')]));
  }
  s += `\nRelay latency bulb -> cloud, ms (publish time = loadgen's schedule anchored at the broker; arrival = the batch's request at the cloud)\n`;
  const lrows = relay.runs.filter((r) => r.rate).map((r) => [r.label, fmt(r.latency_ms.p50, 0), fmt(r.latency_ms.p99, 0), fmt(r.latency_ms.max, 0),
    String(r.latency_target_ms), r.batch_max_frames === relay.batch_max_frames ? mark(r.latency_ms.p99 <= r.latency_target_ms) : '(info)',
    fmt(r.latency_stored_ms.p99, 0), fmt(r.latency_sample_from_broker_ms.p99, 0), fmt(r.publish_lag_ms.p99, 1),
    `${fmt(r.newest_frame_latency_ms.p50, 0)}/${fmt(r.newest_frame_latency_ms.p99, 0)}`,
    r.batches_by_timer ? `${r.batches_by_timer}: ${fmt(r.timer_overshoot_ms.p50, 0)}/${fmt(r.timer_overshoot_ms.max, 0)}` : '-']);
  s += grid(['run', 'p50', 'p99', 'max', 'target', 'verdict', 'p99 stored', 'p99 sample', 'pub lag p99',
    'newest p50/p99', 'timer batches: over p50/max'], lrows);
  const MiB = (k) => (k ? fmt(k / 1024, 2) : '-');
  s += `\nRelay memory (daemon VmRSS, MiB): start ${MiB(relay.rss_start?.rssKiB)}, ${relay.bulbs} bulbs enrolled ${MiB(relay.rss_after_enrol?.rssKiB)}, ` +
    `after the runs ${MiB(relay.rss_after_load?.rssKiB)} (target ${RELAY_TARGET.rss200MiB})` +
    (relay.rss_after_big_batch ? `, after the run with bigger batches ${MiB(relay.rss_after_big_batch.rssKiB)}` : '');
  if (relay.rss_after_big_enrol) {
    s += `; ${relay.big_bulbs} bulbs enrolled ${MiB(relay.rss_after_big_enrol.rssKiB)}, after a frame pass ${MiB(relay.rss_after_big_load?.rssKiB)}, ` +
      `peak ${MiB(relay.rss_after_big_load?.hwmKiB ?? relay.rss_after_big_enrol.hwmKiB)} (target ${RELAY_TARGET.rss5000MiB}); ` +
      `anon/file ${MiB((relay.rss_after_big_load ?? relay.rss_after_big_enrol).anonKiB)}/${MiB((relay.rss_after_big_load ?? relay.rss_after_big_enrol).fileKiB)}`;
  }
  return `${s}\n`;
}
