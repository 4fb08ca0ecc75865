// A real OAuth 2.0 authorization server for the integration tests (PROTOCOL.md 4,
// DESIGN.md "Test set-up"): npm `oidc-provider` (panva) on loopback HTTPS with the Device
// Authorization Grant (RFC 8628), refresh-token rotation with reuse detection, revocation
// (RFC 7009), introspection (RFC 7662) and DPoP (RFC 9449). See README.md beside this file.
//
//   import { startAuthServer } from './oauth/server.mjs';
//   const as = await startAuthServer({ dir, accessTokenTtl: 5, interval: 1 });
//   // [oauth] issuer = as.issuer, ca file = as.caFile, client_id = as.clientId
//   await as.approve(userCode, { account: 'alice' });   // the test plays the user
//   const info = await as.verifyAccessToken(token);       // { account, jkt, scope, exp, ... } | null
//
//   node oauth/server.mjs [--port 0] [--dir DIR] [--interval 1] [--access-token-ttl 5] ...
//   prints one JSON line {issuer, port, caFile, clientId, controlUrl} once listening.
import crypto from 'node:crypto';
import { EventEmitter, once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import * as jose from 'jose';
import Provider, { errors as oidcErrors } from 'oidc-provider';
import { makeCerts } from '../cloud/server.mjs';
import { verifyDpopProof, createReplayCache } from './dpop.mjs';

export const DEVICE_CODE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
export const DEFAULT_CLIENT_ID = 'iothub-hub';
export const DEFAULT_SCOPE = 'openid offline_access iothub';

// ---------------------------------------------------------------------------------------
// Storage adapter: a per-instance in-memory store (oidc-provider's own memory adapter is a
// module-wide LRU shared by every provider in the process, and capped at 1000 entries).

// Entries live GRACE_S past their expiry: the models check `exp` themselves, and a device
// code polled after expiry must still be found to answer `expired_token` (RFC 8628 3.5),
// not `invalid_grant`.
const GRACE_S = 3600;

function makeAdapterClass() {
  const store = new Map(); // `${model}:${id}` -> { payload, exp (ms) }
  const byGrant = new Map(); // grantId -> Set of keys
  const byUserCode = new Map(); // userCode -> id (DeviceCode)
  const bySessionUid = new Map(); // uid -> id (Session)
  const grantable = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode', 'BackchannelAuthenticationRequest']);

  const live = (key) => {
    const e = store.get(key);
    if (!e) return undefined;
    if (e.exp !== undefined && e.exp <= Date.now()) { store.delete(key); return undefined; }
    return e.payload;
  };

  class Adapter {
    constructor(model) { this.model = model; }

    key(id) { return `${this.model}:${id}`; }

    async upsert(id, payload, expiresIn) {
      const key = this.key(id);
      const exp = expiresIn ? Date.now() + (expiresIn + GRACE_S) * 1000 : undefined;
      store.set(key, { payload, exp });
      if (grantable.has(this.model) && payload.grantId) {
        if (!byGrant.has(payload.grantId)) byGrant.set(payload.grantId, new Set());
        byGrant.get(payload.grantId).add(key);
      }
      if (this.model === 'DeviceCode' && payload.userCode) byUserCode.set(payload.userCode, id);
      if (this.model === 'Session' && payload.uid) bySessionUid.set(payload.uid, id);
    }

    async find(id) { return live(this.key(id)); }

    async findByUserCode(userCode) {
      const id = byUserCode.get(userCode);
      return id === undefined ? undefined : this.find(id);
    }

    async findByUid(uid) {
      const id = bySessionUid.get(uid);
      return id === undefined ? undefined : this.find(id);
    }

    async consume(id) {
      const p = live(this.key(id));
      if (p) p.consumed = Math.floor(Date.now() / 1000);
    }

    async destroy(id) { store.delete(this.key(id)); }

    async revokeByGrantId(grantId) {
      const keys = byGrant.get(grantId);
      if (!keys) return;
      for (const k of keys) store.delete(k);
      byGrant.delete(grantId);
    }
  }

  // For the test helpers: every live payload of a model.
  Adapter.all = (model) => {
    const out = [];
    for (const key of store.keys()) {
      if (!key.startsWith(`${model}:`)) continue;
      const p = live(key);
      if (p) out.push({ id: key.slice(model.length + 1), payload: p });
    }
    return out;
  };
  return Adapter;
}

// ---------------------------------------------------------------------------------------
// A small HTTPS client with a cookie jar, trusting the test CA: used by approve()/deny() to
// play the user in a browser, and exported for the tests (Node 20's fetch takes no CA).

export function httpsRequest(url, { method = 'GET', headers = {}, body, ca, timeoutMs = 10_000 } = {}) {
  const u = new URL(url);
  let payload = body;
  const h = { ...headers };
  if (payload !== undefined && typeof payload === 'object' && !Buffer.isBuffer(payload)) {
    payload = new URLSearchParams(payload).toString();
    h['content-type'] ??= 'application/x-www-form-urlencoded';
  }
  if (payload !== undefined) h['content-length'] = Buffer.byteLength(payload);
  return new Promise((resolve, reject) => {
    const req = https.request({
      protocol: u.protocol, hostname: u.hostname, port: u.port, path: `${u.pathname}${u.search}`,
      method, headers: h, ca, agent: false, timeout: timeoutMs,
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        resolve({
          status: res.statusCode,
          headers: res.headers,
          text,
          json() { return JSON.parse(text); },
        });
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`timeout on ${method} ${url}`)));
    req.on('error', reject);
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

class CookieJar {
  #cookies = new Map(); // `${name}|${path}` -> { name, value, path }

  store(setCookie) {
    for (const line of [].concat(setCookie ?? [])) {
      const [nv, ...attrs] = line.split(';');
      const eq = nv.indexOf('=');
      if (eq < 1) continue;
      const name = nv.slice(0, eq).trim();
      const value = nv.slice(eq + 1).trim();
      let cpath = '/';
      let expired = false;
      for (const a of attrs) {
        const [k, v = ''] = a.split('=');
        const key = k.trim().toLowerCase();
        if (key === 'path') cpath = v.trim() || '/';
        else if (key === 'expires' && Date.parse(v.trim()) <= Date.now()) expired = true;
        else if (key === 'max-age' && Number(v) <= 0) expired = true;
      }
      const id = `${name}|${cpath}`;
      if (expired || value === '') this.#cookies.delete(id);
      else this.#cookies.set(id, { name, value, path: cpath });
    }
  }

  header(reqPath) {
    const match = (p) => reqPath === p || reqPath.startsWith(p.endsWith('/') ? p : `${p}/`);
    const list = [...this.#cookies.values()].filter((c) => match(c.path))
      .sort((a, b) => b.path.length - a.path.length);
    return list.length ? list.map((c) => `${c.name}=${c.value}`).join('; ') : undefined;
  }
}

const unescapeHtml = (s) => s.replace(/&(#x?[0-9a-fA-F]+|amp|lt|gt|quot|apos);/g, (m, e) => {
  switch (e) {
    case 'amp': return '&';
    case 'lt': return '<';
    case 'gt': return '>';
    case 'quot': return '"';
    case 'apos': return "'";
    default: return String.fromCodePoint(e[1] === 'x' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10));
  }
});
const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function attrs(tag) {
  const out = {};
  for (const m of tag.matchAll(/([a-zA-Z_:.-]+)\s*=\s*"([^"]*)"/g)) out[m[1].toLowerCase()] = unescapeHtml(m[2]);
  return out;
}

// The forms of an HTML page: [{ id, action, method, fields: {name: value} }].
function parseForms(html) {
  const forms = [];
  for (const m of html.matchAll(/<form\b([^>]*)>([\s\S]*?)<\/form>/g)) {
    const a = attrs(m[1]);
    const fields = {};
    for (const i of m[2].matchAll(/<input\b([^>]*)>/g)) {
      const ia = attrs(i[1]);
      if (ia.name) fields[ia.name] = ia.value ?? '';
    }
    forms.push({ id: a.id, action: a.action, method: (a.method || 'get').toLowerCase(), fields });
  }
  return forms;
}

const meta = (html, name) => {
  const m = new RegExp(`<meta name="${name}" content="([^"]*)"`).exec(html);
  return m ? unescapeHtml(m[1]) : undefined;
};

// ---------------------------------------------------------------------------------------
// Pages. Every page carries <meta name="iothub-step"> so that approve() knows where it is;
// they are ordinary forms, so a person can also complete the flow in a browser.

function page(step, title, body, error) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title>
<meta name="iothub-step" content="${escapeHtml(step)}">${error ? `
<meta name="iothub-error" content="${escapeHtml(error)}">` : ''}
</head><body><h1>${escapeHtml(title)}</h1>
${body}
</body></html>`;
}

// ---------------------------------------------------------------------------------------

export async function startAuthServer(opts = {}) {
  const o = {
    port: 0,
    clientId: DEFAULT_CLIENT_ID,
    scope: DEFAULT_SCOPE, // the scopes the client may ask for (and the server knows)
    accessTokenTtl: 600,
    refreshTokenTtl: 14 * 24 * 3600,
    deviceCodeTtl: 600,
    interval: 5, // device flow polling interval (s), returned in the device authorization response
    slowDownStep: 5, // s added to a device code's interval on each slow_down (RFC 8628 3.5)
    slowDownToleranceMs: 100, // a poll earlier than interval - this is "too fast"
    dpop: true, // features.dPoP
    dpopNonce: false, // require a server DPoP-Nonce at the token endpoint (RFC 9449 8)
    dpopAlgs: ['ES256'],
    requireDpop: false, // client metadata dpop_bound_access_tokens: refuse token requests without DPoP
    rotateRefreshToken: true, // every refresh rotates; a reused refresh token revokes the grant
    metadata: 'both', // serve metadata at 'both' well-known paths, or only 'openid' / 'oauth'
    introspectionClient: { clientId: 'iothub-cloud', clientSecret: crypto.randomBytes(24).toString('base64url') },
    log: false,
    ...opts,
  };
  let ownDir = false;
  if (!o.dir) { o.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'iothub-oauth-')); ownDir = true; }
  const pki = makeCerts(o.dir);
  const ca = fs.readFileSync(pki.caFile);
  const log = typeof o.log === 'function' ? o.log : o.log ? (...a) => console.error('[oauth]', ...a) : () => {};

  const events = new EventEmitter();
  const state = {
    deviceAuthorizations: 0,
    tokenRequests: 0, // every POST to the token endpoint
    tokensIssued: 0, // successful token responses (any grant)
    deviceCodeGrants: 0, // successful device_code exchanges
    refreshes: 0, // successful refresh_token exchanges
    refreshFailures: 0,
    pending: 0, // authorization_pending answers
    slowDowns: 0, // slow_down answers
    dpopProofs: 0, // token requests carrying a DPoP header
    dpopNonceChallenges: 0, // use_dpop_nonce answers
    revocations: 0, // successful revocation requests that revoked a token
    revocationRequests: 0,
    introspections: 0,
    approvals: 0,
    denials: 0,
    errors: {}, // token endpoint error code -> count
    log: [], // token/revocation/device endpoint requests: { at, route, grantType, status, error, dpop, tokenType }
  };
  const count = (k) => { state[k] += 1; };

  // Keys: one EC key signs ID tokens (the client asks for ES256), plus RS256 which OIDC
  // requires the server to support.
  const jwks = { keys: [] };
  for (const [alg, kid] of [['ES256', 'es256'], ['RS256', 'rs256']]) {
    const { privateKey } = await jose.generateKeyPair(alg, { extractable: true });
    jwks.keys.push({ ...await jose.exportJWK(privateKey), kid, alg, use: 'sig' });
  }

  const Adapter = makeAdapterClass();
  const scopes = [...new Set(o.scope.split(' ').filter(Boolean))];

  // Bind first, so that the issuer carries the real port.
  let handler = (req, res) => { res.statusCode = 503; res.end(); };
  const server = https.createServer({ key: fs.readFileSync(pki.keyFile), cert: fs.readFileSync(pki.certFile) },
    (req, res) => handler(req, res));
  server.listen(o.port, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  const issuer = `https://127.0.0.1:${port}`;

  const deviceStep = (step) => async (ctx, form, ...rest) => {
    ctx.type = 'html';
    if (step === 'user-code') {
      const [out, err] = rest;
      ctx.body = page('user-code', 'Sign in to iothub', `<p>${err ? `Error: ${escapeHtml(out?.error_description || err.name)}` : 'Enter the code displayed on your hub.'}</p>
${form}
<button type="submit" form="op.deviceInputForm">Continue</button>`, err ? (err.name || out?.error || 'error') : undefined);
    } else if (step === 'device-confirm') {
      const [client, , userCode] = rest;
      ctx.body = page('device-confirm', 'Confirm device', `<p>${escapeHtml(client.clientName || client.clientId)} shows the code <code>${escapeHtml(userCode)}</code>.</p>
${form}
<button type="submit" form="op.deviceConfirmForm">Continue</button>
<button type="submit" form="op.deviceConfirmForm" name="abort" value="yes">Abort</button>`);
    } else {
      ctx.body = page('success', 'Sign-in success', '<p>Your hub is signed in, you may close this page.</p>');
    }
  };

  const configuration = {
    adapter: Adapter,
    jwks,
    clients: [
      {
        client_id: o.clientId,
        client_name: 'iothub hub',
        application_type: 'native',
        token_endpoint_auth_method: 'none',
        grant_types: [DEVICE_CODE_GRANT, 'refresh_token'],
        response_types: [],
        redirect_uris: [],
        id_token_signed_response_alg: 'ES256',
        scope: scopes.join(' '),
        ...(o.requireDpop ? { dpop_bound_access_tokens: true } : {}),
      },
      ...(o.introspectionClient ? [{
        client_id: o.introspectionClient.clientId,
        client_secret: o.introspectionClient.clientSecret,
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: [],
        response_types: [],
        redirect_uris: [],
      }] : []),
      ...(o.clients ?? []),
    ],
    scopes,
    claims: { openid: ['sub'], profile: ['name'] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    findAccount: async (ctx, sub) => ({
      accountId: sub,
      async claims() { return { sub, name: sub }; },
    }),
    interactions: { url: async (ctx, interaction) => `/interaction/${interaction.uid}` },
    renderError: async (ctx, out, error) => {
      ctx.type = 'html';
      ctx.body = page('error', 'Error', `<p>${escapeHtml(out.error)}: ${escapeHtml(out.error_description ?? '')}</p>`, out.error);
      log('render error', out, error?.message);
    },
    features: {
      devInteractions: { enabled: false },
      deviceFlow: {
        enabled: true,
        charset: 'base-20',
        mask: '****-****',
        userCodeInputSource: deviceStep('user-code'),
        userCodeConfirmSource: deviceStep('device-confirm'),
        successSource: deviceStep('success'),
      },
      revocation: { enabled: true },
      introspection: {
        enabled: true,
        // A public client may introspect only its own tokens; confidential clients (the cloud) all.
        allowedPolicy: async (ctx, client, token) => client.clientAuthMethod !== 'none' || token.clientId === client.clientId,
      },
      dPoP: {
        enabled: !!o.dpop,
        ...(o.dpopNonce ? { nonceSecret: crypto.randomBytes(32), requireNonce: () => true } : {}),
      },
      userinfo: { enabled: true },
      // Opaque access tokens, checked through verifyAccessToken()/introspection; no RFC 8707
      // resource indicators (a `resource` parameter is then ignored, not refused).
      resourceIndicators: { enabled: false },
    },
    enabledJWA: { dPoPSigningAlgValues: o.dpopAlgs },
    rotateRefreshToken: o.rotateRefreshToken,
    issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
    ttl: {
      AccessToken: () => o.accessTokenTtl,
      AuthorizationCode: () => 60,
      ClientCredentials: () => o.accessTokenTtl,
      DeviceCode: () => o.deviceCodeTtl,
      BackchannelAuthenticationRequest: () => o.deviceCodeTtl,
      IdToken: () => 3600,
      RefreshToken: () => o.refreshTokenTtl,
      Interaction: () => 3600,
      Session: () => 24 * 3600,
      Grant: () => Math.max(o.refreshTokenTtl, 14 * 24 * 3600),
    },
    // Enough for tests; pairwise subjects are not used.
    pairwiseIdentifier: async (ctx, accountId, client) => crypto.createHash('sha256')
      .update(client.sectorIdentifier ?? '').update(accountId).digest('hex'),
  };

  const provider = new Provider(issuer, configuration);
  provider.on('server_error', (ctx, err) => log('server_error', err));
  // oidc-provider answers e.g. invalid_grant with a generic error_description; keep its
  // internal reason (error_detail: "refresh token already used", "failed jkt verification",
  // "DPoP proof JWT Replay detected", ...) for state.log.
  const errDetail = new WeakMap();
  for (const ev of ['grant.error', 'revocation.error', 'device_authorization.error', 'introspection.error']) {
    provider.on(ev, (ctx, err) => { errDetail.set(ctx, err?.error_detail ?? err?.error_description ?? err?.message); });
  }

  // --- RFC 8628 parts oidc-provider leaves out: the `interval` member of the device
  // authorization response, and `slow_down` (3.5) for a device code polled faster than
  // its interval; each slow_down adds slowDownStep to that code's interval. Also counters.
  const polls = new Map(); // device_code -> { interval (s), last (ms, performance.now()) }
  provider.use(async (ctx, next) => {
    const t0 = performance.now();
    await next();
    const route = ctx.oidc?.route;
    if (!['device_authorization', 'token', 'revocation', 'introspection'].includes(route)) return;
    const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
    const entry = { at: Date.now(), route, status: ctx.status, dpop: !!ctx.get('dpop') };
    if (entry.dpop) { try { entry.dpopNonce = jose.decodeJwt(ctx.get('dpop')).nonce; } catch { /* not a JWT */ } }
    if (route === 'device_authorization') {
      if (ctx.status === 200 && body.device_code) {
        body.interval = o.interval;
        polls.set(body.device_code, { interval: o.interval, last: undefined });
        count('deviceAuthorizations');
        entry.userCode = body.user_code;
      }
    } else if (route === 'token') {
      count('tokenRequests');
      const grantType = ctx.oidc.params?.grant_type;
      entry.grantType = grantType;
      if (entry.dpop) count('dpopProofs');
      const dc = grantType === DEVICE_CODE_GRANT ? ctx.oidc.params?.device_code : undefined;
      const p = dc !== undefined ? polls.get(dc) : undefined;
      if (p && (body.error === 'authorization_pending' || body.error === 'slow_down')) {
        const tooFast = p.last !== undefined && t0 - p.last < p.interval * 1000 - o.slowDownToleranceMs;
        p.last = t0;
        if (tooFast) {
          p.interval += o.slowDownStep;
          ctx.body = { error: 'slow_down', error_description: `polling too quickly, the interval is now ${p.interval} s` };
        }
      }
      const out = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
      if (out.error) {
        entry.error = out.error;
        entry.detail = errDetail.get(ctx);
        state.errors[out.error] = (state.errors[out.error] ?? 0) + 1;
        if (out.error === 'authorization_pending') count('pending');
        if (out.error === 'slow_down') count('slowDowns');
        if (out.error === 'use_dpop_nonce') count('dpopNonceChallenges');
        if (grantType === 'refresh_token') count('refreshFailures');
      } else if (ctx.status === 200 && out.access_token) {
        count('tokensIssued');
        entry.tokenType = out.token_type;
        if (grantType === DEVICE_CODE_GRANT) { count('deviceCodeGrants'); polls.delete(dc); }
        if (grantType === 'refresh_token') count('refreshes');
      }
    } else if (route === 'revocation') {
      count('revocationRequests');
      if (ctx.status === 200 && (ctx.oidc.entities?.RefreshToken || ctx.oidc.entities?.AccessToken)) count('revocations');
      entry.error = body.error;
    } else if (route === 'introspection') {
      count('introspections');
    }
    state.log.push(entry);
    events.emit(route, entry);
    log(route, JSON.stringify(entry));
  });

  // --- interaction pages (login, consent) --------------------------------------------
  const grantsByAccount = new Map(); // account -> Set(grantId), made by the consent step

  async function readForm(req, limit = 8192) {
    const chunks = [];
    let n = 0;
    for await (const c of req) {
      n += c.length;
      if (n > limit) throw new Error('form too large');
      chunks.push(c);
    }
    return Object.fromEntries(new URLSearchParams(Buffer.concat(chunks).toString('utf8')));
  }

  async function interactionRoute(req, res, uid, action) {
    const send = (status, html) => {
      res.statusCode = status;
      res.setHeader('content-type', 'text/html; charset=utf-8');
      res.setHeader('cache-control', 'no-store');
      res.end(html);
    };
    try {
      const details = await provider.interactionDetails(req, res);
      if (details.uid !== uid) return send(400, page('error', 'Error', '<p>interaction mismatch</p>', 'interaction_mismatch'));
      const { prompt, params, session } = details;
      const base = `/interaction/${encodeURIComponent(uid)}`;
      if (req.method === 'GET' && !action) {
        if (prompt.name === 'login') {
          return send(200, page('login', 'Sign in', `<form id="login" method="post" action="${base}/login">
<label>Account <input type="text" name="login" value=""></label>
<button type="submit">Sign in</button></form>
<form id="abort" method="post" action="${base}/abort"><button type="submit">Cancel</button></form>`));
        }
        return send(200, page('consent', 'Authorize', `<p>${escapeHtml(params.client_id)} asks for: ${escapeHtml(params.scope ?? '')}</p>
<form id="consent" method="post" action="${base}/confirm"><button type="submit">Allow</button></form>
<form id="abort" method="post" action="${base}/abort"><button type="submit">Deny</button></form>`));
      }
      if (req.method !== 'POST') return send(405, page('error', 'Error', '<p>method not allowed</p>', 'method'));
      const form = await readForm(req);
      if (action === 'login') {
        if (prompt.name !== 'login') return send(400, page('error', 'Error', '<p>not a login step</p>', 'step'));
        const account = String(form.login ?? '').trim();
        if (!account) return send(400, page('error', 'Error', '<p>empty account</p>', 'account'));
        return provider.interactionFinished(req, res, { login: { accountId: account } }, { mergeWithLastSubmission: false });
      }
      if (action === 'confirm') {
        if (prompt.name !== 'consent') return send(400, page('error', 'Error', '<p>not a consent step</p>', 'step'));
        const { details: d } = prompt;
        let grant = details.grantId ? await provider.Grant.find(details.grantId) : undefined;
        grant ??= new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
        if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
        if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
        if (d.missingResourceScopes) {
          for (const [indicator, sc] of Object.entries(d.missingResourceScopes)) grant.addResourceScope(indicator, sc.join(' '));
        }
        const grantId = await grant.save();
        if (!grantsByAccount.has(session.accountId)) grantsByAccount.set(session.accountId, new Set());
        grantsByAccount.get(session.accountId).add(grantId);
        return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
      }
      if (action === 'abort') {
        return provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'End-User aborted interaction' },
          { mergeWithLastSubmission: false });
      }
      return send(404, page('error', 'Error', '<p>unknown action</p>', 'not_found'));
    } catch (e) {
      log('interaction error', e);
      return send(400, page('error', 'Error', `<p>${escapeHtml(e.message)}</p>`, e.error || e.name || 'error'));
    }
  }

  // --- misbehaviour on demand (hostile-server tests) ------------------------------------
  // misbehave({ route: 'token'|'revocation'|'device', count = 1, respond, rewrite }) makes the
  // next `count` requests to that endpoint (-1: until clearMisbehaviour()) go wrong:
  //   respond: async ({ form, dpop, req }) => ({ status, headers, body }) answers instead of
  //            oidc-provider (form: the parsed form body, dpop: the DPoP header's decoded claims
  //            or null); the rule may do the real work itself (e.g. revokeToken(form.token)).
  //   rewrite: (json) => json | text changes oidc-provider's own JSON answer before it is sent
  //            (text for what JSON.stringify cannot write, e.g. integers beyond 2^53).
  // Every request a rule saw is in state.misbehaved: { route, path, form keys, dpop claims }.
  const rules = [];
  state.misbehaved = [];
  function misbehave(rule) { rules.push({ count: 1, ...rule }); }
  function clearMisbehaviour() { rules.length = 0; }
  const routeOf = (p) => (p === new URL(ep.token).pathname ? 'token'
    : p === new URL(ep.revocation).pathname ? 'revocation'
      : p === new URL(ep.deviceAuthorization).pathname ? 'device' : null);
  function takeRule(route) {
    const i = rules.findIndex((r) => r.route === route);
    if (i < 0) return null;
    const r = rules[i];
    if (r.count > 0 && --r.count === 0) rules.splice(i, 1);
    return r;
  }
  async function misbehaving(req, res, route, rule) {
    const dpopHeader = req.headers.dpop;
    let dpop = null;
    if (typeof dpopHeader === 'string') {
      try { dpop = jose.decodeJwt(dpopHeader); } catch { dpop = { undecodable: true }; }
    }
    if (rule.respond) {
      let form = {};
      try { form = await readForm(req); } catch { /* too large: empty */ }
      state.misbehaved.push({ at: Date.now(), route, path: req.url, formKeys: Object.keys(form), dpop });
      const out = await rule.respond({ form, dpop, req });
      res.statusCode = out.status;
      for (const [k, v] of Object.entries(out.headers ?? {})) res.setHeader(k, v);
      res.end(out.body ?? '');
      return;
    }
    state.misbehaved.push({ at: Date.now(), route, path: req.url, formKeys: null, dpop });
    // rewrite: buffer oidc-provider's answer, change its JSON, send it with a new length.
    const chunks = [];
    const write = res.write.bind(res), end = res.end.bind(res);
    res.write = (c, ...a) => { if (c) chunks.push(Buffer.from(c)); const cb = a.find((x) => typeof x === 'function'); if (cb) cb(); return true; };
    res.end = (c, ...a) => {
      if (c && typeof c !== 'function') chunks.push(Buffer.from(c));
      let body = Buffer.concat(chunks);
      try {
        const j = JSON.parse(body.toString());
        const out = typeof rule.rewrite === 'function' ? rule.rewrite(j) : j;
        body = Buffer.from(typeof out === 'string' ? out : JSON.stringify(out)); // a string: sent as it is
      } catch { /* not JSON: as it was */ }
      if (!res.headersSent) res.setHeader('content-length', body.length);
      write(body);
      return end();
    };
    callback(req, res);
  }

  const callback = provider.callback();
  handler = (req, res) => {
    // Metadata at both well-known paths (OIDC Discovery and RFC 8414), or only one of them
    // (opts.metadata 'openid' | 'oauth') to exercise the hub's fallback.
    const [p, q] = req.url.split('?');
    const notFound = () => { res.statusCode = 404; res.setHeader('content-type', 'application/json'); res.end('{"error":"not_found"}'); };
    if (p === '/.well-known/oauth-authorization-server') {
      if (o.metadata === 'openid') return notFound();
      req.url = `/.well-known/openid-configuration${q !== undefined ? `?${q}` : ''}`;
    } else if (p === '/.well-known/openid-configuration' && o.metadata === 'oauth') return notFound();
    const m = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?(?:\?.*)?$/.exec(req.url);
    if (m) { interactionRoute(req, res, m[1], m[2]); return; }
    const route = req.method === 'POST' ? routeOf(p) : null;
    const rule = route ? takeRule(route) : null;
    if (rule) { misbehaving(req, res, route, rule).catch((e) => { log('misbehave', e); res.destroy(); }); return; }
    callback(req, res);
  };

  const ep = {
    discovery: `${issuer}/.well-known/openid-configuration`,
    deviceAuthorization: provider.urlFor('device_authorization'),
    verification: provider.urlFor('code_verification'),
    token: provider.urlFor('token'),
    revocation: provider.urlFor('revocation'),
    introspection: provider.urlFor('introspection'),
    jwks: provider.urlFor('jwks'),
  };

  // --- the test plays the user ---------------------------------------------------------
  // Drives the provider's own device-flow pages the way a browser would: the user-code
  // form, the device confirmation form (or its Abort button), then the login and consent
  // pages of this server, following redirects, with cookies. Resolves when the provider
  // shows its success page (approve) or has recorded the abort (deny); throws with the
  // page's error otherwise (e.g. "user code rejected: ExpiredError").
  async function playUser(userCode, { account = 'alice', deny = false, denyAt = 'device' } = {}) {
    const jar = new CookieJar();
    const go = async (url, method = 'GET', body) => {
      const u = new URL(url, issuer);
      const headers = {};
      const cookie = jar.header(u.pathname);
      if (cookie) headers.cookie = cookie;
      const r = await httpsRequest(u.href, { method, headers, body, ca });
      jar.store(r.headers['set-cookie']);
      r.url = u.href;
      return r;
    };
    const submit = (r, form, extra = {}) => go(new URL(form.action || r.url, r.url).href, form.method.toUpperCase(), { ...form.fields, ...extra });
    const findForm = (r, id) => {
      const f = parseForms(r.text).find((x) => x.id === id);
      if (!f) throw new Error(`no form ${id} on the ${meta(r.text, 'iothub-step')} page`);
      return f;
    };

    let r = await go(ep.verification);
    let typed = false;
    let confirmed = false;
    for (let i = 0; i < 20; i++) {
      if ([301, 302, 303, 307, 308].includes(r.status)) {
        r = await go(new URL(r.headers.location, r.url).href);
        continue;
      }
      const step = meta(r.text, 'iothub-step');
      const error = meta(r.text, 'iothub-error');
      switch (step) {
        case 'user-code':
          if (typed) {
            if (deny && confirmed && error === 'AbortedError') return { denied: true };
            throw new Error(`user code rejected: ${error ?? 'unknown'}`);
          }
          typed = true;
          r = await submit(r, findForm(r, 'op.deviceInputForm'), { user_code: userCode });
          break;
        case 'device-confirm':
          confirmed = true;
          r = await submit(r, findForm(r, 'op.deviceConfirmForm'), deny && denyAt === 'device' ? { abort: 'yes' } : {});
          break;
        case 'login':
          r = deny && denyAt === 'login'
            ? await submit(r, findForm(r, 'abort'))
            : await submit(r, findForm(r, 'login'), { login: account });
          break;
        case 'consent':
          r = await submit(r, findForm(r, deny && denyAt === 'consent' ? 'abort' : 'consent'));
          break;
        case 'success':
          if (deny) throw new Error('reached the success page while denying');
          return { approved: true };
        case 'error':
          if (deny && denyAt !== 'device' && error === 'access_denied') return { denied: true };
          throw new Error(`authorization page error: ${error}`);
        default:
          throw new Error(`unexpected page (HTTP ${r.status}) at ${r.url}: ${r.text.slice(0, 200)}`);
      }
    }
    throw new Error('too many steps');
  }

  async function approve(userCode, { account = 'alice' } = {}) {
    await playUser(userCode, { account });
    count('approvals');
    return true;
  }

  async function deny(userCode, { at = 'device', account = 'alice' } = {}) {
    await playUser(userCode, { account, deny: true, denyAt: at });
    count('denials');
    return true;
  }

  // --- token checks for the reference cloud -----------------------------------------
  // The same checks as the introspection endpoint, in-process: the token exists, has not
  // expired, its grant still exists, belongs to the same client and account.
  async function verifyAccessToken(token) {
    if (typeof token !== 'string' || !token) return null;
    const at = await provider.AccessToken.find(token);
    if (!at || !at.isValid) return null;
    if (at.grantId) {
      const grant = await provider.Grant.find(at.grantId);
      if (!grant || grant.isExpired || grant.clientId !== at.clientId || grant.accountId !== at.accountId) return null;
    }
    return {
      account: at.accountId,
      clientId: at.clientId,
      scope: at.scope,
      exp: at.exp,
      iat: at.iat,
      jkt: at.jkt ?? null,
      tokenType: at.tokenType,
      grantId: at.grantId,
    };
  }

  // Hooks for tests/cloud/server.mjs: startCloud({ ...auth.cloudHooks() }). A DPoP-bound
  // token is refused as a Bearer token (RFC 9449 7.2); a DPoP request needs a proof that
  // verifyDpopProof accepts, made with the key the token is bound to.
  const resourceReplay = createReplayCache();
  function cloudHooks({ maxAgeS = 60, nonce } = {}) {
    return {
      verifyToken: async (token) => {
        const info = await verifyAccessToken(token);
        return info && !info.jkt ? info.account : null;
      },
      verifyDpop: async ({ token, proof, method, htu }) => {
        const info = await verifyAccessToken(token);
        if (!info || !info.jkt) return null;
        await verifyDpopProof({ proof, method, htu, accessToken: token, jkt: info.jkt, maxAgeS, replay: resourceReplay,
          nonce: typeof nonce === 'function' ? nonce() : nonce });
        return info.account;
      },
    };
  }

  // --- server-side revocation ----------------------------------------------------------
  async function revokeGrantId(grantId) {
    for (const model of [provider.AccessToken, provider.RefreshToken, provider.DeviceCode, provider.AuthorizationCode]) {
      await model.revokeByGrantId(grantId);
    }
    await provider.Grant.adapter.destroy(grantId);
  }

  // Revokes every grant (and so every access and refresh token) of an account, as an
  // administrator or a "sign out everywhere" would. Returns how many grants were revoked.
  async function revokeGrant(account) {
    const ids = new Set(grantsByAccount.get(account) ?? []);
    for (const { id, payload } of Adapter.all('Grant')) if (payload.accountId === account) ids.add(id);
    for (const id of ids) await revokeGrantId(id);
    grantsByAccount.delete(account);
    return ids.size;
  }

  // Revokes one token server-side (like RFC 7009 does for its client): a refresh token
  // takes its grant (and the grant's access tokens) with it.
  async function revokeToken(token) {
    const rt = await provider.RefreshToken.find(token, { ignoreExpiration: true });
    if (rt) { await rt.destroy(); await revokeGrantId(rt.grantId); return 'refresh_token'; }
    const at = await provider.AccessToken.find(token, { ignoreExpiration: true });
    if (at) { await at.destroy(); return 'access_token'; }
    return null;
  }

  // Makes every live access token of an account expire now (to exercise a refresh
  // without waiting for accessTokenTtl).
  async function expireAccessTokens(account) {
    let n = 0;
    for (const { id, payload } of Adapter.all('AccessToken')) {
      if (account !== undefined && payload.accountId !== account) continue;
      await provider.AccessToken.adapter.destroy(id);
      n++;
    }
    return n;
  }

  async function waitFor(pred, { timeoutMs = 10_000, stepMs = 20 } = {}) {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const v = await pred(state);
      if (v) return v;
      if (Date.now() > end) throw new Error('waitFor: timed out');
      await new Promise((r) => setTimeout(r, stepMs));
    }
  }

  let closed = false;
  async function close() {
    if (closed) return;
    closed = true;
    const p = new Promise((r) => server.close(() => r()));
    server.closeAllConnections?.();
    await p;
    if (ownDir) fs.rmSync(o.dir, { recursive: true, force: true });
  }

  log(`listening on ${issuer}`);
  return {
    issuer,
    port,
    caFile: pki.caFile,
    ca,
    dir: o.dir,
    clientId: o.clientId,
    scope: scopes.join(' '),
    endpoints: ep,
    introspectionClient: o.introspectionClient,
    options: o,
    provider,
    state,
    events,
    approve,
    deny,
    verifyAccessToken,
    introspect: verifyAccessToken,
    cloudHooks,
    revokeGrant,
    revokeToken,
    expireAccessTokens,
    misbehave,
    clearMisbehaviour,
    waitFor,
    close,
  };
}

