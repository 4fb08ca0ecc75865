// A TPM at a real chip's pace (TESTBED.md): a TCP proxy between the swtpm TCTI and a swtpm, on
// loopback only. The command port P holds each response for `delayMs` and serialises commands
// across connections, as one chip does (a command waits while the chip works on another); the
// control port P + 1 is forwarded untouched (the swtpm TCTI talks to exactly P + 1).
//
// The swtpm TCTI sends bare TPM commands (Part 1, 18: header tag(2) size(4) code(4)) and reads
// bare responses, one at a time per connection, so both directions are framed by the size field.
//
// protocol 'mssim' (the TCG simulator's framing, tpm2-tss's "mssim" TCTI): the TCTI keeps one
// connection open and has a poll handle, as /dev/tpmrm0 has, so the daemon's asynchronous
// signing (hubkey.c) really waits on the loop. Commands come as UINT32 TPM_SEND_COMMAND (8),
// UINT8 locality, UINT32 size, command; answers go back as UINT32 size, response, UINT32 0. They
// are unwrapped for swtpm (which is then talked to as by the swtpm TCTI). The platform port P + 1
// (power on, NV on, session end: UINT32 codes, each acknowledged with UINT32 0) is answered here:
// swtpm's control channel speaks another protocol.
import net from 'node:net';
import { once } from 'node:events';
import { freePort } from './harness.mjs';

const HEADER = 10;
const MSSIM_SEND_COMMAND = 8;
const MSSIM_SESSION_END = 20;
const MAX_MESSAGE = 64 * 1024; // TPM2 messages are at most a few KiB (MAX_COMMAND_SIZE 4096 on swtpm)

// Splits a byte stream into size-framed TPM messages; returns [messages, rest].
function frames(buf) {
  const out = [];
  while (buf.length >= HEADER) {
    const size = buf.readUInt32BE(2);
    if (size < HEADER || size > MAX_MESSAGE) throw new Error(`TPM message of ${size} bytes`);
    if (buf.length < size) break;
    out.push(buf.subarray(0, size));
    buf = buf.subarray(size);
  }
  return [out, buf];
}

// The same for the simulator's framing: returns [bare TPM commands, rest, ended].
function mssimFrames(buf) {
  const out = [];
  while (buf.length >= 4) {
    const code = buf.readUInt32BE(0);
    if (code === MSSIM_SESSION_END) return [out, buf.subarray(4), true];
    if (code !== MSSIM_SEND_COMMAND) throw new Error(`simulator command ${code}`);
    if (buf.length < 9) break;
    const size = buf.readUInt32BE(5);
    if (size < HEADER || size > MAX_MESSAGE) throw new Error(`TPM message of ${size} bytes`);
    if (buf.length < 9 + size) break;
    out.push(buf.subarray(9, 9 + size));
    buf = buf.subarray(9 + size);
  }
  return [out, buf, false];
}

export class SlowTpm {
  constructor(target, delayMs, protocol = 'swtpm') {
    this.target = target; // { host: '127.0.0.1', port } of the swtpm (control at port + 1)
    this.delayMs = delayMs;
    this.protocol = protocol; // 'swtpm' or 'mssim' (above)
    this.port = null;
    this.servers = [];
    this.sockets = new Set();
    this.busyUntil = 0; // when the "chip" finishes what it is doing
    this.commands = []; // { code, at, held } per command, in order of arrival
    this.counts = new Map(); // command code -> number
  }

  get tcti() { return `${this.protocol}:host=127.0.0.1,port=${this.port}`; }

  // swtpm: a harness Swtpm (or anything with .port); the proxy's ports are P and P + 1, free.
  static async start(swtpm, delayMs, { protocol = 'swtpm' } = {}) {
    for (let attempt = 0; ; attempt++) {
      const p = new SlowTpm({ host: '127.0.0.1', port: swtpm.port }, delayMs, protocol);
      try {
        await p.#listen(await freePort());
        return p;
      } catch (e) {
        await p.stop();
        if (attempt === 9) throw e;
      }
    }
  }

