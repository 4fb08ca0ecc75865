// The commands scenario of `make bench` (tests/bench/README.md, "The commands scenario"):
// latency cloud -> bulb of commands queued at the reference cloud (tests/cloud/server.mjs),
// answered at once to the hub's parked long poll, checked and signed by the hub key in a
// software TPM (swtpm) as a JWS, published by the real iothubd through mosquitto to simulated
// bulbs that verify it with jose against the hub's public JWK (`iothubctl key show --jwk`,
// taken before the daemon starts) and ack it in their next status frame; then to the cloud
// recording the "acked" result. Once quiet, once beside a status load from loadgen, to show
// whether commands wait behind status uploads.
//
// The cloud runs in a worker thread (the cloud thread of relay.mjs, with the command ops
// below; this same file is the worker's script), so that its frame checks under load never
// delay the bulbs' receive stamps in the main thread. Times on both sides are
// performance.timeOrigin + performance.now(): one wall clock, sub-millisecond, in every thread.
import { isMainThread, workerData } from 'node:worker_threads';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import * as jose from 'jose';
import { Broker, Hub, Swtpm, mqttClient, sleep, waitFor } from '../integration/lib/harness.mjs';
import { SlowTpm } from '../integration/lib/slowtpm.mjs';
import { Bulb } from '../integration/lib/bulb.mjs';
import { CloudThread, cloudWorker, dist } from './relay.mjs';

const WORKER_TAG = 'iothub-bench-commands-cloud';
const PREFIX = 'iothub/v1/bulbs';
const HUB_ID = 'test-hub'; // the harness's [hub] id
const TOKEN = 'tok-bench-commands-0123456789abcdef';
const CMD_PREFIX = 'cmd-bulb-';

const wall = () => performance.timeOrigin + performance.now();
const nowS = () => Math.floor(Date.now() / 1000);

// ---------------------------------------------------------------------------------------
// The worker: relay.mjs's cloud thread plus three ops. `queue` waits (bounded) until the
// hub's long poll is parked, then queues the command and stamps that moment; every result
// the cloud records for a queued id is stamped as it is recorded.

if (!isMainThread && workerData?.tag === WORKER_TAG) await cloudWorker(workerData, commandOps);

function commandOps(cloud) {
  const times = new Map(); // id -> { queuedAt, results: { status: at } }
  cloud.events.on('result', (r) => {
    const t = times.get(r.id);
    if (t && t.results[r.status] === undefined) t.results[r.status] = wall();
  });
  const hub = () => cloud.state.hubs.get(HUB_ID);
  const parked = () => (hub()?.waiters?.size ?? 0) >= 1;
  return {
    now: async () => wall(),
    queue: async ({ id, dev, set, exp, parkTimeoutMs }) => {
      const t = wall();
      while (!parked() && wall() - t < parkTimeoutMs) await sleep(1);
      const wasParked = parked();
      const queuedAt = wall();
      const cmd = cloud.control.queueCommand({ hub: HUB_ID, id, dev, set, exp });
      // handOut() ran inside queueCommand() if a poll was parked: the answer is on its way.
      const rec = { queuedAt, parkWaitMs: queuedAt - t, parked: wasParked, answeredAtOnce: cmd.sentAt !== undefined };
      times.set(id, { ...rec, results: {} });
      return rec;
    },
    times: async ({ ids }) => ids.map((id) => {
      const t = times.get(id);
      const c = hub()?.commands.get(id);
      return t ? { ...t, deliveries: c?.deliveries ?? null } : null;
    }),
  };
}

// ---------------------------------------------------------------------------------------
// A bulb: signs its status frames with jose (tests/integration/lib/bulb.mjs), subscribes to
// its command topic, stamps each message as MQTT.js hands it over, verifies it with the hub's
// public key (ES256, the paired kid), and acks a verified one in its next status frame, one
// frame after the other (a later seq must not overtake an earlier one).

class CmdBulb {
  constructor(bulb, client, hubKey, kid) {
    Object.assign(this, { bulb, id: bulb.id, client, hubKey, kid });
    this.got = new Map(); // command id -> { at, verified, error, ackSignedAt, ackPubackAt }
    this.unverified = 0;
    this.foreign = 0;
    this.sending = Promise.resolve();
  }

