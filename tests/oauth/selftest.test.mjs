// Self-test of the test authorization server (oauth/server.mjs) and of oauth/dpop.mjs, with
// a tiny OAuth client written here. Run: cd tests && node --test oauth/
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { startAuthServer, httpsRequest, DEVICE_CODE_GRANT } from './server.mjs';
import {
  createDpopProof, createReplayCache, generateDpopKey, verifyDpopProof, accessTokenHash,
} from './dpop.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// --- the tiny client -----------------------------------------------------------------
function client(as, { scope = 'openid offline_access iothub' } = {}) {
  const ep = as.endpoints;
  const post = (url, body, headers = {}) => httpsRequest(url, { method: 'POST', body, headers, ca: as.ca });
  const proof = (key, url, extra = {}) => (key ? createDpopProof(key, { method: 'POST', htu: url, ...extra }) : undefined);
  const withDpop = async (key, url, extra) => (key ? { dpop: await proof(key, url, extra) } : {});
  return {
    async deviceAuthorization(s = scope) {
      const r = await post(ep.deviceAuthorization, { client_id: as.clientId, scope: s });
      assert.equal(r.status, 200, r.text);
      return r.json();
    },
    async poll(deviceCode, { key, nonce, jti } = {}) {
      return post(ep.token, { client_id: as.clientId, grant_type: DEVICE_CODE_GRANT, device_code: deviceCode },
        await withDpop(key, ep.token, { nonce, jti }));
    },
    async refresh(refreshToken, { key, nonce, jti } = {}) {
      return post(ep.token, { client_id: as.clientId, grant_type: 'refresh_token', refresh_token: refreshToken },
        await withDpop(key, ep.token, { nonce, jti }));
    },
    async revoke(token, hint = 'refresh_token') {
      return post(ep.revocation, { client_id: as.clientId, token, token_type_hint: hint });
    },
    // device authorization, user approval, one poll: the tokens
    async signIn(account = 'alice', { key, nonce } = {}) {
      const da = await this.deviceAuthorization();
      await as.approve(da.user_code, { account });
      const r = await this.poll(da.device_code, { key, nonce });
      assert.equal(r.status, 200, r.text);
      return r.json();
    },
  };
}
const errorOf = (r) => { try { return r.json().error; } catch { return `HTTP ${r.status}: ${r.text.slice(0, 80)}`; } };

// ---------------------------------------------------------------------------------------

