// Test harness: real mosquitto, the real iothubd and iothubctl binaries, on loopback ports
// picked at run time, in temporary directories removed afterwards.
import { spawn, execFile } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import fsSync from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import mqtt from 'mqtt';

const here = path.dirname(fileURLToPath(import.meta.url));
export const BUILD = process.env.IOTHUB_BUILD ?? path.resolve(here, '../../../build');
export const IOTHUBD = path.join(BUILD, 'iothubd');
export const IOTHUBCTL = path.join(BUILD, 'iothubctl');
export const IOTHUB_SIGNER = path.join(BUILD, 'iothub-signer');
export const IOTHUB_UPLINK = path.join(BUILD, 'iothub-uplink');
export const NOTIFY_LISTEN = path.join(BUILD, 'tools', 'notify-listen');

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// IOTHUB_VALGRIND=1 runs every daemon a test starts under valgrind's memcheck (make
// valgrind): each process writes $IOTHUB_VALGRIND_DIR/iothubd-<pid>.log, which the make
// target checks for errors and definite leaks once the suite ran. Start-up waits are longer.
export const VALGRIND = process.env.IOTHUB_VALGRIND === '1';
export const SLOW = VALGRIND ? 6 : 1;
function daemonCommand(args) {
  if (!VALGRIND) return [IOTHUBD, args];
  const dir = process.env.IOTHUB_VALGRIND_DIR ?? path.join(os.tmpdir(), 'iothub-valgrind');
  fsSync.mkdirSync(dir, { recursive: true });
  return ['valgrind', ['--tool=memcheck', '--leak-check=full', '--show-leak-kinds=definite',
    '--errors-for-leak-kinds=definite', '--track-origins=yes', '--num-callers=30',
    `--suppressions=${path.join(here, '..', '..', 'valgrind.supp')}`,
    `--log-file=${path.join(dir, 'iothubd-%p.log')}`, IOTHUBD, ...args]];
}

export async function tempDir(prefix = 'iothub-test-') {
  const d = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  return d;
}

export async function freePort() {
  const srv = net.createServer();
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const { port } = srv.address();
  srv.close();
  await once(srv, 'close');
  return port;
}

export async function waitPort(port, timeoutMs = 5000) {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    const ok = await new Promise((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port });
      s.once('connect', () => { s.destroy(); resolve(true); });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    await sleep(50);
  }
  throw new Error(`nothing listens on 127.0.0.1:${port} after ${timeoutMs} ms`);
}

