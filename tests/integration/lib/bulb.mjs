// A bulb simulator that signs frames with jose, an implementation independent of the hub's C
// code, so that a bug in the hub cannot agree with itself.
import * as jose from 'jose';
import crypto from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';

export class Bulb {
  constructor(id, alg, keys, pem) {
    this.id = id; this.alg = alg; this.privateKey = keys.privateKey; this.publicKey = keys.publicKey;
    this.pem = pem; this.seq = 0;
  }

  static async create(id, alg = 'ES256') {
    const keys = await jose.generateKeyPair(alg, { extractable: true, crv: alg === 'EdDSA' ? 'Ed25519' : undefined });
    const pem = await jose.exportSPKI(keys.publicKey);
    return new Bulb(id, alg, keys, pem);
  }

  payload(over = {}) {
    return { dev: this.id, seq: ++this.seq, iat: Math.floor(Date.now() / 1000), state: { on: true, bri: 128 }, ...over };
  }

  // A genuine frame: JWS Compact, header exactly { alg, kid, typ }.
  async frame(over = {}, header = {}) {
    const p = this.payload(over);
    return new jose.CompactSign(new TextEncoder().encode(JSON.stringify(p)))
      .setProtectedHeader({ alg: this.alg, kid: this.id, typ: 'iothub-status', ...header })
      .sign(this.privateKey);
  }

  // End-to-end acknowledgement (PROTOCOL.md 1): from here on the bulb keeps every frame it
  // sends with send() until the hub acks a seq at or above it on <prefix>/<id>/ack, and resends
  // those above the acked seq after resendMs without an ack, and on every reconnect of client.
  // window caps the unacknowledged frames in flight (further frames wait, in order): with 1,
  // no frame can overtake a lost one (see iothub-protocol(7), "a bulb's window"). Existing
  // callers that never attach keep the old fire-and-forget behaviour.
  async attach(client, { prefix = 'iothub/v1/bulbs', resendMs = 1000, window = Infinity } = {}) {
    this.client = client; this.prefix = prefix; this.resendMs = resendMs; this.window = window;
    this.unacked = new Map(); // seq -> { jws, sentAt }, in seq order
    this.waiting = []; // { seq, jws } not yet published (window full)
    this.sent = []; // every frame handed to send(): { seq, jws }
    this.ackedSeq = 0; this.acks = []; this.resent = 0;
    this.ackTopic = `${prefix}/${this.id}/ack`;
    this.statusTopic = `${prefix}/${this.id}/status`;
    this.onMessage = (topic, payload) => { if (topic === this.ackTopic) this.#onAck(payload); };
    this.onConnect = () => this.resendUnacked();
    client.on('message', this.onMessage);
    client.on('connect', this.onConnect);
    await client.subscribeAsync(this.ackTopic, { qos: 1 });
    this.timer = setInterval(() => this.#resendDue(), Math.max(20, Math.floor(resendMs / 4)));
    this.timer.unref(); // a test that fails before detach() must not keep node alive
  }

  detach() {
    clearInterval(this.timer);
    this.client?.off('message', this.onMessage);
    this.client?.off('connect', this.onConnect);
  }

  // Signs one new frame and sends it now, or when the window has room.
  async send(over = {}) {
    const jws = await this.frame(over);
    const f = { seq: this.seq, jws };
    this.sent.push(f);
    this.waiting.push(f);
    this.#pump();
    return f;
  }

  get inFlight() { return this.unacked.size + this.waiting.length; }

  #publish(seq, jws) {
    this.unacked.set(seq, { jws, sentAt: Date.now() });
    this.client.publish(this.statusTopic, jws, { qos: 1 }, () => {});
  }

  #pump() {
    while (this.waiting.length > 0 && this.unacked.size < this.window) {
      const f = this.waiting.shift();
      if (f.seq <= this.ackedSeq) continue;
      this.#publish(f.seq, f.jws);
    }
  }

