import { mkdir, open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Takes `<dataDir>/vault.lock` (this process's pid, created exclusively) so that only one vault
 * process uses a SQLite database: the job runner treats every `running` job it finds at start
 * as orphaned, which is only true when no other vault shares the file. A lock left by a dead
 * process is taken over. Returns the release function.
 */
export async function lockDataDir(dataDir: string): Promise<() => Promise<void>> {
  await mkdir(dataDir, { recursive: true });
  const file = join(dataDir, 'vault.lock');
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await open(file, 'wx', 0o600);
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      return () => rm(file, { force: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const pid = Number((await readFile(file, 'utf8').catch(() => '')).trim());
      if (Number.isInteger(pid) && pid > 0 && alive(pid)) {
        throw new LifeboatError(
          'LB_VAULT_DATA_DIR_IN_USE',
          `Another vault (pid ${pid}) uses ${dataDir}. One vault process per SQLite database; for several instances use PostgreSQL (--database-url).`,
          { details: { dataDir, pid } },
        );
      }
      await rm(file, { force: true }); // left by a vault that died
    }
  }
  throw new LifeboatError('LB_VAULT_DATA_DIR_IN_USE', `Cannot take the lock ${file}.`, {
    details: { dataDir },
  });
}