export async function waitFor(pred, timeoutMs = 5000, what = 'condition') {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

// A real mosquitto broker with persistence, so that a restart keeps queued QoS 1 messages.
// opts.tls = { certFile, keyFile } for a TLS listener; opts.passwordFile to require a login.
export class Broker {
  constructor(dir, port, opts = {}) { this.dir = dir; this.port = port; this.proc = null; this.opts = opts; }

  static async start(dir, opts = {}) {
    const b = new Broker(dir, await freePort(), opts);
    await b.#spawn();
    return b;
  }

  async #spawn() {
    const conf = path.join(this.dir, 'mosquitto.conf');
    const tls = this.opts.tls ? [`certfile ${this.opts.tls.certFile}`, `keyfile ${this.opts.tls.keyFile}`] : [];
    const auth = this.opts.passwordFile
      ? ['allow_anonymous false', `password_file ${this.opts.passwordFile}`] : ['allow_anonymous true'];
    await fs.writeFile(conf, [
      `listener ${this.port} 127.0.0.1`,
      ...tls,
      ...auth,
      'persistence true',
      `persistence_location ${this.dir}/`,
      'autosave_interval 1',
      'max_queued_messages 100000',
      // As recommended in iothub-protocol(7): no Nagle delay on an ack waiting behind a PUBACK.
      'set_tcp_nodelay true',
      'user root',
      'log_dest none',
      '',
    ].join('\n'));
    this.proc = spawn('mosquitto', ['-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
    this.stderr = '';
    this.proc.stderr.on('data', (d) => { this.stderr += d; });
    await waitPort(this.port);
  }

  async stop() {
    if (!this.proc) return;
    const p = this.proc;
    this.proc = null;
    if (p.exitCode === null) {
      p.kill('SIGTERM');
      await once(p, 'exit');
    }
  }

  async restart(downMs = 0) {
    await this.stop();
    if (downMs) await sleep(downMs);
    await this.#spawn();
  }
}

export function confText(o) {
  let s = '';
  for (const [section, keys] of Object.entries(o)) {
    s += `[${section}]\n`;
    for (const [k, v] of Object.entries(keys)) if (v !== undefined && v !== null) s += `${k} = ${v}\n`;
    s += '\n';
  }
  return s;
}

let hubCounter = 0;

// cmd argv in a mount namespace of its own where /etc/resolv.conf is the file resolvConf: a
// name lookup it makes goes where the test says (a nameserver on loopback), never to the
// machine's resolver on the network.
function withResolvConf(resolvConf, cmd, argv) {
  return ['unshare', ['-m', '--propagation', 'private', '--', 'sh', '-c',
    'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"', 'sh', resolvConf, cmd, ...argv]];
}

// The daemon under test, with its own NOTIFY_SOCKET so that tests see every sd_notify line.
export class Hub {
  constructor(dir, broker, overrides = {}) {
    this.dir = dir;
    this.broker = broker;
    this.overrides = overrides;
    this.configPath = path.join(dir, 'iothub.conf');
    this.stateDir = path.join(dir, 'state');
    this.runtimeDir = path.join(dir, 'run');
    // iothub-signer (issue 14): holds the hub key and the sealed tokens; the daemon asks it over
    // this socket. Started before the daemon and stopped after it, as systemd orders the units.
    this.signerSock = path.join(dir, 'signer.sock');
    this.signerStateDir = path.join(dir, 'signer');
    this.signerProc = null;
    this.signerLog = '';
    // iothub-uplink (issue 14 stage 2): HTTPS, sign-in and the tokens; the daemon asks it over
    // this socket. Started with the signer whenever the configuration has [cloud] url, stopped
    // after the daemon, as systemd orders the units.
    this.uplinkSock = path.join(dir, 'uplink.sock');
    this.uplinkProc = null;
    this.uplinkLog = '';
    this.notifications = [];
    this.log = '';
    this.clientId = `iothubd-test-${process.pid}-${++hubCounter}`;
  }

  conf() {
    const base = {
      hub: { id: 'test-hub', state_dir: this.stateDir, runtime_dir: this.runtimeDir },
      mqtt: { host: '127.0.0.1', port: this.broker ? this.broker.port : 1, client_id: this.clientId, keepalive_s: 5 },
      frames: { rate_per_device: 1000 },
      signer: { socket: this.signerSock, client_user: os.userInfo().username, command_user: os.userInfo().username, state_dir: this.signerStateDir },
      uplink: { socket: this.uplinkSock, client_user: os.userInfo().username },
    };
    for (const [sec, keys] of Object.entries(this.overrides)) base[sec] = { ...(base[sec] ?? {}), ...keys };
    return base;
  }

  async writeConfig(text) {
    await fs.writeFile(this.configPath, text ?? confText(this.conf()), { mode: 0o644 });
  }

  static async start(broker, overrides = {}, opts = {}) {
    const dir = opts.dir ?? await tempDir();
    await fs.chmod(dir, 0o755);
    const h = new Hub(dir, broker, overrides);
    await fs.mkdir(h.stateDir, { recursive: true, mode: 0o700 });
    await fs.mkdir(h.signerStateDir, { recursive: true, mode: 0o700 });
    await h.writeConfig();
    try {
      await h.start(opts);
    } catch (e) {
      // A daemon that never became ready must not outlive the test (nor its notify listener):
      // a test that fails here would otherwise hang the whole run.
      await h.stop('SIGKILL').catch(() => {});
      throw e;
    }
    return h;
  }

  // The signer as its unit runs it, on the configured socket; opts.signer === false starts the
  // daemon alone (a test starts the signer later with startSigner()). Waits until the socket
  // takes connections, or the signer exited (a bad configuration: the test looks at the daemon).
  // opts.wrap(cmd, argv) -> [cmd, argv] runs it through another program (FaultHub: a mount
  // namespace of its own); opts.stderrFd: its stderr goes there (with opts.env.JOURNAL_STREAM,
  // its log goes to the journal), and signerLog stays empty.
  async startSigner(opts = {}) {
    return this.#startSide('signer', IOTHUB_SIGNER, this.signerSock, opts);
  }

  async stopSigner(signal = 'SIGTERM') {
    return this.#stopSide('signer', signal);
  }

  // iothub-uplink, the same way (its log in uplinkLog); opts.uplink === false at start() leaves
  // it out (a test starts it later with startUplink()).
  async startUplink(opts = {}) {
    return this.#startSide('uplink', IOTHUB_UPLINK, this.uplinkSock, opts);
  }

  async stopUplink(signal = 'SIGTERM') {
    return this.#stopSide('uplink', signal);
  }

  // Whether the configuration has a cloud: the daemon then needs the uplink.
  get hasCloud() {
    return Boolean(this.conf().cloud?.url);
  }

  async #startSide(name, program, sock, opts) {
    const running = this[`${name}Proc`];
    if (running && running.exitCode === null && running.signalCode === null) return;
    const env = { ...process.env };
    delete env.NOTIFY_SOCKET;
    delete env.JOURNAL_STREAM;
    delete env.LISTEN_FDS;
    delete env.LISTEN_PID;
    Object.assign(env, opts.env ?? {});
    let [cmd, argv] = [program, ['--config', this.configPath, '--listen', sock, ...(opts.args ?? [])]];
    if (opts.wrap) [cmd, argv] = opts.wrap(cmd, argv);
    const proc = spawn(cmd, argv, { env, stdio: ['ignore', 'ignore', opts.stderrFd ?? 'pipe'] });
    this[`${name}Proc`] = proc;
    proc.stderr?.on('data', (d) => { this[`${name}Log`] += d; });
    this[`${name}Exited`] = once(proc, 'exit').then(([code, signal]) => ({ code, signal }));
    const end = Date.now() + 5000 * SLOW;
    while (Date.now() < end && proc.exitCode === null && proc.signalCode === null) {
      const ok = await new Promise((resolve) => {
        const c = net.connect({ path: sock });
        c.once('connect', () => { c.destroy(); resolve(true); });
        c.once('error', () => resolve(false));
      });
      if (ok) return;
      await sleep(20);
    }
    if (proc.exitCode === null && proc.signalCode === null)
      throw new Error(`${path.basename(program)} does not listen on ${sock} after 5 s: ${this[`${name}Log`]}`);
  }

  async #stopSide(name, signal) {
    const p = this[`${name}Proc`];
    if (!p) return { code: null, signal: null };
    if (p.exitCode === null && p.signalCode === null) p.kill(signal);
    const res = await this[`${name}Exited`];
    this[`${name}Proc`] = null;
    return res;
  }

  async start(opts = {}) {
    if (opts.signer !== false) await this.startSigner(opts.signerOpts ?? {});
    // opts.resolvConf: the uplink (which resolves the cloud's name) sees it too.
    if (opts.uplink !== false && this.hasCloud) {
      const uo = { ...(opts.uplinkOpts ?? {}) };
      if (opts.resolvConf && !uo.wrap) uo.wrap = (c, a) => withResolvConf(opts.resolvConf, c, a);
      await this.startUplink(uo);
    }
    this.notifySock = path.join(this.dir, `notify-${Date.now()}`);
    this.notify = spawn(NOTIFY_LISTEN, [this.notifySock], { stdio: ['ignore', 'pipe', 'inherit'] });
    const rl = readline.createInterface({ input: this.notify.stdout });
    const listening = new Promise((resolve, reject) => {
      rl.on('line', (line) => {
        if (line === 'LISTENING') { resolve(); return; }
        this.notifications.push(line);
      });
      // Not built (`make tools`), or it died: said at once, where waiting for its line hung the
      // test until its timeout without a word.
      this.notify.once('error', (e) => reject(new Error(`${NOTIFY_LISTEN}: ${e.message} (make tools?)`)));
      this.notify.once('exit', (code, signal) => reject(new Error(`${NOTIFY_LISTEN} exited (${code ?? signal}) before it listened`)));
    });
    await listening;
    const mark = this.notifications.length;
    const env = { ...process.env, NOTIFY_SOCKET: this.notifySock, ...(opts.env ?? {}) };
    delete env.JOURNAL_STREAM;
    let [cmd, argv] = daemonCommand(['--config', this.configPath, ...(opts.args ?? [])]);
    // opts.resolvConf: the daemon sees this file as /etc/resolv.conf, in a mount namespace of its
    // own, so that a name lookup it makes goes where the test says (a nameserver on loopback),
    // never to the machine's resolver on the network.
    if (opts.resolvConf) [cmd, argv] = withResolvConf(opts.resolvConf, cmd, argv);
    this.proc = spawn(cmd, argv, { env, stdio: ['ignore', 'ignore', 'pipe'] });
    this.proc.stderr.on('data', (d) => { this.log += d; });
    this.exited = once(this.proc, 'exit').then(([code, signal]) => ({ code, signal }));
    if (opts.waitReady !== false)
      await this.waitNotify((l) => l.split('|').includes('READY=1'), 5000 * SLOW, 'READY=1', mark);
  }

  // Waits for a notification line matching pred that arrived after index 'from'.
  async waitNotify(pred, timeoutMs = 5000, what = 'notification', from = 0) {
    return waitFor(() => {
      for (let i = from; i < this.notifications.length; i++) if (pred(this.notifications[i])) return { i, line: this.notifications[i] };
      return null;
    }, timeoutMs, `${what} (got: ${JSON.stringify(this.notifications)}; log: ${this.log})`);
  }

  async stop(signal = 'SIGTERM') {
    let res = { code: null, signal: null };
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill(signal);
      res = await this.exited;
    } else if (this.proc) {
      res = await this.exited;
    }
    if (this.notify) {
      // Only one that runs: one that never started (its 'error') or already exited would never
      // emit 'exit' again.
      if (this.notify.pid !== undefined && this.notify.exitCode === null && this.notify.signalCode === null) {
        this.notify.kill('SIGTERM');
        await once(this.notify, 'exit').catch(() => {});
      }
      this.notify = null;
    }
    // After the daemon, as systemd stops iothub.service before the uplink and the signer it
    // requires (the uplink before the signer it asks).
    await this.stopUplink(signal === 'SIGKILL' ? 'SIGKILL' : 'SIGTERM');
    await this.stopSigner(signal === 'SIGKILL' ? 'SIGKILL' : 'SIGTERM');
    return res;
  }

  async restart() {
    await this.stop();
    await this.start();
  }

  ctl(args, opts = {}) {
    return new Promise((resolve) => {
      execFile(IOTHUBCTL, ['--config', this.configPath, ...args], { ...opts, encoding: 'utf8' },
        (err, stdout, stderr) => resolve({ code: err ? (err.code ?? 1) : 0, stdout, stderr }));
    });
  }

  async status() {
    const r = await this.ctl(['status', '--json']);
    if (r.code !== 0) throw new Error(`iothubctl status failed (${r.code}): ${r.stderr}`);
    return JSON.parse(r.stdout);
  }

  async cleanup() {
    await this.stop();
    await fs.rm(this.dir, { recursive: true, force: true });
  }
}