  static async create(id, port, hubKey, kid) {
    const bulb = await Bulb.create(id, 'ES256');
    const client = await mqttClient(port, { clientId: `bench-${id}-${process.pid}` });
    // MQTT.js leaves Nagle's algorithm on: the ack frame, written right after the PUBACK of
    // the command, would then wait for the broker's delayed ACK of that PUBACK (40 ms here),
    // a cost of the simulator, not of the hub. A bulb's own stack is its own business.
    client.stream.setNoDelay(true);
    const b = new CmdBulb(bulb, client, hubKey, kid);
    client.on('message', (topic, payload) => { b.#onMessage(wall(), topic, payload); });
    await client.subscribeAsync(`${PREFIX}/${id}/cmd`, { qos: 1 });
    return b;
  }

  async #onMessage(at, topic, payload) {
    const e = { at, verified: false };
    let cmdId = null;
    try {
      cmdId = JSON.parse(Buffer.from(payload.toString().split('.')[1] ?? '', 'base64url').toString()).id ?? null;
    } catch { /* not a JWS with a JSON payload */ }
    try {
      const v = await jose.compactVerify(payload.toString(), this.hubKey, { algorithms: ['ES256'] });
      const p = JSON.parse(Buffer.from(v.payload).toString());
      if (p.id !== cmdId) throw new Error('payload changed');
      if (v.protectedHeader.kid !== this.kid) throw new Error(`kid ${v.protectedHeader.kid}, paired ${this.kid}`);
      if (v.protectedHeader.typ !== 'iothub-cmd' || p.dev !== this.id || p.hub !== HUB_ID) throw new Error(`not a command for ${this.id}`);
      e.verified = true;
      e.verifiedAt = wall();
    } catch (err) {
      e.error = err.message;
      this.unverified++;
    }
    if (cmdId === null || this.got.has(cmdId)) { this.foreign++; return; }
    this.got.set(cmdId, e);
    if (e.verified) await this.#ack(cmdId, e);
  }

  #ack(id, e) {
    const send = async () => {
      const jws = await this.bulb.frame({ ack: { id, ok: true } });
      e.ackSignedAt = wall();
      await this.client.publishAsync(`${PREFIX}/${this.id}/status`, jws, { qos: 1 });
      e.ackPubackAt = wall();
    };
    this.sending = this.sending.then(send, send).catch((err) => { e.ackError = err.message; });
    return this.sending;
  }

  async end() { await this.client.endAsync(); }
}

// A second MQTT client (QoS 0) on the bulbs' command and status topics: when the broker
// hands out each command and each ack frame, to split the latencies at the broker.
class BrokerStamps {
  constructor(client) {
    this.client = client;
    this.cmd = new Map(); // command id -> when the broker handed the command out
    this.ack = new Map(); // command id -> when the broker handed the ack frame out
  }

  static async start(port, ids) {
    const c = await mqttClient(port, { clientId: `bench-cmd-sampler-${process.pid}` });
    const s = new BrokerStamps(c);
    c.on('message', (topic, payload) => {
      const at = wall();
      try {
        const p = JSON.parse(Buffer.from(payload.toString().split('.')[1], 'base64url').toString());
        if (topic.endsWith('/cmd') && typeof p.id === 'string' && !s.cmd.has(p.id)) s.cmd.set(p.id, at);
        else if (topic.endsWith('/status') && typeof p.ack?.id === 'string' && !s.ack.has(p.ack.id)) s.ack.set(p.ack.id, at);
      } catch { /* not a JWS with a JSON payload */ }
    });
    await c.subscribeAsync(ids.flatMap((id) => [`${PREFIX}/${id}/cmd`, `${PREFIX}/${id}/status`]), { qos: 0 });
    return s;
  }

  async close() { await this.client.endAsync(); }
}

// ---------------------------------------------------------------------------------------
// The hub's own stages (src/commands.c stamp(), daemon at --log-level debug): one line
// "Command <id> stage <name> at <wall clock usec>" each. In order: taken (the poll's answer
// handed over by curl and checked), sign_asked (request queued to iothub-signer), signed (JWS
// back, on the loop), store_begins / stored (the transaction around the command's row, its
// fsync included), published (handed to libmosquitto), puback (the broker's PUBACK read).
const HUB_STAGES = ['taken', 'sign_asked', 'signed', 'store_begins', 'stored', 'published', 'puback'];

