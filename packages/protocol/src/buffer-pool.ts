/**
 * Whole ArrayBuffers for frame-sized bytes (a DATA frame, a journal record's body) that a
 * process server moves to a store worker thread and gets back once the store has taken them.
 *
 * Why: such buffers (hundreds of KiB each) were allocated anew for every frame and freed by
 * whichever thread's garbage collector got to them last. glibc's malloc keeps freed memory of
 * that size in its arenas (a freed large block raises its mmap threshold, so later ones come
 * from the heap), fragmented between live blocks, and rarely gives it back: a 100-machine
 * process server held 100-190 MiB more RSS than its live buffers (with the mmap threshold
 * fixed at 128 KiB its peak fell from 490-580 MiB to 396, at a cost in page faults of fresh
 * memory). Reusing the same buffers keeps both the footprint and the page faults down.
 *
 * A buffer from {@link FrameBufferPool.take} belongs to one user until it is given back with
 * {@link FrameBufferPool.give}, and only a buffer that nothing else can read may be given back:
 * the safe source is a buffer that was transferred to another thread (every view of it on this
 * thread is detached) and transferred back once that thread was done with it. A buffer that is
 * never given back is simply collected.
 */
export class FrameBufferPool {
  /** Free buffers by size class (LIFO: the most recently used pages are the warm ones). */
  private readonly free = new Map<number, ArrayBuffer[]>();
  private freeBytes = 0;
  /** Buffers handed out, given back, and allocated because none of the class was free. */
  readonly counters = { taken: 0, given: 0, allocated: 0, dropped: 0 };

  constructor(
    /** Bytes of free buffers kept at most; more given back are dropped (collected). */
    readonly maxFreeBytes = 32 * 1024 * 1024,
  ) {}

  /** Bytes of free buffers held now. */
  get heldBytes(): number {
    return this.freeBytes;
  }

  /** A Buffer of `length` bytes (uninitialised) at offset 0 of a whole ArrayBuffer of its class. */
  take(length: number): Buffer {
    this.counters.taken++;
    if (length < POOL_MIN_BYTES) return Buffer.allocUnsafeSlow(length);
    const size = sizeClass(length);
    // A DATA frame (extent + header) and its journal body (extent alone) differ by a few
    // bytes, often across a class boundary: a slightly larger free buffer does too.
    let ab: ArrayBuffer | undefined;
    for (let c = size; c <= size + 2 * CLASS_STEP && ab === undefined; c += CLASS_STEP)
      ab = this.free.get(c)?.pop();
    if (ab !== undefined) this.freeBytes -= ab.byteLength;
    else {
      ab = new ArrayBuffer(size);
      this.counters.allocated++;
    }
    const b = Buffer.from(ab, 0, length);
    pooledViews.add(b);
    return b;
  }

  /**
   * Takes back a buffer nothing else reads any more (see the class comment); buffers of no
   * class size, detached ones, or beyond `maxFreeBytes` are dropped.
   */
  give(ab: ArrayBuffer): void {
    const size = ab.byteLength;
    if (size < POOL_MIN_BYTES || size !== sizeClass(size)) return;
    if (this.freeBytes + size > this.maxFreeBytes) {
      this.counters.dropped++;
      return;
    }
    this.counters.given++;
    let list = this.free.get(size);
    if (list === undefined) {
      list = [];
      this.free.set(size, list);
    }
    list.push(ab);
    this.freeBytes += size;
  }

  /** Drops every free buffer. */
  clear(): void {
    this.free.clear();
    this.freeBytes = 0;
  }
}

/** Smaller buffers come from Node's allocator as before (they are not the problem). */
export const POOL_MIN_BYTES = 64 * 1024;
/** Class sizes are multiples of this: at most 1/16 wasted on a 256 KiB frame. */
const CLASS_STEP = 16 * 1024;

function sizeClass(n: number): number {
  return Math.ceil(n / CLASS_STEP) * CLASS_STEP;
}

/** Views from {@link FrameBufferPool.take}: each is the only data in its ArrayBuffer. */
const pooledViews = new WeakSet<Uint8Array>();

/** True when `view` came from a pool's `take`, so its whole ArrayBuffer holds nothing else. */
export function isPooledView(view: Uint8Array): boolean {
  return pooledViews.has(view);
}

/** The process's pool, shared by the frame decoders and the process server's journal reads. */
export const frameBufferPool = new FrameBufferPool();