export async function mqttClient(port, opts = {}) {
  const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, { reconnectPeriod: 200, clean: true, ...opts });
  await once(c, 'connect');
  return c;
}

export function publish(client, topic, payload, qos = 1) {
  return client.publishAsync(topic, payload, { qos });
}

// A real software TPM (swtpm) on two loopback ports, with its own state directory.
export class Swtpm {
  constructor(dir, port) { this.dir = dir; this.port = port; this.proc = null; }

  get tcti() { return `swtpm:host=127.0.0.1,port=${this.port}`; }

  // opts.ekCa: a directory for a local test CA (made on first use, shared by the TPMs given the
  // same one): the TPM is first manufactured by swtpm_setup with an EK certificate from it
  // (provisionEk below).
  static async start(dir, opts = {}) {
    await fs.mkdir(dir, { recursive: true });
    if (opts.ekCa) await provisionEk(dir, opts.ekCa);
    for (let attempt = 0; attempt < 10; attempt++) {
      const port = await freePort();
      const t = new Swtpm(dir, port);
      try {
        await t.#spawn();
        return t;
      } catch (e) {
        await t.stop();
        if (attempt === 9) throw e;
      }
    }
  }

  // On a port chosen beforehand (a TCTI written into a config before the TPM runs).
  static async startAt(dir, port) {
    await fs.mkdir(dir, { recursive: true });
    const t = new Swtpm(dir, port);
    await t.#spawn();
    return t;
  }

