import { runCommand } from './run-command.js';

/**
 * Reads a file out of an ext4 file system image (raw) without mounting it, with `debugfs`.
 * Resolves to `undefined` when the file does not exist.
 */
export async function readExt4File(rawImage: string, path: string): Promise<Buffer | undefined> {
  const { stdout, stderr } = await runCommand('debugfs', ['-R', `cat ${path}`, rawImage]);
  // debugfs exits 0 even when the file is missing; it says so on stderr.
  if (/File not found|not found by ext2_lookup/.test(stderr)) return undefined;
  return Buffer.from(stdout, 'latin1');
}

/** Lists the names in a directory of an ext4 image (raw), without `.` and `..`. */
export async function listExt4Dir(rawImage: string, path: string): Promise<string[]> {
  const { stdout } = await runCommand('debugfs', ['-R', `ls -p ${path}`, rawImage]);
  // `ls -p` prints /inode/mode/uid/gid/name/size/ per entry.
  return stdout
    .split('\n')
    .map((l) => l.split('/')[5])
    .filter((n): n is string => n !== undefined && n !== '' && n !== '.' && n !== '..');
}

/**
 * Replays the ext4 journal of a raw image in place (`e2fsck -E journal_only`), as mounting
 * would. A crash-consistent image (a recovery point, a killed VM) keeps its newest metadata in
 * the journal: read it with debugfs or check it with `e2fsck -n` only after this, on a copy.
 */
export async function replayExt4Journal(rawImage: string): Promise<void> {
  await runCommand('e2fsck', ['-E', 'journal_only', '-p', rawImage], { okExitCodes: [0, 1] });
}

/** Result of {@link checkExt4}. */
export interface Ext4Check {
  /** True when `e2fsck -n -f` found nothing to fix. */
  clean: boolean;
  /** e2fsck's output. */
  output: string;
}

/** Runs `e2fsck -n -f` (read-only, forced) on an ext4 image (raw); see {@link replayExt4Journal}. */
export async function checkExt4(rawImage: string): Promise<Ext4Check> {
  try {
    const { stdout, stderr } = await runCommand('e2fsck', ['-n', '-f', rawImage]);
    return { clean: true, output: stdout + stderr };
  } catch (err) {
    return { clean: false, output: err instanceof Error ? err.message : String(err) };
  }
}
