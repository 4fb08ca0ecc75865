// A small client of the channels' wire format (iothub-signer(8) and iothub-uplink(8), WIRE
// FORMAT: one format, two tables of ops and tags), written from the man pages, not from the C
// codec, so that both programs are tested against a second reading of the format.
//
//   u32 length of the rest, u32 id, u16 op (| 0x8000 in answers), i16 status,
//   then fields: u16 tag, u32 length, value. Big-endian throughout.
import net from 'node:net';
import { once } from 'node:events';

export const OP = {
  KEY_INFO: 1, SIGN_HTTP: 2, SIGN_DPOP: 3, SIGN_COMMAND: 4, TOKENS_GET: 5, TOKENS_PUT: 6,
  TOKENS_ERASE: 7, ATTEST_BEGIN: 8, ATTEST_ANSWER: 9, STATUS: 10, CANCEL: 11,
};
export const TAG = {
  KEY_ID: 1, JWK: 2, BACKEND: 3, METHOD: 4, TARGET_URI: 5, AUTHORIZATION: 6, BODY: 7, PRIO: 8,
  CONTENT_DIGEST: 9, SIGNATURE_INPUT: 10, SIGNATURE: 11, URL: 12, ATH: 13, NONCE: 14, PROOF: 15,
  DEV: 16, CMD_ID: 17, IAT: 18, EXP: 19, SET: 20, CLOUD_JWS: 21, JWS: 22, ACCESS_TOKEN: 23,
  REFRESH_TOKEN: 24, TOKEN_TYPE: 25, SCOPE: 26, EXPIRES_AT: 27, EVIDENCE: 28, CHALLENGE: 29,
  ANSWER: 30, SIGNATURES: 31, REFUSED_POLICY: 32, REFUSED_RATE: 33, REFUSED_PEER: 34,
  MALFORMED: 35, TPM_ERRORS: 36, LAST_ERROR: 37, CANCELLED: 38,
};
// A channel's table, as decode() reads answers with it: tag names, which tags are u64 numbers
// and which are bytes (a Buffer); the rest are text.
function table(TAGS, u64, bytes) {
  return { TAG_NAME: Object.fromEntries(Object.entries(TAGS).map(([k, v]) => [v, k])), U64: new Set(u64), BYTES: new Set(bytes) };
}
// Fields that are numbers on the wire: u8 PRIO, u64 the rest.
export const SIGNER = table(TAG, [TAG.IAT, TAG.EXP, TAG.EXPIRES_AT, TAG.SIGNATURES, TAG.REFUSED_POLICY,
  TAG.REFUSED_RATE, TAG.REFUSED_PEER, TAG.MALFORMED, TAG.TPM_ERRORS, TAG.CANCELLED], [TAG.BODY]);

// iothub-uplink(8): its ops and tags (include/iothub/uplink-proto.h is the normative list).
export const UPLINK_OP = { REQUEST: 1, REGISTER: 2, LOGIN_START: 3, LOGIN_WAIT: 4, LOGOUT: 5, STATUS: 6, WATCH: 7,
  CANCEL: 8 };
export const UPLINK_TAG = {
  KIND: 1, ARG: 2, BODY: 3, TIMEOUT: 4, HTTP_STATUS: 5, RETRY_AFTER: 6, MESSAGE: 7, USER_CODE: 8,
  VERIFICATION_URI: 9, VERIFICATION_URI_COMPLETE: 10, EXPIRES_IN: 11, RESULT: 12, STATUS_JSON: 13, SINCE: 14,
  GEN: 15, EVENTS: 16,
};
export const UPLINK_KIND = { STATUS: 1, DEVICES: 2, EVENTS: 3, COMMANDS_POLL: 4, COMMAND_RESULT: 5 };
export const UPLINK = table(UPLINK_TAG, [UPLINK_TAG.TIMEOUT, UPLINK_TAG.HTTP_STATUS, UPLINK_TAG.EXPIRES_IN,
  UPLINK_TAG.SINCE, UPLINK_TAG.GEN], [UPLINK_TAG.BODY]);
export const ANSWER = 0x8000;
export const MSG_MAX = 1024 * 1024 + 64 * 1024;
export const ERRNO = { EPERM: -1, ENOENT: -2, EACCES: -13, EINVAL: -22, EBUSY: -16, EBADMSG: -74, EPROTO: -71,
  EOPNOTSUPP: -95, ENOKEY: -126, ECANCELED: -125 };

// The fields of a SIGN_HTTP request as iothub-signer(8) lists them: METHOD, TARGET_URI,
// AUTHORIZATION (required: PROTOCOL.md 3 signs every request with it), BODY when there is one, PRIO.
export function signHttpFields({ method, targetUri, authorization, body, prio = 0 }) {
  if (typeof authorization !== 'string') throw new Error('SIGN_HTTP: AUTHORIZATION is required');
  const f = [[TAG.METHOD, method], [TAG.TARGET_URI, targetUri], [TAG.AUTHORIZATION, authorization]];
  if (body !== undefined) f.push([TAG.BODY, body]);
  f.push([TAG.PRIO, { u8: prio }]);
  return f;
}

