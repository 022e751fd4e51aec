import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { LifeboatError } from './lifeboat-error.js';

const execFileAsync = promisify(execFile);

/** What a component got from the vault when it registered (kept 0600 in its state directory). */
export interface ComponentIdentity {
  /** The vault's id of the component (`ps_...`, `agt_...`); the subject of its certificate. */
  id: string;
  name: string;
  kind: 'process-server' | 'recovery-host' | 'agent';
  /** Bearer token (`lbc_...`) for the vault's component routes. */
  token: string;
  /** Its certificate (PEM), signed by the vault's CA. */
  cert: string;
  /** Its private key (PEM). */
  key: string;
  /** The vault CA's certificate (PEM). */
  ca: string;
}

/** What `POST /api/register` and `POST /api/components/self/certificate` answer. */
export interface IssuedIdentity {
  certificate: string;
  caCertificate: string;
  certificateExpiresAt?: string;
  privateKey?: string;
}

const FILE = 'identity.json';

/** Reads the identity saved in `dir`, or undefined when there is none yet. */
export async function loadComponentIdentity(dir: string): Promise<ComponentIdentity | undefined> {
  let text: string;
  try {
    text = await readFile(join(dir, FILE), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new LifeboatError(
      'LB_IDENTITY_UNREADABLE',
      `Cannot read ${join(dir, FILE)}: ${(err as Error).message}. Check the state directory's permissions.`,
      { cause: err, details: { path: join(dir, FILE) } },
    );
  }
  try {
    const v = JSON.parse(text) as ComponentIdentity;
    if (!v.id || !v.token || !v.cert || !v.key || !v.ca) throw new Error('fields missing');
    return v;
  } catch (err) {
    throw new LifeboatError(
      'LB_IDENTITY_UNREADABLE',
      `${join(dir, FILE)} is damaged (${(err as Error).message}). Move it away and register again with a new key.`,
      { cause: err, details: { path: join(dir, FILE) } },
    );
  }
}

/** Saves an identity in `dir` (created 0700), the file 0600, replaced atomically. */
export async function saveComponentIdentity(dir: string, id: ComponentIdentity): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const tmp = join(dir, `${FILE}.${process.pid}.tmp`);
  await writeFile(tmp, `${JSON.stringify(id, null, 2)}\n`, { mode: 0o600 });
  await rename(tmp, join(dir, FILE));
}

/**
 * A new EC P-256 key and a certificate signing request for it (PEM), made with the `openssl`
 * command (node:crypto cannot write a CSR). The private key never leaves this machine: the
 * vault signs the request. Undefined when openssl is not installed; the caller then lets the
 * vault make the key pair.
 */
export async function createKeyAndCsr(
  commonName: string,
): Promise<{ key: string; csr: string } | undefined> {
  const dir = await mkdtemp(join(tmpdir(), 'lifeboat-csr-'));
  try {
    await execFileAsync(
      'openssl',
      [
        ...['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1'],
        ...['-nodes', '-keyout', 'key.pem', '-out', 'csr.pem', '-subj', `/CN=${commonName}`],
      ],
      { cwd: dir, timeout: 30_000 },
    );
    return {
      key: await readFile(join(dir, 'key.pem'), 'utf8'),
      csr: await readFile(join(dir, 'csr.pem'), 'utf8'),
    };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new LifeboatError(
      'LB_IDENTITY_CSR_FAILED',
      `openssl could not make a key and certificate request: ${(err as { stderr?: string }).stderr?.trim() ?? (err as Error).message}.`,
      { cause: err },
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The certificate's validity (from its PEM). */
export function certificateValidity(pem: string): { notBefore: Date; notAfter: Date } {
  const x = new X509Certificate(pem);
  return { notBefore: new Date(x.validFrom), notAfter: new Date(x.validTo) };
}

/**
 * True when the certificate should be renewed now: less than `fraction` of its lifetime is
 * left (a third by default: a 90-day certificate is renewed 30 days before it expires, so a
 * component that is down for weeks still comes back with a valid one).
 */
export function certificateNeedsRenewal(pem: string, now = new Date(), fraction = 1 / 3): boolean {
  const { notBefore, notAfter } = certificateValidity(pem);
  const life = notAfter.getTime() - notBefore.getTime();
  return notAfter.getTime() - now.getTime() < life * fraction;
}

/** The subject's common name of a certificate: the vault id of the component it was issued to. */
export function certificateSubjectId(pem: string | Buffer): string | undefined {
  const subject = new X509Certificate(pem).subject;
  return /(?:^|\n)CN=([^\n]+)/.exec(subject)?.[1];
}
