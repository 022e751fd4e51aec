import { mkdir, open, readFile, readdir, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';

/** What the process server remembers about one machine across restarts. */
export interface MachineState {
  machine: string;
  /** Journal records up to this sequence number are no longer needed (committed or dropped). */
  releasedSeq: number;
  /** Disks and their logical sizes as of the last committed cut (or as announced, for new disks). */
  disks: Record<string, { size: number }>;
  /** The newest committed cut. */
  lastCut?: {
    cutId: string;
    seq: number;
    time: number;
    kind: 'crash' | 'app';
    committedAt: number;
  };
  /** Newest committed point per disk. */
  points: Record<string, { id: string; time: number }>;
  /** Set when the backlog was dropped (journal overflow); cleared by the next cut after the agent learned it. */
  resync?: { since: number; reason: string; atSeq: number };
  consistencyGroup?: string;
}

const FILE_RE = /^m-([0-9a-f]+)\.json$/;

/** Per-machine state files in a directory, each replaced atomically (write, fsync, rename, fsync dir). */
export class MachineStateStore {
  private readonly chains = new Map<string, Promise<void>>();

  constructor(
    private readonly dir: string,
    private readonly noSync = false,
  ) {}

  /** Loads every machine's state. */
  async loadAll(): Promise<MachineState[]> {
    await mkdir(this.dir, { recursive: true });
    const out: MachineState[] = [];
    for (const name of await readdir(this.dir)) {
      if (!FILE_RE.test(name)) continue;
      const text = await readFile(join(this.dir, name), 'utf8');
      try {
        out.push(JSON.parse(text) as MachineState);
      } catch (cause) {
        throw new LifeboatError(
          'LB_PS_JOURNAL_CORRUPT',
          `Machine state file ${name} in ${this.dir} is not valid JSON; check the journal's disk.`,
          { cause, details: { file: join(this.dir, name) } },
        );
      }
    }
    return out;
  }

  /** Replaces a machine's state durably; saves of one machine run in call order. */
  save(state: MachineState): Promise<void> {
    const snapshot = structuredClone(state);
    const prev = this.chains.get(state.machine) ?? Promise.resolve();
    const next = prev.catch(() => undefined).then(() => this.write(snapshot));
    this.chains.set(state.machine, next);
    return next;
  }

  private async write(state: MachineState): Promise<void> {
    const file = join(this.dir, `m-${Buffer.from(state.machine, 'utf8').toString('hex')}.json`);
    const tmp = `${file}.tmp`;
    const fh = await open(tmp, 'w');
    try {
      await fh.writeFile(JSON.stringify(state));
      if (!this.noSync) await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
    if (!this.noSync) {
      const d = await open(this.dir, 'r');
      try {
        await d.sync();
      } finally {
        await d.close();
      }
    }
  }
}