describe('oidc-provider device flow server', () => {
  let as;
  let c;
  before(async () => {
    as = await startAuthServer({ interval: 1, accessTokenTtl: 3 });
    c = client(as);
  });
  after(() => as?.close());

  test('discovery lists the device, token, revocation endpoints and ES256 DPoP', async () => {
    for (const wk of ['openid-configuration', 'oauth-authorization-server']) {
      const r = await httpsRequest(`${as.issuer}/.well-known/${wk}`, { ca: as.ca });
      assert.equal(r.status, 200);
      const m = r.json();
      assert.equal(m.issuer, as.issuer);
      assert.match(as.issuer, /^https:\/\/127\.0\.0\.1:\d+$/);
      assert.equal(m.device_authorization_endpoint, `${as.issuer}/device/auth`);
      assert.equal(m.token_endpoint, `${as.issuer}/token`);
      assert.equal(m.revocation_endpoint, `${as.issuer}/token/revocation`);
      assert.equal(m.introspection_endpoint, `${as.issuer}/token/introspection`);
      assert.deepEqual(m.dpop_signing_alg_values_supported, ['ES256']);
      assert.ok(m.grant_types_supported.includes(DEVICE_CODE_GRANT));
      assert.ok(m.grant_types_supported.includes('refresh_token'));
      assert.ok(m.token_endpoint_auth_methods_supported.includes('none'));
      assert.ok(m.scopes_supported.includes('offline_access'));
    }
    // the CA file is what a client must trust: a default client refuses the certificate
    await assert.rejects(httpsRequest(`${as.issuer}/.well-known/openid-configuration`, {}), /self.signed|unable to verify|certificate/i);
    assert.ok(fs.readFileSync(as.caFile, 'utf8').includes('BEGIN CERTIFICATE'));
  });

  test('device flow: authorization_pending, approve, tokens; the device code is single-use', async () => {
    const da = await c.deviceAuthorization();
    assert.match(da.user_code, /^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$/);
    assert.equal(da.verification_uri, `${as.issuer}/device`);
    assert.equal(da.verification_uri_complete, `${as.issuer}/device?user_code=${encodeURIComponent(da.user_code)}`);
    assert.equal(da.interval, 1);
    assert.equal(da.expires_in, 600);

    let r = await c.poll(da.device_code);
    assert.equal(r.status, 400);
    assert.equal(errorOf(r), 'authorization_pending');

    await as.approve(da.user_code, { account: 'alice' });
    await sleep(1050);
    r = await c.poll(da.device_code);
    assert.equal(r.status, 200, r.text);
    assert.match(r.headers['cache-control'], /no-store/);
    const t = r.json();
    assert.equal(t.token_type, 'Bearer');
    assert.equal(t.expires_in, 3);
    assert.equal(t.scope, 'openid offline_access iothub');
    assert.match(t.access_token, /^[A-Za-z0-9_-]{43}$/);
    assert.match(t.refresh_token, /^[A-Za-z0-9_-]{43}$/);
    assert.ok(t.id_token);

    const info = await as.verifyAccessToken(t.access_token);
    assert.equal(info.account, 'alice');
    assert.equal(info.jkt, null);
    assert.equal(info.tokenType, 'Bearer');
    assert.equal(info.scope, 'openid offline_access iothub');
    assert.ok(info.exp > Date.now() / 1000);
    assert.equal(await as.verifyAccessToken('not-a-token'), null);
    assert.equal(await as.verifyAccessToken(t.refresh_token), null);

    await sleep(1050);
    r = await c.poll(da.device_code);
    assert.equal(errorOf(r), 'invalid_grant'); // consumed (and its grant revoked)
    assert.equal(await as.verifyAccessToken(t.access_token), null);
  });

  test('a scope without openid still yields a refresh token (offline_access), and no ID token', async () => {
    const da = await c.deviceAuthorization('offline_access iothub');
    await as.approve(da.user_code, { account: 'carol' });
    const r = await c.poll(da.device_code);
    const t = r.json();
    assert.equal(r.status, 200, r.text);
    assert.ok(t.refresh_token);
    assert.equal(t.id_token, undefined);
    assert.equal(t.scope, 'offline_access iothub');
  });

  test('without offline_access there is no refresh token', async () => {
    const da = await c.deviceAuthorization('iothub');
    await as.approve(da.user_code, { account: 'carol' });
    const t = (await c.poll(da.device_code)).json();
    assert.ok(t.access_token);
    assert.equal(t.refresh_token, undefined);
  });

  test('slow_down when polled faster than the interval, and the interval grows by 5 s', async () => {
    const da = await c.deviceAuthorization();
    const before = as.state.slowDowns;
    assert.equal(errorOf(await c.poll(da.device_code)), 'authorization_pending');
    await sleep(1050);
    assert.equal(errorOf(await c.poll(da.device_code)), 'authorization_pending'); // paced: fine
    const r = await c.poll(da.device_code); // at once: too fast
    assert.equal(r.status, 400);
    assert.equal(errorOf(r), 'slow_down');
    assert.equal(as.state.slowDowns, before + 1);
    await sleep(1050); // 1 s is no longer enough: the interval is now 6 s
    assert.equal(errorOf(await c.poll(da.device_code)), 'slow_down');
    // a denied code is still reported as access_denied, whatever the pace
    await as.deny(da.user_code);
    assert.equal(errorOf(await c.poll(da.device_code)), 'access_denied');
  });

  test('deny (Abort on the provider page) gives access_denied; the code is then spent', async () => {
    const da = await c.deviceAuthorization();
    await as.deny(da.user_code);
    const r = await c.poll(da.device_code);
    assert.equal(r.status, 400);
    assert.equal(errorOf(r), 'access_denied');
    await assert.rejects(as.approve(da.user_code), /AlreadyUsedError/);
    await sleep(1050);
    assert.equal(errorOf(await c.poll(da.device_code)), 'invalid_grant');
  });

  test('deny at the login or consent page gives access_denied too', async () => {
    for (const at of ['login', 'consent']) {
      const da = await c.deviceAuthorization();
      await as.deny(da.user_code, { at });
      assert.equal(errorOf(await c.poll(da.device_code)), 'access_denied', at);
    }
  });

  test('approving an unknown user code fails', async () => {
    await assert.rejects(as.approve('BBBB-BBBB'), /NotFoundError/);
  });

  test('refresh with rotation; reuse of a rotated refresh token revokes the grant', async () => {
    const t1 = await c.signIn('alice');
    let r = await c.refresh(t1.refresh_token);
    assert.equal(r.status, 200, r.text);
    const t2 = r.json();
    assert.equal(t2.token_type, 'Bearer');
    assert.notEqual(t2.refresh_token, t1.refresh_token);
    assert.notEqual(t2.access_token, t1.access_token);
    assert.equal((await as.verifyAccessToken(t2.access_token)).account, 'alice');

    r = await c.refresh(t1.refresh_token); // the old one: refused ...
    assert.equal(r.status, 400);
    assert.equal(errorOf(r), 'invalid_grant');
    assert.equal(as.state.log.at(-1).detail, 'refresh token already used');
    r = await c.refresh(t2.refresh_token); // ... and the whole grant is gone (reuse detection)
    assert.equal(errorOf(r), 'invalid_grant');
    assert.equal(await as.verifyAccessToken(t2.access_token), null);
  });

  test('access tokens expire after accessTokenTtl; a refresh gets a new one', async () => {
    const t1 = await c.signIn('dave');
    assert.equal((await as.verifyAccessToken(t1.access_token)).account, 'dave');
    await sleep(3100);
    assert.equal(await as.verifyAccessToken(t1.access_token), null);
    const r = await c.refresh(t1.refresh_token);
    assert.equal(r.status, 200, r.text);
    assert.equal((await as.verifyAccessToken(r.json().access_token)).account, 'dave');
  });

  test('revocation (RFC 7009) of the refresh token: refresh then fails with invalid_grant', async () => {
    const t = await c.signIn('erin');
    const before = as.state.revocations;
    const r = await c.revoke(t.refresh_token);
    assert.equal(r.status, 200);
    assert.equal(r.text, '');
    assert.equal(as.state.revocations, before + 1);
    assert.equal(errorOf(await c.refresh(t.refresh_token)), 'invalid_grant');
    assert.equal(await as.verifyAccessToken(t.access_token), null); // the grant went with it
    // revoking an unknown or already revoked token is not an error (RFC 7009 2.2)
    assert.equal((await c.revoke(t.refresh_token)).status, 200);
  });

  test('server-side revokeGrant(account) and revokeToken(token)', async () => {
    const t = await c.signIn('frank');
    const t2 = await c.signIn('frank');
    assert.equal(await as.revokeGrant('frank'), 2);
    assert.equal(errorOf(await c.refresh(t.refresh_token)), 'invalid_grant');
    assert.equal(errorOf(await c.refresh(t2.refresh_token)), 'invalid_grant');
    assert.equal(await as.verifyAccessToken(t.access_token), null);

    const t3 = await c.signIn('grace');
    assert.equal(await as.revokeToken(t3.refresh_token), 'refresh_token');
    assert.equal(errorOf(await c.refresh(t3.refresh_token)), 'invalid_grant');

    const t4 = await c.signIn('heidi');
    assert.equal(await as.expireAccessTokens('heidi'), 1);
    assert.equal(await as.verifyAccessToken(t4.access_token), null);
    assert.equal((await c.refresh(t4.refresh_token)).status, 200);
  });

  test('DPoP: bound tokens (token_type DPoP, jkt), refresh needs the same key, replays refused', async () => {
    const key = await generateDpopKey();
    const dpopBefore = as.state.dpopProofs;
    const t1 = await c.signIn('alice', { key });
    assert.equal(t1.token_type, 'DPoP');
    const info = await as.verifyAccessToken(t1.access_token);
    assert.equal(info.account, 'alice');
    assert.equal(info.jkt, key.jkt);
    assert.equal(info.tokenType, 'DPoP');
    assert.equal(as.state.dpopProofs, dpopBefore + 1);

    // refresh: without a proof, or with another key: refused (the refresh token is bound too)
    assert.equal(errorOf(await c.refresh(t1.refresh_token)), 'invalid_grant');
    const other = await generateDpopKey();
    let r = await c.refresh(t1.refresh_token, { key: other });
    assert.equal(errorOf(r), 'invalid_grant');
    assert.equal(as.state.log.at(-1).detail, 'failed jkt verification');
    // with the right key: a new DPoP-bound pair
    r = await c.refresh(t1.refresh_token, { key, jti: 'jti-once' });
    assert.equal(r.status, 200, r.text);
    const t2 = r.json();
    assert.equal(t2.token_type, 'DPoP');
    assert.equal((await as.verifyAccessToken(t2.access_token)).jkt, key.jkt);
    // the same proof jti again: a replay
    r = await c.refresh(t2.refresh_token, { key, jti: 'jti-once' });
    assert.equal(errorOf(r), 'invalid_grant');
    assert.equal(as.state.log.at(-1).detail, 'DPoP proof JWT Replay detected');
    // a proof for another URI or method is refused outright
    r = await httpsRequest(as.endpoints.token, {
      method: 'POST', ca: as.ca,
      headers: { dpop: await createDpopProof(key, { method: 'POST', htu: `${as.issuer}/elsewhere` }) },
      body: { client_id: as.clientId, grant_type: 'refresh_token', refresh_token: t2.refresh_token },
    });
    assert.equal(errorOf(r), 'invalid_dpop_proof');
    r = await c.refresh(t2.refresh_token, { key });
    assert.equal(r.status, 200, r.text);

    // the introspection endpoint (for a resource server in another process) agrees
    const { clientId, clientSecret } = as.introspectionClient;
    r = await httpsRequest(as.endpoints.introspection, {
      method: 'POST', ca: as.ca,
      headers: { authorization: `Basic ${Buffer.from(`${clientId}:${clientSecret}`).toString('base64')}` },
      body: { token: r.json().access_token },
    });
    const intro = r.json();
    assert.equal(intro.active, true);
    assert.equal(intro.sub, 'alice');
    assert.equal(intro.token_type, 'DPoP');
    assert.deepEqual(intro.cnf, { jkt: key.jkt });
  });

  test('cloudHooks: the reference cloud checks tokens and resource DPoP proofs', async () => {
    const hooks = as.cloudHooks();
    const bearer = await c.signIn('ivan');
    assert.equal(await hooks.verifyToken(bearer.access_token), 'ivan');
    assert.equal(await hooks.verifyToken('bogus'), null);

    const key = await generateDpopKey();
    const t = await c.signIn('judy', { key });
    assert.equal(await hooks.verifyToken(t.access_token), null); // a DPoP token used as Bearer
    const htu = 'https://127.0.0.1:9/v1/status';
    const proof = await createDpopProof(key, { method: 'POST', htu, accessToken: t.access_token });
    assert.equal(await hooks.verifyDpop({ token: t.access_token, proof, method: 'POST', htu }), 'judy');
    await assert.rejects(hooks.verifyDpop({ token: t.access_token, proof, method: 'POST', htu }), /replayed/);
    const wrongKey = await createDpopProof(await generateDpopKey(), { method: 'POST', htu, accessToken: t.access_token });
    await assert.rejects(hooks.verifyDpop({ token: t.access_token, proof: wrongKey, method: 'POST', htu }), /jkt/);
    assert.equal(await hooks.verifyDpop({ token: bearer.access_token, proof, method: 'POST', htu }), null);
  });
});

