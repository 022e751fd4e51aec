import { execFile } from 'node:child_process';
import { X509Certificate, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { Kysely } from 'kysely';
import { LifeboatError } from '@lifeboat/protocol';
import type { VaultDatabase } from '../db/schema.js';
import type { SecretBox } from '../secret-box.js';
import { invalid } from './errors.js';

const execFileAsync = promisify(execFile);

/** A certificate issued to a component. */
export interface IssuedCertificate {
  certificate: string;
  serial: string;
  expiresAt: string;
  /** Present when the vault generated the key pair (no CSR given). */
  privateKey?: string;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  try {
    await execFileAsync('openssl', args, { cwd, timeout: 30_000 });
  } catch (err) {
    throw new LifeboatError(
      'LB_VAULT_CA_FAILED',
      `The vault's certificate authority could not run openssl (${args[0]}): ${(err as { stderr?: string }).stderr?.trim() ?? (err as Error).message}. Check that openssl is installed.`,
      { cause: err },
    );
  }
}

async function withTemp<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'lifeboat-ca-'));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * The vault's internal certificate authority (EC P-256). node:crypto cannot create
 * certificates, so it drives the `openssl` command. The CA's key is sealed with the vault's
 * secret key and kept in the database, so every vault instance on one database signs with it.
 */
export class CertificateAuthority {
  private constructor(
    readonly certificate: string,
    private readonly keyPem: string,
    private readonly days: number,
  ) {}

  /** Loads the CA, creating it on first start (the first instance to insert wins). */
  static async load(
    db: Kysely<VaultDatabase>,
    secrets: SecretBox,
    days: number,
  ): Promise<CertificateAuthority> {
    let row = await db
      .selectFrom('settings')
      .selectAll()
      .where('key', '=', 'ca')
      .executeTakeFirst();
    if (row === undefined) {
      const created = await withTemp(async (dir) => {
        await openssl(
          [
            'req',
            '-x509',
            '-newkey',
            'ec',
            '-pkeyopt',
            'ec_paramgen_curve:prime256v1',
            '-nodes',
            '-keyout',
            'ca.key',
            '-out',
            'ca.crt',
            '-days',
            '3650',
            '-subj',
            `/O=Lifeboat/CN=Lifeboat vault CA ${randomBytes(4).toString('hex')}`,
            '-addext',
            'basicConstraints=critical,CA:TRUE',
            '-addext',
            'keyUsage=critical,keyCertSign,cRLSign',
          ],
          dir,
        );
        return {
          cert: await readFile(join(dir, 'ca.crt'), 'utf8'),
          key: await readFile(join(dir, 'ca.key'), 'utf8'),
        };
      });
      await db
        .insertInto('settings')
        .values({
          key: 'ca',
          value: JSON.stringify({ cert: created.cert, key: secrets.seal(created.key) }),
        })
        .onConflict((oc) => oc.column('key').doNothing())
        .execute();
      row = await db
        .selectFrom('settings')
        .selectAll()
        .where('key', '=', 'ca')
        .executeTakeFirstOrThrow();
    }
    const { cert, key } = JSON.parse(row.value) as { cert: string; key: string };
    return new CertificateAuthority(cert, secrets.open(key), days);
  }

  /**
   * Issues a client+server certificate whose subject is the component's id (whatever the CSR
   * asked for, so a component cannot claim another's name). Without a CSR the vault makes the
   * key pair and returns the private key once.
   */
  async issue(
    componentId: string,
    names: string[],
    csr: string | undefined,
  ): Promise<IssuedCertificate> {
    return withTemp(async (dir) => {
      let privateKey: string | undefined;
      if (csr === undefined) {
        await openssl(
          [
            'req',
            '-new',
            '-newkey',
            'ec',
            '-pkeyopt',
            'ec_paramgen_curve:prime256v1',
            '-nodes',
            '-keyout',
            'key.pem',
            '-out',
            'csr.pem',
            '-subj',
            `/CN=${componentId}`,
          ],
          dir,
        );
        privateKey = await readFile(join(dir, 'key.pem'), 'utf8');
      } else {
        await writeFile(join(dir, 'csr.pem'), csr);
        try {
          await execFileAsync('openssl', ['req', '-in', 'csr.pem', '-verify', '-noout'], {
            cwd: dir,
          });
        } catch {
          throw invalid('body.csr', 'not a valid PEM certificate signing request (PKCS#10).');
        }
      }
      await writeFile(join(dir, 'ca.crt'), this.certificate);
      await writeFile(join(dir, 'ca.key'), this.keyPem, { mode: 0o600 });
      const sans = [componentId, ...names]
        .map((n) => n.trim())
        .filter((n) => /^[A-Za-z0-9.-]+$/.test(n))
        .map((n) => (/^\d+\.\d+\.\d+\.\d+$/.test(n) ? `IP:${n}` : `DNS:${n}`));
      await writeFile(
        join(dir, 'ext.cnf'),
        [
          'basicConstraints=CA:FALSE',
          'keyUsage=critical,digitalSignature,keyEncipherment',
          'extendedKeyUsage=serverAuth,clientAuth',
          `subjectAltName=${[...new Set(sans)].join(',')}`,
        ].join('\n') + '\n',
      );
      const serial = randomBytes(16)
        .toString('hex')
        .replace(/^[89a-f]/, '1');
      await openssl(
        [
          'x509',
          '-req',
          '-in',
          'csr.pem',
          '-CA',
          'ca.crt',
          '-CAkey',
          'ca.key',
          '-set_serial',
          `0x${serial}`,
          '-days',
          String(this.days),
          '-subj',
          `/O=Lifeboat/CN=${componentId}`,
          '-extfile',
          'ext.cnf',
          '-out',
          'cert.pem',
        ],
        dir,
      );
      const certificate = await readFile(join(dir, 'cert.pem'), 'utf8');
      const x509 = new X509Certificate(certificate);
      return {
        certificate,
        serial,
        expiresAt: new Date(x509.validTo).toISOString(),
        ...(privateKey !== undefined ? { privateKey } : {}),
      };
    });
  }
}
