// 'iothubctl login' as a user runs it: the device grant (RFC 8628) shown on the terminal, the
// user acting at the authorization server (tests/oauth: approve, deny, or nothing).
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import assert from 'node:assert/strict';
import readline from 'node:readline';

import { IOTHUBCTL, sleep } from './harness.mjs';

// Runs the login for hub h against the authorization server 'as'. act: 'approve' (as alice),
// 'deny' or 'none'; delayMs: how long the user takes before acting. Resolves to the exit code,
// the output and the user code the hub showed.
export async function deviceLogin(h, as, { act = 'approve', delayMs = 0 } = {}) {
  const p = spawn(IOTHUBCTL, ['--config', h.configPath, 'login'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stderr.on('data', (d) => { err += d; });
  const rl = readline.createInterface({ input: p.stdout });
  const code = await new Promise((resolve, reject) => {
    let next = false;
    rl.on('line', (l) => {
      out += `${l}\n`;
      if (next && l.trim()) { resolve(l.trim()); next = false; }
      if (/enter the code/.test(l)) next = true;
    });
    p.once('exit', () => reject(new Error(`iothubctl login exited early: ${out} ${err}`)));
  });
  if (delayMs) await sleep(delayMs);
  if (act === 'approve') await as.approve(code, { account: 'alice' });
  else if (act === 'deny') await as.deny(code);
  const [exitCode] = await once(p, 'exit');
  return { code: exitCode, out, err, userCode: code };
}

// The login approved at once; it must succeed.
export async function loginApproved(h, as) {
  const r = await deviceLogin(h, as);
  assert.equal(r.code, 0, `${r.out} ${r.err}`);
  return r;
}
