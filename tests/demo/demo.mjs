// make demo: the hub's main job end to end, all local. A private mosquitto, the daemon, and
// three simulated bulbs signing with jose; one also sends a forgery, a replay and junk.
import fs from 'node:fs/promises';
import path from 'node:path';
import { Broker, Hub, mqttClient, tempDir, waitFor, sleep } from '../integration/lib/harness.mjs';
import { Bulb } from '../integration/lib/bulb.mjs';

const PREFIX = 'iothub/v1/bulbs';
const dir = await tempDir('iothub-demo-');
const broker = await Broker.start(dir);
console.log(`mosquitto on 127.0.0.1:${broker.port}`);
const hub = await Hub.start(broker, { frames: { rate_per_device: 20 } });
console.log(`iothubd running, config ${hub.configPath}`);
try {
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'MQTT connection');
  const bulbs = [await Bulb.create('kitchen', 'ES256'), await Bulb.create('hall', 'EdDSA'), await Bulb.create('porch', 'ES256')];
  for (const b of bulbs) {
    const f = path.join(dir, `${b.id}.pem`);
    await fs.writeFile(f, b.pem);
    const r = await hub.ctl(['bulb', 'add', b.id, '--key', f]);
    process.stdout.write(r.stdout || r.stderr);
  }
  const client = await mqttClient(broker.port);
  const send = (dev, payload) => client.publishAsync(`${PREFIX}/${dev}/status`, payload, { qos: 1 });
  const impostor = await Bulb.create('kitchen', 'ES256');
  let last;
  for (let round = 0; round < 10; round++) {
    for (const b of bulbs) {
      last = await b.frame({ state: { on: round % 2 === 0, bri: 20 * round } });
      await send(b.id, last);
    }
    if (round === 3) { impostor.seq = 1000; await send('kitchen', await impostor.frame()); console.log('sent a forgery for kitchen'); }
    if (round === 5) { await send('porch', last); console.log('sent a replay for porch'); }
    if (round === 7) { await send('hall', '{"not":"a jws"}'); console.log('sent junk for hall'); }
    await sleep(1000);
  }
  await client.endAsync();
  await sleep(300);
  console.log('\n$ iothubctl status');
  process.stdout.write((await hub.ctl(['status'])).stdout);
  console.log('\n$ iothubctl bulb list');
  process.stdout.write((await hub.ctl(['bulb', 'list'])).stdout);
  console.log('\nDaemon log:');
  process.stdout.write(hub.log);
} finally {
  await hub.cleanup();
  await broker.stop();
}
