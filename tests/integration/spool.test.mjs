// The spool's segment log (issue 13) through the daemon: [spool] max_bytes sets the segment size,
// also on reload; segments retire once uploaded, their bulbs' seqs in bulb_seqs, and replay
// protection holds after they are gone and the daemon restarted.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { Hub, mqttClient, publish, waitFor, sleep } from './lib/harness.mjs';
import { Bulb } from './lib/bulb.mjs';
import { startCloud } from '../cloud/server.mjs';
import { startTestbed, stopTestbed, keyBeforeDaemon } from './lib/testbed.mjs';

const PREFIX = 'iothub/v1/bulbs';
const TOKEN = 'tok-spool-test-0123456789';
const REASONS = ['too_large', 'malformed', 'unknown_device', 'revoked', 'bad_signature', 'replay', 'stale',
  'rate_limited', 'topic_mismatch'];
let dir, tpm, broker, cloud, client;

before(async () => {
  ({ dir, tpm, broker } = await startTestbed());
  cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'alice' } });
  await fs.writeFile(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  client = await mqttClient(broker.port);
});

after(async () => {
  await stopTestbed({ clients: [client], cloud, broker, tpm, dir });
});

async function enrol(h, bulb) {
  const f = path.join(h.dir, `${bulb.id}.pem`);
  await fs.writeFile(f, bulb.pem);
  const r = await h.ctl(['bulb', 'add', bulb.id, '--key', f]);
  assert.equal(r.code, 0, r.stderr);
}

async function segments(h) {
  return (await fs.readdir(path.join(h.stateDir, 'spool'))).filter((n) => /^seg-[0-9a-f]{16}\.log$/.test(n)).sort();
}

function counters(st) {
  return { received: st.frames.received, accepted: st.frames.accepted, ...st.frames.rejected };
}

// Publishes the frames and waits until the daemon decided every one (accepted after its commit);
// returns the change of every counter (frames.test.mjs does the same for one frame).
async function send(h, bulb, frames) {
  const before = counters(await h.status());
  for (const f of frames) await publish(client, `${PREFIX}/${bulb.id}/status`, f);
  const decided = (c) => c.accepted - before.accepted + REASONS.reduce((n, r) => n + c[r] - before[r], 0);
  let after;
  await waitFor(async () => {
    after = counters(await h.status());
    return decided(after) >= frames.length;
  }, 10000, `${frames.length} frames decided`);
  await sleep(20);
  after = counters(await h.status());
  const delta = {};
  for (const k of Object.keys(after)) if (after[k] !== before[k]) delta[k] = after[k] - before[k];
  return delta;
}

async function frames(bulb, n) {
  const out = [];
  for (let i = 0; i < n; i++) out.push(await bulb.frame());
  return out;
}

// Segment size = a 16th of [spool] max_bytes, 16 KiB..1 MiB (iothub.conf(5)); a reload must
// recompute it for the segments to come, as it applies the cap itself at once.
test('a reload applies [spool] max_bytes to the segment size of new segments', async () => {
  const hub = await Hub.start(broker); // the default 256M: 1 MiB segments
  try {
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt connected');
    const b = await Bulb.create('spool-reload', 'ES256');
    await enrol(hub, b);
    // Past 16 KiB in the one segment: ~300-byte frames.
    assert.deepEqual(await send(hub, b, await frames(b, 80)), { received: 80, accepted: 80 });
    const segs = await segments(hub);
    assert.equal(segs.length, 1);
    const size = (await fs.stat(path.join(hub.stateDir, 'spool', segs[0]))).size;
    assert.ok(size > 16 * 1024, `the segment holds ${size} bytes`);

    hub.overrides = { spool: { max_bytes: 65536 } }; // 16 KiB segments
    await hub.writeConfig();
    const mark = hub.notifications.length;
    hub.proc.kill('SIGHUP');
    await hub.waitNotify((l) => l.split('|').includes('READY=1'), 5000, 'READY=1 after reload', mark);
    assert.match(hub.log, /Reloaded/);
    assert.deepEqual(await send(hub, b, await frames(b, 1)), { received: 1, accepted: 1 });
    assert.equal((await segments(hub)).length, 2, 'the full segment was closed, a new one opened');
    const st = await hub.status();
    assert.equal(st.spool.pending, 81);
    assert.equal(st.spool.dropped, 0);
  } finally {
    await hub.cleanup();
  }
});