function hubStamps(log) {
  const m = new Map(); // id -> { stage: wall ms }
  for (const x of log.matchAll(/Command (\S+) stage (\w+) at (\d+)/g)) {
    const e = m.get(x[1]) ?? {};
    if (e[x[2]] === undefined) e[x[2]] = Number(x[3]) / 1000;
    m.set(x[1], e);
  }
  return m;
}

// ---------------------------------------------------------------------------------------
// The scenario

const numbersOf = (o) => Object.fromEntries(Object.entries(o ?? {}).filter(([, v]) => typeof v === 'number'));
const diffNumbers = (a, b) => Object.fromEntries(Object.entries(numbersOf(b)).map(([k, v]) => [k, v - (a?.[k] ?? 0)]).filter(([, v]) => v));

// The tightest of a few round trips main -> cloud thread -> main: the cloud thread's clock
// must lie between the two main-thread stamps (both >= 0, within the round trip).
async function clockCheck(cloud) {
  let best = null;
  for (let i = 0; i < 5; i++) {
    const a = wall();
    const w = await cloud.call('now');
    const b = wall();
    if (!best || b - a < best.round_trip_ms) best = { round_trip_ms: b - a, worker_minus_sent_ms: w - a, received_minus_worker_ms: b - w };
  }
  return best;
}

