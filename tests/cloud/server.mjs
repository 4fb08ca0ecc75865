// Reference vendor web service ("the cloud") of PROTOCOL.md section 3, for the integration
// tests and benchmarks. Every check is made with code and libraries independent of the hub's
// C code (node:crypto, jose, structured-headers, http-message-signatures), so that a bug in
// the hub cannot agree with itself. See README.md beside this file.
//
//   import { startCloud } from './cloud/server.mjs';
//   const cloud = await startCloud({ dir, tokens: { tok: 'alice' } });
//   // [cloud] url = cloud.url, ca_file = cloud.caFile
//
//   node cloud/server.mjs --port 0 --dir DIR [--control-port 0] [--token TOKEN[=ACCOUNT]]...
//   prints one JSON line {url, port, caFile, controlUrl} once listening.
import crypto from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { EventEmitter, once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as jose from 'jose';
import * as sf from 'structured-headers';
import { httpbis, createVerifier } from 'http-message-signatures';
import { verifyDpopProof, createReplayCache } from '../oauth/dpop.mjs';
import { createAttestation, AttestError } from './attest.mjs';

// ---------------------------------------------------------------------------------------
// Constants of the contract (PROTOCOL.md 1 and 3)

export const LABEL = 'hub';
export const ALG = 'ecdsa-p256-sha256';
export const VALIDITY_S = 60;
export const COMPONENTS_WITH_BODY = ['@method', '@target-uri', 'content-digest', 'authorization'];
export const COMPONENTS_WITHOUT_BODY = ['@method', '@target-uri', 'authorization'];
export const PARAMS = ['created', 'expires', 'nonce', 'keyid', 'alg'];
export const REJECTION_REASONS = ['too_large', 'malformed', 'unknown_device', 'revoked', 'bad_signature', 'replay'];
export const RESULT_STATUSES = ['delivered', 'acked', 'failed', 'expired', 'rejected'];

const DEVICE_ID_RE = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/; // PROTOCOL.md 1
const HUB_ID_RE = DEVICE_ID_RE; // the contract leaves it open: same alphabet as device ids
const COMMAND_ID_RE = /^[A-Za-z0-9._-]{1,64}$/; // PROTOCOL.md 1 (ack.id)
const B64U_RE = /^[A-Za-z0-9_-]+$/;
const TOKEN68_RE = /^[A-Za-z0-9\-._~+/]+=*$/; // RFC 6750 2.1 b64token
const JWS_COMPACT_RE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;
const MAX_SEQ = Number.MAX_SAFE_INTEGER; // 2^53 - 1

// Security events (PROTOCOL.md 5, iothub-protocol(7) "Security events").
export const EVENT_TYPES = ['frame_rejected', 'flood', 'bulb_enrolled', 'bulb_revoked', 'control_refused',
  'config_reloaded', 'signin_changed', 'key_error', 'command_rejected', 'events_dropped'];
const EVENT_REASON_RE = /^[a-z0-9_]{1,32}$/;
const EVENTS_MAX = 1000; // events in one POST the reference cloud takes

// The vendor's signature of a command (PROTOCOL.md 5): a JWS (ES256) whose payload is
// {hub,id,dev,exp,set}, made with jose as a vendor's back end would. over: members that replace
// the command's in the signed payload (tests of a signature over another command).
export async function signCloudCommand({ privateKey, kid }, hubId, cmd, over = {}) {
  const payload = { hub: hubId, id: cmd.id, dev: cmd.dev, exp: cmd.exp, set: cmd.set, ...over };
  return new jose.CompactSign(new TextEncoder().encode(JSON.stringify(payload)))
    .setProtectedHeader({ alg: 'ES256', typ: 'iothub-cloud-cmd', kid })
    .sign(privateKey);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const nowS = () => Math.floor(Date.now() / 1000);

// ---------------------------------------------------------------------------------------
// Test PKI made with the openssl CLI (no shell): a CA and a server certificate for
// 127.0.0.1 and localhost. Reused when DIR already holds a valid set, so that a cloud
// restarted on the same DIR keeps the CA the hub was configured with.

const OPENSSL_CNF = `# made by tests/cloud/server.mjs
[req]
distinguished_name = dn
prompt = no
[dn]
CN = iothub test cloud
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_srv]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
`;

function openssl(args) {
  try {
    execFileSync('openssl', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    throw new Error(`openssl ${args.join(' ')} failed: ${e.stderr?.toString() ?? e.message}`);
  }
}

export function makeCerts(dir, { days = 30 } = {}) {
  fs.mkdirSync(dir, { recursive: true });
  const f = (n) => path.join(dir, n);
  const files = { caFile: f('ca.pem'), caKey: f('ca.key'), certFile: f('server.pem'), keyFile: f('server.key') };
  if (Object.values(files).every((p) => fs.existsSync(p))) {
    try {
      const ca = new crypto.X509Certificate(fs.readFileSync(files.caFile));
      const crt = new crypto.X509Certificate(fs.readFileSync(files.certFile));
      const soon = Date.now() + 3600e3;
      if (crt.verify(ca.publicKey) && Date.parse(crt.validTo) > soon && Date.parse(ca.validTo) > soon) return files;
    } catch { /* remake below */ }
  }
  fs.writeFileSync(f('openssl.cnf'), OPENSSL_CNF);
  const ec = ['-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256'];
  openssl(['genpkey', ...ec, '-out', files.caKey]);
  openssl(['req', '-new', '-x509', '-config', f('openssl.cnf'), '-extensions', 'v3_ca', '-key', files.caKey,
    '-subj', '/CN=iothub test CA', '-sha256', '-days', String(days), '-out', files.caFile]);
  openssl(['genpkey', ...ec, '-out', files.keyFile]);
  openssl(['req', '-new', '-config', f('openssl.cnf'), '-key', files.keyFile, '-subj', '/CN=127.0.0.1',
    '-out', f('server.csr')]);
  openssl(['x509', '-req', '-in', f('server.csr'), '-CA', files.caFile, '-CAkey', files.caKey,
    '-set_serial', `0x${crypto.randomBytes(12).toString('hex')}`, '-sha256', '-days', String(days),
    '-extfile', f('openssl.cnf'), '-extensions', 'v3_srv', '-out', files.certFile]);
  fs.chmodSync(files.caKey, 0o600);
  fs.chmodSync(files.keyFile, 0o600);
  return files;
}

// ---------------------------------------------------------------------------------------
// Small helpers

class HttpError extends Error {
  // kind: a short name counted in state.failures; status: the HTTP status to answer.
  constructor(status, kind, message, headers = {}) {
    super(message);
    this.status = status; this.kind = kind; this.headers = headers;
  }
}
const authFail = (kind, message) => new HttpError(401, kind, message,
  { 'WWW-Authenticate': `Bearer realm="iothub-cloud", error="invalid_token"` });
// RFC 9449 7.1: a refused proof is answered with the DPoP scheme's invalid_dpop_proof.
const dpopFail = (kind, message) => new HttpError(401, kind, message,
  { 'WWW-Authenticate': 'DPoP algs="ES256", error="invalid_dpop_proof"' });
const badRequest = (kind, message) => new HttpError(400, kind, message);

// Validates JSON text strictly (RFC 8259 grammar, and no duplicate member names, which the
// contract forbids and JSON.parse silently accepts), then parses it.
export function parseJsonStrict(text) {
  let i = 0;
  const n = text.length;
  const fail = (what) => { throw new Error(`invalid JSON at offset ${i}: ${what}`); };
  const ws = () => { while (i < n && (text[i] === ' ' || text[i] === '\t' || text[i] === '\n' || text[i] === '\r')) i++; };
  const STR = /"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/y;
  const NUM = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;
  const string = () => {
    STR.lastIndex = i;
    const m = STR.exec(text);
    if (!m) fail('bad string');
    i = STR.lastIndex;
    return JSON.parse(m[0]);
  };
  const value = (depth) => {
    if (depth > 64) fail('nested too deeply');
    ws();
    const c = text[i];
    if (c === '{') {
      i++; ws();
      const seen = new Set();
      if (text[i] === '}') { i++; return; }
      for (;;) {
        ws();
        if (text[i] !== '"') fail('expected a member name');
        const k = string();
        if (seen.has(k)) fail(`duplicate member name "${k}"`);
        seen.add(k);
        ws();
        if (text[i++] !== ':') fail('expected ":"');
        value(depth + 1);
        ws();
        const d = text[i++];
        if (d === '}') return;
        if (d !== ',') fail('expected "," or "}"');
      }
    }
    if (c === '[') {
      i++; ws();
      if (text[i] === ']') { i++; return; }
      for (;;) {
        value(depth + 1);
        ws();
        const d = text[i++];
        if (d === ']') return;
        if (d !== ',') fail('expected "," or "]"');
      }
    }
    if (c === '"') { string(); return; }
    for (const lit of ['true', 'false', 'null']) {
      if (text.startsWith(lit, i)) { i += lit.length; return; }
    }
    NUM.lastIndex = i;
    if (!NUM.exec(text)) fail('unexpected character');
    i = NUM.lastIndex;
  };
  value(0);
  ws();
  if (i !== n) fail('trailing characters');
  return JSON.parse(text);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });
function decodeUtf8(buf) {
  return utf8.decode(buf);
}

const isObj = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const keysExactly = (o, required, optional = []) => {
  const ks = Object.keys(o);
  return required.every((k) => Object.hasOwn(o, k)) && ks.every((k) => required.includes(k) || optional.includes(k));
};
const isInt = (v, lo, hi) => Number.isSafeInteger(v) && v >= lo && v <= hi;

// The raw values of one header field (RFC 9421 2.1: each value trimmed, joined by ", ").
function rawHeaderValues(req, name) {
  const out = [];
  for (let k = 0; k < req.rawHeaders.length; k += 2) {
    if (req.rawHeaders[k].toLowerCase() === name) out.push(req.rawHeaders[k + 1]);
  }
  return out;
}
function fieldValue(req, name) {
  const vs = rawHeaderValues(req, name);
  if (vs.length === 0) return undefined;
  return vs.map((v) => v.trim().replace(/\r?\n[ \t]*/g, ' ')).join(', ');
}

// JWK of a public key of the allowed kinds; private members are an error (the hub must
// never send private key material).
const PRIVATE_JWK_MEMBERS = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'k', 'oth'];
function checkPublicJwk(jwk, { allowEd25519 }) {
  if (!isObj(jwk)) return 'jwk is not an object';
  for (const m of PRIVATE_JWK_MEMBERS) if (Object.hasOwn(jwk, m)) return `jwk carries private key material ("${m}")`;
  if (jwk.kty === 'EC') {
    if (jwk.crv !== 'P-256') return `EC jwk must be on P-256, not ${jwk.crv}`;
    if (typeof jwk.x !== 'string' || typeof jwk.y !== 'string' || !B64U_RE.test(jwk.x) || !B64U_RE.test(jwk.y)) return 'EC jwk needs base64url x and y';
    if (Buffer.from(jwk.x, 'base64url').length !== 32 || Buffer.from(jwk.y, 'base64url').length !== 32) return 'EC jwk x and y must be 32 bytes';
    return null;
  }
  if (allowEd25519 && jwk.kty === 'OKP') {
    if (jwk.crv !== 'Ed25519') return `OKP jwk must be Ed25519, not ${jwk.crv}`;
    if (typeof jwk.x !== 'string' || !B64U_RE.test(jwk.x) || Buffer.from(jwk.x, 'base64url').length !== 32) return 'Ed25519 jwk needs a 32-byte base64url x';
    return null;
  }
  return allowEd25519 ? 'jwk must be EC P-256 or OKP Ed25519' : 'jwk must be EC P-256';
}

function publicKeyFromJwk(jwk) {
  // node:crypto's own JWK import, independent of jose; it also checks the point is on the curve.
  const pub = { kty: jwk.kty, crv: jwk.crv, x: jwk.x };
  if (jwk.kty === 'EC') pub.y = jwk.y;
  return crypto.createPublicKey({ key: pub, format: 'jwk' });
}

// ---------------------------------------------------------------------------------------
// RFC 9421 signature base (section 2.5), built here from the RFC text on its own, and
// checked a second time with the http-message-signatures library: both must agree.

function serializeSignatureParams(components, p) {
  // RFC 8941 serialization of the inner list with its parameters, for the contract's fixed
  // shape (all strings are base64url or a fixed token-like text: nothing to escape).
  const list = `(${components.map((c) => `"${c}"`).join(' ')})`;
  return `${list};created=${p.created};expires=${p.expires};nonce="${p.nonce}";keyid="${p.keyid}";alg="${p.alg}"`;
}

export function signatureBase({ method, targetUri, headers, components, signatureParams }) {
  const lines = components.map((c) => {
    if (c === '@method') return `"@method": ${method}`;
    if (c === '@target-uri') return `"@target-uri": ${targetUri}`;
    const v = headers[c];
    if (v === undefined) throw new Error(`covered field "${c}" is missing`);
    return `"${c}": ${v}`;
  });
  lines.push(`"@signature-params": ${signatureParams}`);
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------
// The service

export async function startCloud(opts = {}) {
  const o = {
    port: 0,
    controlPort: 0,
    clockSkewS: 5,
    maxFrameBytes: 4096,
    maxBodyBytes: 16 << 20,
    maxWaitS: 60,
    dpopMaxAgeS: 60, // RFC 9449 4.3 check 10: |now - iat| of a proof at most this
    dpopNonce: false, // RFC 9449 9: require this server's own DPoP-Nonce in proofs
    redeliverMs: 30_000,
    storeJws: true,
    log: false,
    ...opts,
  };
  let ownDir = false;
  if (!o.dir) { o.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'iothub-cloud-')); ownDir = true; }
  const pki = makeCerts(o.dir);
  const log = typeof o.log === 'function' ? o.log : o.log ? (...a) => console.error('[cloud]', ...a) : () => {};

  // Tokens: a Map or object token -> account, or a Set/array of tokens (all of account
  // "default"). Without opts.tokens and opts.verifyToken any well-formed token is accepted
  // (account "default"): say `anyToken` explicitly in the state so tests can see it.
  const tokens = new Map();
  if (o.tokens instanceof Map) for (const [t, a] of o.tokens) tokens.set(t, a);
  else if (o.tokens instanceof Set || Array.isArray(o.tokens)) for (const t of o.tokens) tokens.set(t, 'default');
  else if (isObj(o.tokens)) for (const [t, a] of Object.entries(o.tokens)) tokens.set(t, a);
  const anyToken = o.tokens === undefined && !o.verifyToken;

  const dpopReplay = createReplayCache(); // jti of the proofs this server saw (RFC 9449 11.1)
  // Hub key attestation (attest.mjs): opts.attestation = { trustedRoots: [pem], intermediates:
  // [pem], require: bool }; without roots every challenge is refused (no EK chains).
  const attest = createAttestation(o.attestation ?? {});
  const events = new EventEmitter();
  const state = {
    anyToken,
    tokens,
    hubs: new Map(), // hub id -> { id, account, jwk, kid, key, registeredAt, devices: Map, deviceLists: [], dedup: Map, commands: Map }
    frames: [], // accepted frames in arrival order: { hub, dev, seq, iat, jws, receivedAt }
    batches: [], // every status POST that passed the request checks
    results: [], // command results in arrival order
    registrations: [],
    failures: {}, // kind -> count (request checks and body checks)
    failureLog: [], // { at, kind, message, method, url, status }
    frameRejections: {}, // reason -> count
    injected: {}, // injected failure kind -> count
    requests: [], // { at, method, url, status, kind?, ms }
    signatures: 0, // request signatures verified
    duplicates: 0, // frames received again (same dev, seq, bytes)
    nonces: new Map(), // nonce -> expiry (Unix s)
    // RFC 9449 resource-server side: proofs that passed the proof checks, their htu claims,
    // this server's current DPoP-Nonce (null: none asked for) and use_dpop_nonce answers.
    dpop: { proofs: 0, htus: [], nonce: o.dpopNonce ? crypto.randomBytes(16).toString('base64url') : null, nonceChallenges: 0,
      nonceRotations: 0 },
    rules: [], // failure injection rules
    events: [], // security events in arrival order: { hub, at, type, dev?, reason?, count, receivedAt }
    eventBodies: [], // the raw body of every events POST that passed the checks (text)
    up: false,
  };

  const countFailure = (kind, message, req, status) => {
    state.failures[kind] = (state.failures[kind] ?? 0) + 1;
    state.failureLog.push({ at: Date.now(), kind, message, method: req?.method, url: req?.url, status });
    events.emit('failure', { kind, message, status });
    log(`${req?.method} ${req?.url} -> ${status} ${kind}: ${message}`);
  };

  // --- authentication of one request -------------------------------------------------

  async function checkAuthorization(req) {
    const vs = rawHeaderValues(req, 'authorization');
    if (vs.length === 0) throw authFail('authorization_missing', 'no Authorization header');
    if (vs.length > 1) throw authFail('authorization_malformed', 'more than one Authorization header');
    const m = /^(\S+) (\S+)$/.exec(vs[0].trim());
    if (!m) throw authFail('authorization_malformed', 'Authorization is not "<scheme> <token>"');
    const [, scheme, token] = m;
    if (!TOKEN68_RE.test(token)) throw authFail('authorization_malformed', 'token has characters outside RFC 6750 b64token');
    if (scheme.toLowerCase() === 'bearer') {
      if (rawHeaderValues(req, 'dpop').length) throw authFail('dpop', 'a DPoP proof with a Bearer token');
      if (o.verifyToken) {
        const account = await o.verifyToken(token, req);
        if (!account) throw authFail('unknown_token', 'access token rejected');
        return { scheme: 'Bearer', token, account };
      }
      if (tokens.has(token)) return { scheme: 'Bearer', token, account: tokens.get(token) };
      if (anyToken) return { scheme: 'Bearer', token, account: 'default' };
      throw authFail('unknown_token', 'unknown access token');
    }
    if (scheme.toLowerCase() === 'dpop') {
      // RFC 9449 7.1: a DPoP-bound token. This cloud checks the proof as a strict resource
      // server does (4.3: one proof, typ, alg, signature by the embedded jwk with jose, htm,
      // htu = the target URI without query and fragment (4.2), iat within dpopMaxAgeS, jti not
      // seen before, ath = hash of this token (4.3 check 11)), and its own nonce (9) when
      // dpopNonce is on; then opts.verifyDpop({ token, proof, method, htu, jkt, req }) says whose
      // token it is (its binding to jkt), returning the account or null.
      if (!o.verifyDpop) throw authFail('dpop_unsupported', 'DPoP-bound tokens are not supported by this cloud yet');
      const proofs = rawHeaderValues(req, 'dpop');
      if (proofs.length !== 1) throw dpopFail('dpop', 'exactly one DPoP header is required');
      const target = new URL(`https://${req.headers.host}${req.url}`);
      const htu = `${target.origin}${target.pathname}`;
      let checked;
      try {
        checked = await verifyDpopProof({ proof: proofs[0], method: req.method, htu, accessToken: token,
          maxAgeS: o.dpopMaxAgeS, replay: dpopReplay, strictHtu: true });
      } catch (e) {
        throw dpopFail(`dpop_${e.check ?? 'proof'}`, `DPoP proof rejected: ${e.message}`);
      }
      state.dpop.proofs += 1;
      state.dpop.htus.push(checked.payload.htu);
      if (state.dpop.htus.length > 1000) state.dpop.htus.shift();
      // RFC 9449 9: the resource server's own nonce, answered with use_dpop_nonce.
      if (state.dpop.nonce !== null && checked.payload.nonce !== state.dpop.nonce) {
        state.dpop.nonceChallenges += 1;
        throw new HttpError(401, 'dpop_use_nonce', 'the proof lacks this server\'s DPoP nonce', {
          'WWW-Authenticate': 'DPoP algs="ES256", error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"',
          'DPoP-Nonce': state.dpop.nonce,
        });
      }
      let account;
      try {
        account = await o.verifyDpop({ token, proof: proofs[0], method: req.method, htu, jkt: checked.jkt, req });
      } catch (e) {
        throw dpopFail('dpop', `DPoP proof rejected: ${e.message}`);
      }
      if (!account) {
        throw new HttpError(401, 'dpop_token', 'DPoP-bound token rejected',
          { 'WWW-Authenticate': 'DPoP algs="ES256", error="invalid_token"' });
      }
      return { scheme: 'DPoP', token, account };
    }
    throw authFail('authorization_malformed', `unknown authorization scheme "${scheme}"`);
  }

  function parseSignatureHeaders(req, hasBody) {
    const inputRaw = fieldValue(req, 'signature-input');
    const sigRaw = fieldValue(req, 'signature');
    if (inputRaw === undefined) throw authFail('signature_missing', 'no Signature-Input header');
    if (sigRaw === undefined) throw authFail('signature_missing', 'no Signature header');
    let inputs, sigs;
    try { inputs = sf.parseDictionary(inputRaw); } catch (e) { throw authFail('signature_input', `Signature-Input is not an RFC 8941 dictionary: ${e.message}`); }
    try { sigs = sf.parseDictionary(sigRaw); } catch (e) { throw authFail('signature_header', `Signature is not an RFC 8941 dictionary: ${e.message}`); }
    if (!inputs.has(LABEL)) throw authFail('signature_input', `Signature-Input has no "${LABEL}" label`);
    if (!sigs.has(LABEL)) throw authFail('signature_header', `Signature has no "${LABEL}" label`);
    if (inputs.size !== 1 || sigs.size !== 1) throw authFail('signature_input', `only the "${LABEL}" label is expected`);
    const input = inputs.get(LABEL);
    if (!sf.isInnerList(input)) throw authFail('signature_input', 'Signature-Input member is not an inner list');
    const [items, params] = input;
    const components = items.map(([name, p]) => {
      if (typeof name !== 'string') throw authFail('components', 'a covered component is not a string');
      if (p.size) throw authFail('components', `component parameters are not expected ("${name}")`);
      return name;
    });
    const want = hasBody ? COMPONENTS_WITH_BODY : COMPONENTS_WITHOUT_BODY;
    if (components.join(' ') !== want.join(' ')) {
      throw authFail('components', `covered components must be (${want.map((c) => `"${c}"`).join(' ')}) ${hasBody ? 'with' : 'without'} a body, got (${components.map((c) => `"${c}"`).join(' ')})`);
    }
    const names = [...params.keys()];
    if (names.join(',') !== PARAMS.join(',')) throw authFail('signature_params', `parameters must be ${PARAMS.join(';')} in that order, got ${names.join(';')}`);
    const p = Object.fromEntries(params);
    if (!Number.isSafeInteger(p.created) || p.created < 0) throw authFail('signature_params', 'created is not an integer');
    if (!Number.isSafeInteger(p.expires)) throw authFail('signature_params', 'expires is not an integer');
    if (p.expires !== p.created + VALIDITY_S) throw authFail('signature_params', `expires must be created+${VALIDITY_S}`);
    if (typeof p.nonce !== 'string' || !B64U_RE.test(p.nonce)) throw authFail('nonce_format', 'nonce is not a base64url string');
    if (Buffer.from(p.nonce, 'base64url').length < 16) throw authFail('nonce_format', 'nonce is shorter than 16 bytes');
    if (typeof p.keyid !== 'string' || !B64U_RE.test(p.keyid)) throw authFail('signature_params', 'keyid is not a base64url string');
    if (p.alg !== ALG) throw authFail('signature_params', `alg must be "${ALG}"`);
    const canonical = serializeSignatureParams(components, p);
    if (inputRaw !== `${LABEL}=${canonical}`) throw authFail('signature_input', `Signature-Input is not in the contract's form ${LABEL}=${canonical}`);
    const sig = sigs.get(LABEL);
    if (!(sig[0] instanceof ArrayBuffer)) throw authFail('signature_header', 'Signature member is not a byte sequence');
    if (sig[1].size) throw authFail('signature_header', 'Signature member has parameters');
    const sigBytes = Buffer.from(sig[0]);
    if (sigBytes.length !== 64) throw authFail('signature_header', `signature must be 64 bytes r||s, got ${sigBytes.length}`);
    return { components, params: p, signatureParams: canonical, sig: sigBytes };
  }

  function checkContentDigest(req, body) {
    const raw = fieldValue(req, 'content-digest');
    if (raw === undefined) throw authFail('content_digest', 'no Content-Digest header on a request with a body');
    let d;
    try { d = sf.parseDictionary(raw); } catch (e) { throw authFail('content_digest', `Content-Digest is not an RFC 8941 dictionary: ${e.message}`); }
    if (d.size !== 1 || !d.has('sha-256')) throw authFail('content_digest', 'Content-Digest must hold exactly sha-256');
    const v = d.get('sha-256');
    if (!(v[0] instanceof ArrayBuffer)) throw authFail('content_digest', 'sha-256 member is not a byte sequence');
    const want = crypto.createHash('sha256').update(body).digest();
    if (!want.equals(Buffer.from(v[0]))) throw authFail('content_digest', 'Content-Digest does not match the body');
    return raw;
  }

  function pruneNonces(now) {
    if (state.nonces.size < 1024) return;
    for (const [n, exp] of state.nonces) if (exp < now) state.nonces.delete(n);
  }

  // Runs every request check of PROTOCOL.md 3 and returns { account, hub, kid }.
  async function authenticate(req, body, route) {
    const auth = await checkAuthorization(req);
    const hasBody = body.length > 0;
    const s = parseSignatureHeaders(req, hasBody);
    const now = nowS();
    if (s.params.created > now + o.clockSkewS) throw authFail('created_future', `created is ${s.params.created - now} s in the future`);
    if (now > s.params.expires) throw authFail('expired', `signature expired ${now - s.params.expires} s ago`);
    const headers = { authorization: fieldValue(req, 'authorization') };
    if (hasBody) headers['content-digest'] = checkContentDigest(req, body);

    // The key to check against: the registered hub key, or for the register request
    // itself the key in the body (a hub registers the key it signs with).
    let jwk;
    if (route.name === 'register' || route.name === 'challenge') {
      let b;
      try { b = JSON.parse(decodeUtf8(body)); } catch { throw authFail('keyid', 'register body is not JSON: no key to check the signature against'); }
      const err = isObj(b) ? checkPublicJwk(b.jwk, { allowEd25519: false }) : 'no jwk';
      if (err) throw authFail('keyid', `register body has no usable hub key: ${err}`);
      jwk = b.jwk;
    } else {
      const hub = state.hubs.get(route.hub);
      if (!hub) throw authFail('unknown_hub', `hub "${route.hub}" is not registered`);
      jwk = hub.jwk;
    }
    const kid = await jose.calculateJwkThumbprint(jwk, 'sha256');
    if (s.params.keyid !== kid) throw authFail('keyid', `keyid is not the RFC 7638 thumbprint of the ${route.name === 'register' ? 'key being registered' : 'registered hub key'}`);
    let key;
    try { key = publicKeyFromJwk(jwk); } catch (e) { throw authFail('keyid', `hub key unusable: ${e.message}`); }

    // 1) our own RFC 9421 2.5 signature base, verified with node:crypto (raw r||s)
    const targetUri = `https://${req.headers.host}${req.url}`;
    const base = signatureBase({ method: req.method, targetUri, headers, components: s.components, signatureParams: s.signatureParams });
    const ours = crypto.verify('sha256', Buffer.from(base), { key, dsaEncoding: 'ieee-p1363' }, s.sig);
    // 2) the same through the http-message-signatures library
    let theirs;
    try {
      theirs = await httpbis.verifyMessage({
        keyLookup: async (params) => (params.keyid === kid
          ? { id: kid, algs: [ALG], verify: createVerifier(key, ALG) } : null),
        requiredParams: PARAMS,
        requiredFields: s.components,
        tolerance: o.clockSkewS,
      }, { method: req.method, url: targetUri, headers: req.headers });
    } catch (e) {
      theirs = e;
    }
    if ((theirs === true) !== ours) {
      const msg = `RFC 9421 verifiers disagree (own: ${ours}, library: ${theirs instanceof Error ? theirs.message : theirs})`;
      console.error(`[cloud] ${msg}\n--- signature base ---\n${base}\n---`);
      throw new HttpError(500, 'verifier_disagreement', msg);
    }
    if (!ours) throw authFail('bad_signature', 'HTTP message signature does not verify with the hub key');

    // Replay: only a verified signature enters the cache, so forgeries cannot burn nonces.
    if (state.nonces.has(s.params.nonce)) throw authFail('replay', 'nonce already seen');
    pruneNonces(now);
    state.nonces.set(s.params.nonce, s.params.expires + o.clockSkewS);
    state.signatures++;
    return { ...auth, kid, jwk, key, params: s.params };
  }

  // --- routing -------------------------------------------------------------------------

  function route(req) {
    const q = req.url.indexOf('?');
    const p = q < 0 ? req.url : req.url.slice(0, q);
    const query = new URLSearchParams(q < 0 ? '' : req.url.slice(q + 1));
    let m;
    const r = (name, method, hub, extra = {}) => ({ name, method, hub, query, ...extra });
    if ((m = /^\/v1\/hubs\/([^/]+)$/.exec(p))) return r('register', 'POST', m[1]);
    if ((m = /^\/v1\/hubs\/([^/]+)\/attest\/challenge$/.exec(p))) return r('challenge', 'POST', m[1]);
    if ((m = /^\/v1\/hubs\/([^/]+)\/devices$/.exec(p))) return r('devices', 'PUT', m[1]);
    if ((m = /^\/v1\/hubs\/([^/]+)\/status$/.exec(p))) return r('status', 'POST', m[1]);
    if ((m = /^\/v1\/hubs\/([^/]+)\/commands$/.exec(p))) return r('commands', 'GET', m[1]);
    if ((m = /^\/v1\/hubs\/([^/]+)\/events$/.exec(p))) return r('events', 'POST', m[1]);
    if ((m = /^\/v1\/hubs\/([^/]+)\/commands\/([^/]+)\/result$/.exec(p))) return r('result', 'POST', m[1], { command: m[2] });
    return null;
  }

  function send(res, status, obj, headers = {}) {
    if (res.headersSent || res.destroyed) return;
    const h = { ...headers };
    let data = '';
    if (obj !== undefined && status !== 204) { data = JSON.stringify(obj); h['Content-Type'] = 'application/json'; }
    h['Content-Length'] = Buffer.byteLength(data);
    res.writeHead(status, h);
    res.end(data);
  }

  function readBody(req) {
    return new Promise((resolve, reject) => {
      const chunks = [];
      let len = 0;
      req.on('data', (c) => {
        len += c.length;
        if (len > o.maxBodyBytes) { reject(new HttpError(413, 'too_large', 'request body too large')); req.destroy(); return; }
        chunks.push(c);
      });
      req.on('end', () => resolve(Buffer.concat(chunks)));
      req.on('error', reject);
    });
  }

  function takeRule(endpoint) {
    for (const rule of state.rules) {
      if (rule.left <= 0) continue;
      if (rule.endpoint !== 'any' && rule.endpoint !== endpoint) continue;
      rule.left--;
      rule.used++;
      state.rules = state.rules.filter((x) => x.left > 0);
      return rule;
    }
    return null;
  }
  const countInjected = (k) => { state.injected[k] = (state.injected[k] ?? 0) + 1; };

  function parseJsonBody(req, body) {
    const ct = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
    if (ct !== 'application/json') throw new HttpError(415, 'content_type', `Content-Type must be application/json, got "${req.headers['content-type'] ?? ''}"`);
    if (!body.length) throw badRequest('body', 'a JSON body is required');
    let text;
    try { text = decodeUtf8(body); } catch { throw badRequest('json', 'body is not valid UTF-8'); }
    try { return parseJsonStrict(text); } catch (e) { throw badRequest('json', e.message); }
  }

  async function handle(req, res) {
    const t0 = Date.now();
    // start/end: performance.now() (sub-millisecond, the test process's clock when the cloud runs
    // in it, as lib/slowtpm.mjs's command times are); first/last: a status batch's first and last
    // frame as sent (whatever the answer), so that tests can check the order of attempts.
    const rec = { at: t0, start: performance.now(), method: req.method, url: req.url, status: 0 };
    state.requests.push(rec);
    let dropAfter = false;
    try {
      const body = await readBody(req);
      rec.bytes = body.length;
      if (req.url.endsWith('/status')) {
        try {
          const f = JSON.parse(body.toString('utf8')).frames;
          if (Array.isArray(f) && f.length) { rec.first = f[0]; rec.last = f[f.length - 1]; rec.count = f.length; }
        } catch { /* the checks below answer it */ }
      }
      const r = route(req);
      if (!r) throw new HttpError(404, 'not_found', `no such endpoint ${req.url.split('?')[0]}`);
      if (req.method !== r.method) throw new HttpError(405, 'method', `${r.name} takes ${r.method}, not ${req.method}`, { Allow: r.method });
      if (!HUB_ID_RE.test(r.hub)) throw new HttpError(404, 'not_found', 'malformed hub id');
      if (r.name === 'result' && !COMMAND_ID_RE.test(r.command)) throw new HttpError(404, 'not_found', 'malformed command id');
      rec.endpoint = r.name;
      const auth = await authenticate(req, body, r);
      if (r.name !== 'register' && r.name !== 'challenge') {
        const hub = state.hubs.get(r.hub);
        if (hub.account !== auth.account) throw new HttpError(403, 'wrong_account', `hub "${r.hub}" belongs to another account`);
      }

      // failure injection
      const rule = takeRule(r.name);
      if (rule) {
        rec.injected = rule.kind;
        countInjected(rule.kind);
        if (rule.delayMs) await sleep(rule.delayMs);
        if (rule.drop && !rule.after) { req.socket.destroy(); rec.status = 'dropped'; return; }
        if (rule.status) {
          const h = rule.retryAfter !== undefined ? { 'Retry-After': String(rule.retryAfter) } : {};
          rec.status = rule.status;
          send(res, rule.status, { error: 'injected', error_description: `failure injected by the test (${rule.kind})` }, h);
          return;
        }
        if (rule.drop && rule.after) dropAfter = true;
      }

      let out;
      if (r.name === 'register') out = await onRegister(req, body, r, auth);
      else if (r.name === 'challenge') out = onChallenge(req, body, r, auth);
      else if (r.name === 'devices') out = await onDevices(req, body, r);
      else if (r.name === 'status') out = await onStatus(req, body, r, rule);
      else if (r.name === 'commands') out = await onCommands(req, res, r);
      else if (r.name === 'events') out = onEvents(req, body, r);
      else out = await onResult(req, body, r);
      if (dropAfter) { req.socket.destroy(); rec.status = 'dropped'; return; }
      // RFC 9449 8.2, 9: a new nonce handed out in a successful answer; proofs with the old one
      // get use_dpop_nonce from now on.
      if (rule?.newDpopNonce && state.dpop.nonce !== null && out.status < 300) {
        state.dpop.nonce = crypto.randomBytes(16).toString('base64url');
        state.dpop.nonceRotations += 1;
        out = { ...out, headers: { ...out.headers, 'DPoP-Nonce': state.dpop.nonce } };
      }
      rec.status = out.status;
      send(res, out.status, out.body, out.headers);
    } catch (e) {
      if (e instanceof AttestError) e = new HttpError(e.status, e.kind, e.message);
      if (!(e instanceof HttpError)) {
        console.error('[cloud] internal error', e);
        e = new HttpError(500, 'internal', e.message);
      }
      rec.status = e.status;
      rec.kind = e.kind;
      countFailure(e.kind, e.message, req, e.status);
      send(res, e.status, { error: e.kind, error_description: e.message }, e.headers);
    } finally {
      rec.ms = Date.now() - t0;
      rec.end = performance.now();
      events.emit('request', rec);
    }
  }

  // --- endpoints -----------------------------------------------------------------------

  async function onRegister(req, body, r, auth) {
    const b = parseJsonBody(req, body);
    if (!isObj(b) || !keysExactly(b, ['jwk'], ['attestation'])) throw badRequest('body', 'register body must be exactly {"jwk":{...}[,"attestation":{...}]}');
    const err = checkPublicJwk(b.jwk, { allowEd25519: false });
    if (err) throw badRequest('body', err);
    // PROTOCOL.md 5: the evidence, when given, must verify; without it the hub is refused when
    // this cloud requires attestation.
    let attested = null;
    if (b.attestation !== undefined) attested = attest.verify(r.hub, auth.kid, b.jwk, b.attestation);
    else if (attest.require) throw new HttpError(403, 'attestation_required', 'this cloud registers only hubs whose key is attested to be in a TPM');
    const old = state.hubs.get(r.hub);
    if (old && old.account !== auth.account) {
      state.registrations.push({ hub: r.hub, account: auth.account, kid: auth.kid, at: Date.now(), status: 409 });
      throw new HttpError(409, 'registered_elsewhere', `hub "${r.hub}" is registered to another account`);
    }
    const hub = old ?? { id: r.hub, devices: new Map(), deviceLists: [], dedup: new Map(), commands: new Map(), waiters: new Set() };
    Object.assign(hub, { account: auth.account, jwk: b.jwk, kid: auth.kid, registeredAt: Date.now(), attested });
    state.hubs.set(r.hub, hub);
    const status = old ? 200 : 201;
    state.registrations.push({ hub: r.hub, account: auth.account, kid: auth.kid, at: Date.now(), status });
    events.emit('register', { hub: r.hub, kid: auth.kid });
    return { status, body: { hub: r.hub, keyid: auth.kid } };
  }

  // POST /v1/hubs/<id>/attest/challenge {"jwk","ek_cert","ak_public"} (iothub-protocol(7)).
  function onChallenge(req, body, r, auth) {
    const b = parseJsonBody(req, body);
    if (!isObj(b) || !keysExactly(b, ['jwk', 'ek_cert', 'ak_public'])) throw badRequest('body', 'challenge body must be exactly {"jwk","ek_cert","ak_public"}');
    const old = state.hubs.get(r.hub);
    if (old && old.account !== auth.account) throw new HttpError(409, 'registered_elsewhere', `hub "${r.hub}" is registered to another account`);
    return { status: 200, body: attest.challenge(r.hub, auth.kid, b) };
  }

  async function onDevices(req, body, r) {
    const b = parseJsonBody(req, body);
    if (!isObj(b) || !keysExactly(b, ['devices']) || !Array.isArray(b.devices)) throw badRequest('body', 'devices body must be exactly {"devices":[...]}');
    const devices = new Map();
    for (const [i, d] of b.devices.entries()) {
      if (!isObj(d) || !keysExactly(d, ['id', 'jwk', 'revoked'])) throw badRequest('body', `devices[${i}] must be exactly {"id","jwk","revoked"}`);
      if (typeof d.id !== 'string' || !DEVICE_ID_RE.test(d.id)) throw badRequest('body', `devices[${i}].id is not a valid device id`);
      if (typeof d.revoked !== 'boolean') throw badRequest('body', `devices[${i}].revoked must be a boolean`);
      if (devices.has(d.id)) throw badRequest('body', `device "${d.id}" listed twice`);
      const err = checkPublicJwk(d.jwk, { allowEd25519: true });
      if (err) throw badRequest('body', `devices[${i}]: ${err}`);
      const alg = d.jwk.kty === 'EC' ? 'ES256' : 'EdDSA';
      let key;
      try { key = await jose.importJWK({ kty: d.jwk.kty, crv: d.jwk.crv, x: d.jwk.x, ...(d.jwk.y ? { y: d.jwk.y } : {}) }, alg); } catch (e) { throw badRequest('body', `devices[${i}].jwk: ${e.message}`); }
      devices.set(d.id, { id: d.id, jwk: d.jwk, revoked: d.revoked, alg, key });
    }
    const hub = state.hubs.get(r.hub);
    hub.devices = devices;
    hub.deviceLists.push({ at: Date.now(), devices: b.devices.map((d) => ({ id: d.id, revoked: d.revoked })) });
    events.emit('devices', { hub: r.hub, count: devices.size });
    return { status: 200, body: { devices: devices.size } };
  }

  // One status frame: { ok, dev, seq, iat } or { ok: false, reason, message }.
  async function checkFrame(hub, jws) {
    const rej = (reason, message) => ({ ok: false, reason, message });
    if (typeof jws !== 'string') return rej('malformed', 'frame is not a string');
    if (Buffer.byteLength(jws) > o.maxFrameBytes) return rej('too_large', `frame over ${o.maxFrameBytes} bytes`);
    if (!JWS_COMPACT_RE.test(jws)) return rej('malformed', 'not a JWS in compact serialization');
    const [h64, p64] = jws.split('.');
    let header, payload;
    try { header = parseJsonStrict(decodeUtf8(Buffer.from(h64, 'base64url'))); } catch (e) { return rej('malformed', `header: ${e.message}`); }
    if (!isObj(header) || !keysExactly(header, ['alg', 'kid', 'typ'])) return rej('malformed', 'header must be exactly {alg,kid,typ}');
    if (header.typ !== 'iothub-status') return rej('malformed', 'typ is not iothub-status');
    if (header.alg !== 'ES256' && header.alg !== 'EdDSA') return rej('malformed', `alg ${header.alg} not allowed`);
    if (typeof header.kid !== 'string' || !DEVICE_ID_RE.test(header.kid)) return rej('malformed', 'kid is not a device id');
    const dev = hub.devices.get(header.kid);
    if (!dev) return rej('unknown_device', `device "${header.kid}" is not in the last devices list`);
    if (dev.revoked) return rej('revoked', `device "${header.kid}" is revoked`);
    if (header.alg !== dev.alg) return rej('bad_signature', `alg ${header.alg} does not match the enrolled ${dev.alg} key`);
    try {
      await jose.compactVerify(jws, dev.key, { algorithms: [dev.alg] });
    } catch (e) {
      return rej('bad_signature', e.message);
    }
    try { payload = parseJsonStrict(decodeUtf8(Buffer.from(p64, 'base64url'))); } catch (e) { return rej('malformed', `payload: ${e.message}`); }
    const perr = checkStatusPayload(payload, header.kid);
    if (perr) return rej('malformed', perr);
    return { ok: true, dev: payload.dev, seq: payload.seq, iat: payload.iat };
  }

  async function onStatus(req, body, r, rule) {
    const b = parseJsonBody(req, body);
    if (!isObj(b) || !keysExactly(b, ['frames']) || !Array.isArray(b.frames)) throw badRequest('body', 'status body must be exactly {"frames":[...]}');
    if (b.frames.length === 0) throw badRequest('body', 'empty batch');
    const hub = state.hubs.get(r.hub);
    const checked = await Promise.all(b.frames.map((f) => checkFrame(hub, f)));
    // From here on synchronous: de-duplication cannot interleave with another batch.
    const at = Date.now();
    const rejected = [];
    let accepted = 0, duplicates = 0, stored = 0;
    checked.forEach((c, index) => {
      if (c.ok && rule?.rejectFrames) {
        const rf = rule.rejectFrames;
        const hit = typeof rf === 'function' ? rf({ index, dev: c.dev, seq: c.seq, jws: b.frames[index] })
          : Array.isArray(rf) ? rf.includes(index)
            : (rf.dev === undefined || [rf.dev].flat().includes(c.dev)) && (rf.seq === undefined || [rf.seq].flat().includes(c.seq));
        if (hit) c = { ok: false, reason: rule.reason ?? 'rejected_by_test', message: 'injected' };
      }
      if (c.ok) {
        const k = `${c.dev}\n${c.seq}`;
        const prev = hub.dedup.get(k);
        if (prev !== undefined && prev !== b.frames[index]) {
          c = { ok: false, reason: 'replay', message: `another frame with dev ${c.dev} seq ${c.seq} was stored before` };
        } else if (prev !== undefined) {
          accepted++; duplicates++; state.duplicates++;
          return;
        } else {
          hub.dedup.set(k, b.frames[index]);
          state.frames.push({ hub: r.hub, dev: c.dev, seq: c.seq, iat: c.iat, jws: o.storeJws ? b.frames[index] : undefined, receivedAt: at });
          accepted++; stored++;
          return;
        }
      }
      rejected.push({ index, reason: c.reason });
      state.frameRejections[c.reason] = (state.frameRejections[c.reason] ?? 0) + 1;
      log(`frame ${index} rejected: ${c.reason}: ${c.message}`);
    });
    const batch = { hub: r.hub, at, count: b.frames.length, bytes: body.length, frameBytes: b.frames.reduce((s, f) => s + (typeof f === 'string' ? f.length : 0), 0), accepted, stored, duplicates, rejected };
    state.batches.push(batch);
    events.emit('batch', batch);
    if (stored) events.emit('frames', { hub: r.hub, stored });
    return { status: 200, body: { accepted, rejected } };
  }

  function eligibleCommands(hub) {
    const now = Date.now();
    return [...hub.commands.values()].filter((c) => c.ready !== false && c.results.length === 0 && (c.sentAt === undefined || now - c.sentAt >= o.redeliverMs));
  }
  function handOut(hub, cmds) {
    const now = Date.now();
    for (const c of cmds) {
      c.sentAt = now; c.deliveries++;
      if (Number.isFinite(o.redeliverMs)) setTimeout(() => wake(hub), o.redeliverMs + 5).unref();
    }
    return { commands: cmds.map((c) => ({ id: c.id, dev: c.dev, set: c.set, exp: c.exp, ...(typeof c.sig === 'string' ? { sig: c.sig } : {}) })) };
  }
  function wake(hub) {
    for (const w of [...hub.waiters]) {
      const cmds = eligibleCommands(hub);
      if (!cmds.length) return;
      w.resolve({ status: 200, body: handOut(hub, cmds) });
    }
  }

  async function onCommands(req, res, r) {
    const w = r.query.get('wait');
    let wait = 0;
    if (w !== null) {
      if (!/^[0-9]{1,6}$/.test(w)) throw badRequest('query', 'wait must be a non-negative integer');
      wait = Math.min(Number(w), o.maxWaitS);
    }
    const hub = state.hubs.get(r.hub);
    const cmds = eligibleCommands(hub);
    if (cmds.length) return { status: 200, body: handOut(hub, cmds) };
    if (wait === 0) return { status: 204 };
    return new Promise((resolve) => {
      const waiter = {
        resolve: (v) => { clearTimeout(waiter.timer); hub.waiters.delete(waiter); resolve(v); },
      };
      waiter.timer = setTimeout(() => waiter.resolve({ status: 204 }), wait * 1000);
      // A poll whose client went away must not swallow commands.
      res.on('close', () => { if (hub.waiters.has(waiter)) waiter.resolve({ status: 204 }); });
      hub.waiters.add(waiter);
    });
  }

  // POST /v1/hubs/<id>/events (PROTOCOL.md 5): {"events":[{at,type,count[,dev][,reason]}]},
  // checked strictly, stored with the raw body (a test searches the bodies for frame bytes).
  function onEvents(req, body, r) {
    const b = parseJsonBody(req, body);
    if (!isObj(b) || !keysExactly(b, ['events']) || !Array.isArray(b.events)) throw badRequest('body', 'events body must be exactly {"events":[...]}');
    if (b.events.length < 1 || b.events.length > EVENTS_MAX) throw badRequest('body', `1..${EVENTS_MAX} events in one request`);
    for (const [i, e] of b.events.entries()) {
      const where = `events[${i}]`;
      if (!isObj(e) || !keysExactly(e, ['at', 'type', 'count'], ['dev', 'reason'])) throw badRequest('body', `${where} must be {at,type,count[,dev][,reason]}`);
      if (!Number.isSafeInteger(e.at) || e.at < 0) throw badRequest('body', `${where}.at must be Unix seconds`);
      if (!EVENT_TYPES.includes(e.type)) throw badRequest('body', `${where}.type "${e.type}" is not one of ${EVENT_TYPES.join('|')}`);
      if (!Number.isSafeInteger(e.count) || e.count < 1) throw badRequest('body', `${where}.count must be a positive integer`);
      if (e.dev !== undefined && (typeof e.dev !== 'string' || !DEVICE_ID_RE.test(e.dev))) throw badRequest('body', `${where}.dev must be a device id`);
      if (e.reason !== undefined && (typeof e.reason !== 'string' || !EVENT_REASON_RE.test(e.reason))) throw badRequest('body', `${where}.reason must be [a-z0-9_]{1,32}`);
    }
    const receivedAt = Date.now();
    for (const e of b.events) state.events.push({ hub: r.hub, ...e, receivedAt });
    state.eventBodies.push(decodeUtf8(body));
    events.emit('events', { hub: r.hub, count: b.events.length });
    return { status: 200, body: { accepted: b.events.length } };
  }

  // The vendor signs a queued command (o.commandKey = { privateKey, kid }) before it is handed
  // out; a test may give its own sig (a string) or none (null) instead.
  function signQueued(hub, cmd, sig) {
    if (sig !== undefined) { cmd.sig = sig; return; }
    if (!o.commandKey) return;
    cmd.ready = false;
    signCloudCommand(o.commandKey, hub.id, cmd).then((jws) => { cmd.sig = jws; cmd.ready = true; wake(hub); },
      (e) => log('signing a command failed:', e.message));
  }

  async function onResult(req, body, r) {
    const b = parseJsonBody(req, body);
    if (!isObj(b) || !keysExactly(b, ['status', 'at'], ['detail'])) throw badRequest('body', 'result body must be {"status","at"[,"detail"]}');
    if (!RESULT_STATUSES.includes(b.status)) throw badRequest('body', `status must be one of ${RESULT_STATUSES.join('|')}`);
    if (!Number.isSafeInteger(b.at) || b.at < 0) throw badRequest('body', 'at must be Unix seconds');
    if (b.detail !== undefined && typeof b.detail !== 'string') throw badRequest('body', 'detail must be a string');
    const hub = state.hubs.get(r.hub);
    const cmd = hub.commands.get(r.command);
    if (!cmd) throw new HttpError(404, 'unknown_command', `no command "${r.command}" was queued for this hub`);
    const result = { hub: r.hub, id: r.command, dev: cmd.dev, status: b.status, at: b.at, detail: b.detail, receivedAt: Date.now() };
    cmd.results.push(result);
    state.results.push(result);
    events.emit('result', result);
    return { status: 200, body: {} };
  }

  // --- listeners -----------------------------------------------------------------------

  const server = https.createServer({ key: fs.readFileSync(pki.keyFile), cert: fs.readFileSync(pki.certFile) }, handle);
  server.keepAliveTimeout = 10_000;
  server.on('tlsClientError', (e) => log('TLS client error:', e.message));
  server.listen(o.port, '127.0.0.1');
  await once(server, 'listening');
  const port = server.address().port;
  state.up = true;
  const url = `https://127.0.0.1:${port}`;

  async function down() {
    if (!state.up) return;
    state.up = false;
    const closed = new Promise((r) => server.close(r));
    server.closeAllConnections();
    await closed;
  }
  async function up() {
    if (state.up) return;
    server.listen(port, '127.0.0.1');
    await once(server, 'listening');
    state.up = true;
  }

  const KINDS = ['status', 'delayMs', 'drop', 'rejectFrames', 'newDpopNonce'];
  const control = {
    // Failure injection. mode: { status, retryAfter?, delayMs?, drop?, after?, rejectFrames?, newDpopNonce?,
    // reason?, count = 1 (-1 or Infinity: until cleared), endpoint = 'status' | 'register' | 'challenge' |
    // 'devices' | 'commands' | 'result' | 'any' }, or 'down' / 'up' / 'clear'.
    // rejectFrames: [indices in the batch], or ({ index, dev, seq, jws }) => boolean, or
    // { dev?: id | [ids], seq?: n | [ns] }; only frames that passed every check are hit.
    async fail(mode) {
      if (mode === 'down' || mode?.down) return down();
      if (mode === 'up' || mode?.up) return up();
      if (mode === 'clear' || mode?.clear) { state.rules = []; return; }
      if (!isObj(mode) || !KINDS.some((k) => mode[k] !== undefined)) throw new Error(`unknown failure mode ${JSON.stringify(mode)}`);
      const endpoint = mode.endpoint ?? 'status';
      if (!['status', 'register', 'challenge', 'devices', 'commands', 'result', 'events', 'any'].includes(endpoint)) throw new Error(`unknown endpoint ${endpoint}`);
      if (mode.status !== undefined && !isInt(mode.status, 100, 599)) throw new Error('status must be an HTTP status');
      const count = mode.count === undefined ? 1 : mode.count === -1 ? Infinity : mode.count;
      const kind = mode.drop ? (mode.after ? 'drop_after' : 'drop') : mode.status ? String(mode.status) : mode.rejectFrames ? 'reject_frames' : mode.newDpopNonce ? 'new_dpop_nonce' : 'delay';
      const rule = { ...mode, endpoint, left: count, used: 0, kind };
      state.rules.push(rule);
      // A long poll already waiting was admitted before the rule: end it now (204, nothing
      // new), so that no success arrives in the middle of the failures the test asked for.
      if (endpoint === 'commands' || endpoint === 'any')
        for (const hub of state.hubs.values()) for (const w of [...hub.waiters]) w.resolve({ status: 204 });
      return rule;
    },
    clearFailures() { state.rules = []; },
    // RFC 9449 9: a new resource-server nonce (proofs with the old one get use_dpop_nonce);
    // null switches nonces off. Returns the nonce.
    rotateDpopNonce(nonce = crypto.randomBytes(16).toString('base64url')) { state.dpop.nonce = nonce; return nonce; },
    down,
    up,
    addToken(token, account = 'default') { tokens.set(token, account); state.anyToken = false; },
    revokeToken(token) { tokens.delete(token); },
    queueCommand({ hub: hubId, id, dev, set, exp, sig }) {
      if (!hubId) {
        if (state.hubs.size !== 1) throw new Error('queueCommand: name the hub (none or several are registered)');
        [hubId] = state.hubs.keys();
      }
      const hub = state.hubs.get(hubId);
      if (!hub) throw new Error(`queueCommand: hub "${hubId}" is not registered`);
      if (typeof id !== 'string' || !COMMAND_ID_RE.test(id)) throw new Error('queueCommand: bad id');
      if (hub.commands.has(id)) throw new Error(`queueCommand: command "${id}" already queued`);
      const cmd = { id, dev, set, exp: exp ?? nowS() + 300, queuedAt: Date.now(), deliveries: 0, results: [] };
      signQueued(hub, cmd, sig);
      hub.commands.set(id, cmd);
      wake(hub);
      return cmd;
    },
    eventsOf(hubId) { return state.events.filter((e) => !hubId || e.hub === hubId); },
    framesOf(dev, hubId) { return state.frames.filter((f) => f.dev === dev && (!hubId || f.hub === hubId)); },
    summary() { return summary(); },
  };

  function summary() {
    return {
      url, port, caFile: pki.caFile, up: state.up, anyToken: state.anyToken,
      hubs: [...state.hubs.values()].map((h) => ({
        id: h.id, account: h.account, keyid: h.kid, attested: h.attested ?? null, devices: [...h.devices.values()].map((d) => ({ id: d.id, revoked: d.revoked, alg: d.alg })),
        commands: [...h.commands.values()].map((c) => ({ id: c.id, dev: c.dev, deliveries: c.deliveries, results: c.results.map((x) => x.status) })),
      })),
      frames: state.frames.length, duplicates: state.duplicates, signatures: state.signatures,
      failures: state.failures, frameRejections: state.frameRejections, injected: state.injected,
      batches: state.batches.length, lastBatches: state.batches.slice(-20),
      results: state.results, requests: state.requests.length,
      rules: state.rules.map(({ rejectFrames, ...r }) => ({ ...r, left: Number.isFinite(r.left) ? r.left : -1, rejectFrames: typeof rejectFrames === 'function' ? 'predicate' : rejectFrames })),
    };
  }

  // Plain-HTTP control API on its own loopback listener (for the CLI and benchmarks).
  const ctl = http.createServer(async (req, res) => {
    const reply = (status, obj) => { const d = JSON.stringify(obj ?? {}); res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(d) }); res.end(d); };
    try {
      const chunks = [];
      for await (const c of req) chunks.push(c);
      const text = Buffer.concat(chunks).toString();
      const b = text ? JSON.parse(text) : {};
      const u = new URL(req.url, 'http://x');
      const p = u.pathname;
      if (req.method === 'GET' && p === '/control/state') return reply(200, summary());
      if (req.method === 'GET' && p === '/control/events') return reply(200, { events: control.eventsOf(u.searchParams.get('hub')) });
      if (req.method === 'GET' && p === '/control/frames') {
        const dev = u.searchParams.get('dev');
        const since = Number(u.searchParams.get('since') ?? 0);
        return reply(200, { frames: state.frames.slice(since).filter((f) => !dev || f.dev === dev) });
      }
      if (req.method === 'POST' && p === '/control/fail') {
        const mode = typeof b.mode === 'string' || isObj(b.mode) ? b.mode : b;
        const rule = await control.fail(mode);
        return reply(200, { ok: true, rule: rule ? { ...rule, left: Number.isFinite(rule.left) ? rule.left : -1 } : undefined });
      }
      if (req.method === 'POST' && p === '/control/clear') { control.clearFailures(); return reply(200, { ok: true }); }
      if (req.method === 'POST' && p === '/control/down') { await down(); return reply(200, { ok: true }); }
      if (req.method === 'POST' && p === '/control/up') { await up(); return reply(200, { ok: true }); }
      if (req.method === 'POST' && p === '/control/commands') {
        const c = control.queueCommand(b);
        return reply(200, { ok: true, id: c.id, exp: c.exp });
      }
      if (req.method === 'POST' && p === '/control/tokens') {
        if (typeof b.token !== 'string') return reply(400, { error: 'token required' });
        if (b.revoke) control.revokeToken(b.token); else control.addToken(b.token, b.account);
        return reply(200, { ok: true });
      }
      reply(404, { error: 'no such control endpoint' });
    } catch (e) {
      reply(400, { error: e.message });
    }
  });
  ctl.listen(o.controlPort, '127.0.0.1');
  await once(ctl, 'listening');
  const controlUrl = `http://127.0.0.1:${ctl.address().port}`;

  async function close() {
    for (const hub of state.hubs.values()) for (const w of [...hub.waiters]) w.resolve({ status: 204 });
    await down();
    await new Promise((r) => { ctl.close(r); ctl.closeAllConnections(); });
    if (ownDir) fs.rmSync(o.dir, { recursive: true, force: true });
  }

  async function waitFor(pred, timeoutMs = 5000, what = 'condition') {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const v = await pred(state);
      if (v) return v;
      if (Date.now() > end) throw new Error(`cloud: timed out after ${timeoutMs} ms waiting for ${what}`);
      await sleep(20);
    }
  }

  return { url, port, caFile: pki.caFile, controlUrl, dir: o.dir, state, control, events, close, waitFor, attest };
}

