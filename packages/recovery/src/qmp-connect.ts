import { QmpClient } from '@lifeboat/qmp';
import type { QmpSession } from './qmp-session.js';

/** Connects a {@link QmpSession} to QEMU's QMP socket with `@lifeboat/qmp`'s client. */
export async function connectQmpSession(socketPath: string): Promise<QmpSession> {
  const client = await QmpClient.connect({ path: socketPath });
  return {
    execute: (command, args) => client.execute(command, args),
    waitForEvent: async (name, match, timeoutMs) =>
      (await client.waitForEvent(name, (e) => match(e.data), timeoutMs)).data,
    close: () => client.close(),
  };
}