export { verifyDpopProof, createReplayCache, oidcErrors };

// ---------------------------------------------------------------------------------------
// CLI, with an optional control API on plain HTTP (loopback) for tests in other processes:
//   POST /approve {"userCode","account"}   POST /deny {"userCode"}
//   POST /verify {"token"} -> verifyAccessToken   POST /revoke-grant {"account"}
//   POST /expire-access-tokens {"account"}         GET /state

function parseArgs(argv) {
  const a = { port: 0 };
  const num = (k, v) => { const n = Number(v); if (!Number.isFinite(n)) throw new Error(`${k} needs a number`); return n; };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = () => { if (i + 1 >= argv.length) throw new Error(`${k} needs a value`); return argv[++i]; };
    if (k === '--port') a.port = num(k, v());
    else if (k === '--dir') a.dir = v();
    else if (k === '--client-id') a.clientId = v();
    else if (k === '--scope') a.scope = v();
    else if (k === '--access-token-ttl') a.accessTokenTtl = num(k, v());
    else if (k === '--refresh-token-ttl') a.refreshTokenTtl = num(k, v());
    else if (k === '--device-code-ttl') a.deviceCodeTtl = num(k, v());
    else if (k === '--interval') a.interval = num(k, v());
    else if (k === '--dpop-nonce') a.dpopNonce = true;
    else if (k === '--no-dpop') a.dpop = false;
    else if (k === '--require-dpop') a.requireDpop = true;
    else if (k === '--control-port') a.controlPort = num(k, v());
    else if (k === '--verbose' || k === '-v') a.log = true;
    else if (k === '--help' || k === '-h') {
      console.log('usage: node oauth/server.mjs [--port N] [--dir DIR] [--client-id ID] [--scope S] [--access-token-ttl S]\n'
        + '  [--refresh-token-ttl S] [--device-code-ttl S] [--interval S] [--dpop-nonce] [--no-dpop] [--require-dpop]\n'
        + '  [--control-port N] [--verbose]');
      process.exit(0);
    } else throw new Error(`unknown argument ${k}`);
  }
  return a;
}