describe('device code expiry', () => {
  let as;
  // 2 s, not 1: the provider counts expiry in whole seconds, so a 1 s code made late in a
  // second could already be expired at the first poll.
  before(async () => { as = await startAuthServer({ interval: 1, deviceCodeTtl: 2 }); });
  after(() => as?.close());

  test('expired_token after deviceCodeTtl; the user can no longer approve', async () => {
    const c = client(as);
    const da = await c.deviceAuthorization();
    assert.equal(da.expires_in, 2);
    assert.equal(errorOf(await c.poll(da.device_code)), 'authorization_pending');
    await sleep(3100);
    const r = await c.poll(da.device_code);
    assert.equal(r.status, 400);
    assert.equal(errorOf(r), 'expired_token');
    await assert.rejects(as.approve(da.user_code), /ExpiredError/);
  });
});

describe('DPoP nonces and DPoP-required clients', () => {
  test('dpopNonce: use_dpop_nonce with a DPoP-Nonce header, then the nonce is accepted', async () => {
    const as = await startAuthServer({ interval: 1, dpopNonce: true });
    try {
      const c = client(as);
      const key = await generateDpopKey();
      const da = await c.deviceAuthorization();
      let r = await c.poll(da.device_code, { key });
      assert.equal(r.status, 400);
      assert.equal(errorOf(r), 'use_dpop_nonce');
      const nonce = r.headers['dpop-nonce'];
      assert.match(nonce, /^[A-Za-z0-9_-]{43}$/);
      // an immediate retry with the nonce is not "too fast": use_dpop_nonce is not a poll
      r = await c.poll(da.device_code, { key, nonce });
      assert.equal(errorOf(r), 'authorization_pending');
      r = await c.poll(da.device_code, { key, nonce: 'bad-nonce' });
      assert.equal(errorOf(r), 'use_dpop_nonce');
      await as.approve(da.user_code, { account: 'alice' });
      await sleep(1050);
      r = await c.poll(da.device_code, { key, nonce });
      assert.equal(r.status, 200, r.text);
      const t = r.json();
      assert.equal(t.token_type, 'DPoP');
      assert.equal(errorOf(await c.refresh(t.refresh_token, { key })), 'use_dpop_nonce');
      assert.equal((await c.refresh(t.refresh_token, { key, nonce })).status, 200);
      assert.equal(as.state.dpopNonceChallenges, 3);
      // the nonce is for the token endpoint only: the device authorization endpoint takes no proof
    } finally {
      await as.close();
    }
  });

  test('requireDpop: a token request without a proof is refused; dpop off: Bearer only', async () => {
    const as = await startAuthServer({ interval: 1, requireDpop: true });
    try {
      const c = client(as);
      const da = await c.deviceAuthorization();
      await as.approve(da.user_code);
      assert.equal(errorOf(await c.poll(da.device_code)), 'invalid_grant');
      const key = await generateDpopKey();
      assert.equal((await c.poll(da.device_code, { key })).json().token_type, 'DPoP');
    } finally {
      await as.close();
    }
    const off = await startAuthServer({ interval: 1, dpop: false, metadata: 'oauth' });
    try {
      const r404 = await httpsRequest(`${off.issuer}/.well-known/openid-configuration`, { ca: off.ca });
      assert.equal(r404.status, 404);
      const m = (await httpsRequest(`${off.issuer}/.well-known/oauth-authorization-server`, { ca: off.ca })).json();
      assert.equal(m.dpop_signing_alg_values_supported, undefined);
      const c = client(off);
      const t = await c.signIn('alice', { key: await generateDpopKey() }); // the proof is ignored
      assert.equal(t.token_type, 'Bearer');
    } finally {
      await off.close();
    }
  });
});

