import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';

const VERSION = 'v1';

/**
 * Encrypts the vault's stored secrets (credentials, store passphrases and connection strings,
 * the CA's private key) with AES-256-GCM under a key kept in a file outside the database, so a
 * copy of the database alone reveals no secret.
 */
export class SecretBox {
  private constructor(private readonly key: Buffer) {}

  /** Loads the key file, creating it (mode 0600) with a random key when it does not exist. */
  static async open(keyFile: string): Promise<SecretBox> {
    let text: string | undefined;
    try {
      text = await readFile(keyFile, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        throw new LifeboatError(
          'LB_VAULT_SECRET_KEY',
          `Cannot read the vault's secret key file ${keyFile}. Check its permissions.`,
          { cause: err, details: { keyFile } },
        );
      }
    }
    if (text === undefined) {
      await mkdir(dirname(keyFile), { recursive: true });
      const key = randomBytes(32);
      // 'wx' so two vault instances starting at once never overwrite each other's key.
      try {
        await writeFile(keyFile, key.toString('base64') + '\n', { mode: 0o600, flag: 'wx' });
        await chmod(keyFile, 0o600);
        return new SecretBox(key);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        text = await readFile(keyFile, 'utf8');
      }
    }
    const key = Buffer.from(text.trim(), 'base64');
    if (key.length !== 32) {
      throw new LifeboatError(
        'LB_VAULT_SECRET_KEY',
        `The vault's secret key file ${keyFile} does not hold a 32-byte base64 key. Restore it from your backup.`,
        { details: { keyFile } },
      );
    }
    return new SecretBox(key);
  }

  /** Encrypts text into `v1.<iv>.<tag>.<ciphertext>` (base64url parts). */
  seal(plaintext: string): string {
    const iv = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', this.key, iv);
    const body = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final()]);
    return [VERSION, iv, cipher.getAuthTag(), body]
      .map((p) => (typeof p === 'string' ? p : p.toString('base64url')))
      .join('.');
  }

  /** Decrypts what {@link seal} produced; a wrong key or a changed byte is an error, never garbage. */
  open(sealed: string): string {
    const [version, iv, tag, body] = sealed.split('.');
    if (version !== VERSION || iv === undefined || tag === undefined || body === undefined) {
      throw new LifeboatError(
        'LB_VAULT_SECRET_UNREADABLE',
        'A stored secret has an unknown format.',
      );
    }
    try {
      const decipher = createDecipheriv('aes-256-gcm', this.key, Buffer.from(iv, 'base64url'));
      decipher.setAuthTag(Buffer.from(tag, 'base64url'));
      return Buffer.concat([
        decipher.update(Buffer.from(body, 'base64url')),
        decipher.final(),
      ]).toString('utf8');
    } catch (err) {
      throw new LifeboatError(
        'LB_VAULT_SECRET_UNREADABLE',
        "A stored secret cannot be decrypted: the vault's secret key file is not the one it was sealed with. Restore the key file.",
        { cause: err },
      );
    }
  }
}