  #onAck(payload) {
    let seq;
    try { seq = JSON.parse(payload.toString()).seq; } catch { return; }
    if (!Number.isSafeInteger(seq) || seq < 1) return;
    this.acks.push({ seq, at: performance.now() });
    if (seq > this.ackedSeq) this.ackedSeq = seq;
    for (const s of [...this.unacked.keys()]) if (s <= this.ackedSeq) this.unacked.delete(s);
    this.#pump();
  }

  // Resends every unacknowledged frame above the acked seq, oldest first.
  resendUnacked(olderThanMs = 0) {
    const now = Date.now();
    for (const [seq, u] of [...this.unacked.entries()].sort((a, b) => a[0] - b[0])) {
      if (seq <= this.ackedSeq || now - u.sentAt < olderThanMs) continue;
      this.resent++;
      this.#publish(seq, u.jws);
    }
  }

  #resendDue() {
    if (this.client.connected) this.resendUnacked(this.resendMs);
  }

  // Signs raw header and payload strings (for malformed JSON the library would not produce).
  async signRaw(headerJson, payloadJson, key = this.privateKey) {
    const h = b64u(headerJson), p = b64u(payloadJson);
    if (key === null) return `${h}.${p}.`;
    const input = Buffer.from(`${h}.${p}`);
    const sig = await rawSign(this.alg, key, input);
    return `${h}.${p}.${b64u(sig)}`;
  }
}

export function b64u(x) {
  return Buffer.from(x).toString('base64url');
}

async function rawSign(alg, key, data) {
  const k = key instanceof crypto.KeyObject ? key : crypto.KeyObject.from(key);
  if (alg === 'ES256') return crypto.sign('sha256', data, { key: k, dsaEncoding: 'ieee-p1363' });
  return crypto.sign(null, data, k);
}

// DER-encoded ECDSA signature over the same input (a common bulb firmware mistake).
export async function derSign(bulb, input) {
  const k = bulb.privateKey instanceof crypto.KeyObject ? bulb.privateKey : crypto.KeyObject.from(bulb.privateKey);
  return crypto.sign('sha256', Buffer.from(input), { key: k, dsaEncoding: 'der' });
}

// What a bulb does with a command (PROTOCOL.md 2 and 5), with jose: verify the hub's JWS with
// the hub key it was paired with (typ iothub-cmd); when it also knows the vendor's command key,
// verify the vendor's JWS in the payload's "cloud" member (typ iothub-cloud-cmd) and that it is
// over this very command: hub, id, dev, exp and set equal. Throws on any failure; resolves to
// { header, payload, cloudHeader?, cloudPayload? }.
export async function verifyCommand(jws, hubKey, vendorKey = null) {
  const v = await jose.compactVerify(jws, hubKey, { algorithms: ['ES256'] });
  if (v.protectedHeader.typ !== 'iothub-cmd') throw new Error(`hub JWS typ ${v.protectedHeader.typ}`);
  const payload = JSON.parse(Buffer.from(v.payload).toString());
  const out = { header: v.protectedHeader, payload };
  if (!vendorKey) return out;
  if (typeof payload.cloud !== 'string') throw new Error('no vendor signature ("cloud") in the command');
  const c = await jose.compactVerify(payload.cloud, vendorKey, { algorithms: ['ES256'] });
  if (c.protectedHeader.typ !== 'iothub-cloud-cmd') throw new Error(`vendor JWS typ ${c.protectedHeader.typ}`);
  const cp = JSON.parse(Buffer.from(c.payload).toString());
  for (const k of ['hub', 'id', 'dev', 'exp', 'set']) {
    if (!isDeepStrictEqual(cp[k], payload[k])) throw new Error(`the vendor signed another ${k}: ${JSON.stringify(cp[k])} != ${JSON.stringify(payload[k])}`);
  }
  return { ...out, cloudHeader: c.protectedHeader, cloudPayload: cp };
}
