// The top Makefile's set-up and flags (issue 9):
//   - `make deps` on a fresh machine asks neither pkg-config nor the compiler anything (it
//     used to open with a screen of "Package libcurl was not found"), also with CFLAGS,
//     CPPFLAGS and LDFLAGS in the environment as dpkg-buildflags exports them;
//   - each hardening flag is probed against the target compiler, once per make run: a compiler
//     that refuses -fcf-protection (gcc for arm64 and armhf) builds without it and keeps the
//     others; the real compiler gets exactly the flags it accepts;
//   - a pkg-config that fails stops the build with a hint instead of compiling without flags.
// The programs make would call (pkg-config, cc, apt-get, npm) are put first on PATH as small
// recorders that log their arguments, so the test sees every call make makes.
// Run: cd tests && node --test integration/build.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const TOP = fileURLToPath(new URL('../..', import.meta.url));
// The Makefile's HARDEN_WANT, in its order.
const HARDEN_WANT = ['-D_FORTIFY_SOURCE=3', '-fstack-protector-strong', '-fstack-clash-protection', '-fcf-protection',
  '-ftrivial-auto-var-init=zero', '-fPIE'];

// The environment of a make started from a shell: this test runs inside `make check` or
// `make asan`, whose MAKEFLAGS (SAN=1, BUILD=build-asan, WERROR=1) the inner make would inherit.
const MAKE_VARS = ['MAKEFLAGS', 'MFLAGS', 'MAKELEVEL', 'MAKEOVERRIDES', 'SAN', 'BUILD', 'WERROR', 'CC', 'PKG_CONFIG',
  'CFLAGS', 'CPPFLAGS', 'LDFLAGS', 'OPT', 'HARDEN_WANT', 'TEST_RUNNER'];
const CLEAN_ENV = Object.fromEntries(Object.entries(process.env).filter(([k]) => !MAKE_VARS.includes(k)));

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, {
    encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 120_000, env: CLEAN_ENV, ...opts,
  });
  if (r.error) throw new Error(`${cmd} ${args.join(' ')}: ${r.error.message}`);
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

