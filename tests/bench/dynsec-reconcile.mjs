// Measures the broker side of issue 15 against a real mosquitto with the dynamic security plugin
// (the shipped drop-in, lib/dynsec.mjs): `bulb add` with and without the broker step, and how long
// the reconciliation takes to recreate N deleted bulb clients after a restart.
//   cd tests && IOTHUB_BUILD=$PWD/../build node bench/dynsec-reconcile.mjs [N]
import fs from 'node:fs/promises';
import path from 'node:path';
import { Hub, tempDir, waitFor } from '../integration/lib/harness.mjs';
import { Bulb } from '../integration/lib/bulb.mjs';
import { DynsecBroker, makePki } from '../integration/lib/dynsec.mjs';

const N = Number(process.argv[2] ?? 200);
const dir = await tempDir('iothub-bench-dynsec-');
const pki = await makePki(path.join(dir, 'pki'));
const broker = await DynsecBroker.start(dir, pki);
await fs.writeFile(path.join(dir, 'hub.pw'), `${broker.adminPassword}\n`, { mode: 0o600 });
const hub = await Hub.start(null, {
  mqtt: { host: '127.0.0.1', port: broker.port, username: broker.adminUser, password_file: path.join(dir, 'hub.pw') },
  broker: { dynsec: 'on', timeout_s: 30 },
});
const pct = (a, p) => a.sort((x, y) => x - y)[Math.min(a.length - 1, Math.floor(a.length * p))];
try {
  await waitFor(async () => (await hub.status()).broker.in_sync, 10000, 'in sync');
  const b = await Bulb.create('x');
  const pem = path.join(dir, 'k.pem');
  await fs.writeFile(pem, b.pem);
  const t = [];
  for (let i = 0; i < N; i++) {
    const t0 = performance.now();
    const r = await hub.ctl(['bulb', 'add', `bench-${i}`, '--key', pem, ...(i % 2 ? ['--broker-password'] : [])]);
    if (r.code !== 0) throw new Error(r.stderr);
    t.push(performance.now() - t0);
  }
  console.log(`bulb add (iothubctl round trip, broker client created): p50 ${pct(t, 0.5).toFixed(1)} ms, p99 ${pct(t, 0.99).toFixed(1)} ms over ${N}`);
  await hub.stop();
  const names = (await broker.listClients()).map((c) => c.username).filter((u) => u.startsWith('bench-'));
  for (let i = 0; i < names.length; i += 200)
    await broker.admin(names.slice(i, i + 200).map((u) => ({ command: 'deleteClient', username: u })));
  const left = (await broker.listClients()).filter((c) => c.username.startsWith('bench-')).length;
  if (left !== 0 || names.length !== N) throw new Error(`deleted ${names.length} of ${N}, ${left} left`);
  const mark = hub.log.length;
  const t0 = performance.now();
  await hub.start();
  let last;
  const st = await waitFor(async () => {
    const s = last = await hub.status();
    return s.broker.in_sync && s.broker.created === N ? s : null;
  }, 60000, 'reconciled').catch((e) => { console.log(JSON.stringify(last.broker), hub.log.slice(mark)); throw e; });
  console.log(`reconciliation after a restart: ${N} missing clients recreated, in sync ${(performance.now() - t0).toFixed(0)} ms after exec (status polled every 25 ms)`);
  if (st.broker.last_error) console.log(`last_error: ${st.broker.last_error}`);
} finally {
  await hub.cleanup();
  await broker.stop();
  await fs.rm(dir, { recursive: true, force: true });
}
