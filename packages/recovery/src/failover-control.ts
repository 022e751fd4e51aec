import { rm } from 'node:fs/promises';
import { connect, createServer, type Server } from 'node:net';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import type { Failover } from './failover.js';
import type { RecoveryJobRecord } from './recovery-job.js';

/** A request to a running failover (one JSON line on its control socket). */
export type FailoverControlRequest =
  | { op: 'status' }
  | { op: 'change-point'; pointIds: string[] }
  | { op: 'commit' }
  | { op: 'hydrate'; dir: string; format?: 'qcow2' | 'raw'; verify?: boolean };

/** The answer: the failover's state and the job the request ran, or the error. */
export interface FailoverControlReply {
  ok: boolean;
  state?: string;
  pointIds?: string[];
  localDisks?: string[];
  job?: RecoveryJobRecord;
  error?: { code: string; message: string };
}

/**
 * Lets later invocations drive a failover that runs in another process (`lifeboat failover
 * start` keeps the machine; `lifeboat failover commit` asks it to commit and hydrate): a UNIX
 * socket in the private run directory, one JSON request per connection. Requests run one at
 * a time.
 */
export async function serveFailoverControl(
  failover: Failover,
  socketPath: string,
): Promise<Server> {
  let queue: Promise<unknown> = Promise.resolve();
  const handle = async (req: FailoverControlRequest): Promise<FailoverControlReply> => {
    let job: RecoveryJobRecord | undefined;
    if (req.op === 'change-point') job = await failover.changePoint(req.pointIds);
    else if (req.op === 'commit') job = await failover.commit();
    else if (req.op === 'hydrate') {
      job = await failover.hydrate({
        dir: req.dir,
        ...(req.format !== undefined ? { format: req.format } : {}),
        ...(req.verify !== undefined ? { verify: req.verify } : {}),
      });
    } else if (req.op !== 'status') {
      throw new LifeboatError(
        'LB_RECOVERY_CONTROL',
        `Unknown failover request ${JSON.stringify(req)}.`,
      );
    }
    return {
      ok: true,
      state: failover.state,
      pointIds: failover.pointIds,
      localDisks: failover.localDisks,
      ...(job ? { job } : {}),
    };
  };
  const server = createServer((s) => {
    let buf = '';
    s.setEncoding('utf8');
    s.on('error', () => undefined);
    s.on('data', (d: string) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      const line = buf.slice(0, nl);
      const run = async (): Promise<FailoverControlReply> => {
        try {
          return await handle(JSON.parse(line) as FailoverControlRequest);
        } catch (err) {
          return {
            ok: false,
            error: isLifeboatError(err)
              ? { code: err.code, message: err.message }
              : {
                  code: 'LB_RECOVERY_CONTROL',
                  message: err instanceof Error ? err.message : String(err),
                },
          };
        }
      };
      const reply = queue.then(run);
      queue = reply;
      void reply.then((r) => s.end(`${JSON.stringify(r)}\n`));
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (cause) =>
      reject(
        new LifeboatError(
          'LB_RECOVERY_CONTROL',
          `Cannot listen on ${socketPath}: ${cause.message}. Is another failover running in this run directory?`,
          {
            cause,
          },
        ),
      ),
    );
    server.listen(socketPath, () => resolve());
  });
  server.on('close', () => void rm(socketPath, { force: true }));
  return server;
}

/** Sends one request to the failover running behind `socketPath` and returns its reply. */
export async function failoverControlRequest(
  socketPath: string,
  req: FailoverControlRequest,
): Promise<FailoverControlReply> {
  return new Promise((resolve, reject) => {
    const s = connect(socketPath);
    let buf = '';
    s.setEncoding('utf8');
    s.on('connect', () => s.write(`${JSON.stringify(req)}\n`));
    s.on('data', (d: string) => (buf += d));
    s.on('error', (cause) =>
      reject(
        new LifeboatError(
          'LB_RECOVERY_CONTROL',
          `No failover runs behind ${socketPath} (${cause.message}). Start one with "lifeboat failover start --run-dir <dir>".`,
          { cause },
        ),
      ),
    );
    s.on('end', () => {
      try {
        resolve(JSON.parse(buf) as FailoverControlReply);
      } catch (cause) {
        reject(
          new LifeboatError(
            'LB_RECOVERY_CONTROL',
            'The running failover sent an unreadable reply.',
            { cause },
          ),
        );
      }
    });
  });
}
