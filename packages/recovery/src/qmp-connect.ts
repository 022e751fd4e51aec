import { connect, type Socket } from 'node:net';
import { LifeboatError } from '@lifeboat/protocol';
import type { QmpSession } from './qmp-session.js';

// TEMPORARY until @lifeboat/qmp's QmpClient lands: the smallest QMP client the recovery host
// needs (greeting, qmp_capabilities, commands by id, events). Replace, don't grow.

interface Waiter {
  name: string;
  match: (data: Record<string, unknown>) => boolean;
  resolve: (data: Record<string, unknown>) => void;
}

/** Connects to QEMU's QMP socket and negotiates capabilities. */
export async function connectQmpSession(socketPath: string): Promise<QmpSession> {
  const socket: Socket = connect(socketPath);
  let buffer = '';
  let nextId = 1;
  const pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  const waiters = new Set<Waiter>();
  let greeted: (() => void) | undefined;
  let closedError: Error | undefined;
  const greeting = new Promise<void>((resolve, reject) => {
    greeted = resolve;
    socket.once('error', reject);
  });
  socket.setEncoding('utf8');
  socket.on('data', (d: string) => {
    buffer += d;
    let nl: number;
    while ((nl = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, nl).trim();
      buffer = buffer.slice(nl + 1);
      if (!line) continue;
      const msg = JSON.parse(line) as Record<string, unknown>;
      if ('QMP' in msg) greeted?.();
      else if ('event' in msg) {
        const data = (msg['data'] ?? {}) as Record<string, unknown>;
        for (const w of [...waiters]) {
          if (w.name === msg['event'] && w.match(data)) {
            waiters.delete(w);
            w.resolve(data);
          }
        }
      } else if (typeof msg['id'] === 'number') {
        const p = pending.get(msg['id']);
        pending.delete(msg['id']);
        const err = msg['error'] as { class?: string; desc?: string } | undefined;
        if (err)
          p?.reject(
            new LifeboatError('LB_RECOVERY_QMP', `QEMU refused: ${err.desc ?? ''}`, {
              details: { class: err.class },
            }),
          );
        else p?.resolve(msg['return']);
      }
    }
  });
  socket.on('close', () => {
    closedError = new LifeboatError('LB_RECOVERY_QMP', 'The QMP connection to QEMU closed.');
    for (const p of pending.values()) p.reject(closedError);
    pending.clear();
  });
  socket.on('error', () => undefined);
  await greeting;
  const execute = (command: string, args?: Record<string, unknown>): Promise<unknown> =>
    new Promise((resolve, reject) => {
      if (closedError) return reject(closedError);
      const id = nextId++;
      pending.set(id, { resolve, reject });
      socket.write(
        `${JSON.stringify({ execute: command, id, ...(args ? { arguments: args } : {}) })}\n`,
      );
    });
  await execute('qmp_capabilities');
  return {
    execute,
    waitForEvent(name, match, timeoutMs) {
      return new Promise((resolve, reject) => {
        const w: Waiter = {
          name,
          match,
          resolve: (d) => {
            clearTimeout(timer);
            resolve(d);
          },
        };
        const timer = setTimeout(() => {
          waiters.delete(w);
          reject(
            new LifeboatError(
              'LB_RECOVERY_QMP',
              `QEMU sent no ${name} event within ${timeoutMs} ms.`,
            ),
          );
        }, timeoutMs);
        waiters.add(w);
      });
    },
    async close() {
      socket.destroy();
    },
  };
}
