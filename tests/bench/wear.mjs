// Where the daemon's disk writes go (issue 13, SD-card wear), for the relay runs when
// BENCH_WEAR_TRACE=1: strace follows the daemon's pwrite64/fdatasync/fsync during a run and
// this sums them per file (the WAL, the database, anything else), with the WAL's frames split
// into commits (a WAL frame header's bytes 4-7 are non-zero on the frame that ends a commit,
// sqlite.org/fileformat2.html#walformat), and estimates write_bytes per file the way the kernel
// counts it: a 4 KiB page each time a clean page of the file is made dirty, and a sync makes
// them clean again. strace slows the daemon (one stop per traced call), so a traced run's rates
// and latencies are not the bench's; the split of the bytes is what it is for.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import path from 'node:path';

const PAGE = 4096;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function startWearTrace(pid, dir) {
  const file = path.join(dir, `wear-${pid}-${Date.now()}.strace`);
  // -y: each descriptor with its file, since the sync thread syncs the spool's segments through
  // descriptors of its own (dup'd, closed after the sync: not in /proc at the end).
  const p = spawn('strace', ['-qq', '-f', '-y', '-p', String(pid), '-e', 'trace=pwrite64,fdatasync,fsync', '-xx', '-s', '8',
    '-o', file], { stdio: ['ignore', 'ignore', 'inherit'] });
  await sleep(300); // attached
  return {
    async stop() {
      const fds = new Map();
      for (const fd of await fs.readdir(`/proc/${pid}/fd`).catch(() => [])) {
        fds.set(Number(fd), await fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '?'));
      }
      p.kill('SIGINT');
      await once(p, 'exit');
      const text = await fs.readFile(file, 'utf8');
      await fs.rm(file, { force: true });
      return summarize(text, fds);
    },
  };
}

function kind(name) {
  if (!name) return 'other';
  if (name.endsWith('-wal')) return 'wal';
  if (name.endsWith('.db')) return 'db';
  if (/\/spool\/seg-[0-9a-f]{16}\.log$/.test(name)) return 'segments'; // the spool (issue 13)
  return path.basename(name);
}

export function summarize(text, fds) {
  const files = {};
  const dirty = new Map(); // file (or fd) -> Set of 4 KiB page numbers dirty since its last sync
  // -xx prints the file's name hex-escaped too.
  const unhex = (p) => p?.replace(/\\x([0-9a-f]{2})/g, (_, h) => String.fromCharCode(parseInt(h, 16)));
  const name = (fd, p) => unhex(p) ?? fds.get(fd);
  const get = (fd, p) => {
    const k = kind(name(fd, p));
    files[k] ??= { writes: 0, bytes: 0, syncs: 0, dirtied_bytes: 0 };
    return files[k];
  };
  const commits = []; // WAL frames (db pages) per commit
  const pagesIn = new Map(); // db page number -> WAL frames written of it
  let frames = 0;
  let pendingHeader = null;
  for (const line of text.split('\n')) {
    let m = line.match(/pwrite64\((\d+)(?:<([^>]*)>)?, "([^"]*)"(?:\.\.\.)?, (\d+), (\d+)\) = (\d+)/);
    if (m) {
      const fd = Number(m[1]), p = m[2], len = Number(m[4]), off = Number(m[5]);
      const f = get(fd, p);
      const key = name(fd, p) ?? fd;
      f.writes++;
      f.bytes += len;
      let d = dirty.get(key);
      if (!d) dirty.set(key, (d = new Set()));
      for (let pg = Math.floor(off / PAGE); pg <= Math.floor((off + len - 1) / PAGE); pg++) {
        if (!d.has(pg)) { d.add(pg); f.dirtied_bytes += PAGE; }
      }
      if (kind(name(fd, p)) === 'wal' && len === 24) {
        const b = m[3].split('\\x').filter(Boolean).map((x) => parseInt(x, 16));
        if (b.length >= 8) {
          const pgno = ((b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]) >>> 0;
          const commit = ((b[4] << 24) | (b[5] << 16) | (b[6] << 8) | b[7]) >>> 0;
          frames++;
          pagesIn.set(pgno, (pagesIn.get(pgno) ?? 0) + 1);
          pendingHeader = (pendingHeader ?? 0) + 1;
          if (commit !== 0) { commits.push(pendingHeader); pendingHeader = null; }
        }
      }
      continue;
    }
    m = line.match(/f(?:data)?sync\((\d+)(?:<([^>]*)>)?\) = 0/);
    if (m) {
      const fd = Number(m[1]), p = m[2];
      get(fd, p).syncs++;
      dirty.delete(name(fd, p) ?? fd);
    }
  }
  commits.sort((a, b) => a - b);
  const q = (p) => (commits.length ? commits[Math.min(commits.length - 1, Math.floor(p * commits.length))] : null);
  const hot = [...pagesIn.entries()].sort((a, b) => b[1] - a[1]).slice(0, 5).map(([pg, n]) => `${pg}:${n}`);
  return { files, wal_frames: frames, commits: commits.length, pages_per_commit: { p50: q(0.5), p90: q(0.9), max: q(1) },
    distinct_pages: pagesIn.size, hottest_pages: hot };
}