  async #listen(port) {
    const cmd = net.createServer((c) => this.#command(c));
    const ctrl = net.createServer((c) => (this.protocol === 'mssim' ? this.#platform(c) : this.#pipe(c, this.target.port + 1)));
    this.servers = [cmd, ctrl];
    for (const [srv, p] of [[cmd, port], [ctrl, port + 1]]) {
      srv.listen({ host: '127.0.0.1', port: p, exclusive: true });
      await Promise.race([once(srv, 'listening'), once(srv, 'error').then(([e]) => { throw e; })]);
    }
    this.port = port;
  }

  #track(s) {
    this.sockets.add(s);
    s.on('close', () => this.sockets.delete(s));
    s.on('error', () => s.destroy());
  }

  #pipe(client, port) {
    this.#track(client);
    const up = net.connect({ host: this.target.host, port });
    this.#track(up);
    client.pipe(up);
    up.pipe(client);
    client.on('close', () => up.destroy());
    up.on('close', () => client.destroy());
  }

  #platform(client) {
    this.#track(client);
    let buf = Buffer.alloc(0);
    client.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 4) {
        const code = buf.readUInt32BE(0);
        buf = buf.subarray(4);
        if (code === MSSIM_SESSION_END) { client.end(); return; }
        client.write(Buffer.alloc(4));
      }
    });
  }

  #command(client) {
    this.#track(client);
    const up = net.connect({ host: this.target.host, port: this.target.port });
    this.#track(up);
    client.on('close', () => up.destroy());
    up.on('close', () => client.destroy());
    let inBuf = Buffer.alloc(0);
    let outBuf = Buffer.alloc(0);
    const pending = []; // arrival times of commands sent up, answered in order
    client.on('data', (d) => {
      let msgs, ended = false;
      try {
        if (this.protocol === 'mssim') [msgs, inBuf, ended] = mssimFrames(Buffer.concat([inBuf, d]));
        else [msgs, inBuf] = frames(Buffer.concat([inBuf, d]));
      } catch { client.destroy(); return; }
      if (ended) client.end();
      for (const m of msgs) {
        const code = m.readUInt32BE(6);
        const rec = { code, at: performance.now(), held: 0, answered: false };
        this.commands.push(rec);
        this.counts.set(code, (this.counts.get(code) ?? 0) + 1);
        pending.push(rec);
        up.write(m);
      }
    });
    up.on('data', (d) => {
      let msgs;
      try { [msgs, outBuf] = frames(Buffer.concat([outBuf, d])); } catch { client.destroy(); return; }
      for (const m of msgs) {
        const rec = pending.shift();
        // The chip starts on this command when it arrived or when it finished the one before,
        // whichever is later, and answers delayMs after starting.
        const start = Math.max(rec ? rec.at : performance.now(), this.busyUntil);
        const release = Math.max(start + this.delayMs, performance.now());
        this.busyUntil = release;
        if (rec) rec.held = release - rec.at;
        const copy = this.protocol === 'mssim'
          ? Buffer.concat([Buffer.from([0, 0, 0, 0]), m, Buffer.alloc(4)]) : Buffer.from(m);
        if (this.protocol === 'mssim') copy.writeUInt32BE(m.length, 0);
        setTimeout(() => {
          if (rec) rec.answered = true;
          if (!client.destroyed) client.write(copy);
        }, release - performance.now());
      }
    });
  }

  // Commands seen since the last reset, by name where known (Part 2, 6.5.2 TPM_CC).
  summary() {
    const names = {
      0x131: 'CreatePrimary', 0x121: 'EvictControl', 0x153: 'Create', 0x157: 'Load', 0x15D: 'Sign',
      0x15E: 'Unseal', 0x165: 'FlushContext', 0x173: 'ReadPublic', 0x176: 'StartAuthSession',
      0x17A: 'GetCapability', 0x17B: 'GetRandom', 0x144: 'Startup', 0x143: 'SelfTest',
    };
    const by = {};
    for (const [code, n] of this.counts) by[names[code] ?? `0x${code.toString(16)}`] = n;
    return { total: this.commands.length, by };
  }

  // Commands sent in and not answered yet (the "chip" works on them), by name where known.
  inFlight() { return this.commands.filter((c) => !c.answered).map((c) => c.code); }

  reset() { this.commands = []; this.counts = new Map(); }

  async stop() {
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
    await Promise.all(this.servers.filter((s) => s.listening).map((s) => new Promise((r) => s.close(r))));
    this.servers = [];
  }
}
