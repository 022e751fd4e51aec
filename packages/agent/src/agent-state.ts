import { open, readFile, rename } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';

/** A full read of a disk in progress (initial replication or resync), resumable. */
export interface SyncProgress {
  /** `initial` sends every allocated range; `resync` sends only chunks that differ from the latest point. */
  kind: 'initial' | 'resync';
  /** The bitmap created when the read began: it holds every write since, so a fuzzy read is repaired by the first cut. */
  bitmap: string;
  /** Bytes below this offset were sent and acknowledged. */
  offset: number;
  /** Size of the disk when the read began. */
  size: number;
}

/** What the agent remembers of one disk between runs. */
export interface DiskState {
  /** Block node name in QEMU. */
  node: string;
  /** Size last sent to the sink. */
  size: number;
  /**
   * Bitmap created at the last acknowledged cut: it (merged with any newer ones) holds every
   * change since that cut. Absent until the first cut of the disk.
   */
  tracking?: string;
  /** A full read in progress. */
  sync?: SyncProgress;
}

/** The agent's state file: small, rewritten atomically after each acknowledged step. */
export interface AgentState {
  version: 1;
  machine: string;
  disks: Record<string, DiskState>;
  /** Id and time of the last acknowledged cut. */
  lastCut?: { id: string; time: number; kind: 'crash' | 'app' };
  /** A cut whose marker was sent but not yet acknowledged, with the bitmaps created at it. */
  pendingCut?: {
    id: string;
    time: number;
    kind: 'crash' | 'app';
    bitmaps: Record<string, string>;
  };
}

/** Reads the agent's state file, or returns an empty state when there is none. */
export async function loadAgentState(path: string, machine: string): Promise<AgentState> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { version: 1, machine, disks: {} };
    throw err;
  }
  let state: AgentState;
  try {
    state = JSON.parse(text) as AgentState;
  } catch (cause) {
    throw new LifeboatError(
      'LB_AGENT_STATE_CORRUPT',
      `The agent state file ${path} is not valid JSON. Move it away; the agent then resyncs every disk (comparing chunk hashes, sending only what differs).`,
      { cause, details: { path } },
    );
  }
  if (state.version !== 1 || typeof state.disks !== 'object' || state.disks === null) {
    throw new LifeboatError(
      'LB_AGENT_STATE_CORRUPT',
      `The agent state file ${path} has an unknown format. Move it away; the agent then resyncs every disk.`,
      { details: { path, version: (state as { version?: unknown }).version } },
    );
  }
  if (state.machine !== machine) {
    throw new LifeboatError(
      'LB_AGENT_STATE_MACHINE',
      `The agent state file ${path} belongs to machine "${state.machine}", not "${machine}". Give each protected machine its own state directory.`,
      { details: { path, stateMachine: state.machine, machine } },
    );
  }
  return state;
}

/** Writes the state file durably: temporary file, fsync, rename, fsync of the directory. */
export async function saveAgentState(path: string, state: AgentState): Promise<void> {
  const tmp = join(dirname(path), `.${process.pid}.state.tmp`);
  const fh = await open(tmp, 'w');
  try {
    await fh.writeFile(JSON.stringify(state, null, 1));
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
  const dir = await open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
