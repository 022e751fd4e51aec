/** @lifeboat/protocol: wire formats and the shared error model. */
export { LifeboatError, isLifeboatError } from './lifeboat-error.js';
export type { LifeboatErrorOptions } from './lifeboat-error.js';
export {
  BASELINE_DIGEST_BYTES,
  BASELINE_DIGESTS_PREFIX_BYTES,
  BASELINE_ENTRY_BYTES,
  DATA_PREFIX_BYTES,
  DEFAULT_MAX_PAYLOAD_BYTES,
  FRAME_HEADER_BYTES,
  FRAME_MAGIC,
  FrameDecoder,
  FrameType,
  MAX_SEQ,
  MIN_PROTOCOL_VERSION,
  PROTOCOL_VERSION,
  encodeFrame,
  encodeFrameBuffer,
  frameOwnsBuffer,
} from './frame-codec.js';
export type {
  AckFrame,
  BaselineDigestsFrame,
  BaselineFrame,
  BaselineRequestFrame,
  CommittedCutInfo,
  CommittedFrame,
  DiscardFrame,
  CutFrame,
  DataFrame,
  ErrorFrame,
  Frame,
  FrameDecoderOptions,
  HelloDisk,
  HelloFrame,
  RangeFrame,
  ResizeFrame,
  SequencedFrame,
  WelcomeFrame,
} from './frame-codec.js';
export { crc32Combine, knownCrc32 } from './crc32-combine.js';
export { FrameBufferPool, POOL_MIN_BYTES, frameBufferPool, isPooledView } from './buffer-pool.js';
export { ReplicationClient } from './replication-client.js';
export type {
  BaselineDigests,
  CutOptions,
  ReplicationClientOptions,
  ReplicationClientStats,
  ReplicationLogger,
} from './replication-client.js';
export { VaultClient } from './vault-client.js';
export type { VaultClientOptions, VaultClientTls, VaultObject } from './vault-client.js';
export {
  certificateNeedsRenewal,
  certificateSubjectId,
  certificateValidity,
  createKeyAndCsr,
  loadComponentIdentity,
  saveComponentIdentity,
} from './component-identity.js';
export type { ComponentIdentity, IssuedIdentity } from './component-identity.js';
export {
  DIRECT_IO_ALIGN,
  O_DIRECT,
  directIoRefused,
  pageAlignedShared,
  writeFully,
} from './direct-io.js';