// One phase: n commands, one every spacingMs, round robin over the bulbs, each answered to
// a parked poll; waits (bounded) for each at its bulb before the next, then for every "acked".
async function phase(ctx, label, o) {
  const { hub, cloud, bulbs, opt, stamps } = ctx;
  const st0 = await hub.status();
  const c0 = await cloud.call('stats');
  const loadavgStart = os.loadavg();
  const sent = [];
  const t0 = wall();
  for (let i = 0; i < o.n; i++) {
    const t = wall();
    const b = bulbs[i % bulbs.length];
    const id = `${o.tag}-${i}`;
    const q = await cloud.call('queue', { id, dev: b.id, set: { on: true, bri: i % 255 }, exp: nowS() + 60, parkTimeoutMs: 5000 });
    sent.push({ id, bulb: b, ...q });
    await waitFor(() => b.got.has(id), 10000, `command ${id} at ${b.id} (${label})`);
    const left = opt.spacingMs - (wall() - t);
    if (left > 0) await sleep(left);
  }
  const tQueued = wall();
  // Every command acked at the cloud (bounded).
  const ids = sent.map((s) => s.id);
  let times;
  await waitFor(async () => {
    times = await cloud.call('times', { ids });
    return times.every((x) => x?.results.acked !== undefined);
  }, 30000, `"acked" at the cloud for all ${o.n} commands (${label})`).catch(async (e) => {
    const missing = ids.filter((id, j) => times?.[j]?.results.acked === undefined);
    const st = await hub.status().catch((x) => String(x));
    e.message += `; missing ${missing.length}: ${missing.slice(0, 10).join(' ')}; hub commands ${JSON.stringify(st.commands ?? st)}`;
    throw e;
  });
  const st1 = await hub.status();
  const c1 = await cloud.call('stats');

  const rows = sent.map((s, j) => {
    const g = s.bulb.got.get(s.id), t = times[j];
    const cmdAtBroker = stamps.cmd.get(s.id), ackAtBroker = stamps.ack.get(s.id);
    return {
      id: s.id, dev: s.bulb.id, queued_at: s.queuedAt, parked: s.parked, park_wait_ms: s.parkWaitMs, answered_at_once: s.answeredAtOnce,
      deliveries: t.deliveries, verified: g.verified, error: g.error,
      bulb_ms: g.at - s.queuedAt,
      broker_cmd_ms: cmdAtBroker !== undefined ? cmdAtBroker - s.queuedAt : null,
      verify_ms: g.verified ? g.verifiedAt - g.at : null,
      ack_sent_ms: g.ackPubackAt !== undefined ? g.ackPubackAt - s.queuedAt : null,
      delivered_ms: t.results.delivered !== undefined ? t.results.delivered - s.queuedAt : null,
      acked_ms: t.results.acked - s.queuedAt,
      // From the bulb's ack frame (signed, about to be published) to the cloud's record of
      // "acked": broker, the hub's frame path and the ack, the result's signature and POST.
      ack_to_acked_ms: g.ackSignedAt !== undefined ? t.results.acked - g.ackSignedAt : null,
      ack_to_broker_ms: g.ackSignedAt !== undefined && ackAtBroker !== undefined ? ackAtBroker - g.ackSignedAt : null,
      broker_ack_to_acked_ms: ackAtBroker !== undefined ? t.results.acked - ackAtBroker : null,
      results: Object.keys(t.results),
    };
  });
  // Each command's time split into consecutive stages (ms, each from the previous stamp).
  const hs = hubStamps(hub.log);
  for (const [j, r] of rows.entries()) {
    const s = sent[j], h = hs.get(s.id), g = s.bulb.got.get(s.id);
    const seq = [['cloud_queued', s.queuedAt], ...HUB_STAGES.filter((k) => k !== 'puback').map((k) => [k, h?.[k]]),
      ['at_broker', stamps.cmd.get(s.id)], ['at_bulb', g?.at]];
    r.stages = {};
    for (let i = 1; i < seq.length; i++) {
      const [a, ta] = seq[i - 1], [b, tb] = seq[i];
      r.stages[`${a}->${b}`] = ta !== undefined && tb !== undefined ? tb - ta : null;
    }
    r.stages['published->puback'] = h?.published !== undefined && h?.puback !== undefined ? h.puback - h.published : null;
  }
  const stageNames = Object.keys(rows[0]?.stages ?? {});
  const col = (k) => rows.map((r) => r[k]).filter((v) => v !== null && v !== undefined);
  const stageCol = (k) => rows.map((r) => r.stages[k]).filter((v) => v !== null && v !== undefined);
  return {
    label, commands: o.n, spacing_ms: opt.spacingMs, bulbs: bulbs.length,
    loadavg_start: loadavgStart, loadavg_end: os.loadavg(),
    seconds: (tQueued - t0) / 1000,
    first_queued_at: sent[0]?.queuedAt, last_queued_at: sent.at(-1)?.queuedAt,
    verified: rows.filter((r) => r.verified).length,
    parked: rows.filter((r) => r.parked).length,
    answered_at_once: rows.filter((r) => r.answered_at_once).length,
    redelivered: rows.filter((r) => r.deliveries > 1).length,
    results_in_order: rows.filter((r) => r.results[0] === 'delivered' && r.results[1] === 'acked').length,
    latency_ms: {
      cloud_to_bulb: dist(col('bulb_ms')),
      cloud_to_broker: dist(col('broker_cmd_ms')),
      cloud_to_delivered: dist(col('delivered_ms')),
      cloud_to_acked: dist(col('acked_ms')),
      bulb_verify: dist(col('verify_ms')),
      cloud_to_ack_sent: dist(col('ack_sent_ms')),
      ack_frame_to_acked: dist(col('ack_to_acked_ms')),
      ack_frame_to_broker: dist(col('ack_to_broker_ms')),
      broker_ack_to_acked: dist(col('broker_ack_to_acked_ms')),
      park_wait: dist(col('park_wait_ms')),
    },
    stages_ms: Object.fromEntries(stageNames.map((k) => [k, dist(stageCol(k))])),
    hub_stamped: rows.filter((r) => r.stages['cloud_queued->taken'] !== null).length,
    hub_commands: diffNumbers(st0.commands, st1.commands),
    hub_key_signatures: st1.key.signatures - st0.key.signatures,
    cloud_requests: diffNumbers(c0.requests, c1.requests),
    cloud_frames_stored: c1.stored - c0.stored,
    cloud_batches: c1.batches - c0.batches,
    hub_frames_rejected: Object.fromEntries(Object.entries(st1.frames.rejected).map(([k, v]) => [k, v - (st0.frames.rejected[k] ?? 0)]).filter(([, v]) => v)),
    per_command: rows,
  };
}

function report(p, fmt) {
  const L = p.latency_ms;
  process.stdout.write(`  commands ${p.label}: ${p.commands} commands, ${p.verified} verified by their bulb, ${p.answered_at_once} answered to a parked poll; ` +
    `cloud -> bulb p50 ${fmt(L.cloud_to_bulb.p50)} p99 ${fmt(L.cloud_to_bulb.p99)} max ${fmt(L.cloud_to_bulb.max)} ms, ` +
    `cloud -> acked p50 ${fmt(L.cloud_to_acked.p50)} p99 ${fmt(L.cloud_to_acked.p99)} max ${fmt(L.cloud_to_acked.max)} ms` +
    (p.load ? `; beside ${fmt(p.load.cloud_frames_per_second, 0)} status frames/s at the cloud` : '') +
    `; load average ${p.loadavg_start[0].toFixed(2)} -> ${p.loadavg_end[0].toFixed(2)}\n`);
  process.stdout.write(`    stages p50/p99/max ms (${p.hub_stamped}/${p.commands} stamped by the hub): ` +
    Object.entries(p.stages_ms).map(([k, d]) => `${k} ${fmt(d.p50)}/${fmt(d.p99)}/${fmt(d.max)}`).join(', ') + '\n');
}

