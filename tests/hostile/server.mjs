// A hostile peer for tests: the vendor cloud and an OAuth authorization server in one
// loopback HTTPS server, whose behaviour is chosen per route and per test. It does not check
// signatures (the reference cloud in tests/cloud/ does): its job is to answer badly (bodies
// too large, endless or slow, malformed or deeply nested JSON, odd status codes, interim 1xx
// answers with headers, redirects, Retry-After and DPoP-Nonce games, absurd lifetimes, a
// wrong certificate) and to record what the hub sent, so that a test can check that the hub
// survives, counts right and loses nothing.
//
//   const peer = await startHostile({ dir });
//   peer.set('status', { kind: 'endless' });   // until set back to { kind: 'ok' }
//   peer.state.frames, peer.state.hits.status, peer.state.endless
//
// Binds 127.0.0.1 only.
import https from 'node:https';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const BODY_MAX = 8 * 1024 * 1024;

const CNF = (san) => `[req]
distinguished_name = dn
prompt = no
[dn]
CN = hostile
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
[v3_srv]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = ${san}
`;

function openssl(args) {
  try {
    execFileSync('openssl', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    throw new Error(`openssl ${args.join(' ')} failed: ${e.stderr?.toString() ?? e.message}`);
  }
}

// A CA and a server certificate signed by it for 'san' (made with the openssl CLI, no shell).
export function makePki(dir, san = 'IP:127.0.0.1,DNS:localhost') {
  fs.mkdirSync(dir, { recursive: true });
  const f = (n) => path.join(dir, n);
  fs.writeFileSync(f('openssl.cnf'), CNF(san));
  const ec = ['-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256'];
  openssl(['genpkey', ...ec, '-out', f('ca.key')]);
  openssl(['req', '-new', '-x509', '-config', f('openssl.cnf'), '-extensions', 'v3_ca', '-key', f('ca.key'),
    '-subj', '/CN=hostile CA', '-sha256', '-days', '2', '-out', f('ca.pem')]);
  openssl(['genpkey', ...ec, '-out', f('server.key')]);
  openssl(['req', '-new', '-config', f('openssl.cnf'), '-key', f('server.key'), '-subj', '/CN=hostile',
    '-out', f('server.csr')]);
  openssl(['x509', '-req', '-in', f('server.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'),
    '-set_serial', `0x${crypto.randomBytes(8).toString('hex')}`, '-sha256', '-days', '2',
    '-extfile', f('openssl.cnf'), '-extensions', 'v3_srv', '-out', f('server.pem')]);
  return { caFile: f('ca.pem'), certFile: f('server.pem'), keyFile: f('server.key') };
}

function route(method, p) {
  let m;
  if (p === '/.well-known/openid-configuration' || p === '/.well-known/oauth-authorization-server') return 'discovery';
  if (p === '/device') return 'device';
  if (p === '/token') return 'token';
  if (p === '/revoke') return 'revoke';
  if (p.startsWith('/elsewhere')) return 'elsewhere';
  if ((m = /^\/v1\/hubs\/[^/]+$/.exec(p)) && method === 'POST') return 'register';
  if (/^\/v1\/hubs\/[^/]+\/devices$/.test(p)) return 'devices';
  if (/^\/v1\/hubs\/[^/]+\/status$/.test(p)) return 'status';
  if (/^\/v1\/hubs\/[^/]+\/commands$/.test(p)) return 'commands';
  if (/^\/v1\/hubs\/[^/]+\/commands\/[^/]+\/result$/.test(p)) return 'result';
  return 'unknown';
}

// opts: dir (required), san (certificate subject alternative names), pki (reuse one).
export async function startHostile(opts) {
  const pki = opts.pki ?? makePki(path.join(opts.dir, 'pki'), opts.san);
  const behaviours = new Map(); // route -> behaviour; absent means { kind: 'ok' }
  const state = {
    hits: {}, // route -> requests seen
    frames: [], // JWS strings accepted by the status route when it behaved
    requests: [], // { route, method, url, headers, at (ms), grantType (token routes) } of each request
    endless: [], // { bytes, ms } per endless answer, once the client went away
    slow: [], // { bytes, ms, complete } per slow answer
    tokens: 0, // access tokens issued
    revoked: 0,
  };
  let url;

  function okAnswer(r, req, body) {
    switch (r) {
    case 'discovery':
      return [200, {
        issuer: url, token_endpoint: `${url}/token`, device_authorization_endpoint: `${url}/device`,
        revocation_endpoint: `${url}/revoke`, grant_types_supported: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
        dpop_signing_alg_values_supported: opts.dpop ? ['ES256'] : undefined,
      }];
    case 'device':
      return [200, { device_code: `dc-${crypto.randomBytes(8).toString('hex')}`, user_code: 'ABCD-EFGH',
        verification_uri: `${url}/activate`, expires_in: 120, interval: 1 }];
    case 'token':
      state.tokens++;
      return [200, { access_token: `at-${crypto.randomBytes(16).toString('hex')}`, token_type: 'Bearer',
        expires_in: 3600, refresh_token: `rt-${crypto.randomBytes(16).toString('hex')}` }];
    case 'revoke':
      state.revoked++;
      return [200, {}];
    case 'register':
      return [201, { registered: true }];
    case 'devices':
      return [200, { ok: true }];
    case 'status': {
      let frames;
      try { frames = JSON.parse(body.toString('utf8')).frames; } catch { return [400, { error: 'bad json' }]; }
      if (!Array.isArray(frames)) return [400, { error: 'no frames' }];
      for (const f of frames) state.frames.push(f);
      return [200, { accepted: frames.length, rejected: [] }];
    }
    case 'commands':
      return [204, null];
    case 'result':
      return [200, {}];
    default:
      return [404, { error: 'not_found' }];
    }
  }

  function send(res, status, obj, headers = {}) {
    const body = obj === null ? '' : (typeof obj === 'string' || Buffer.isBuffer(obj) ? obj : JSON.stringify(obj));
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...headers });
    res.end(body);
  }

  async function handle(req, res) {
    const u = new URL(req.url, url);
    const r = route(req.method, u.pathname);
    state.hits[r] = (state.hits[r] ?? 0) + 1;
    state.requests.push({ route: r, method: req.method, url: req.url, headers: req.headers, at: Date.now() });
    const chunks = [];
    let len = 0;
    for await (const c of req) {
      len += c.length;
      if (len > BODY_MAX) { res.destroy(); return; }
      chunks.push(c);
    }
    const body = Buffer.concat(chunks);
    // What a token request asked for (the form's grant_type), never the codes or tokens in it.
    if (r === 'token' || r === 'device' || r === 'revoke')
      state.requests[state.requests.length - 1].grantType = new URLSearchParams(body.toString('utf8')).get('grant_type');
    const b = behaviours.get(r) ?? { kind: 'ok' };
    if (b.delayMs) await sleep(b.delayMs);
    if (req.socket.destroyed) return;
    const start = Date.now();
    switch (b.kind) {
    case 'ok': {
      const [status, obj] = okAnswer(r, req, body);
      return send(res, status, obj, b.headers);
    }
    case 'answer': // a fixed status, headers and body (odd codes, Retry-After games, lifetimes)
      return send(res, b.status, b.body ?? {}, b.headers);
    case 'huge': { // a complete body over the hub's limit, with a content-length
      const size = b.bytes ?? 2 * 1024 * 1024;
      res.writeHead(b.status ?? 200, { 'content-type': 'application/json', 'content-length': size });
      const chunk = Buffer.alloc(64 * 1024, 0x20);
      let sent = 0;
      res.on('close', () => state.endless.push({ bytes: sent, ms: Date.now() - start, huge: true }));
      while (sent < size && !res.destroyed) {
        const n = Math.min(chunk.length, size - sent);
        sent += n;
        if (!res.write(n === chunk.length ? chunk : chunk.subarray(0, n))) await once(res, 'drain').catch(() => {});
      }
      return res.end();
    }
    case 'endless': { // chunked, never ending: only the client can stop it
      res.writeHead(200, { 'content-type': 'application/json' }); // no content-length: chunked
      const chunk = Buffer.alloc(16 * 1024, 0x20);
      let sent = 0, closed = false;
      res.on('close', () => { closed = true; state.endless.push({ bytes: sent, ms: Date.now() - start }); });
      res.write('{"accepted":0,"pad":"');
      while (!closed && Date.now() - start < (b.maxMs ?? 60000)) {
        sent += chunk.length;
        if (!res.write(chunk)) await Promise.race([once(res, 'drain'), once(res, 'close')]).catch(() => {});
      }
      if (!closed) res.end('"}');
      return;
    }
    case 'slow': { // the right answer, one byte every intervalMs
      const [status, obj] = okAnswer(r, req, body);
      const text = Buffer.from(JSON.stringify(obj));
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': text.length });
      let i = 0;
      const rec = { bytes: 0, ms: 0, complete: false };
      state.slow.push(rec);
      for (; i < text.length && !res.destroyed; i++) {
        res.write(text.subarray(i, i + 1));
        rec.bytes = i + 1;
        await sleep(b.intervalMs ?? 100);
      }
      rec.ms = Date.now() - start;
      rec.complete = i === text.length;
      if (!res.destroyed) res.end();
      return;
    }
    case 'malformed':
      return send(res, b.status ?? 200, b.text ?? '{"accepted": 3, "rejected": [ {"index": 0, "reason": ', b.headers);
    case 'deep': { // nesting far beyond any parser's stack
      const depth = b.depth ?? 100000;
      return send(res, b.status ?? 200, '['.repeat(depth) + ']'.repeat(depth));
    }
    case 'wrongtype':
      return send(res, b.status ?? 200, b.body ?? { accepted: '3', rejected: { index: 'x' } });
    case 'interim': { // an interim 1xx with headers, then the final answer without them
      const hints = { link: '</x>; rel=preload', ...(b.interimHeaders ?? {}) };
      res.writeEarlyHints(hints);
      await sleep(50);
      return send(res, b.status, b.body ?? {}, b.headers);
    }
    case 'redirect':
      return send(res, b.status ?? 307, {}, { location: b.location ?? `${url}/elsewhere${u.pathname}` });
    case 'hang': // never answers (the client's timeout or hang-up ends it)
      await once(res, 'close').catch(() => {});
      return;
    default:
      throw new Error(`unknown behaviour ${b.kind}`);
    }
  }

  const server = https.createServer({ key: fs.readFileSync(pki.keyFile), cert: fs.readFileSync(pki.certFile) },
    (req, res) => handle(req, res).catch((e) => { if (!res.headersSent) send(res, 500, { error: String(e) }); else res.destroy(); }));
  server.keepAliveTimeout = 30000;
  server.listen(opts.port ?? 0, '127.0.0.1');
  await once(server, 'listening');
  const port = server.address().port;
  url = `https://127.0.0.1:${port}`;
  return {
    url, port, caFile: pki.caFile, pki, state,
    set(r, b) { if (!b || (b.kind === 'ok' && Object.keys(b).length === 1)) behaviours.delete(r); else behaviours.set(r, b); },
    reset() { behaviours.clear(); },
    async close() {
      server.closeAllConnections();
      server.close();
      await once(server, 'close').catch(() => {});
    },
  };
}