describe('verifyDpopProof (resource server side)', () => {
  const htu = 'https://127.0.0.1:8443/v1/status';
  const token = 'an-access-token';
  let key;
  before(async () => { key = await generateDpopKey(); });

  test('accepts a good proof once; refuses a replay', async () => {
    const replay = createReplayCache();
    const proof = await createDpopProof(key, { method: 'POST', htu, accessToken: token });
    const ok = await verifyDpopProof({ proof, method: 'POST', htu, accessToken: token, jkt: key.jkt, replay });
    assert.equal(ok.jkt, key.jkt);
    assert.equal(ok.payload.ath, accessTokenHash(token));
    await assert.rejects(verifyDpopProof({ proof, method: 'POST', htu, accessToken: token, jkt: key.jkt, replay }), /replayed/);
    // htu may differ in host case / default port (RFC 9449 4.3 check 9, RFC 3986 6.2)
    const p1 = await createDpopProof(key, { method: 'GET', htu: 'https://127.0.0.1:443/x' });
    await verifyDpopProof({ proof: p1, method: 'GET', htu: 'HTTPS://127.0.0.1/x', replay });
    // but is the target URI without query and fragment (RFC 9449 4.2): a strict resource
    // server refuses a claim that carries one; strictHtu: false only compares with both cut
    const p2 = await createDpopProof(key, { method: 'GET', htu: 'https://127.0.0.1:443/x?y=1' });
    await assert.rejects(verifyDpopProof({ proof: p2, method: 'GET', htu: 'HTTPS://127.0.0.1/x', replay }), /htu/);
    const p3 = await createDpopProof(key, { method: 'GET', htu: 'https://127.0.0.1:443/x#f' });
    await assert.rejects(verifyDpopProof({ proof: p3, method: 'GET', htu: 'HTTPS://127.0.0.1/x', replay }), /htu/);
    const p4 = await createDpopProof(key, { method: 'GET', htu: 'https://127.0.0.1:443/x?y=1' });
    await verifyDpopProof({ proof: p4, method: 'GET', htu: 'HTTPS://127.0.0.1/x', replay, strictHtu: false });
  });

  test('refuses a wrong ath, htu, htm, key, old iat, typ, alg, nonce, or a private jwk', async () => {
    const replay = createReplayCache();
    const v = (proof, extra = {}) => verifyDpopProof({ proof, method: 'POST', htu, accessToken: token, jkt: key.jkt, replay, ...extra });
    const mk = (o = {}) => createDpopProof(key, { method: 'POST', htu, accessToken: token, ...o });
    await assert.rejects(v(await mk({ accessToken: 'another-token' })), /ath/);
    await assert.rejects(v(await mk({ extra: { ath: undefined } })), /ath/);
    await assert.rejects(v(await mk({ htu: 'https://127.0.0.1:8443/v1/other' })), /htu/);
    await assert.rejects(v(await mk({ htu: 'https://localhost:8443/v1/status' })), /htu/);
    await assert.rejects(v(await mk({ method: 'GET' })), /htm/);
    await assert.rejects(v(await createDpopProof(await generateDpopKey(), { method: 'POST', htu, accessToken: token })), /jkt/);
    await assert.rejects(v(await mk({ iat: Math.floor(Date.now() / 1000) - 120 })), /iat/);
    await assert.rejects(v(await mk({ iat: Math.floor(Date.now() / 1000) + 120 })), /iat/);
    await assert.rejects(v(await mk({ header: { typ: 'JWT' } })), /typ|header/i);
    await assert.rejects(v(await mk({ nonce: 'n1' }), { nonce: 'n2' }), /nonce/);
    await v(await mk({ nonce: 'n2' }), { nonce: 'n2' });
    const { privateKey } = key;
    const jose = await import('jose');
    const privJwk = await jose.exportJWK(privateKey);
    const withPriv = await new jose.SignJWT({ jti: 'x', htm: 'POST', htu, iat: Math.floor(Date.now() / 1000), ath: accessTokenHash(token) })
      .setProtectedHeader({ alg: 'ES256', typ: 'dpop+jwt', jwk: privJwk }).sign(privateKey);
    await assert.rejects(v(withPriv), /DpopError|private|header/i);
    // RS256 or HS256 are not accepted
    const rsa = await jose.generateKeyPair('RS256');
    const rsProof = await new jose.SignJWT({ jti: 'y', htm: 'POST', htu, iat: Math.floor(Date.now() / 1000) })
      .setProtectedHeader({ alg: 'RS256', typ: 'dpop+jwt', jwk: await jose.exportJWK(rsa.publicKey) }).sign(rsa.privateKey);
    await assert.rejects(verifyDpopProof({ proof: rsProof, method: 'POST', htu, replay }), /signature or header/);
    await assert.rejects(verifyDpopProof({ proof: 'a.b', method: 'POST', htu, replay }), /compact/);
  });
});

