import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  BlobServiceClient,
  ContainerClient,
  type BlobDownloadResponseParsed,
  type StoragePipelineOptions,
} from '@azure/storage-blob';
import { LifeboatError } from '@lifeboat/protocol';
import type { ObjectBackend, ObjectInfo, ObjectWriter, PutOptions } from '@lifeboat/store';
import {
  resolveAzureBlobBackendOptions,
  type AzureBlobBackendOptions,
  type ResolvedAzureBlobBackendOptions,
} from './azure-backend-options.js';
import {
  errorCodeOf,
  isTransient,
  retryAfterMs,
  statusOf,
  toLifeboatError,
  unavailableError,
  type RequestFacts,
} from './azure-errors.js';
import { RequestLimiter } from './request-limiter.js';
import { withRetry } from './retry.js';

/** The service's limit on committed blocks per blob. */
const MAX_BLOCKS = 50_000;
/** Times a large put stages its blocks again after a concurrent writer's commit discarded them. */
const MAX_UPLOAD_ROUNDS = 5;
/** Blocks of an object written in pieces (openWrite) staged at once before an append waits. */
const STAGE_AHEAD = 4;
/** Metadata name of the id each put gives its blob (metadata names are C# identifiers). */
const UPLOAD_ID = 'lifeboatupload';
/** Longest blob name the service accepts, in characters. */
const MAX_KEY_LENGTH = 1024;

/**
 * Our own retry loop (with a total time bound and stable error codes) replaces the SDK's, so
 * the SDK makes exactly one try per call.
 */
const PIPELINE_OPTIONS: StoragePipelineOptions = {
  retryOptions: { maxTries: 1 },
  keepAliveOptions: { enable: true },
  userAgentOptions: { userAgentPrefix: 'lifeboat' },
};

/**
 * The SDK resumes a broken download body with up to 5 further requests of its own, outside the
 * request cap and the retry budget; a broken body fails the attempt instead and our loop retries.
 */
const ONE_TRY_DOWNLOAD = { maxRetryRequests: 0 } as const;

function configError(message: string, cause?: unknown): LifeboatError {
  return new LifeboatError(
    'LB_BACKEND_INVALID_OPTIONS',
    message,
    cause === undefined ? {} : { cause },
  );
}

function makeContainerClient(o: ResolvedAzureBlobBackendOptions): ContainerClient {
  if (o.containerUrl === undefined) {
    let service: BlobServiceClient;
    try {
      service = BlobServiceClient.fromConnectionString(o.connectionString ?? '', PIPELINE_OPTIONS);
    } catch (cause) {
      throw configError(
        'The Azure Storage connection string is not valid. Copy it from the storage account ' +
          '(Access keys) or build it as DefaultEndpointsProtocol=https;AccountName=…;AccountKey=…',
        cause,
      );
    }
    return service.getContainerClient(o.container ?? '');
  }
  const url = new URL(o.containerUrl);
  const name = url.pathname
    .split('/')
    .filter((s) => s !== '')
    .at(-1);
  if (name === undefined) throw configError(`The URL ${o.containerUrl} names no container.`);
  if (o.connectionString === undefined) {
    // A SAS URL carries its own authorisation.
    return new ContainerClient(o.containerUrl, undefined, PIPELINE_OPTIONS);
  }
  const service = (() => {
    try {
      return BlobServiceClient.fromConnectionString(o.connectionString, PIPELINE_OPTIONS);
    } catch (cause) {
      throw configError('The Azure Storage connection string is not valid.', cause);
    }
  })();
  const client = service.getContainerClient(decodeURIComponent(name));
  const strip = (u: string): string => {
    const p = new URL(u);
    return `${p.origin}${p.pathname.replace(/\/+$/, '')}`.toLowerCase();
  };
  if (strip(client.url) !== strip(o.containerUrl)) {
    throw configError(
      `The container URL ${o.containerUrl} is not in the storage account of the connection ` +
        `string (${service.url}). Give the connection string of the account that holds the container.`,
    );
  }
  return client;
}