// The segments of a bulb's frames retire once uploaded, its newest seq moved into bulb_seqs
// first; after a restart nothing of that bulb is in the spool, and bulb_seqs alone must refuse
// the resend of its old frames (the unit test: tests/unit/test-registry.c test_spool_seqs).
test('replay protection after the segments retired and the daemon restarted', async () => {
  const overrides = {
    key: { backend: 'tpm', tcti: tpm.tcti, handle: '0x81000101' },
    cloud: { url: cloud.url, ca_file: cloud.caFile, bearer_token_file: path.join(dir, 'token'),
      batch_max_frames: 20, batch_max_delay_ms: 100, timeout_s: 5 },
    spool: { max_bytes: 65536 }, // 16 KiB segments: they roll every ~45 frames
  };
  await keyBeforeDaemon(broker, overrides);
  const hub = await Hub.start(broker, overrides);
  try {
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt connected');
    const r = await hub.ctl(['register']);
    assert.equal(r.code, 0, r.stderr);
    const a = await Bulb.create('spool-old', 'ES256');
    const other = await Bulb.create('spool-busy', 'EdDSA');
    await enrol(hub, a);
    await enrol(hub, other);
    await waitFor(() => cloud.state.hubs.get('test-hub')?.devices?.size === 2, 5000, 'device list at the cloud');

    const old = await frames(a, 5);
    assert.deepEqual(await send(hub, a, old), { received: 5, accepted: 5 });
    // The other bulb fills segments until the ones with a's frames are uploaded and unlinked,
    // and the segment being written holds none of a's.
    const first = (await segments(hub))[0];
    for (let round = 0; round < 20; round++) {
      assert.deepEqual(await send(hub, other, await frames(other, 40)), { received: 40, accepted: 40 });
      await waitFor(async () => (await hub.status()).spool.pending === 0, 10000, 'uploaded');
      const segs = await segments(hub);
      if (round >= 2 && !segs.includes(first) && segs.length <= 2) break;
    }
    assert.ok(!(await segments(hub)).includes(first), 'the first segment retired');
    for (const f of old) assert.ok(cloud.state.frames.some((x) => x.dev === a.id && x.jws === f), 'a\'s frames reached the cloud');
    const { stdout } = await promisify(execFile)('sqlite3', [path.join(hub.stateDir, 'iothub.db'),
      `SELECT last_seq FROM bulb_seqs WHERE id = '${a.id}'`]);
    assert.equal(Number(stdout.trim()), a.seq, 'a\'s newest seq is in bulb_seqs');

    await hub.restart();
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'reconnected');
    assert.deepEqual(await send(hub, a, [old[4]]), { received: 1, replay: 1 });
    assert.deepEqual(await send(hub, a, [old[0]]), { received: 1, replay: 1 });
    assert.deepEqual(await send(hub, a, await frames(a, 1)), { received: 1, accepted: 1 });
  } finally {
    await hub.cleanup();
  }
});

// A start reads only the segments without a summary (spool_segments): with the cloud away, a
// backlog of many closed segments; after a restart the counts are the same, and a resend of an
// old frame, whose segment is summarized and not read at start, is still a replay (its seq is in
// bulb_seqs with the summary).
test('a restart takes closed segments from their summaries: same counts, replays refused', async () => {
  // 16 KiB segments (the smallest), a cap far above the frames sent; no cloud: nothing leaves.
  const hub = await Hub.start(broker, { spool: { max_bytes: 262144 } });
  const sql = async (q) => (await promisify(execFile)('sqlite3', [path.join(hub.stateDir, 'iothub.db'), q])).stdout.trim();
  try {
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'mqtt connected');
    const a = await Bulb.create('spool-sum-old', 'ES256');
    const other = await Bulb.create('spool-sum-busy', 'EdDSA');
    await enrol(hub, a);
    await enrol(hub, other);
    const old = await frames(a, 5);
    assert.deepEqual(await send(hub, a, old), { received: 5, accepted: 5 });
    for (let round = 0; round < 6; round++)
      assert.deepEqual(await send(hub, other, await frames(other, 40)), { received: 40, accepted: 40 });
    const segs = await segments(hub);
    assert.ok(segs.length >= 5, `${segs.length} segments`);
    // Every closed segment but perhaps the last one closed has its summary (stored after its
    // sync; the last one's wait begins at the append after it closed), the first one (a's
    // frames) among them.
    await waitFor(async () => Number(await sql('SELECT COUNT(*) FROM spool_segments')) >= segs.length - 2, 5000,
      'summaries stored');
    assert.equal(await sql('SELECT COUNT(*) FROM spool_segments WHERE size = 0 OR frames = 0'), '0');
    assert.equal(await sql(`SELECT COUNT(*) FROM spool_segments WHERE id = ${parseInt(segs[0].slice(4, 20), 16)}`), '1');
    assert.equal(Number(await sql(`SELECT last_seq FROM bulb_seqs WHERE id = '${a.id}'`)), a.seq);
    const before = (await hub.status()).spool;
    assert.equal(before.pending, 245);

    await hub.restart();
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'reconnected');
    const st = (await hub.status()).spool;
    assert.equal(st.pending, before.pending);
    assert.equal(st.bytes, before.bytes);
    assert.deepEqual(await send(hub, a, [old[4]]), { received: 1, replay: 1 });
    assert.deepEqual(await send(hub, a, [old[0]]), { received: 1, replay: 1 });
    assert.deepEqual(await send(hub, a, await frames(a, 1)), { received: 1, accepted: 1 });
    assert.equal((await hub.status()).spool.pending, before.pending + 1);

    // Without summaries (an earlier version's segments): read whole at start, the same counts;
    // each sync then takes a few of them along, and their summaries come back.
    await sql('DELETE FROM spool_segments');
    await hub.restart();
    await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'reconnected');
    assert.equal((await hub.status()).spool.pending, before.pending + 1);
    const closed = (await segments(hub)).length - 1;
    for (let i = 0; i < 10 && Number(await sql('SELECT COUNT(*) FROM spool_segments')) < closed; i++)
      assert.deepEqual(await send(hub, other, await frames(other, 1)), { received: 1, accepted: 1 });
    assert.equal(Number(await sql('SELECT COUNT(*) FROM spool_segments')), closed);
    assert.deepEqual(await send(hub, a, [old[2]]), { received: 1, replay: 1 });
  } finally {
    await hub.cleanup();
  }
});
