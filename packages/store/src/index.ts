/** @lifeboat/store: the replica store's public API. */
export type { ObjectBackend, ObjectInfo, PutOptions } from './object-backend.js';
export type * from './store-types.js';
