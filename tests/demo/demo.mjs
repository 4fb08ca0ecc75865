// make demo: the hub's main job end to end, all local. A private mosquitto, a software TPM
// holding the hub key, an OAuth authorization server (oidc-provider), the reference cloud,
// the daemon, and three simulated bulbs signing with jose; one of them also sends a forgery,
// a replay and junk. The user signs in with the device grant (the demo plays the user at the
// provider's own pages) and registers the hub, with TPM attestation that the cloud requires.
// Frames flow bulb -> broker -> iothubd (checked, spooled) -> cloud
// (batches signed by the TPM key, DPoP-bound token, all checked independently there).
import fs from 'node:fs/promises';
import path from 'node:path';
import { Broker, Hub, Swtpm, mqttClient, tempDir, waitFor, sleep } from '../integration/lib/harness.mjs';
import { Bulb } from '../integration/lib/bulb.mjs';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import readline from 'node:readline';
import { startCloud } from '../cloud/server.mjs';
import { startAuthServer } from '../oauth/server.mjs';
import * as jose from 'jose';
import { IOTHUBCTL } from '../integration/lib/harness.mjs';

const PREFIX = 'iothub/v1/bulbs';
const step = (s) => console.log(`\n== ${s}`);
const dir = await tempDir('iothub-demo-');
await fs.chmod(dir, 0o755);
// The TPM as a vendor ships it: an endorsement key with its certificate, from a local CA that
// stands for the TPM maker's (swtpm_setup and swtpm_localca). The cloud trusts that CA and
// requires attestation (PROTOCOL.md 5): the hub registers only by proving its key is in this TPM.
const ekCa = path.join(dir, 'tpm-maker-ca');
const tpm = await Swtpm.start(path.join(dir, 'tpm'), { ekCa });
const broker = await Broker.start(dir);
const auth = await startAuthServer({ dir: path.join(dir, 'as'), interval: 1 });
const cloud = await startCloud({
  dir: path.join(dir, 'cloud'), ...auth.cloudHooks(),
  attestation: {
    trustedRoots: [await fs.readFile(path.join(ekCa, 'swtpm-localca-rootca-cert.pem'))],
    intermediates: [await fs.readFile(path.join(ekCa, 'issuercert.pem'))], require: true,
  },
});
console.log(`swtpm ${tpm.tcti}; mosquitto 127.0.0.1:${broker.port}; OAuth server ${auth.issuer}; reference cloud ${cloud.url}`);
const overrides = {
  frames: { rate_per_device: 20 },
  key: { backend: 'tpm', tcti: tpm.tcti },
  cloud: { url: cloud.url, ca_file: cloud.caFile, batch_max_delay_ms: 1000 },
  oauth: { issuer: auth.issuer, client_id: auth.clientId, scope: 'openid offline_access iothub', ca_file: auth.caFile },
};
let hub;
try {
  step('iothubctl key init (the hub key is made inside the TPM and never leaves it)');
  const pre = new Hub(dir, broker, overrides);
  await pre.writeConfig();
  let r = await pre.ctl(['key', 'init']);
  process.stdout.write(r.stdout || r.stderr);
  r = await pre.ctl(['key', 'show', '--jwk']);
  process.stdout.write(r.stdout || r.stderr);
  // What a bulb is given when it is paired: the hub's public key, to check commands with.
  const { kid: _kid, ...hubJwk } = JSON.parse(r.stdout);
  const hubKey = await jose.importJWK(hubJwk, 'ES256');

  step('iothub-signer, iothub-uplink and iothubd start');
  hub = await Hub.start(broker, overrides, { dir });
  await waitFor(async () => (await hub.status()).mqtt.connected, 5000, 'MQTT connection');
  // The key named by the signer to both the daemon and the uplink (which signs the requests).
  await waitFor(async () => (await hub.status()).key.id, 15000, 'the hub key');
  step('iothubctl login (the demo plays the user: it approves the code at the provider)');
  const p = spawn(IOTHUBCTL, ['--config', hub.configPath, 'login'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const rl = readline.createInterface({ input: p.stdout });
  let next = false;
  rl.on('line', async (l) => {
    console.log(l);
    if (next && l.trim()) { next = false; await auth.approve(l.trim(), { account: 'demo-user' }); }
    if (/enter the code/.test(l)) next = true;
  });
  const [loginCode] = await once(p, 'exit');
  if (loginCode !== 0) throw new Error('login failed');
  step('iothubctl register (with TPM attestation: EK certificate, credential activation, TPM2_Certify)');
  r = await hub.ctl(['register']);
  process.stdout.write(r.stdout || r.stderr);
  if (r.code !== 0) throw new Error('registration failed');
  const reg = cloud.state.hubs.get('test-hub');
  console.log(`the cloud verified the evidence: ${cloud.attest.state.verified} attestation(s), EK certificate from ` +
    `${reg?.attested?.ekIssuer ?? '(none)'}; refused: ${JSON.stringify(cloud.attest.state.refused)}`);

  step('iothubctl bulb add');
  const bulbs = [await Bulb.create('kitchen', 'ES256'), await Bulb.create('hall', 'EdDSA'), await Bulb.create('porch', 'ES256')];
  for (const b of bulbs) {
    const f = path.join(dir, `${b.id}.pem`);
    await fs.writeFile(f, b.pem);
    r = await hub.ctl(['bulb', 'add', b.id, '--key', f]);
    process.stdout.write(r.stdout || r.stderr);
  }

  step('bulbs publish signed status frames for 10 seconds');
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
  step('a user turns the kitchen light on: cloud -> hub -> bulb, and the outcome back');
  const kitchen = bulbs[0];
  await client.subscribeAsync(`${PREFIX}/kitchen/cmd`, { qos: 1 });
  const got = new Promise((resolve) => client.on('message', async (topic, payload) => {
    if (topic !== `${PREFIX}/kitchen/cmd`) return;
    const { payload: p, protectedHeader } = await jose.compactVerify(payload.toString(), hubKey, { algorithms: ['ES256'] });
    resolve({ header: protectedHeader, cmd: JSON.parse(new TextDecoder().decode(p)) });
  }));
  const t0 = Date.now();
  cloud.control.queueCommand({ id: 'demo-cmd-1', dev: 'kitchen', set: { on: true, bri: 200 }, exp: Math.floor(Date.now() / 1000) + 60 });
  const { header, cmd } = await got;
  console.log(`the kitchen bulb got a command signed by the hub (verified with jose, kid ${header.kid}) after ${Date.now() - t0} ms:`);
  console.log(JSON.stringify(cmd));
  await send('kitchen', await kitchen.frame({ state: { on: true, bri: 200 }, ack: { id: cmd.id, ok: true } }));
  await waitFor(() => cloud.state.results.some((x) => x.status === 'acked'), 10000, 'the ack at the cloud');
  console.log(`results at the cloud: ${cloud.state.results.map((x) => x.status).join(', ')}`);
  await client.endAsync();
  await waitFor(async () => (await hub.status()).spool.pending === 0, 10000, 'the spool drained');

  step('iothubctl status');
  process.stdout.write((await hub.ctl(['status'])).stdout);
  step('iothubctl bulb list');
  process.stdout.write((await hub.ctl(['bulb', 'list'])).stdout);
  step('what the reference cloud received and verified independently');
  const byDev = {};
  for (const f of cloud.state.frames) byDev[f.dev] = (byDev[f.dev] ?? 0) + 1;
  console.log(`frames: ${JSON.stringify(byDev)}; batches: ${cloud.state.batches.length}; ` +
    `request signatures verified: ${cloud.state.signatures}; refused requests: ${JSON.stringify(cloud.state.failures)}`);
  step('the daemon log (iothubd: the bulb side)');
  process.stdout.write(hub.log);
  step('the uplink log (iothub-uplink: HTTPS, sign-in, the tokens)');
  process.stdout.write(hub.uplinkLog);
} finally {
  await hub?.cleanup();
  await cloud.close();
  await auth.close();
  await broker.stop();
  await tpm.stop();
  await fs.rm(dir, { recursive: true, force: true });
}