// opt: { bulbs, commands, spacingMs, loadRate, loadBulbs, leadInMs, drainTimeoutMs }
// h: helpers of bench.mjs { loadgen, enrol, procStatus, fmt }
export async function commandsScenario(root, h, opt) {
  const dir = path.join(root, opt.root ?? 'commands');
  await fs.mkdir(dir);
  const keys = path.join(dir, 'keys');
  const out = {
    scenario: 'commands', bulbs: opt.bulbs, commands_per_phase: opt.commands, spacing_ms: opt.spacingMs,
    load_rate: opt.loadRate, load_bulbs: opt.loadRate > 0 ? opt.loadBulbs : 0, phases: [],
  };
  const ctx = { opt, bulbs: [] };
  try {
    ctx.tpm = await Swtpm.start(path.join(dir, 'tpm'));
    // BENCH_TPM_TCTI=mssim (the default), as in relay.mjs: a TCTI with a poll handle, so that
    // asynchronous signing waits on the loop.
    const tctiKind = process.env.BENCH_TPM_TCTI || 'mssim';
    if (opt.tpmDelayMs > 0 || tctiKind === 'mssim') ctx.slow = await SlowTpm.start(ctx.tpm, opt.tpmDelayMs ?? 0, { protocol: tctiKind });
    out.tpm_tcti = tctiKind;
    out.tpm_delay_ms = opt.tpmDelayMs ?? 0;
    ctx.broker = await Broker.start(dir);
    ctx.cloud = await CloudThread.start(path.join(dir, 'cloud'), { [TOKEN]: 'bench' }, { script: new URL(import.meta.url), tag: WORKER_TAG });
    const tokenFile = path.join(dir, 'token');
    await fs.writeFile(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
    await fs.chmod(tokenFile, 0o600);
    const overrides = {
      key: { backend: 'tpm', tcti: (ctx.slow ?? ctx.tpm).tcti, handle: '0x81000101' },
      cloud: { url: ctx.cloud.url, ca_file: ctx.cloud.caFile, bearer_token_file: tokenFile },
      frames: { rate_per_device: 1000, max_clock_skew_s: 86400 },
    };
    // The key, and the public JWK the bulbs are paired with, before the daemon starts:
    // swtpm serves one client at a time and the daemon keeps its connection.
    const pre = new Hub(path.join(dir, 'keyinit'), ctx.broker, overrides);
    await fs.mkdir(pre.dir);
    await pre.writeConfig();
    let r = await pre.ctl(['key', 'init']);
    if (r.code !== 0) throw new Error(`iothubctl key init: ${r.code} ${r.stderr}`);
    r = await pre.ctl(['key', 'show', '--jwk']);
    if (r.code !== 0) throw new Error(`iothubctl key show --jwk: ${r.code} ${r.stderr}`);
    const { kid, ...pubJwk } = JSON.parse(r.stdout);
    if (kid !== await jose.calculateJwkThumbprint(pubJwk, 'sha256')) throw new Error(`key show --jwk: kid ${kid} is not the JWK's thumbprint`);
    const hubKey = await jose.importJWK(pubJwk, 'ES256');
    out.hub_kid = kid;

    await fs.mkdir(path.join(dir, 'hub'), { mode: 0o755 });
    // At debug level for the stage stamps of src/commands.c (the frame path logs nothing per
    // frame at that level, so the load is not slowed by it).
    ctx.hub = await Hub.start(ctx.broker, overrides, { dir: path.join(dir, 'hub'), args: ['--log-level', 'debug'] });
    ctx.pid = ctx.hub.proc.pid;
    await waitFor(async () => (await ctx.hub.status()).mqtt.connected, 10000, 'MQTT connection');
    r = await ctx.hub.ctl(['register']);
    if (r.code !== 0) throw new Error(`iothubctl register: ${r.code} ${r.stderr}`);
    await waitFor(async () => (await ctx.cloud.call('stats')).registered, 10000, 'the hub registered at the cloud');
    out.clock_check = await clockCheck(ctx.cloud);

    // The load's bulbs (loadgen keys, P-256 and Ed25519 alternating), then the command bulbs.
    const nLoad = opt.loadRate > 0 ? opt.loadBulbs : 0;
    if (nLoad) {
      await h.loadgen('keys', '--dir', keys, '--bulbs', nLoad, '--alg', 'mixed');
      out.enrol_load_seconds = await h.enrol(ctx.hub, keys, nLoad);
    }
    for (let i = 0; i < opt.bulbs; i++) {
      const b = await CmdBulb.create(`${CMD_PREFIX}${i}`, ctx.broker.port, hubKey, kid);
      ctx.bulbs.push(b);
      const f = path.join(dir, `${b.id}.pem`);
      await fs.writeFile(f, b.bulb.pem);
      r = await ctx.hub.ctl(['bulb', 'add', b.id, '--key', f]);
      if (r.code !== 0) throw new Error(`iothubctl bulb add ${b.id}: ${r.code} ${r.stderr}`);
    }
    ctx.stamps = await BrokerStamps.start(ctx.broker.port, ctx.bulbs.map((b) => b.id));
    const nDev = nLoad + opt.bulbs;
    await waitFor(async () => (await ctx.cloud.call('stats')).devices === nDev, 60000, `the list of ${nDev} bulbs at the cloud`);
    out.rss_start = await h.procStatus(ctx.pid);

    out.phases.push(await phase(ctx, 'quiet', { n: opt.commands, tag: 'quiet' }));
    report(out.phases.at(-1), h.fmt);

    if (opt.loadRate > 0) {
      // The load runs from leadInMs before the first command to about a second after the last.
      const seconds = opt.leadInMs / 1000 + (opt.commands * opt.spacingMs) / 1000 + 1;
      const frames = Math.round(opt.loadRate * seconds);
      const file = path.join(dir, 'frames.txt');
      const gen = await h.loadgen('frames', '--dir', keys, '--bulbs', nLoad, '--frames', frames, '--seq-start', 1, '--out', file);
      const c0 = await ctx.cloud.call('stats');
      const tLoad = wall();
      const pub = h.loadgen('publish', '--host', '127.0.0.1', '--port', ctx.broker.port, '--file', file, '--window', 1000,
        '--rate', opt.loadRate, '--timeout', Math.ceil(seconds + 60));
      pub.catch(() => {}); // awaited below
      await sleep(opt.leadInMs);
      let p;
      try {
        p = await phase(ctx, `status ${opt.loadRate}/s`, { n: opt.commands, tag: 'loaded' });
      } finally {
        await pub.catch(() => {});
      }
      const published = await pub;
      const tEnd = tLoad + (frames / opt.loadRate) * 1000;
      // Every frame of the load at the cloud (bounded): the load went through, not only the
      // commands. Load frames are those of bulb-<i> (the cloud thread records i, else -1).
      const loadStored = (bs) => bs.reduce((n, b) => n + b.devs.filter((d) => d >= 0).length, 0);
      let batches = [];
      await waitFor(async () => {
        const c = await ctx.cloud.call('stats');
        if (c.stored - c0.stored < frames) return false;
        batches = await ctx.cloud.call('batches', { from: c0.batches });
        return loadStored(batches) >= frames;
      }, opt.drainTimeoutMs, `the ${frames} frames of the load at the cloud`);
      await fs.rm(file);
      // What the cloud took while the commands went: frames stored between the first command
      // queued and the last one acked, per second (from the cloud thread's batch records).
      const lastAcked = Math.max(...p.per_command.map((x) => x.queued_at + x.acked_ms));
      const inWindow = batches.filter((b) => b.reqAt !== null && b.reqAt >= p.first_queued_at && b.reqAt <= lastAcked);
      p.load = {
        rate: opt.loadRate, bulbs: nLoad, frames, avg_frame_bytes: gen.avg_bytes, publish: published,
        publish_window_s: (tEnd - tLoad) / 1000,
        commands_acked_before_load_ended: p.per_command.filter((x) => x.queued_at + x.acked_ms <= tEnd).length,
        cloud_batches_during_commands: inWindow.length,
        cloud_frames_per_second: inWindow.reduce((n, b) => n + b.stored, 0) / ((lastAcked - p.first_queued_at) / 1000),
        cloud_load_frames_stored: loadStored(batches),
      };
      out.phases.push(p);
      report(p, h.fmt);
    }
    const st = await ctx.hub.status();
    out.hub_commands = st.commands;
    out.rss_end = await h.procStatus(ctx.pid);
    out.unverified_messages = ctx.bulbs.reduce((n, b) => n + b.unverified, 0);
    out.log_warnings = ctx.hub.log.split('\n').filter((l) => /warn|error/i.test(l)).slice(0, 20);
  } catch (e) {
    const st = await ctx.hub?.status().catch((x) => String(x));
    const cs = await ctx.cloud?.call('stats', null, 5000).catch((x) => String(x));
    e.message += `\nhub status: ${JSON.stringify(st?.commands ?? st)} ${JSON.stringify(st?.cloud ?? '')}\ncloud: ${JSON.stringify(cs)}\nhub log (end): ${ctx.hub?.log.slice(-2000)}`;
    throw e;
  } finally {
    for (const b of ctx.bulbs) await b.end().catch(() => {});
    await ctx.stamps?.close().catch(() => {});
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

export function commandsTable(c, fmt) {
  const grid = (head, rows, left = 1) => {
    const w = head.map((x, i) => Math.max(x.length, ...rows.map((r) => r[i].length)));
    const line = (r) => r.map((v, i) => (i < left ? v.padEnd(w[i]) : v.padStart(w[i]))).join('  ');
    return `${line(head)}\n${w.map((n) => '-'.repeat(n)).join('  ')}\n${rows.map((r) => `${line(r)}\n`).join('')}`;
  };
  const three = (d) => `${fmt(d.p50)} / ${fmt(d.p99)} / ${fmt(d.max)}`;
  const two = (d) => `${fmt(d.p50)} / ${fmt(d.p99)}`;
  let s = `\nCommands cloud -> bulb (${c.bulbs} bulbs, ${c.commands_per_phase} commands per phase, one every ${c.spacing_ms} ms to a parked ` +
    `long poll, each verified with jose and acked in the bulb's next status frame; hub key in swtpm)\n`;
  const rows = c.phases.map((p) => {
    const L = p.latency_ms;
    return [p.label, String(p.commands), p.load ? fmt(p.load.cloud_frames_per_second, 0) : '-',
      `${p.answered_at_once}/${p.commands}`, `${p.verified}/${p.commands}`,
      three(L.cloud_to_bulb), three(L.cloud_to_acked), two(L.cloud_to_delivered), two(L.bulb_verify),
      two(L.ack_frame_to_broker), two(L.broker_ack_to_acked), String(p.hub_commands.signatures ?? 0), String(p.hub_key_signatures)];
  });
  s += grid(['phase', 'cmds', 'status f/s', 'at once', 'verified', 'cloud->bulb p50/p99/max', 'cloud->acked p50/p99/max',
    'cloud->delivered', 'bulb verify', 'ack bulb->broker', 'broker->acked', 'cmd sigs', 'all sigs'], rows);
  const names = Object.keys(c.phases[0]?.stages_ms ?? {});
  if (names.length) {
    s += `\nWhere a command's time goes (ms, p50 / p99 / max; each stage from the previous stamp: the cloud's, the hub's ` +
      `debug stamps of src/commands.c, the broker's hand-out to a sampler, the bulb's receipt; published->puback runs beside)\n`;
    s += grid(['stage', ...c.phases.map((p) => `${p.label} (load ${p.loadavg_start[0].toFixed(1)}-${p.loadavg_end[0].toFixed(1)})`)],
      names.map((k) => [k, ...c.phases.map((p) => three(p.stages_ms[k]))]));
  }
  const [q, l] = c.phases;
  if (q && l) {
    s += `Under the status load: cloud -> bulb p99 ${fmt(l.latency_ms.cloud_to_bulb.p99)} ms against ${fmt(q.latency_ms.cloud_to_bulb.p99)} ms quiet; ` +
      `cloud -> acked p99 ${fmt(l.latency_ms.cloud_to_acked.p99)} ms against ${fmt(q.latency_ms.cloud_to_acked.p99)} ms ` +
      `(${l.load.commands_acked_before_load_ended}/${l.commands} acked while the load ran)\n`;
  }
  return s;
}
