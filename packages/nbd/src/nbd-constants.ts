/**
 * Wire constants of the NBD protocol (fixed newstyle), from the protocol specification
 * (NetworkBlockDevice/nbd, doc/proto.md). Names follow the specification's, without `NBD_`.
 */
export const NBD = Object.freeze({
  /** "NBDMAGIC", first 8 bytes the server sends. */
  INIT_MAGIC: 0x4e42444d41474943n,
  /** "IHAVEOPT": newstyle handshake magic, also the prefix of every option request. */
  OPTS_MAGIC: 0x49484156454f5054n,
  /** Prefix of every option reply. */
  REP_MAGIC: 0x3e889045565a9n,
  REQUEST_MAGIC: 0x25609513,
  SIMPLE_REPLY_MAGIC: 0x67446698,
  STRUCTURED_REPLY_MAGIC: 0x668e33ef,

  // Handshake flags (server) and client flags.
  FLAG_FIXED_NEWSTYLE: 1 << 0,
  FLAG_NO_ZEROES: 1 << 1,
  FLAG_C_FIXED_NEWSTYLE: 1 << 0,
  FLAG_C_NO_ZEROES: 1 << 1,

  // Options.
  OPT_EXPORT_NAME: 1,
  OPT_ABORT: 2,
  OPT_LIST: 3,
  OPT_PEEK_EXPORT: 4,
  OPT_STARTTLS: 5,
  OPT_INFO: 6,
  OPT_GO: 7,
  OPT_STRUCTURED_REPLY: 8,
  OPT_LIST_META_CONTEXT: 9,
  OPT_SET_META_CONTEXT: 10,
  OPT_EXTENDED_HEADERS: 11,

  // Option reply types.
  REP_ACK: 1,
  REP_SERVER: 2,
  REP_INFO: 3,
  REP_META_CONTEXT: 4,
  REP_FLAG_ERROR: 0x80000000,
  REP_ERR_UNSUP: 0x80000001,
  REP_ERR_POLICY: 0x80000002,
  REP_ERR_INVALID: 0x80000003,
  REP_ERR_PLATFORM: 0x80000004,
  REP_ERR_TLS_REQD: 0x80000005,
  REP_ERR_UNKNOWN: 0x80000006,
  REP_ERR_SHUTDOWN: 0x80000007,
  REP_ERR_BLOCK_SIZE_REQD: 0x80000008,
  REP_ERR_TOO_BIG: 0x80000009,

  // Information types of NBD_REP_INFO.
  INFO_EXPORT: 0,
  INFO_NAME: 1,
  INFO_DESCRIPTION: 2,
  INFO_BLOCK_SIZE: 3,

  // Transmission flags.
  FLAG_HAS_FLAGS: 1 << 0,
  FLAG_READ_ONLY: 1 << 1,
  FLAG_SEND_FLUSH: 1 << 2,
  FLAG_SEND_FUA: 1 << 3,
  FLAG_ROTATIONAL: 1 << 4,
  FLAG_SEND_TRIM: 1 << 5,
  FLAG_SEND_WRITE_ZEROES: 1 << 6,
  FLAG_SEND_DF: 1 << 7,
  FLAG_CAN_MULTI_CONN: 1 << 8,
  FLAG_SEND_RESIZE: 1 << 9,
  FLAG_SEND_CACHE: 1 << 10,
  FLAG_SEND_FAST_ZERO: 1 << 11,

  // Commands.
  CMD_READ: 0,
  CMD_WRITE: 1,
  CMD_DISC: 2,
  CMD_FLUSH: 3,
  CMD_TRIM: 4,
  CMD_CACHE: 5,
  CMD_WRITE_ZEROES: 6,
  CMD_BLOCK_STATUS: 7,

  // Command flags.
  CMD_FLAG_FUA: 1 << 0,
  CMD_FLAG_NO_HOLE: 1 << 1,
  CMD_FLAG_DF: 1 << 2,
  CMD_FLAG_REQ_ONE: 1 << 3,
  CMD_FLAG_FAST_ZERO: 1 << 4,

  // Structured reply chunk flags and types.
  REPLY_FLAG_DONE: 1 << 0,
  REPLY_TYPE_NONE: 0,
  REPLY_TYPE_OFFSET_DATA: 1,
  REPLY_TYPE_OFFSET_HOLE: 2,
  REPLY_TYPE_BLOCK_STATUS: 5,
  REPLY_TYPE_ERROR: 32769,
  REPLY_TYPE_ERROR_OFFSET: 32770,

  // Block status flags of base:allocation and qemu:dirty-bitmap:*.
  STATE_HOLE: 1 << 0,
  STATE_ZERO: 1 << 1,
  STATE_DIRTY: 1 << 0,

  // Error values on the wire (Linux errno numbers, fixed by the specification).
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,

  /** Header sizes in bytes. */
  REQUEST_SIZE: 28,
  SIMPLE_REPLY_SIZE: 16,
  STRUCTURED_REPLY_SIZE: 20,
});

/** The `base:allocation` meta context every NBD server with block status offers. */
export const BASE_ALLOCATION = 'base:allocation';

/** The meta context name QEMU uses to export dirty bitmap `name`. */
export function dirtyBitmapContext(name: string): string {
  return `qemu:dirty-bitmap:${name}`;
}
