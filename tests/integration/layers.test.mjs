// The one-way architecture (issue 11, ARCHITECTURE.md "Modules, top to bottom"): a module may
// include the header of, and call, only modules below it; news goes up through the event
// tables that hub.c installs. This reads the sources (no build needed) and fails on an arrow
// that points up or sideways, naming the file, the line and the module it reaches.
// Run: cd tests && node --test integration/layers.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const TOP = fileURLToPath(new URL('../..', import.meta.url));

// Who may use whom: the "is handed" column of ARCHITECTURE.md, as includes and calls. Every
// module may use util.h and log.h. A module that is not listed, or an arrow that is not, fails:
// a new arrow is a decision to write down here and in ARCHITECTURE.md. The graph must stay
// acyclic (the last test), so that news can only go up through the event tables of hub.c.
const BASE = ['util', 'log'];
const ALLOWED = {
  iothubd: ['hub', 'conf'],
  // Issue 14 stage 2: HTTPS, sign-in and the tokens are iothub-uplink's; the daemon reaches it
  // through its client (uplink-client), never http, oauth or cloudreq.
  hub: ['control', 'pair', 'commands', 'ingest', 'events', 'ack', 'dynsec', 'cloud', 'uplink-client', 'mqtt', 'signer',
    'registry', 'spool', 'db', 'frame', 'conf'],
  iothubctl: ['doctor', 'control', 'hubkey', 'conf'],
  doctor: ['control', 'hubkey', 'conf'],
  control: ['pair', 'enrol', 'dynsec', 'cloud', 'uplink-client', 'registry', 'verify', 'db', 'frame', 'conf'],
  pair: ['enrol', 'dynsec', 'registry', 'verify', 'frame', 'conf'],
  // spool: at start, the acks a power cut took from the commands table but not from the segments.
  commands: ['events', 'cloud', 'uplink-client', 'mqtt', 'signer', 'command', 'jws', 'hubkey', 'registry', 'verify', 'spool', 'db',
    'frame', 'conf'],
  // iothub-signer(8): its main and loop, its policy, the wire codec (issue 14).
  signer: ['chanserver', 'signer-policy', 'signer-proto', 'tokenstore', 'attest', 'httpsig', 'command', 'dpop', 'jws', 'hubkey',
    'verify', 'frame', 'conf'],
  'signer-policy': ['command', 'dpop', 'hubkey', 'verify', 'frame', 'conf'],
  // iothub-uplink(8) (issue 14 stage 2): its main and loop; HTTPS, sign-in and the requests by
  // kind; the hub key and the sealed tokens through the signer's client.
  uplink: ['chanserver', 'cloudreq', 'oauth', 'http', 'signer', 'uplink-proto', 'tlv', 'conf'],
  // The channels' server loop, shared by iothub-signer and iothub-uplink (each hands it its table).
  chanserver: ['tlv', 'conf'],
  'signer-proto': ['tlv'],
  // The channels' codec (signer-proto's and uplink-proto's tables drive it).
  tlv: [],
  // iothubd <-> iothub-uplink (issue 14, stage 2): the table, and the request each kind is;
  // a command id is checked by command.c's command_id_is_valid(), as the signer's policy does.
  'uplink-proto': ['tlv', 'command'],
  command: ['jws', 'hubkey', 'verify', 'frame'],
  dpop: ['jws', 'hubkey', 'frame'],
  events: ['cloud', 'uplink-client', 'spool', 'db', 'frame', 'conf'],
  enrol: ['registry', 'verify', 'frame', 'conf'],
  dynsec: ['mqtt', 'registry', 'frame', 'conf'],
  ingest: ['ack', 'registry', 'spool', 'db', 'verify', 'frame', 'conf'],
  ack: ['mqtt', 'registry', 'db', 'frame', 'conf'],
  cloud: ['uplink-client', 'uplink-proto', 'registry', 'spool', 'db', 'verify', 'frame', 'conf'],
  // iothubd's client of iothub-uplink: the channel's ops over the generic channel client.
  'uplink-client': ['chan-client', 'uplink-proto', 'tlv', 'conf'],
  // The client side of the binary channels (the connection, queue, resend), for both peers.
  'chan-client': ['tlv'],
  // Authorized, signed requests (issue 14 stage 2: what iothub-uplink serves REQUEST and
  // REGISTER with); the URL of each kind from the channel's table.
  cloudreq: ['oauth', 'http', 'signer', 'uplink-proto', 'conf'],
  attest: ['hubkey', 'frame', 'conf'],
  oauth: ['tokenstore', 'http', 'signer', 'dpop', 'jws', 'hubkey', 'frame', 'conf'],
  tokenstore: ['hubkey', 'frame', 'conf'],
  mqtt: ['conf'],
  http: [],
  // iothubd's client of iothub-signer (its header is signer.h: the daemon's modules call
  // signer_*, which this table counts as 'signer'), on the wire codec.
  'signer-client': ['signer', 'signer-proto', 'chan-client', 'tlv', 'conf'],
  httpsig: ['hubkey', 'frame'],
  jws: ['hubkey', 'frame'],
  hubkey: ['frame', 'conf'],
  registry: ['db', 'verify', 'frame'],
  // The spool's frames are in the segment log (issue 13); db.c syncs its files with the WAL.
  spool: ['seglog', 'db', 'frame'],
  db: ['seglog'],
  // The spool's segment files: on nothing but the frame's limits.
  seglog: ['frame'],
  verify: ['frame'],
  frame: [],
  conf: ['verify', 'frame'],
  log: ['util'],
  util: [],
};
const MODULES = Object.keys(ALLOWED);
// Functions whose prefix is not their module's (declared in that module's header).
const OWNER = { oauth_tokens_done: 'tokenstore', attest_mode_to_string: 'conf', dpop_mode_to_string: 'conf' };
// Prefixes of modules whose file name has a '-' (no C identifier has one): the signer's codec and policy.
const PREFIX_OWNER = [['signer_msg_', 'signer-proto'], ['signer_buf_', 'signer-proto'], ['signer_tag_', 'signer-proto'],
  ['signer_op_to_string', 'signer-proto'], ['signer_policy_', 'signer-policy'], ['signer_origin_', 'signer-policy'],
  ['signer_bucket_', 'signer-policy'], ['signer_method_', 'signer-policy'],
  ['uplink_msg_', 'uplink-proto'], ['uplink_kind_', 'uplink-proto'], ['uplink_request_target', 'uplink-proto'],
  ['uplink_refusal_reason', 'uplink-proto'],
  // iothubd's client of the uplink (uplink-client.h), after uplink_request_target above.
  ['uplink_client_', 'uplink-client'], ['uplink_call_', 'uplink-client'], ['uplink_request', 'uplink-client'],
  ['uplink_register', 'uplink-client'], ['uplink_login_', 'uplink-client'], ['uplink_logout', 'uplink-client'],
  ['uplink_status_', 'uplink-client'], ['uplink_refresh_status', 'uplink-client'], ['uplink_have_', 'uplink-client'],
  ['uplink_is_connected', 'uplink-client'], ['uplink_key_error', 'uplink-client'], ['uplink_signatures', 'uplink-client'], ['uplink_last_error', 'uplink-client'],
  // The two ends of a channel: chan-client.h (iothubd's end) before chanserver.h's chan_.
  ['chan_client_', 'chan-client'], ['chan_op_', 'chan-client'], ['chan_', 'chanserver']];