// The payload of a status frame, PROTOCOL.md 1. Returns an error text or null.
export function checkStatusPayload(p, kid) {
  if (!isObj(p)) return 'payload is not a JSON object';
  if (!keysExactly(p, ['dev', 'seq', 'iat', 'state'], ['ack'])) return 'payload members must be dev, seq, iat, state[, ack]';
  if (p.dev !== kid) return 'dev does not equal kid';
  if (!isInt(p.seq, 1, MAX_SEQ)) return 'seq is not an integer in 1..2^53-1';
  if (!Number.isSafeInteger(p.iat)) return 'iat is not an integer';
  const s = p.state;
  if (!isObj(s) || !keysExactly(s, ['on'], ['bri', 'ct', 'xy'])) return 'state members must be on[, bri, ct, xy]';
  if (typeof s.on !== 'boolean') return 'state.on is not a boolean';
  if (s.bri !== undefined && !isInt(s.bri, 0, 254)) return 'state.bri out of 0..254';
  if (s.ct !== undefined && !isInt(s.ct, 153, 500)) return 'state.ct out of 153..500';
  if (s.xy !== undefined && !(Array.isArray(s.xy) && s.xy.length === 2 && s.xy.every((v) => typeof v === 'number' && v >= 0 && v <= 1))) return 'state.xy must be two numbers in [0,1]';
  if (p.ack !== undefined) {
    const a = p.ack;
    if (!isObj(a) || !keysExactly(a, ['id', 'ok'], ['err'])) return 'ack members must be id, ok[, err]';
    if (typeof a.id !== 'string' || !COMMAND_ID_RE.test(a.id)) return 'ack.id is not a command id';
    if (typeof a.ok !== 'boolean') return 'ack.ok is not a boolean';
    if (a.err !== undefined && (typeof a.err !== 'string' || Buffer.byteLength(a.err) > 128)) return 'ack.err must be a string of at most 128 bytes';
  }
  return null;
}

