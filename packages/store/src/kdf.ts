import { createHash, scrypt } from 'node:crypto';

// Key-encryption keys derived ahead of need (see key-prefetch.ts), by a hash of their inputs;
// each is handed out once and then forgotten. A handful at most: a store has one or two keys.
const early = new Map<string, Promise<Buffer>>();
const MAX_EARLY = 4;

function inputsId(passphrase: string, salt: Buffer, N: number, r: number, p: number): string {
  return createHash('sha256')
    .update(passphrase, 'utf8')
    .update('\u0000')
    .update(salt)
    .update(`\u0000${N}:${r}:${p}`)
    .digest('hex');
}

function derive(
  passphrase: string,
  salt: Buffer,
  N: number,
  r: number,
  p: number,
): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scrypt(passphrase, salt, 32, { N, r, p, maxmem: 256 * N * r + 16 * 1024 * 1024 }, (err, key) =>
      err === null ? resolve(key) : reject(err),
    );
  });
}

/** The scrypt key-encryption key of a passphrase (NFC) and salt; on the thread pool, or already started early. */
export function scryptKek(
  passphrase: string,
  salt: Buffer,
  N: number,
  r: number,
  p: number,
): Promise<Buffer> {
  const pass = passphrase.normalize('NFC');
  const id = inputsId(pass, salt, N, r, p);
  const started = early.get(id);
  if (started !== undefined) {
    early.delete(id);
    return started;
  }
  return derive(pass, salt, N, r, p);
}

/**
 * Starts deriving a key-encryption key now, so that a later {@link scryptKek} with the same
 * inputs gets it without waiting the whole cost. Never fails (errors show up in the real call).
 */
export function startScryptKek(
  passphrase: string,
  salt: Buffer,
  N: number,
  r: number,
  p: number,
): void {
  if (early.size >= MAX_EARLY) return;
  const pass = passphrase.normalize('NFC');
  const id = inputsId(pass, salt, N, r, p);
  if (early.has(id)) return;
  const pending = derive(pass, salt, N, r, p);
  pending.catch(() => undefined);
  early.set(id, pending);
}

/** @internal Derivations started early and not yet taken (tests). */
export function pendingEarlyKeks(): number {
  return early.size;
}
