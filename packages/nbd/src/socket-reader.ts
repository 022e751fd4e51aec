import type { Socket } from 'node:net';

/** Thrown by {@link SocketReader.read} when the stream ends or fails before enough bytes came. */
export class SocketClosedError extends Error {
  /** Bytes still wanted when the stream ended (0 when it ended between messages). */
  readonly missing: number;
  constructor(message: string, missing: number, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'SocketClosedError';
    this.missing = missing;
  }
}

interface Waiter {
  length: number;
  /** readInto: bytes go straight into this buffer as they arrive (no staging copy). */
  dest?: Buffer;
  filled: number;
  resolve: (buf: Buffer) => void;
  reject: (err: Error) => void;
}

/** Bytes buffered before the socket is paused, so a slow consumer never balloons memory. */
const HIGH_WATER = 8 * 1024 * 1024;

/**
 * Reads exact byte counts from a socket, one reader at a time. NBD is a framed protocol with
 * fixed headers and known payload lengths, so "give me N bytes" is the only primitive needed.
 */
export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: Waiter | undefined;
  private ended: Error | undefined;

  constructor(private readonly socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
      if (
        this.buffered > HIGH_WATER &&
        (this.waiter === undefined || this.buffered >= this.waiter.length)
      ) {
        socket.pause();
      }
      this.pump();
    });
    socket.on('end', () => this.fail(new SocketClosedError('connection closed by peer', 0)));
    socket.on('close', () => this.fail(new SocketClosedError('connection closed', 0)));
    socket.on('error', (err) =>
      this.fail(new SocketClosedError(`connection failed: ${err.message}`, 0, err)),
    );
  }

  /** Bytes received and not yet read. */
  get available(): number {
    return this.buffered;
  }

  /** Resolves with exactly `length` bytes; rejects with SocketClosedError if the stream ends first. */
  read(length: number): Promise<Buffer> {
    if (this.waiter !== undefined) throw new Error('SocketReader: concurrent read');
    if (length === 0) return Promise.resolve(Buffer.alloc(0));
    return new Promise<Buffer>((resolve, reject) => {
      this.waiter = { length, resolve, reject, filled: 0 };
      this.pump();
    });
  }

  /** Fills `dest` completely from the stream; saves a copy for large payloads. */
  readInto(dest: Buffer): Promise<void> {
    if (this.waiter !== undefined) throw new Error('SocketReader: concurrent read');
    if (dest.length === 0) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.waiter = { length: dest.length, dest, filled: 0, resolve: () => resolve(), reject };
      this.pump();
    });
  }

  /** Reads and drops `length` bytes without holding them all in memory at once. */
  async skip(length: number): Promise<void> {
    let left = length;
    while (left > 0) {
      const n = Math.min(left, 1024 * 1024);
      await this.read(n);
      left -= n;
    }
  }

  private pump(): void {
    const w = this.waiter;
    if (w === undefined) return;
    if (w.dest !== undefined) {
      while (w.filled < w.length && this.chunks.length > 0) {
        const c = this.chunks[0] as Buffer;
        const n = Math.min(c.length, w.length - w.filled);
        c.copy(w.dest, w.filled, 0, n);
        w.filled += n;
        this.buffered -= n;
        if (n === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(n);
      }
      if (w.filled === w.length) {
        this.waiter = undefined;
        w.resolve(w.dest);
        if (this.buffered <= HIGH_WATER && this.socket.isPaused()) this.socket.resume();
        return;
      }
    } else if (this.buffered >= w.length) {
      this.waiter = undefined;
      w.resolve(this.take(w.length));
      if (this.buffered <= HIGH_WATER && this.socket.isPaused()) this.socket.resume();
      return;
    }
    if (this.ended !== undefined) {
      this.waiter = undefined;
      const e = this.ended;
      w.reject(
        e instanceof SocketClosedError
          ? new SocketClosedError(e.message, w.length - w.filled - this.buffered, e.cause)
          : e,
      );
      return;
    }
    if (this.socket.isPaused()) this.socket.resume();
  }

  private take(length: number): Buffer {
    const first = this.chunks[0];
    if (first !== undefined && first.length >= length) {
      const out = first.subarray(0, length);
      if (first.length === length) this.chunks.shift();
      else this.chunks[0] = first.subarray(length);
      this.buffered -= length;
      return out;
    }
    const out = Buffer.allocUnsafe(length);
    let pos = 0;
    while (pos < length) {
      const c = this.chunks[0];
      if (c === undefined) throw new Error('SocketReader: buffer accounting broken');
      const n = Math.min(c.length, length - pos);
      c.copy(out, pos, 0, n);
      pos += n;
      if (n === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(n);
    }
    this.buffered -= length;
    return out;
  }

  private fail(err: Error): void {
    if (this.ended === undefined) this.ended = err;
    this.pump();
  }
}
