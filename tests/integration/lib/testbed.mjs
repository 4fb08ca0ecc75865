// The parts that integration test files start before their daemon, and stop after it: a
// directory, a software TPM, a mosquitto broker, optionally the OAuth authorization server
// (tests/oauth); and the hub key made before the daemon runs. All on loopback ports picked at
// run time (harness.mjs).
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';

import { Broker, Hub, Swtpm, tempDir } from './harness.mjs';
import { startCloud } from '../../cloud/server.mjs';
import { startAuthServer } from '../../oauth/server.mjs';

// authServer: options for startAuthServer() (its dir is <dir>/as), or null for none.
export async function startTestbed({ authServer = null } = {}) {
  const dir = await tempDir();
  await fs.chmod(dir, 0o755);
  const tpm = await Swtpm.start(path.join(dir, 'tpm'));
  const broker = await Broker.start(dir);
  const auth = authServer ? await startAuthServer({ dir: path.join(dir, 'as'), ...authServer }) : null;
  return { dir, tpm, broker, auth };
}

// The reference cloud as a strict resource server (RFC 9449 4.3) with its own DPoP nonce
// (RFC 9449 9), taking the tokens of the authorization server 'auth'; every token presented is
// added to the set 'seen'.
export function startStrictCloud(dir, auth, seen) {
  const hooks = auth.cloudHooks();
  return startCloud({
    dir: path.join(dir, 'cloud'),
    dpopNonce: true,
    verifyToken: async (t, req) => { seen.add(t); return hooks.verifyToken(t, req); },
    verifyDpop: async (a) => { seen.add(a.token); return hooks.verifyDpop(a); },
  });
}

// Stops everything in the reverse order of starting. Any part may be missing (a before() that
// failed half-way): what was started is stopped all the same.
export async function stopTestbed({ clients = [], hub, cloud, auth, broker, tpm, dir } = {}) {
  for (const c of clients) await c?.endAsync();
  await hub?.cleanup();
  await cloud?.close();
  await auth?.close();
  await broker?.stop();
  await tpm?.stop();
  if (dir) await fs.rm(dir, { recursive: true, force: true });
}

// 'iothubctl key init' and 'key show --jwk' with the daemon's configuration, before the daemon
// runs: swtpm serves one client at a time and the daemon keeps its connection (a real
// /dev/tpmrm0 multiplexes). check(pre, init), when given, runs more commands meanwhile.
// Resolves to the init result and the public JWK.
export async function keyBeforeDaemon(broker, overrides, check = null) {
  const pre = new Hub(await tempDir(), broker, {});
  pre.overrides = overrides;
  try {
    await pre.writeConfig();
    const init = await pre.ctl(['key', 'init']);
    assert.equal(init.code, 0, init.stderr);
    if (check) await check(pre, init);
    const show = await pre.ctl(['key', 'show', '--jwk']);
    assert.equal(show.code, 0, show.stderr);
    return { init, jwk: JSON.parse(show.stdout) };
  } finally {
    await fs.rm(pre.dir, { recursive: true, force: true });
  }
}
