/** One object as listed by a backend. */
export interface ObjectInfo {
  /** The object's key, slash-separated, e.g. `packs/3f/3f9a…`. */
  key: string;
  /** Size in bytes. */
  size: number;
}

/** Options for {@link ObjectBackend.put}. */
export interface PutOptions {
  /** Replace an existing object. When false and the key exists, put rejects with `LB_BACKEND_EXISTS`. @default false */
  overwrite?: boolean;
  /**
   * False: atomic, and visible to every reader once put resolves, but it may be lost if the
   * machine (not just this process) stops before the system writes it back. For lock objects,
   * which mean nothing after their holder's machine stopped; everything else stays durable.
   * Backends that are always durable ignore it. @default true
   */
  durable?: boolean;
  /** Aborts the request. */
  signal?: AbortSignal;
}

/**
 * The small interface every target-store backend implements (local directory, Azure Blob
 * Storage, later S3). The store needs nothing else from a backend: the format is designed for
 * a dumb object store (immutable objects, whole-object put, ranged get, prefix list, delete).
 *
 * Contract (checked by the conformance suite in integration-tests against every backend):
 * - `put` is atomic and durable: once it resolves the object survives a crash of this process
 *   and of the machine, and no reader ever sees a partial object.
 * - `get`/`getRange` of a missing key reject with `LB_BACKEND_NOT_FOUND`; a range past the end
 *   rejects with `LB_BACKEND_RANGE`.
 * - `delete` of a missing key succeeds (idempotent).
 * - `list` yields every object whose key starts with `prefix`, each once, in no promised order.
 * - Transient faults are retried inside the backend with backoff; what still fails rejects with
 *   `LB_BACKEND_UNAVAILABLE` (so callers can tell "store down" from "object missing").
 */
export interface ObjectBackend {
  /** Where the objects live, for messages: `dir:/srv/lifeboat` or `azure:account/container`. */
  readonly location: string;
  /** Stores `data` under `key`, atomically and durably. */
  put(key: string, data: Uint8Array, options?: PutOptions): Promise<void>;
  /** Reads a whole object. */
  get(key: string, signal?: AbortSignal): Promise<Buffer>;
  /** Reads `length` bytes at `offset` of an object. */
  getRange(key: string, offset: number, length: number, signal?: AbortSignal): Promise<Buffer>;
  /**
   * Optional: like getRange, but reads `target.length` bytes into `target` (the store passes
   * shared memory its crypto threads read from, so nothing is allocated or copied per read).
   * Same errors as getRange. The store falls back to getRange when a backend lacks it.
   */
  getRangeInto?(
    key: string,
    offset: number,
    target: Uint8Array,
    signal?: AbortSignal,
  ): Promise<void>;
  /** The object's size, or undefined when it does not exist. */
  stat(key: string): Promise<ObjectInfo | undefined>;
  /** Every object whose key starts with `prefix`. */
  list(prefix: string): AsyncIterable<ObjectInfo>;
  /**
   * Optional: the keys `list` would yield, without their sizes (a directory then reads the
   * directory only, not a `stat` per file). The store falls back to `list` when a backend lacks it.
   */
  listKeys?(prefix: string): AsyncIterable<string>;
  /**
   * Optional: starts an object that is written in pieces and published whole by
   * {@link ObjectWriter.commit}, atomically and durably as `put` would (a pack, as its blobs are
   * sealed: most of its bytes reach the disk while later ones are still being sealed, so the
   * commit has little left to write). Readers see nothing of it before the commit. The store
   * falls back to one `put` when a backend lacks it.
   */
  openWrite?(key: string): Promise<ObjectWriter>;
  /** Deletes an object; succeeds when it is already gone. */
  delete(key: string): Promise<void>;
  /** Releases connections and handles. */
  close(): Promise<void>;
}

/** An object being written in pieces ({@link ObjectBackend.openWrite}). */
export interface ObjectWriter {
  /**
   * Appends `data` to the object. Calls must not overlap (each waits for the previous one);
   * the caller leaves the bytes unchanged until `commit` or `abort` resolves (a backend may
   * still be uploading them, or upload them again).
   */
  append(data: Uint8Array): Promise<void>;
  /**
   * Optional: makes the bytes appended so far durable now, so that `commit` has less to wait
   * for. Never needed for correctness: `commit` makes everything durable.
   */
  syncEarly?(): Promise<void>;
  /**
   * Publishes the object under its key, complete and durable; rejects with
   * `LB_BACKEND_EXISTS` when the key exists. After a failed commit, call `abort`.
   */
  commit(): Promise<void>;
  /** Drops what was written: nothing becomes visible. Never rejects. */
  abort(): Promise<void>;
}

/** The keys under `prefix`: the backend's cheaper key listing when it has one. */
export async function* listKeys(backend: ObjectBackend, prefix: string): AsyncIterable<string> {
  if (backend.listKeys !== undefined) {
    yield* backend.listKeys(prefix);
    return;
  }
  for await (const info of backend.list(prefix)) yield info.key;
}
