// The integration harness's side of the memory table (issue 13): the same path as the installed-
// system test (tests/system/guest.sh) - a hub key in a software TPM held by iothub-signer, the
// reference cloud, a bulb enrolled, 9 signed frames relayed - with the daemon and the signer run
// by the harness instead of systemd. Prints, for each process, VmRSS, private memory and the top
// mappings by private bytes (smapsTop(), the same breakdown guest.sh logs), so that the installed
// numbers and these can be put side by side.
//
//   cd tests && IOTHUB_BUILD=$PWD/../build node bench/memmap.mjs
import fs from 'node:fs/promises';
import path from 'node:path';
import { Broker, Hub, Swtpm, mqttClient, publish, tempDir, waitFor, sleep } from '../integration/lib/harness.mjs';
import { Bulb } from '../integration/lib/bulb.mjs';
import { startCloud } from '../cloud/server.mjs';
import { procMemory, smapsTop } from './probes.mjs';

const TOKEN = 'tok-bench-memmap-0123456789abcdef';
const DEV = 'mem-bulb-1';
const FRAMES = 9;

const dir = await tempDir('iothub-memmap-');
await fs.chmod(dir, 0o755);
const stop = [];
try {
  const tpm = await Swtpm.start(path.join(dir, 'tpm'));
  stop.push(() => tpm.stop());
  const broker = await Broker.start(dir);
  stop.push(() => broker.stop());
  const cloud = await startCloud({ dir: path.join(dir, 'cloud'), tokens: { [TOKEN]: 'memmap' } });
  stop.push(() => cloud.close());
  const tokenFile = path.join(dir, 'token');
  await fs.writeFile(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
  // As guest.sh's write_conf: batch_max_delay_ms 200, timeout_s 5, the rest the defaults.
  const overrides = {
    key: { backend: 'tpm', tcti: tpm.tcti },
    cloud: { url: cloud.url, ca_file: cloud.caFile, bearer_token_file: tokenFile, batch_max_delay_ms: 200, timeout_s: 5 },
    frames: { rate_per_device: undefined },
  };
  // The key is made before the daemon and the signer start: swtpm serves one client at a time.
  const pre = new Hub(path.join(dir, 'keyinit'), broker, overrides);
  await fs.mkdir(pre.dir);
  await pre.writeConfig();
  let r = await pre.ctl(['key', 'init']);
  if (r.code !== 0) throw new Error(`iothubctl key init: ${r.code} ${r.stderr}`);

  const hub = new Hub(path.join(dir, 'hub'), broker, overrides);
  await fs.mkdir(hub.dir, { mode: 0o755 });
  await fs.mkdir(hub.stateDir, { mode: 0o700 });
  await fs.mkdir(hub.signerStateDir, { mode: 0o700 });
  await hub.writeConfig();
  await hub.start();
  stop.unshift(() => hub.stop());
  await waitFor(async () => (await hub.status()).mqtt.connected, 10000, 'MQTT connection');
  r = await hub.ctl(['register']);
  if (r.code !== 0) throw new Error(`iothubctl register: ${r.code} ${r.stderr}`);
  const bulb = await Bulb.create(DEV, 'ES256');
  const pem = path.join(dir, 'bulb.pem');
  await fs.writeFile(pem, bulb.pem);
  r = await hub.ctl(['bulb', 'add', DEV, '--key', pem]);
  if (r.code !== 0) throw new Error(`iothubctl bulb add: ${r.code} ${r.stderr}`);
  const c = await mqttClient(broker.port);
  for (let i = 1; i <= FRAMES; i++) {
    await publish(c, `iothub/v1/bulbs/${DEV}/status`, await bulb.frame({ state: { on: i % 2 === 1, bri: 10 * i } }));
  }
  await c.endAsync();
  await waitFor(async () => (await hub.status()).cloud.uploaded === FRAMES, 20000, `${FRAMES} frames at the cloud`);
  await sleep(500);
  // MEMMAP_HOLD_S: keep everything running that long after the numbers (to look with gdb, pmap).
  const hold = Number(process.env.MEMMAP_HOLD_S ?? 0);
  for (const [name, pid] of [['iothubd', hub.proc.pid], ['iothub-signer', hub.signerProc.pid],
    ['iothub-uplink', hub.uplinkProc.pid]]) {
    const m = await procMemory(pid);
    console.log(`${name}: RSS ${m.rssKiB} kB, private ${m.privateKiB} kB (anonymous ${m.anonKiB} kB, file pages ${m.privateKiB - m.anonKiB} kB), Pss ${m.pssKiB} kB, threads ${m.threads} (integration, ${FRAMES} frames)`);
    console.log(`  ${smapsTop(await fs.readFile(`/proc/${pid}/smaps`, 'utf8'), name, 8)}`);
  }
  if (hold > 0) {
    console.log(`holding ${hold} s: iothubd ${hub.proc.pid}, iothub-signer ${hub.signerProc.pid}`);
    await sleep(hold * 1000);
  }
} finally {
  for (const f of stop) await Promise.resolve().then(f).catch(() => {});
  await fs.rm(dir, { recursive: true, force: true });
}
