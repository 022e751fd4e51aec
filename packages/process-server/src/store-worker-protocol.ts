import { LifeboatError } from '@lifeboat/protocol';

/** A request from the process server to a store worker. */
export type StoreWorkerRequest =
  | {
      id: number;
      op: 'beginWrite';
      args: { machine: string; disk: string; size: number; base?: string | null };
    }
  | { id: number; op: 'write'; session: number; offset: number; data: Uint8Array }
  | { id: number; op: 'writeZeroes' | 'trim'; session: number; offset: number; length: number }
  | {
      id: number;
      op: 'prefetch';
      session: number;
      ranges: Array<{ offset: number; length: number }>;
    }
  | { id: number; op: 'resize'; session: number; size: number }
  | {
      id: number;
      op: 'commit';
      session: number;
      options: { time?: Date; kind?: 'crash' | 'app'; cut?: string; consistencyGroup?: string };
    }
  | { id: number; op: 'abort'; session: number }
  | { id: number; op: 'listPoints'; filter: Record<string, unknown> }
  | { id: number; op: 'findCutPoint'; machine: string; disk: string; cut: string }
  | { id: number; op: 'pointDigests'; point: string; key: Uint8Array }
  | { id: number; op: 'close' };

/** A worker's answer. */
export type StoreWorkerResponse =
  | {
      id: number;
      ok: true;
      value: unknown;
      /** A write's bytes handed back once the store took them (transferred), for reuse. */
      buffer?: ArrayBuffer;
    }
  | {
      id: number;
      ok: false;
      error: { code: string; message: string; details: Record<string, unknown> };
    };

/** Makes any thrown value cloneable, keeping a LifeboatError's code. */
export function serializeError(err: unknown): {
  code: string;
  message: string;
  details: Record<string, unknown>;
} {
  if (err instanceof LifeboatError)
    return { code: err.code, message: err.message, details: err.details };
  return {
    code: 'LB_PS_STORE_FAILED',
    message: `Store worker: ${(err as Error)?.message ?? String(err)}`,
    details: {},
  };
}