async function startControl(as, port) {
  const routes = {
    'POST /approve': (b) => as.approve(b.userCode, { account: b.account ?? 'alice' }),
    'POST /deny': (b) => as.deny(b.userCode, { at: b.at }),
    'POST /verify': (b) => as.verifyAccessToken(b.token),
    'POST /revoke-grant': (b) => as.revokeGrant(b.account),
    'POST /revoke-token': (b) => as.revokeToken(b.token),
    'POST /expire-access-tokens': (b) => as.expireAccessTokens(b.account),
    'GET /state': () => as.state,
  };
  const srv = http.createServer(async (req, res) => {
    const send = (status, v) => { res.writeHead(status, { 'content-type': 'application/json' }); res.end(JSON.stringify(v ?? null)); };
    const fn = routes[`${req.method} ${req.url}`];
    if (!fn) return send(404, { error: 'not_found' });
    try {
      const chunks = [];
      for await (const c of req) chunks.push(c);
      const text = Buffer.concat(chunks).toString('utf8');
      return send(200, await fn(text ? JSON.parse(text) : {}));
    } catch (e) {
      return send(400, { error: e.message });
    }
  });
  srv.listen(port, '127.0.0.1');
  await once(srv, 'listening');
  return srv;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  let args;
  try { args = parseArgs(process.argv.slice(2)); } catch (e) { console.error(e.message); process.exit(2); }
  const { controlPort, ...opts } = args;
  const as = await startAuthServer(opts);
  let control;
  if (controlPort !== undefined) control = await startControl(as, controlPort);
  console.log(JSON.stringify({
    issuer: as.issuer,
    port: as.port,
    caFile: as.caFile,
    clientId: as.clientId,
    scope: as.scope,
    controlUrl: control ? `http://127.0.0.1:${control.address().port}` : undefined,
    introspectionClient: as.introspectionClient,
  }));
  const stop = async () => { control?.close(); await as.close(); process.exit(0); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}
