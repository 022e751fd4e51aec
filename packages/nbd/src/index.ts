/** @lifeboat/nbd: public API. */
export { NBD, BASE_ALLOCATION, dirtyBitmapContext } from './nbd-constants.js';
export { nbdErrnoName } from './nbd-errors.js';
export {
  NbdClient,
  type NbdTarget,
  type NbdClientOptions,
  type NbdBlockSize,
  type NbdExtent,
  type NbdExportListing,
  type NbdExportInfo,
  type NbdWriteOptions,
  type NbdWriteZeroesOptions,
} from './nbd-client.js';
export {
  NbdServer,
  type NbdServerOptions,
  type NbdPendingRequests,
  type NbdExportOptions,
  type NbdSourceErrorContext,
} from './nbd-server.js';
export {
  exportSourceFromReader,
  type NbdExportSource,
  type NbdSourceExtent,
  type WholeDiskReader,
} from './nbd-export-source.js';