// ---------------------------------------------------------------------------------------
// CLI

function parseArgs(argv) {
  const a = { port: 0, controlPort: 0, tokens: undefined, log: false };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = () => { if (i + 1 >= argv.length) throw new Error(`${k} needs a value`); return argv[++i]; };
    if (k === '--port') a.port = Number(v());
    else if (k === '--control-port') a.controlPort = Number(v());
    else if (k === '--dir') a.dir = v();
    else if (k === '--token') { const [t, acc] = v().split('='); (a.tokens ??= {})[t] = acc || 'default'; }
    else if (k === '--verbose' || k === '-v') a.log = true;
    else if (k === '--help' || k === '-h') {
      console.log('usage: node cloud/server.mjs [--port N] [--control-port N] [--dir DIR] [--token TOKEN[=ACCOUNT]]... [--verbose]');
      process.exit(0);
    } else throw new Error(`unknown argument ${k}`);
  }
  return a;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  let args;
  try { args = parseArgs(process.argv.slice(2)); } catch (e) { console.error(e.message); process.exit(2); }
  const cloud = await startCloud(args);
  console.log(JSON.stringify({ url: cloud.url, port: cloud.port, caFile: cloud.caFile, controlUrl: cloud.controlUrl, dir: cloud.dir }));
  const stop = async () => { await cloud.close(); process.exit(0); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}