describe('CLI', () => {
  test('prints {issuer, caFile} once listening, and the control API drives it', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'iothub-oauth-cli-'));
    const child = spawn(process.execPath, [path.join(here, 'server.mjs'), '--dir', dir, '--interval', '1', '--control-port', '0'],
      { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      const rl = readline.createInterface({ input: child.stdout });
      const [line] = await once(rl, 'line');
      const info = JSON.parse(line);
      assert.match(info.issuer, /^https:\/\/127\.0\.0\.1:\d+$/);
      assert.equal(info.caFile, path.join(dir, 'ca.pem'));
      const ca = fs.readFileSync(info.caFile);
      const m = (await httpsRequest(`${info.issuer}/.well-known/openid-configuration`, { ca })).json();
      const da = (await httpsRequest(m.device_authorization_endpoint, { method: 'POST', ca, body: { client_id: info.clientId, scope: 'offline_access' } })).json();
      const ctl = async (p, body) => (await fetch(`${info.controlUrl}${p}`, body ? { method: 'POST', body: JSON.stringify(body) } : {})).json();
      assert.equal(await ctl('/approve', { userCode: da.user_code, account: 'zoe' }), true);
      const t = (await httpsRequest(m.token_endpoint, { method: 'POST', ca, body: { client_id: info.clientId, grant_type: DEVICE_CODE_GRANT, device_code: da.device_code } })).json();
      assert.equal((await ctl('/verify', { token: t.access_token })).account, 'zoe');
      assert.equal((await ctl('/state')).deviceCodeGrants, 1);
    } finally {
      child.kill('SIGTERM');
      await once(child, 'exit');
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
