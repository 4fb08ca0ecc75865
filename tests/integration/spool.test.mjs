// The spool's segment log (issue 13) through the daemon: [spool] max_bytes sets the segment size,
// also on reload.
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
