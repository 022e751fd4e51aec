import { readFile, readdir, readlink } from 'node:fs/promises';

/** A TCP socket a process listens on. */
export interface ListeningSocket {
  /** `127.0.0.1`, `0.0.0.0`, `::`, ... */
  address: string;
  port: number;
}

function decodeAddress(hex: string, v6: boolean): string {
  if (!v6) {
    // /proc/net/tcp prints the IPv4 address as a little-endian 32-bit number.
    const n = Number.parseInt(hex, 16);
    return [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff].join('.');
  }
  const words: string[] = [];
  for (let i = 0; i < 32; i += 8) {
    const w = hex.slice(i, i + 8);
    // Each 32-bit word is little-endian too.
    words.push(w.slice(6, 8) + w.slice(4, 6), w.slice(2, 4) + w.slice(0, 2));
  }
  return words.map((w) => w.replace(/^0+(?=.)/, '')).join(':');
}

/**
 * The TCP sockets process `pid` listens on, read from /proc (its socket inodes matched
 * against /proc/net/tcp and tcp6 in LISTEN state), so a test failover can prove its machines
 * expose nothing outside the isolated network.
 */
export async function listeningSockets(pid: number): Promise<ListeningSocket[]> {
  const inodes = new Set<string>();
  for (const fd of await readdir(`/proc/${pid}/fd`).catch(() => [] as string[])) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    const m = /^socket:\[(\d+)\]$/.exec(target);
    if (m) inodes.add(m[1]!);
  }
  const found: ListeningSocket[] = [];
  for (const [file, v6] of [
    [`/proc/${pid}/net/tcp`, false],
    [`/proc/${pid}/net/tcp6`, true],
  ] as const) {
    const text = await readFile(file, 'utf8').catch(() => '');
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      // f[1] local address:port, f[3] state (0A = LISTEN), f[9] inode.
      if (f.length < 10 || f[3] !== '0A' || !inodes.has(f[9]!)) continue;
      const [addr, port] = f[1]!.split(':');
      found.push({ address: decodeAddress(addr!, v6), port: Number.parseInt(port!, 16) });
    }
  }
  return found;
}
