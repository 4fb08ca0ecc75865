// A real mosquitto with the dynamic security plugin, configured by the drop-in the package ships
// (packaging/mosquitto/iothub.conf) with only its ports, paths and bind addresses changed for the
// test: every listener on 127.0.0.1. Certificates from a test CA made with the openssl CLI.
import { spawn, execFile } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import mqtt from 'mqtt';
import { freePort, waitPort } from './harness.mjs';

const run = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
export const DROPIN = path.resolve(here, '../../../packaging/mosquitto/iothub.conf');

// A CA that signs the broker's server certificate and the bulbs' device certificates.
export async function makePki(dir) {
  await fs.mkdir(dir, { recursive: true });
  const o = (args) => run('openssl', args, { cwd: dir });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  await o(['req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '30', '-subj', '/CN=Test Bulb Maker CA']);
  await o(['req', '-new', ...ec, '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=127.0.0.1']);
  await fs.writeFile(path.join(dir, 'server.ext'), 'subjectAltName=IP:127.0.0.1\n');
  await o(['x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
    '-out', 'server.crt', '-days', '30', '-extfile', 'server.ext']);
  const pki = {
    dir, ca: path.join(dir, 'ca.pem'), caKey: path.join(dir, 'ca.key'),
    serverCert: path.join(dir, 'server.crt'), serverKey: path.join(dir, 'server.key'),
    // A device certificate (P-256 key) with CN = id, signed by this CA or by a CA of its own.
    async device(id, { selfSigned = false } = {}) {
      const key = path.join(dir, `${id}.key`), cert = path.join(dir, `${id}.pem`);
      if (selfSigned) {
        await o(['req', '-x509', ...ec, '-keyout', key, '-out', cert, '-days', '30', '-subj', `/CN=${id}`]);
      } else {
        await o(['req', '-new', ...ec, '-keyout', key, '-out', `${id}.csr`, '-subj', `/CN=${id}`]);
        await o(['x509', '-req', '-in', `${id}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
          '-out', cert, '-days', '30']);
      }
      return { key, cert };
    },
  };
  return pki;
}

export class DynsecBroker {
  constructor(dir) { this.dir = dir; this.proc = null; this.stderr = ''; }

  // adminUser/adminPassword: the plugin's administrator, made by `mosquitto_ctrl dynsec init`.
  static async start(dir, pki, { adminUser = 'iothub-admin', adminPassword = 'admin-pw-not-secret' } = {}) {
    const b = new DynsecBroker(dir);
    b.pki = pki;
    b.adminUser = adminUser;
    b.adminPassword = adminPassword;
    b.dynsecFile = path.join(dir, 'dynamic-security.json');
    await run('mosquitto_ctrl', ['dynsec', 'init', b.dynsecFile, adminUser, adminPassword]);
    b.port = await freePort();
    b.certPort = await freePort();
    b.passwordPort = await freePort();
    await b.#spawn();
    return b;
  }

  // The shipped drop-in, with the test's ports, files and loopback addresses.
  async render() {
    const { stdout } = await run('gcc', ['-print-multiarch']);
    let text = await fs.readFile(DROPIN, 'utf8');
    const subst = [
      ['@MULTIARCH@', stdout.trim()],
      ['/var/lib/mosquitto/dynamic-security.json', this.dynsecFile],
      ['/etc/iothub/broker/server.crt', this.pki.serverCert],
      ['/etc/iothub/broker/server.key', this.pki.serverKey],
      ['/etc/iothub/bulb-ca.pem', this.pki.ca],
    ];
    for (const [a, b] of subst) {
      if (!text.includes(a)) throw new Error(`the drop-in no longer names ${a}`);
      text = text.split(a).join(b);
    }
    const ports = { 'listener 1883 127.0.0.1': this.port, 'listener 8883': this.certPort, 'listener 8884': this.passwordPort };
    text = text.split('\n').map((l) => {
      if (!l.startsWith('listener ')) return l;
      const p = ports[l.trim()];
      if (!p) throw new Error(`unexpected listener line in the drop-in: ${l}`);
      return `listener ${p} 127.0.0.1`;
    }).join('\n');
    return `${text}\nuser root\npersistence false\nlog_dest stderr\n`;
  }

  async #spawn() {
    const conf = path.join(this.dir, 'mosquitto.conf');
    await fs.writeFile(conf, await this.render());
    this.proc = spawn('mosquitto', ['-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
    this.proc.stderr.on('data', (d) => { this.stderr += d; });
    await Promise.all([waitPort(this.port), waitPort(this.certPort), waitPort(this.passwordPort)]);
  }

  async stop() {
    if (!this.proc) return;
    const p = this.proc;
    this.proc = null;
    if (p.exitCode === null && p.signalCode === null) {
      p.kill('SIGTERM');
      await once(p, 'exit');
    }
  }

  // An MQTT 5 client (so that refusals come back as reason codes) on the hub's loopback listener.
  async client(username, password, opts = {}) {
    const c = mqtt.connect(`mqtt://127.0.0.1:${this.port}`, {
      protocolVersion: 5, username, password, reconnectPeriod: 0, clean: true, connectTimeout: 3000, ...opts,
    });
    await new Promise((resolve, reject) => {
      c.once('connect', resolve);
      c.once('error', (e) => { c.end(true); reject(e); });
    });
    return c;
  }

  // The administrator's own JSON commands, for what the test does behind the hub's back.
  async admin(commands) {
    const c = await this.client(this.adminUser, this.adminPassword);
    try {
      await c.subscribeAsync('$CONTROL/dynamic-security/v1/response', { qos: 1 });
      const tag = `test-${Date.now()}-${Math.random()}`;
      const got = new Promise((resolve) => {
        c.on('message', (t, p) => {
          const r = JSON.parse(p.toString());
          if (r.responses?.some((x) => x.correlationData?.startsWith(tag))) resolve(r.responses);
        });
      });
      await c.publishAsync('$CONTROL/dynamic-security/v1',
        JSON.stringify({ commands: commands.map((x, i) => ({ ...x, correlationData: `${tag}-${i}` })) }), { qos: 1 });
      return await got;
    } finally {
      await c.endAsync();
    }
  }

  async listClients() {
    const [r] = await this.admin([{ command: 'listClients', verbose: true, count: -1, offset: 0 }]);
    return r.data.clients;
  }
}
