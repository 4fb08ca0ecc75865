// The journal message catalog (systemd/iothub.catalog): one entry, with a subject, an
// explanation and what to do, for every MESSAGE_ID the daemon logs, and none for an id it does
// not; the file compiles with the real journalctl (--update-catalog on a temporary root) and
// 'make install' puts it where journald looks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from './lib/harness.mjs';

const top = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const run = (cmd, args, opts = {}) => new Promise((resolve) => {
  execFile(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 24, ...opts },
    (err, stdout, stderr) => resolve({ code: err ? (err.code ?? 1) : 0, stdout, stderr }));
});

// MESSAGE_IDs: the names defined in log.h, and which of them the sources log.
async function messageIds() {
  const h = await fs.readFile(path.join(top, 'include/iothub/log.h'), 'utf8');
  const defs = new Map();
  for (const m of h.matchAll(/#define (IOTHUB_MID_\w+) "([^"]*)"/g)) defs.set(m[1], m[2]);
  const used = new Set();
  for (const f of await fs.readdir(path.join(top, 'src'))) {
    if (!f.endsWith('.c')) continue;
    const s = await fs.readFile(path.join(top, 'src', f), 'utf8');
    for (const m of s.matchAll(/\bIOTHUB_MID_\w+/g)) used.add(m[0]);
  }
  return { defs, used };
}

// "-- ID" starts an entry; header lines until the first empty line; then the text.
function parseCatalog(text) {
  const entries = new Map();
  let cur = null;
  for (const line of text.split('\n')) {
    const m = /^-- ([0-9a-f]{32})$/.exec(line);
    if (m) {
      assert.ok(!entries.has(m[1]), `catalog: ${m[1]} twice`);
      cur = { headers: {}, body: [], inBody: false };
      entries.set(m[1], cur);
      continue;
    }
    if (!cur) continue;
    if (!cur.inBody) {
      if (line === '') { cur.inBody = true; continue; }
      const h = /^([A-Za-z-]+): (.+)$/.exec(line);
      assert.ok(h, `catalog: bad header line '${line}'`);
      cur.headers[h[1]] = h[2];
    } else cur.body.push(line);
  }
  return entries;
}

test('every MESSAGE_ID is random, unique, logged by the daemon, and has one catalog entry; no entry without one', async () => {
  const { defs, used } = await messageIds();
  assert.ok(defs.size >= 20, `found ${defs.size} MESSAGE_IDs in log.h`);
  const ids = [...defs.values()];
  assert.equal(new Set(ids).size, ids.length, 'no id used twice');
  for (const [name, id] of defs) {
    // systemd-id128 new: 128 random bits, formatted as a v4 UUID without dashes.
    assert.match(id, /^[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}$/, `${name} = ${id} is not a random id128`);
    assert.ok(used.has(name), `${name} is defined but never logged`);
  }
  for (const name of used) assert.ok(defs.has(name), `${name} is logged but not defined in log.h`);
  const entries = parseCatalog(await fs.readFile(path.join(top, 'systemd/iothub.catalog'), 'utf8'));
  for (const [name, id] of defs) {
    const e = entries.get(id);
    assert.ok(e, `${name} (${id}) has no entry in systemd/iothub.catalog`);
    assert.ok(e.headers.Subject?.length > 10, `${name}: no Subject`);
    assert.equal(e.headers['Defined-By'], 'iothub');
    assert.match(e.headers.Documentation ?? '', /^man:/, `${name}: no Documentation`);
    // An explanation, then what to do: at least two paragraphs.
    const paras = e.body.join('\n').trim().split(/\n\s*\n/).filter((p) => p.trim());
    assert.ok(paras.length >= 2, `${name}: the text needs an explanation and a suggested action`);
  }
  for (const id of entries.keys())
    assert.ok(ids.includes(id), `catalog entry ${id} has no MESSAGE_ID in include/iothub/log.h`);
});

test('journalctl compiles the catalog (--update-catalog on a temporary root) and lists every entry', async () => {
  const { defs } = await messageIds();
  const root = await tempDir('iothub-catalog-');
  try {
    const dir = path.join(root, 'usr/lib/systemd/catalog');
    await fs.mkdir(dir, { recursive: true });
    await fs.copyFile(path.join(top, 'systemd/iothub.catalog'), path.join(dir, 'iothub.catalog'));
    const u = await run('journalctl', [`--root=${root}`, '--update-catalog']);
    assert.equal(u.code, 0, u.stderr);
    assert.equal(u.stderr, '', 'journalctl reports no parse problem');
    const l = await run('journalctl', [`--root=${root}`, '--list-catalog']);
    assert.equal(l.code, 0, l.stderr);
    for (const [name, id] of defs) assert.match(l.stdout, new RegExp(`^${id} iothub: `, 'm'), `${name} listed`);
    // The text with the fields of an entry filled in, as journalctl -x shows it.
    const d = await run('journalctl', [`--root=${root}`, '--dump-catalog', defs.get('IOTHUB_MID_KEY_UNAVAILABLE')]);
    assert.equal(d.code, 0, d.stderr);
    assert.match(d.stdout, /Subject: The hub key cannot be opened/);
    assert.match(d.stdout, /iothubctl key init/);
  } finally {
    await fs.rm(root, { recursive: true, force: true });
  }
});

test('make install puts the catalog in $(PREFIX)/lib/systemd/catalog (and so into the .deb)', async () => {
  const dest = await tempDir('iothub-install-');
  try {
    const r = await run('make', ['-C', top, '-n', 'install', `DESTDIR=${dest}`, 'PREFIX=/usr']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /install -Dm0644 systemd\/iothub\.catalog \S+\/usr\/lib\/systemd\/catalog\/iothub\.catalog/);
    // packaging/debian/rules moves only lib/systemd/system out of usr/: the catalog stays where
    // systemd's dpkg trigger (/usr/lib/systemd/catalog) compiles it.
    const rules = await fs.readFile(path.join(top, 'packaging/debian/rules'), 'utf8');
    assert.doesNotMatch(rules, /rm -rf? \S*usr\/lib\/systemd(\s|$)/);
  } finally {
    await fs.rm(dest, { recursive: true, force: true });
  }
});
