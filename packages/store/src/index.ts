/** @lifeboat/store: the replica store's public API. */
export type { ObjectBackend, ObjectInfo, ObjectWriter, PutOptions } from './object-backend.js';
export type * from './store-types.js';
export { DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, Store } from './store.js';
export type { StoreExtraOptions } from './store.js';
export type { LockOptions } from './store-locks.js';
export { DirectoryBackend } from './directory-backend.js';
export { warmPackBuffer } from './pack-writer.js';
export type { DirectoryBackendOptions } from './directory-backend.js';
export { parseDuration } from './retention.js';
