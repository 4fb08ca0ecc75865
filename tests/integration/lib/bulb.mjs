// A bulb simulator that signs frames with jose, an implementation independent of the hub's C
// code, so that a bug in the hub cannot agree with itself.
import * as jose from 'jose';
import crypto from 'node:crypto';

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