// src/cloud.c, src/commands-internal.h, include/iothub/cloud.h -> the module's name.
function moduleOf(file) {
  const base = file.split('/').pop().replace(/\.[ch]$/, '').replace(/-internal$/, '');
  return base;
}

function sources() {
  const files = [];
  for (const f of readdirSync(join(TOP, 'src'))) if (/\.[ch]$/.test(f)) files.push(`src/${f}`);
  for (const f of readdirSync(join(TOP, 'include/iothub'))) if (/\.h$/.test(f)) files.push(`include/iothub/${f}`);
  return files.sort();
}

// Comments and string literals out, line breaks kept (so that line numbers stay right).
function code(text) {
  return text
    .replace(/\/\*[\s\S]*?\*\//g, (m) => m.replace(/[^\n]/g, ' '))
    .replace(/\/\/[^\n]*/g, '')
    .replace(/"(?:[^"\\\n]|\\.)*"/g, '""');
}

// Function calls by the prefix of another module: cloud_kick( -> cloud.
const PREFIXES = MODULES.filter((m) => !['iothubd', 'iothubctl', 'util'].includes(m))
  .sort((a, b) => b.length - a.length); // httpsig_ before http_, hubkey_ before hub_
// Not a member called through a pointer (in->ev.command_ack(...): a callback, not the module).
const CALL = new RegExp(`(?<![.>])\\b(?:${PREFIXES.join('|')})_[a-z0-9_]*\\s*\\(`, 'g');
const callee = (m) => {
  const name = m.replace(/\s*\($/, '');
  return { name, to: OWNER[name] ?? PREFIX_OWNER.find(([p]) => name.startsWith(p))?.[1] ??
    PREFIXES.find((p) => name.startsWith(`${p}_`)) };
};

function arrows() {
  const found = [];
  for (const file of sources()) {
    const from = moduleOf(file);
    assert.ok(from in ALLOWED, `${file}: a module that ARCHITECTURE.md and ALLOWED here do not place yet`);
    const text = readFileSync(join(TOP, file), 'utf8');
    const lines = text.split('\n');
    lines.forEach((l, i) => {
      const m = /^\s*#\s*include\s+"iothub\/([a-z0-9_]+)\.h"/.exec(l);
      if (m) found.push({ file, line: i + 1, from, to: m[1], how: `#include "iothub/${m[1]}.h"` });
    });
    code(text).split('\n').forEach((l, i) => {
      for (const m of l.matchAll(CALL)) {
        const { name, to } = callee(m[0]);
        found.push({ file, line: i + 1, from, to, how: `${name}()` });
      }
    });
  }
  return found;
}

// Up or sideways: to a module that is not below (an unknown one counts as wrong too).
const edges = (m) => [...(ALLOWED[m] ?? []), ...(BASE.includes(m) ? [] : BASE)];
const isWrong = (a) => a.to !== a.from && !edges(a.from).includes(a.to);

test('every module includes and calls only modules below it', () => {
  const all = arrows();
  assert.ok(all.length > 100, `only ${all.length} arrows found: the scan is broken`);
  const wrong = all.filter(isWrong);
  assert.deepEqual(wrong.map((a) => `${a.file}:${a.line}: ${a.from} -> ${a.to} (${a.how})`), []);
});

test('the scan sees an upward call (the check can fail)', () => {
  // What ingest.c did before issue 11: the frame path kicked the relay and commands directly.
  const text = 'void f(void) {\n        cloud_kick(h->cloud);\n        /* commands_kick( in a comment */\n}\n';
  const calls = [...code(text).matchAll(CALL)].map((m) => callee(m[0]).to);
  assert.deepEqual(calls, ['cloud']);
  assert.equal(isWrong({ from: 'ingest', to: 'cloud' }), true);
  assert.equal(isWrong({ from: 'cloudreq', to: 'oauth' }), false);
  assert.equal(isWrong({ from: 'cloud', to: 'oauth' }), true, 'the relay asks the uplink, which holds the token');
  assert.equal(isWrong({ from: 'cloud', to: 'cloudreq' }), true, 'cloudreq is the uplink\'s');
  assert.equal(isWrong({ from: 'ingest', to: 'commands' }), true, 'sideways');
  assert.equal(isWrong({ from: 'oauth', to: 'cloud' }), true, 'the relay uses the token, not the reverse');
  assert.equal(isWrong({ from: 'control', to: 'hub' }), true);
  assert.equal(isWrong({ from: 'hub', to: 'nosuchmodule' }), true);
  assert.equal(isWrong({ from: 'util', to: 'log' }), true);
});

// Issue 14 stage 2: nothing iothubd is built from reaches HTTPS, sign-in or the tokens (the
// Makefile's link line fails such an object too; uplink.test checks ldd).
test('iothubd reaches neither http, oauth nor cloudreq', () => {
  const seen = new Set();
  const walk = (m) => { if (seen.has(m)) return; seen.add(m); for (const n of edges(m)) walk(n); };
  walk('iothubd');
  // (signer_* calls count as the signer's module, which is iothub-signer's program here: the
  // token store it reaches is behind the signer's socket.)
  for (const m of ['http', 'oauth', 'cloudreq', 'uplink']) assert.ok(!seen.has(m), `iothubd reaches ${m}`);
  assert.ok(seen.has('uplink-client') && seen.has('chan-client'), [...seen].join(' '));
});

test('only hub.c knows struct hub', () => {
  const users = sources().filter((f) => f !== 'src/hub.c' && /\bstruct hub\b/.test(code(readFileSync(join(TOP, f), 'utf8'))));
  assert.deepEqual(users, []);
});

test('the allowed arrows have no cycle', () => {
  const state = new Map(); // 1: on the path, 2: done
  const visit = (m, path) => {
    assert.notEqual(state.get(m), 1, `a cycle: ${[...path, m].join(' -> ')}`);
    if (state.get(m) === 2) return;
    state.set(m, 1);
    for (const n of edges(m)) {
      assert.ok(n in ALLOWED, `${m} -> ${n}: not a module`);
      visit(n, [...path, m]);
    }
    state.set(m, 2);
  };
  for (const m of MODULES) visit(m, []);
});

test('the exceptions to the prefix rule are declared where they say', () => {
  for (const [name, mod] of Object.entries(OWNER))
    assert.match(readFileSync(join(TOP, `include/iothub/${mod}.h`), 'utf8'), new RegExp(`\\b${name}\\(`));
});