/**
 * Keys of the store format (`packs/3f/3f9a…`): slash-separated segments of letters, digits, `.`,
 * `_` and `-`, none starting with `.`. The directory backend accepts exactly the same, so a store
 * can be copied between backends; it also keeps clear of what URLs would mangle (`..`, `\`).
 */
const KEY_RE = /^[A-Za-z0-9_-][A-Za-z0-9._-]*(\/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$/;

function checkKey(key: string, location: string): void {
  if (key.length > MAX_KEY_LENGTH || !KEY_RE.test(key)) {
    throw new LifeboatError(
      'LB_BACKEND_INVALID_KEY',
      `Invalid object key ${JSON.stringify(key.slice(0, 200))} for ${location}: use at most ` +
        `${MAX_KEY_LENGTH} characters in slash-separated segments of letters, digits, ".", "_" ` +
        `and "-", none starting with ".".`,
      { details: { key, location } },
    );
  }
}

function rangeError(
  key: string,
  location: string,
  details: Record<string, unknown>,
): LifeboatError {
  return new LifeboatError(
    'LB_BACKEND_RANGE',
    `The range read from ${key} in ${location} is outside the object.`,
    { details: { key, location, ...details } },
  );
}

/** An incomplete body is retried like a dropped connection. */
class ShortBodyError extends Error {
  readonly code = 'ERR_STREAM_PREMATURE_CLOSE';
}

/** Reads a download's body into one buffer, checking its length against Content-Length. */
async function readBody(
  response: BlobDownloadResponseParsed,
  signal: AbortSignal,
): Promise<Buffer> {
  const expected = response.contentLength ?? 0;
  const body = response.readableStreamBody;
  if (body === undefined) {
    if (expected === 0) return Buffer.alloc(0);
    throw new ShortBodyError('the response has no body');
  }
  const stream = body as NodeJS.ReadableStream & { destroy?: (err?: Error) => void };
  const onAbort = (): void => stream.destroy?.(signal.reason as Error);
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    const out = Buffer.allocUnsafe(expected);
    let at = 0;
    for await (const chunk of stream) {
      const c = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
      if (at + c.length > expected)
        throw new ShortBodyError('the response is longer than announced');
      c.copy(out, at);
      at += c.length;
    }
    if (at !== expected)
      throw new ShortBodyError(`the response ended after ${at} of ${expected} bytes`);
    return out;
  } catch (err) {
    if (signal.aborted) throw signal.reason;
    throw err;
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}

/** Total size from a Content-Range header (`bytes 0-9/10`). */
function sizeFromContentRange(contentRange: string | undefined): number | undefined {
  const m = /\/(\d+)$/.exec(contentRange ?? '');
  return m?.[1] === undefined ? undefined : Number(m[1]);
}

/**
 * The target store's objects in an Azure Blob Storage container, as block blobs. Implements
 * the {@link ObjectBackend} contract: puts are atomic (one Put Blob, or blocks made visible at
 * once by Put Block List) and never replace an object unless asked to (a conditional
 * `If-None-Match: *`), transient faults are retried with exponential backoff and jitter within a
 * bounded time, and at most `maxConcurrency` requests are in flight per instance.
 */
export class AzureBlobBackend implements ObjectBackend {
  /** `azure:<account>/<container>`. */
  readonly location: string;
  /** The validated options. */
  readonly options: ResolvedAzureBlobBackendOptions;
  private readonly client: ContainerClient;
  private readonly limiter: RequestLimiter;
  private ready: Promise<void> | undefined;
  private closed = false;
  private readonly pending = new Set<Promise<unknown>>();

  /** Validates the options (throws `LB_BACKEND_INVALID_OPTIONS`); no request is made until first use. */
  constructor(options: AzureBlobBackendOptions) {
    this.options = resolveAzureBlobBackendOptions(options);
    this.client = makeContainerClient(this.options);
    this.limiter = new RequestLimiter(this.options.maxConcurrency);
    this.location = `azure:${this.client.accountName}/${this.client.containerName}`;
  }

  /**
   * A backend for the container at `containerUrl`, authorised by `connectionString` (or by a SAS
   * in the URL when the connection string is omitted).
   */
  static fromContainerUrl(
    containerUrl: string,
    connectionString?: string,
    options: Omit<AzureBlobBackendOptions, 'container' | 'containerUrl' | 'connectionString'> = {},
  ): AzureBlobBackend {
    return new AzureBlobBackend({
      ...options,
      containerUrl,
      ...(connectionString === undefined ? {} : { connectionString }),
    });
  }

  /** Requests in flight now (for tests and metrics). */
  get inFlight(): number {
    return this.limiter.inFlight;
  }

  async put(key: string, data: Uint8Array, options: PutOptions = {}): Promise<void> {
    return this.track(async () => {
      checkKey(key, this.location);
      const { signal } = options;
      await this.ensureReady();
      const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
      // Stored as blob metadata: lets a retried put recognise its own earlier success (below).
      // A random id rather than a content hash: hashing every pack cost more CPU than the upload
      // itself; integrity is the store's own AEAD per chunk, and TLS's in transit.
      const uploadId = randomBytes(12).toString('hex');
      const metadata = { [UPLOAD_ID]: uploadId };
      const conditions = options.overwrite === true ? {} : { ifNoneMatch: '*' };
      const blob = this.client.getBlockBlobClient(key);
      const facts = { location: this.location, operation: 'put', key };
      let attempts = 0;
      try {
        if (buf.length <= this.options.maxSinglePutSize) {
          await this.retried(facts, signal, (s) => {
            attempts++;
            return blob.upload(buf, buf.length, {
              conditions,
              metadata,
              abortSignal: s,
            });
          });
        } else {
          for (let round = 1; ; round++) {
            const blockIds = await this.stageBlocks(key, buf, signal);
            try {
              await this.retried(facts, signal, (s) => {
                attempts++;
                return blob.commitBlockList(blockIds, {
                  conditions,
                  metadata,
                  abortSignal: s,
                });
              });
              break;
            } catch (err) {
              // Another writer's commit of this blob discarded our uncommitted blocks: unless
              // the blob now exists and we may not replace it, stage them again.
              if (errorCodeOf(err) !== 'InvalidBlockList' || round >= MAX_UPLOAD_ROUNDS) throw err;
              if (options.overwrite !== true && (await this.stat(key)) !== undefined) throw err;
              await sleep(
                Math.random() * 100 * round,
                undefined,
                signal === undefined ? {} : { signal },
              );
            }
          }
        }
      } catch (err) {
        const code = errorCodeOf(err);
        const exists =
          code === 'BlobAlreadyExists' ||
          (options.overwrite !== true &&
            (statusOf(err) === 412 ||
              (code === 'InvalidBlockList' && (await this.stat(key)) !== undefined)));
        if (!exists) throw this.mapError(err, facts, signal);
        // An earlier attempt may have succeeded with its answer lost: then the blob is ours.
        if (attempts > 1 && (await this.isOwnUpload(key, uploadId, signal))) return;
        throw new LifeboatError(
          'LB_BACKEND_EXISTS',
          `Object ${key} already exists in ${this.location}; objects are immutable unless overwritten explicitly.`,
          { cause: err, details: { key, location: this.location } },
        );
      }
    });
  }

  /**
   * An object written in pieces: each piece is staged as an uncommitted block once the next
   * one comes (a few at once, within the request limit; the last at `commit`) and `commit`
   * puts the block list, as a large put ends, so most of a pack is uploaded while its later
   * blobs are still being sealed. An object of one piece goes up in one put.
   * Uncommitted blocks are invisible; the service discards those never committed (after a
   * week), which is all `abort` leaves. When the commit meets anything but a clean answer (the
   * name exists, or another writer's commit of it discarded these blocks), it hands the pieces
   * to one whole `put`, which sorts each of those cases out.
   */
  async openWrite(key: string): Promise<ObjectWriter> {
    checkKey(key, this.location);
    this.checkOpen();
    const blob = this.client.getBlockBlobClient(key);
    // Ids unique to this object, all of one length, as the service wants within a blob.
    const nonce = randomBytes(12).toString('hex');
    const uploadId = randomBytes(12).toString('hex');
    const pieces: Buffer[] = [];
    const ids: string[] = [];
    const staged: Array<Promise<void>> = [];
    let failure: unknown;
    const stageFacts = { location: this.location, operation: 'put (stage block)', key };
    const whole = (): Promise<void> => this.put(key, Buffer.concat(pieces));
    /** Stages pieces[index] as a block (past the service's block count: up whole at commit). */
    const stage = (index: number): void => {
      if (index >= MAX_BLOCKS) return;
      const piece = pieces[index] as Buffer;
      const id = Buffer.from(`${nonce}-${String(ids.length).padStart(6, '0')}`).toString('base64');
      ids.push(id);
      const staging = this.track(async () => {
        await this.ensureReady();
        await this.retried(stageFacts, undefined, (s) =>
          blob.stageBlock(id, piece, piece.length, { abortSignal: s }),
        );
      });
      staging.catch((err: unknown) => {
        failure ??= err;
      });
      staged.push(staging);
    };
    return {
      append: async (data) => {
        if (data.length === 0) return;
        // The caller leaves the bytes alone until commit or abort (ObjectWriter's contract).
        pieces.push(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
        // The newest piece waits for the next one or the commit: an object of one piece (a
        // small pack, the usual one of a process server's cut) goes up in one put, not a block
        // and a block list.
        if (pieces.length < 2) return;
        stage(pieces.length - 2);
        await staged[staged.length - 1 - STAGE_AHEAD]?.catch(() => undefined);
      },
      commit: async () => {
        if (pieces.length <= 1) return whole();
        stage(pieces.length - 1);
        await Promise.allSettled(staged);
        if (failure !== undefined) throw this.mapError(failure, stageFacts);
        if (ids.length !== pieces.length) return whole();
        const facts = { location: this.location, operation: 'put', key };
        let attempts = 0;
        try {
          await this.track(() =>
            this.retried(facts, undefined, (s) => {
              attempts++;
              return blob.commitBlockList(ids, {
                conditions: { ifNoneMatch: '*' },
                metadata: { [UPLOAD_ID]: uploadId },
                abortSignal: s,
              });
            }),
          );
        } catch (err) {
          const status = statusOf(err);
          const code = errorCodeOf(err);
          if (status !== 409 && status !== 412 && code !== 'InvalidBlockList') {
            throw this.mapError(err, facts);
          }
          // An earlier attempt may have succeeded with its answer lost: then the blob is ours.
          if (attempts > 1 && (await this.isOwnUpload(key, uploadId, undefined))) return;
          await whole();
        }
      },
      abort: async () => {
        await Promise.allSettled(staged);
      },
    };
  }

  async get(key: string, signal?: AbortSignal): Promise<Buffer> {
    return this.track(async () => {
      checkKey(key, this.location);
      await this.ensureReady();
      const blob = this.client.getBlobClient(key);
      const facts = { location: this.location, operation: 'get', key };
      try {
        return await this.retried(facts, signal, async (s) =>
          readBody(await blob.download(0, undefined, { abortSignal: s, ...ONE_TRY_DOWNLOAD }), s),
        );
      } catch (err) {
        throw this.mapError(err, facts, signal);
      }
    });
  }

  async getRange(
    key: string,
    offset: number,
    length: number,
    signal?: AbortSignal,
  ): Promise<Buffer> {
    return this.track(async () => {
      checkKey(key, this.location);
      if (
        !Number.isSafeInteger(offset) ||
        !Number.isSafeInteger(length) ||
        offset < 0 ||
        length < 0
      ) {
        throw rangeError(key, this.location, { offset, length });
      }
      await this.ensureReady();
      if (length === 0) {
        // The service reads "no count" as "to the end", so an empty range is answered from stat.
        const info = await this.stat(key);
        if (info === undefined) throw this.notFound(key);
        if (offset > info.size)
          throw rangeError(key, this.location, { offset, length, size: info.size });
        return Buffer.alloc(0);
      }
      const blob = this.client.getBlobClient(key);
      const facts = { location: this.location, operation: 'getRange', key };
      let response: { data: Buffer; size: number | undefined };
      try {
        response = await this.retried(facts, signal, async (s) => {
          const r = await blob.download(offset, length, { abortSignal: s, ...ONE_TRY_DOWNLOAD });
          return { data: await readBody(r, s), size: sizeFromContentRange(r.contentRange) };
        });
      } catch (err) {
        if (statusOf(err) === 416) throw rangeError(key, this.location, { offset, length });
        throw this.mapError(err, facts, signal);
      }
      // Past the end the service returns what there is (or, at the end, Azurite even all of it).
      if (
        response.data.length !== length ||
        (response.size !== undefined && offset + length > response.size)
      ) {
        throw rangeError(key, this.location, { offset, length, size: response.size });
      }
      return response.data;
    });
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    return this.track(async () => {
      checkKey(key, this.location);
      await this.ensureReady();
      const blob = this.client.getBlobClient(key);
      const facts = { location: this.location, operation: 'stat', key };
      try {
        const props = await this.retried(facts, undefined, (s) =>
          blob.getProperties({ abortSignal: s }),
        );
        return { key, size: props.contentLength ?? 0 };
      } catch (err) {
        if (statusOf(err) === 404 && errorCodeOf(err) !== 'ContainerNotFound') return undefined;
        throw this.mapError(err, facts);
      }
    });
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    this.checkOpen();
    await this.ensureReady();
    const facts = { location: this.location, operation: 'list', key: `${prefix}*` };
    let continuationToken: string | undefined;
    do {
      const token = continuationToken;
      let page;
      try {
        page = await this.track(() =>
          this.retried(facts, undefined, (s) =>
            this.client
              .listBlobsFlat({ prefix, abortSignal: s })
              .byPage({
                maxPageSize: this.options.listPageSize,
                ...(token === undefined ? {} : { continuationToken: token }),
              })
              .next(),
          ),
        );
      } catch (err) {
        throw this.mapError(err, facts);
      }
      if (page.done === true) return;
      for (const item of page.value.segment.blobItems) {
        yield { key: item.name, size: item.properties.contentLength ?? 0 };
      }
      continuationToken =
        page.value.continuationToken === '' ? undefined : page.value.continuationToken;
    } while (continuationToken !== undefined);
  }

  async delete(key: string): Promise<void> {
    return this.track(async () => {
      checkKey(key, this.location);
      await this.ensureReady();
      const blob = this.client.getBlobClient(key);
      const facts = { location: this.location, operation: 'delete', key };
      try {
        // deleteIfExists: a retry after a lost answer finds the blob gone, which is success.
        await this.retried(facts, undefined, (s) => blob.deleteIfExists({ abortSignal: s }));
      } catch (err) {
        throw this.mapError(err, facts);
      }
    });
  }

  /** Waits for requests in flight, then refuses new ones. Idle keep-alive sockets do not hold the process. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.allSettled([...this.pending]);
  }

  private checkOpen(): void {
    if (this.closed) {
      throw new LifeboatError(
        'LB_BACKEND_CLOSED',
        `The backend for ${this.location} was closed; open it again.`,
        {
          details: { location: this.location },
        },
      );
    }
  }

  /** Runs an operation, counted so close() can wait for it. */
  private track<T>(op: () => Promise<T>): Promise<T> {
    this.checkOpen();
    const p = op();
    this.pending.add(p);
    const forget = (): void => {
      this.pending.delete(p);
    };
    p.then(forget, forget);
    return p;
  }

  /**
   * Creates the container once when asked to; a failure is retried on the next call. Shared by
   * every caller, so no one caller's signal ends it.
   */
  private ensureReady(): Promise<void> {
    if (!this.options.createContainer) return Promise.resolve();
    this.ready ??= (async () => {
      const facts = { location: this.location, operation: 'create container' };
      try {
        await this.retried(facts, undefined, (s) =>
          this.client.createIfNotExists({ abortSignal: s }),
        );
      } catch (err) {
        this.ready = undefined;
        throw this.mapError(err, facts);
      }
    })();
    return this.ready;
  }

  private retried<T>(
    facts: RequestFacts,
    signal: AbortSignal | undefined,
    attempt: (signal: AbortSignal) => Promise<T>,
  ): Promise<T> {
    return withRetry(attempt, {
      options: this.options.retry,
      isTransient,
      retryAfterMs,
      giveUp: (g) => unavailableError(facts, g.lastError, g.attempts, g.elapsedMs),
      limiter: this.limiter,
      signal,
    });
  }

  private mapError(err: unknown, facts: RequestFacts, signal?: AbortSignal): unknown {
    // An abort is the caller's own doing: pass its reason through untouched.
    if (signal?.aborted === true) return signal.reason;
    if (err instanceof LifeboatError) return err;
    return toLifeboatError(err, facts);
  }

  private notFound(key: string): LifeboatError {
    return new LifeboatError(
      'LB_BACKEND_NOT_FOUND',
      `Object ${key} does not exist in ${this.location}.`,
      {
        details: { key, location: this.location },
      },
    );
  }

  /** Uploads `buf` as uncommitted blocks (in parallel, within the request limit); returns their ids. */
  private async stageBlocks(
    key: string,
    buf: Buffer,
    signal: AbortSignal | undefined,
  ): Promise<string[]> {
    const blockSize = Math.max(this.options.blockSize, Math.ceil(buf.length / MAX_BLOCKS));
    const count = Math.ceil(buf.length / blockSize);
    // Ids unique to this upload: two writers staging the same blob cannot mix their blocks.
    const nonce = randomBytes(12).toString('hex');
    const ids = Array.from({ length: count }, (_, i) =>
      Buffer.from(`${nonce}-${String(i).padStart(6, '0')}`).toString('base64'),
    );
    const blob = this.client.getBlockBlobClient(key);
    const stop = new AbortController();
    const onAbort = (): void => stop.abort(signal?.reason);
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      await Promise.all(
        ids.map(async (id, i) => {
          const part = buf.subarray(i * blockSize, Math.min(buf.length, (i + 1) * blockSize));
          try {
            await this.retried(
              { location: this.location, operation: 'put (stage block)', key },
              stop.signal,
              (s) => blob.stageBlock(id, part, part.length, { abortSignal: s }),
            );
          } catch (err) {
            // One block failed for good: the others need not keep the connections busy.
            stop.abort(err);
            throw err;
          }
        }),
      );
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      // The first failure aborted the rest; report it, not their aborts.
      throw stop.signal.aborted ? stop.signal.reason : err;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    return ids;
  }

  /** True when the blob under `key` was committed by the put whose id is `uploadId`. */
  private async isOwnUpload(
    key: string,
    uploadId: string,
    signal: AbortSignal | undefined,
  ): Promise<boolean> {
    const blob = this.client.getBlobClient(key);
    const facts = { location: this.location, operation: 'stat', key };
    try {
      const p = await this.retried(facts, signal, (s) => blob.getProperties({ abortSignal: s }));
      return p.metadata?.[UPLOAD_ID] === uploadId;
    } catch {
      return false;
    }
  }
}
