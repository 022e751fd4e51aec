/** What the recovery host needs of a QMP connection (implemented over `@lifeboat/qmp`). */
export interface QmpSession {
  /** Runs a command; rejects with QEMU's error class and description. */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown>;
  /** Waits for an event whose data satisfies `match`; rejects after `timeoutMs`. */
  waitForEvent(
    name: string,
    match: (data: Record<string, unknown>) => boolean,
    timeoutMs: number,
  ): Promise<Record<string, unknown>>;
  /** Closes the connection. */
  close(): Promise<void>;
}