// A directory of recorders: each named program appends "name args..." to LOG and then runs
// the given shell body (default: exit 0).
function recorders(t, programs) {
  const dir = mkdtempSync(join(tmpdir(), 'build-test-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const log = join(dir, 'calls.log');
  writeFileSync(log, '');
  for (const [name, body] of Object.entries(programs)) {
    const p = join(dir, name);
    writeFileSync(p, `#!/bin/sh\necho "${name} $*" >> '${log}'\n${body ?? 'exit 0'}\n`);
    chmodSync(p, 0o755);
  }
  return { dir, calls: () => readFileSync(log, 'utf8').split('\n').filter(Boolean) };
}

const NOT_FOUND = 'echo "Package libcurl was not found in the pkg-config search path." >&2; exit 1';

test('make deps on a machine without the -dev packages asks neither pkg-config nor the compiler', (t) => {
  const rec = recorders(t, { 'pkg-config': NOT_FOUND, cc: 'exit 1', gcc: 'exit 1', 'apt-get': null, npm: null });
  // CFLAGS and friends in the environment, as dpkg-buildflags exports them: make expands an
  // exported variable for every recipe, so nothing probed may hide in them.
  const env = {
    ...CLEAN_ENV, PATH: `${rec.dir}:${process.env.PATH}`, CFLAGS: '-O2', CPPFLAGS: '-DX=1', LDFLAGS: '-Wl,-z,now',
  };
  const r = run('make', ['--no-print-directory', '-C', TOP, 'deps'], { env });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stderr, '', 'make deps printed on stderr');
  const calls = rec.calls();
  assert.deepEqual(calls.filter((c) => /^(pkg-config|cc|gcc) /.test(c)), [], 'make deps asked pkg-config or cc');
  // The recorders did see the recipe run (as root it installs, otherwise it prints the line).
  assert.ok(calls.some((c) => c.startsWith('npm ci')), calls.join('\n'));
  if (process.getuid() === 0) assert.ok(calls.some((c) => /^apt-get install .*libcurl4-openssl-dev/.test(c)), calls.join('\n'));
  else assert.match(r.stdout, /Run as root: apt-get install/);
});

test('the same recorders do see a compiling target ask pkg-config and probe the compiler', (t) => {
  // The counter-check of the test above: were the recorders not on make's path, that test
  // would pass for nothing.
  const rec = recorders(t, { 'pkg-config': NOT_FOUND, cc: 'exit 0' });
  const env = { ...CLEAN_ENV, PATH: `${rec.dir}:${process.env.PATH}` };
  const r = run('make', ['--no-print-directory', '-C', TOP, '-n', '-B', 'BUILD=/nonexistent/build', 'all'], { env });
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /Package libcurl was not found/);
  assert.match(r.stderr, /pkg-config --cflags .*failed: install the -dev packages \(make deps/);
  assert.ok(rec.calls().some((c) => c.startsWith('pkg-config --cflags libcurl')), rec.calls().join('\n'));
});

// The hardening flags on the compile line of src/util.c in `make -n -B all`.
function compileFlags(stdout) {
  const line = stdout.split('\n').find((l) => / -c -o \S+\/obj\/util\.o src\/util\.c$/.test(l));
  assert.ok(line, `no compile line for util.c in:\n${stdout}`);
  return line.split(/\s+/).filter((w) => HARDEN_WANT.includes(w));
}

test('a compiler that refuses -fcf-protection (gcc for arm64/armhf) keeps every other hardening flag, probed once', (t) => {
  // Answers like aarch64-linux-gnu-gcc 12: a hard error for -fcf-protection, whatever -Werror.
  const rec = recorders(t, {
    'cross-cc': 'case "$*" in *-fcf-protection*) echo "cc1: error: \'-fcf-protection=full\' is not supported for this target" >&2; exit 1;; esac; exit 0',
  });
  const r = run('make', ['--no-print-directory', '-C', TOP, '-n', '-B', 'BUILD=/nonexistent/build',
    `CC=${join(rec.dir, 'cross-cc')}`, 'all']);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stderr, '');
  assert.deepEqual(compileFlags(r.stdout), HARDEN_WANT.filter((f) => f !== '-fcf-protection'));
  // One probe per flag for the whole run (19 objects, 2 programs), each with -Werror.
  const probes = rec.calls().filter((c) => c.includes('-x c -c /dev/null'));
  assert.deepEqual(probes, HARDEN_WANT.map((f) => `cross-cc -Werror ${f} -x c -c /dev/null -o /dev/null`));
});

test('a flag the compiler only warns about is dropped too (-Werror in the probe)', (t) => {
  const rec = recorders(t, {
    'warn-cc': 'case "$*" in *-Werror*-fstack-clash-protection*) echo "cc1: error: -fstack-clash-protection not supported [-Werror]" >&2; exit 1;; esac; exit 0',
  });
  const r = run('make', ['--no-print-directory', '-C', TOP, '-n', '-B', 'BUILD=/nonexistent/build',
    `CC=${join(rec.dir, 'warn-cc')}`, 'all']);
  assert.equal(r.status, 0, r.stderr);
  assert.deepEqual(compileFlags(r.stdout), HARDEN_WANT.filter((f) => f !== '-fstack-clash-protection'));
});

test('the real compiler gets exactly the hardening flags it accepts', () => {
  const accepted = HARDEN_WANT.filter((f) => run('cc', ['-Werror', f, '-x', 'c', '-c', '/dev/null', '-o', '/dev/null']).status === 0);
  // On amd64 (CI) that is all of them, -fcf-protection included.
  if (process.arch === 'x64') assert.deepEqual(accepted, HARDEN_WANT);
  const r = run('make', ['--no-print-directory', '-C', TOP, '-n', '-B', 'BUILD=/nonexistent/build', 'all']);
  assert.equal(r.status, 0, r.stderr);
  assert.deepEqual(compileFlags(r.stdout), accepted);
});