// One field: tag and a Buffer, string, bigint/number (u64) or { u8 }.
function fieldBytes(tag, v) {
  let value;
  if (Buffer.isBuffer(v)) value = v;
  else if (typeof v === 'string') value = Buffer.from(v, 'utf8');
  else if (v && typeof v === 'object' && 'u8' in v) value = Buffer.from([v.u8]);
  else if (typeof v === 'number' || typeof v === 'bigint') { value = Buffer.alloc(8); value.writeBigUInt64BE(BigInt(v)); }
  else throw new Error(`field ${tag}: unsupported value`);
  const h = Buffer.alloc(6);
  h.writeUInt16BE(tag, 0);
  h.writeUInt32BE(value.length, 2);
  return Buffer.concat([h, value]);
}

// fields: an array of [tag, value] (order and repetition as given: tests send bad ones too).
export function encode(id, op, fields = [], { status = 0 } = {}) {
  const body = Buffer.concat(fields.map(([t, v]) => fieldBytes(t, v)));
  const h = Buffer.alloc(12);
  h.writeUInt32BE(8 + body.length, 0);
  h.writeUInt32BE(id >>> 0, 4);
  h.writeUInt16BE(op, 8);
  h.writeInt16BE(status, 10);
  return Buffer.concat([h, body]);
}

// A complete message (prefix included) -> { id, op, answer, status, fields: { NAME: value } },
// read with the channel's table t (the signer's by default).
export function decode(buf, t = SIGNER) {
  const n = buf.readUInt32BE(0);
  if (n + 4 !== buf.length) throw new Error('length prefix does not match');
  const id = buf.readUInt32BE(4);
  const rawOp = buf.readUInt16BE(8);
  const status = buf.readInt16BE(10);
  const fields = {};
  for (let at = 12; at < buf.length;) {
    if (buf.length - at < 6) throw new Error('trailing bytes');
    const tag = buf.readUInt16BE(at);
    const len = buf.readUInt32BE(at + 2);
    at += 6;
    if (at + len > buf.length) throw new Error('field past the end');
    const name = t.TAG_NAME[tag] ?? `tag${tag}`;
    if (name in fields) throw new Error(`duplicate ${name}`);
    const v = buf.subarray(at, at + len);
    fields[name] = t.U64.has(tag) ? v.readBigUInt64BE(0) : t.BYTES.has(tag) ? Buffer.from(v) : v.toString('utf8');
    at += len;
  }
  return { id, op: rawOp & 0x7fff, answer: (rawOp & ANSWER) !== 0, status, fields };
}

// A client of either channel: t is the table its answers are read with (SIGNER, UPLINK).
export class ChannelClient {
  constructor(sock, t = SIGNER) {
    this.sock = sock;
    this.table = t;
    this.buf = Buffer.alloc(0);
    this.waiting = new Map(); // id -> resolve
    this.answers = [];        // every answer, in arrival order
    this.nextId = 1;
    this.closed = new Promise((resolve) => sock.once('close', () => resolve(true)));
    sock.on('data', (d) => this.#data(d));
    sock.on('error', () => {});
  }

  static async connect(path, t = SIGNER) {
    const sock = net.createConnection(path);
    await once(sock, 'connect');
    return new ChannelClient(sock, t);
  }

  #data(d) {
    this.buf = Buffer.concat([this.buf, d]);
    while (this.buf.length >= 4) {
      const n = this.buf.readUInt32BE(0);
      if (this.buf.length < 4 + n) break;
      const m = decode(this.buf.subarray(0, 4 + n), this.table);
      this.buf = this.buf.subarray(4 + n);
      this.answers.push(m);
      const w = this.waiting.get(m.id);
      if (w) { this.waiting.delete(m.id); w(m); }
    }
  }

  // The answer to id, or an Error after timeoutMs (or when the connection closes first).
  wait(id, timeoutMs = 10000) {
    const done = this.answers.find((a) => a.id === id);
    if (done) return Promise.resolve(done);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => { this.waiting.delete(id); reject(new Error(`no answer to ${id}`)); }, timeoutMs);
      this.waiting.set(id, (m) => { clearTimeout(t); resolve(m); });
      this.closed.then(() => setTimeout(() => {
        if (this.waiting.has(id)) { this.waiting.delete(id); clearTimeout(t); reject(new Error(`closed before answer ${id}`)); }
      }, 50));
    });
  }

  sendRaw(bytes) { this.sock.write(bytes); }

  send(op, fields = []) {
    const id = this.nextId++;
    this.sock.write(encode(id, op, fields));
    return id;
  }

  async call(op, fields = [], timeoutMs) {
    return this.wait(this.send(op, fields), timeoutMs);
  }

  close() { this.sock.destroy(); }
}

// The signer's tests' name for it.
export { ChannelClient as SignerClient };