  async #spawn() {
    this.proc = spawn('swtpm', ['socket', '--tpm2',
      '--server', `type=tcp,port=${this.port},bindaddr=127.0.0.1`,
      '--ctrl', `type=tcp,port=${this.port + 1},bindaddr=127.0.0.1`,
      '--tpmstate', `dir=${this.dir}`, '--flags', 'not-need-init,startup-clear'],
    { stdio: ['ignore', 'ignore', 'pipe'] });
    this.stderr = '';
    this.proc.stderr.on('data', (d) => { this.stderr += d; });
    const exited = once(this.proc, 'exit').then(() => { throw new Error(`swtpm exited: ${this.stderr}`); });
    await Promise.race([waitPort(this.port, 5000), exited]);
    exited.catch(() => {});
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
}

// Manufactures a TPM state in stateDir as a vendor would, with swtpm_setup(8): an RSA 2048 and an
// ECC EK (persistent at 0x81010001 and 0x81010016), their certificates in the TCG NV indices
// (0x01c00002, 0x01c00016) and a platform certificate, issued by swtpm_localca(8) from a CA in
// caDir (swtpm-localca.conf(5): the root and the issuing CA are made there on first use), never
// the system's /var/lib/swtpm-localca. Returns the CA's PEM files: { root, issuer }.
export async function provisionEk(stateDir, caDir) {
  await fs.mkdir(stateDir, { recursive: true });
  await fs.mkdir(caDir, { recursive: true });
  const f = (n) => path.join(caDir, n);
  await fs.writeFile(f('swtpm-localca.conf'), `statedir = ${caDir}\nsigningkey = ${f('signkey.pem')}\n` +
    `issuercert = ${f('issuercert.pem')}\ncertserial = ${f('certserial')}\n`);
  await fs.writeFile(f('swtpm-localca.options'), '--platform-manufacturer iothub-test\n--platform-version 2.1\n--platform-model swtpm\n');
  await fs.writeFile(f('swtpm_setup.conf'), `create_certs_tool = /usr/bin/swtpm_localca\n` +
    `create_certs_tool_config = ${f('swtpm-localca.conf')}\ncreate_certs_tool_options = ${f('swtpm-localca.options')}\n` +
    'active_pcr_banks = sha256\n');
  await new Promise((resolve, reject) => {
    execFile('swtpm_setup', ['--tpm2', '--tpmstate', stateDir, '--create-ek-cert', '--create-platform-cert',
      '--config', f('swtpm_setup.conf'), '--overwrite'], { encoding: 'utf8' },
    (err, stdout, stderr) => (err ? reject(new Error(`swtpm_setup failed: ${stderr || stdout || err.message}`)) : resolve()));
  });
  return { root: f('swtpm-localca-rootca-cert.pem'), issuer: f('issuercert.pem') };
}
