// strace on every thread of a running daemon, for what happens in which order on disk and on
// the wire (issue 13: a commit no longer syncs; what says "done" must follow the WAL's sync).
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import { waitFor, sleep } from './harness.mjs';

const CALLS = 'pwrite64,write,writev,sendto,sendmsg,fdatasync,fsync,exit_group';

// Attaches to pid (every thread, -f); stop() ends the trace and returns it parsed.
export async function straceAttach(pid, out) {
  let tracer = spawn('strace', ['-f', '-ttt', '-T', '-yy', '-s', '256', '-e', `trace=${CALLS}`,
    '-e', 'signal=none', '-p', String(pid), '-o', out], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  tracer.stderr.on('data', (d) => { err += d; });
  await waitFor(() => err.includes('Process') && err.includes('attached'), 5000, `strace attached (${err})`);
  await sleep(200);
  return {
    async stop() {
      if (!tracer) return null;
      const t = tracer;
      tracer = null;
      if (t.exitCode === null && t.signalCode === null) {
        t.kill('SIGINT');
        await once(t, 'exit');
      }
      return parseTrace(await fs.readFile(out, 'utf8'), pid);
    },
  };
}

// strace -f: "TID TIME call(...) = R <DUR>", or split into "<unfinished ...>" and
// "<... call resumed>" when another thread ran meanwhile. Returns the WAL's writes (times in
// ms), its whole syncs {start, end}, the same for the spool's segment files (segWrites
// {ts, file}, segSyncs {start, end, file}: the frames, issue 13), the syncs made on the loop's
// thread (pid), and every other write or send with its time and text, for the caller to pick
// its own.
export function parseTrace(text, pid) {
  const lines = text.split('\n');
  const walWrites = [], syncs = [], loopSyncs = [], sends = [], segWrites = [], segSyncs = [];
  const open = new Map(), openSeg = new Map();
  const segFile = (x) => /<([^<>]*\/spool\/seg-[0-9a-f]{16}\.log)>/.exec(x)?.[1];
  let exit = null;
  for (const l of lines) {
    const m = /^(\d+)\s+([\d.]+)\s+(.*)$/.exec(l);
    if (!m) continue;
    const tid = Number(m[1]), ts = Number(m[2]) * 1000, rest = m[3];
    const dur = /<([\d.]+)>$/.exec(rest);
    if (/^fdatasync\(|^fsync\(/.test(rest)) {
      if (tid === pid) loopSyncs.push(rest);
      if (rest.includes('-wal>')) {
        if (rest.includes('<unfinished')) open.set(tid, ts);
        else if (dur) syncs.push({ start: ts, end: ts + Number(dur[1]) * 1000 });
      }
      const file = segFile(rest);
      if (file) {
        if (rest.includes('<unfinished')) openSeg.set(tid, { ts, file });
        else if (dur) segSyncs.push({ start: ts, end: ts + Number(dur[1]) * 1000, file });
      }
    } else if (/^<\.\.\. f(data)?sync resumed>/.test(rest) && (open.has(tid) || openSeg.has(tid))) {
      if (open.has(tid)) syncs.push({ start: open.get(tid), end: ts });
      else segSyncs.push({ start: openSeg.get(tid).ts, end: ts, file: openSeg.get(tid).file });
      open.delete(tid);
      openSeg.delete(tid);
    } else if (/^pwrite64\(/.test(rest) && rest.includes('-wal>')) {
      walWrites.push(ts);
    } else if (/^pwrite64\(/.test(rest) && segFile(rest)) {
      segWrites.push({ ts, file: segFile(rest) });
    } else if (/^(write|writev|sendto|sendmsg)\(/.test(rest)) {
      sends.push({ ts, tid, text: rest });
    } else if (/^exit_group\(/.test(rest)) {
      exit = ts;
    }
  }
  return { lines, walWrites, syncs, loopSyncs, sends, segWrites, segSyncs, exit };
}

// Whether the thing done at time `at` came after a whole fdatasync of the WAL that began after
// the last write to the WAL before it (that write ended the commit it reports). A message for
// assert.ok.
export function syncedBefore(trace, at, what) {
  const before = trace.walWrites.filter((x) => x < at);
  if (before.length === 0) return { ok: false, msg: `${what} at ${at}: no WAL write before it` };
  const w = Math.max(...before);
  const ok = trace.syncs.some((s) => s.start > w && s.end <= at);
  return {
    ok,
    msg: `${what} at ${at} with the last WAL write at ${w} and ${ok ? 'a' : 'no'} whole fdatasync between: ` +
      JSON.stringify(trace.syncs.filter((s) => s.end > w - 500 && s.start < at + 500)),
  };
}

// The same for the spool's segments: the thing done at `at` came after a whole fsync of the
// segment file last written before it, begun after that write.
export function segSyncedBefore(trace, at, what) {
  const before = trace.segWrites.filter((x) => x.ts < at);
  if (before.length === 0) return { ok: false, msg: `${what} at ${at}: no segment write before it` };
  const w = before.reduce((a, b) => (b.ts > a.ts ? b : a));
  const ok = trace.segSyncs.some((s) => s.file === w.file && s.start > w.ts && s.end <= at);
  return {
    ok,
    msg: `${what} at ${at} with the last write to ${w.file} at ${w.ts} and ${ok ? 'a' : 'no'} whole fsync of it ` +
      `between: ${JSON.stringify(trace.segSyncs.filter((s) => s.end > w.ts - 500 && s.start < at + 500))}`,
  };
}
