// DPoP (RFC 9449) proofs with `jose` and node:crypto only, independent of the hub's C code:
// verifyDpopProof() for the reference cloud (a resource server, RFC 9449 4.3 and 7.1),
// createDpopProof() for test clients.
import crypto from 'node:crypto';
import * as jose from 'jose';

export const DPOP_ALGS = ['ES256'];

export class DpopError extends Error {
  // check: which check failed (counted by the reference cloud as `dpop_<check>`).
  constructor(message, check = 'proof') {
    super(message);
    this.name = 'DpopError';
    this.error = 'invalid_dpop_proof';
    this.check = check;
  }
}

const b64uSha256 = (s) => crypto.createHash('sha256').update(s).digest('base64url');
export const accessTokenHash = (token) => b64uSha256(token); // the `ath` claim

// jti replay cache: key -> expiry (ms). Entries are kept for the proof acceptance window.
export function createReplayCache() {
  const seen = new Map();
  return {
    // true when key was unseen (and is now remembered until expMs)
    add(key, expMs) {
      const now = Date.now();
      if (seen.size > 10_000) for (const [k, e] of seen) if (e <= now) seen.delete(k);
      const e = seen.get(key);
      if (e !== undefined && e > now) return false;
      seen.set(key, expMs);
      return true;
    },
    get size() { return seen.size; },
  };
}
const defaultReplay = createReplayCache();

// htu comparison (RFC 9449 4.3 step 9): the claim without query and fragment, normalised
// (scheme and host case, default port, percent-encoding) must equal the request's URI.
function normUri(u) {
  const url = new URL(u);
  url.search = '';
  url.hash = '';
  return url.href;
}

// Verifies one DPoP proof JWT. Throws DpopError (with .message saying why) or returns
// { jkt, jti, iat, jwk, payload }.
//   proof        the DPoP header value
//   method, htu  the HTTP method and target URI (without query) of the request
//   accessToken  when given, `ath` must be base64url(SHA-256(accessToken)) (resource requests)
//   jkt          when given, the proof's key thumbprint must equal it (the token's cnf.jkt)
//   nonce        when given, the proof's `nonce` must equal it
//   maxAgeS      |now - iat| bound (default 60 s)
//   replay       a createReplayCache() (default: one per process); `jti`s are not reusable
//   strictHtu    (default true) RFC 9449 4.2: the claim itself is the target URI "without query
//                and fragment parts"; a claim that carries them is refused, as a strict
//                resource server does (false: only compare with both sides cut, 4.3 check 9)
export async function verifyDpopProof({
  proof, method, htu, accessToken, jkt, nonce, maxAgeS = 60, replay = defaultReplay, algorithms = DPOP_ALGS,
  now = Math.floor(Date.now() / 1000), strictHtu = true,
} = {}) {
  if (typeof proof !== 'string' || !/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/.test(proof)) {
    throw new DpopError('DPoP proof is not a compact JWS', 'format');
  }
  let protectedHeader;
  let payload;
  try {
    ({ protectedHeader, payload } = await jose.jwtVerify(proof, jose.EmbeddedJWK, { typ: 'dpop+jwt', algorithms }));
  } catch (e) {
    throw new DpopError(`DPoP proof signature or header invalid: ${e.code ?? ''} ${e.message}`.trim(), 'signature');
  }
  const { jwk } = protectedHeader;
  if (protectedHeader.typ !== 'dpop+jwt') throw new DpopError('typ is not dpop+jwt', 'header');
  if (!jwk || typeof jwk !== 'object' || 'd' in jwk) throw new DpopError('jwk header missing or private', 'header');
  if (typeof payload.jti !== 'string' || !payload.jti || payload.jti.length > 256) throw new DpopError('jti missing', 'jti');
  if (payload.htm !== method) throw new DpopError(`htm mismatch (${payload.htm} != ${method})`, 'htm');
  let htuOk = false;
  try { htuOk = typeof payload.htu === 'string' && normUri(payload.htu) === normUri(htu); } catch { htuOk = false; }
  if (htuOk && strictHtu && /[?#]/.test(payload.htu)) htuOk = false;
  if (!htuOk) throw new DpopError(`htu mismatch (${payload.htu} != ${htu})`, 'htu');
  if (typeof payload.iat !== 'number' || !Number.isFinite(payload.iat)) throw new DpopError('iat missing or not a number', 'iat');
  if (Math.abs(now - payload.iat) > maxAgeS) throw new DpopError(`iat outside ${maxAgeS} s of now`, 'iat');
  if (nonce !== undefined && payload.nonce !== nonce) throw new DpopError('nonce mismatch', 'nonce');
  if (accessToken !== undefined) {
    if (typeof payload.ath !== 'string' || payload.ath !== accessTokenHash(accessToken)) throw new DpopError('ath mismatch', 'ath');
  }
  const thumbprint = await jose.calculateJwkThumbprint(jwk, 'sha256');
  if (jkt !== undefined && thumbprint !== jkt) throw new DpopError('proof key does not match the token binding (jkt)', 'jkt');
  if (replay && !replay.add(`${thumbprint}:${payload.jti}`, (now + maxAgeS + 1) * 1000)) {
    throw new DpopError('jti replayed', 'replay');
  }
  return { jkt: thumbprint, jti: payload.jti, iat: payload.iat, jwk, payload };
}

// --- client side (tests) ---------------------------------------------------------------

export async function generateDpopKey() {
  const { privateKey, publicKey } = await jose.generateKeyPair('ES256', { extractable: true });
  const publicJwk = await jose.exportJWK(publicKey);
  return { privateKey, publicJwk, jkt: await jose.calculateJwkThumbprint(publicJwk, 'sha256') };
}

// A DPoP proof for one request. Overrides (jti, iat, ath, htu, ...) let tests build bad ones.
export async function createDpopProof(key, { method, htu, accessToken, nonce, jti, iat, extra = {}, header = {} }) {
  const payload = {
    jti: jti ?? crypto.randomUUID(),
    htm: method,
    htu,
    iat: iat ?? Math.floor(Date.now() / 1000),
    ...(nonce !== undefined ? { nonce } : {}),
    ...(accessToken !== undefined ? { ath: accessTokenHash(accessToken) } : {}),
    ...extra,
  };
  return new jose.SignJWT(payload)
    .setProtectedHeader({ alg: 'ES256', typ: 'dpop+jwt', jwk: key.publicJwk, ...header })
    .sign(key.privateKey);
}
