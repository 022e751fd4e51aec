// Messages between the crypto pool (crypto-pool.ts) and its threads (crypto-worker.ts).

/** What a crypto thread is started with. */
export interface CryptoWorkerData {
  /** The pool's slots: `slotBytes` each, shared with the owning thread. */
  arena: SharedArrayBuffer;
  slotBytes: number;
}

/** A request to a crypto thread; `id` pairs it with its reply. */
export type CryptoRequest =
  | { t: 'key'; id: number; key: number; master: Uint8Array; storeId: string; level: number }
  | { t: 'unkey'; id: number; key: number }
  /** Keyed ids of the plaintexts in `slots` (lengths `lens`). */
  | { t: 'hash'; id: number; key: number; slots: Int32Array; lens: Int32Array }
  /** Seals the data chunks in `slots` in place (ids: 32 bytes each, for the AAD). */
  | { t: 'seal'; id: number; key: number; slots: Int32Array; lens: Int32Array; ids: Uint8Array }
  /**
   * Opens the sealed data chunks at `offs`/`lens` of `data` (transferred, or a view of shared
   * memory); the plaintexts go one after another into `out` (shared memory) when given.
   */
  | {
      t: 'open';
      id: number;
      key: number;
      data: Uint8Array;
      out?: Uint8Array;
      offs: Int32Array;
      lens: Int32Array;
      raws: Int32Array;
      ids: Uint8Array;
    }
  /** Tests only: the thread ends abruptly. */
  | { t: 'die'; id: number };

/** A crypto thread's reply. */
export type CryptoReply =
  | {
      id: number;
      ok: true;
      ready?: true;
      /** hash: 32 bytes per slot. */
      ids?: Uint8Array;
      /** seal: the sealed length written over each slot's plaintext. */
      sealed?: Int32Array;
      /** open: the plaintexts, one after another (absent when written into the request's `out`). */
      out?: Uint8Array;
      /** open: per blob, why it failed to open (null: it opened); null when all opened. */
      errors?: Array<string | null> | null;
    }
  | { id: number; ok: false; error: string };
