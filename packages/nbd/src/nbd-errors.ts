import { LifeboatError } from '@lifeboat/protocol';
import { NBD } from './nbd-constants.js';

const ERRNO_NAMES: Record<number, string> = {
  [NBD.EPERM]: 'EPERM',
  [NBD.EIO]: 'EIO',
  [NBD.ENOMEM]: 'ENOMEM',
  [NBD.EINVAL]: 'EINVAL',
  [NBD.ENOSPC]: 'ENOSPC',
  [NBD.EOVERFLOW]: 'EOVERFLOW',
  [NBD.ENOTSUP]: 'ENOTSUP',
  [NBD.ESHUTDOWN]: 'ESHUTDOWN',
};

/** The symbolic name of an NBD wire error value (`EIO`), or `E<number>` for unknown ones. */
export function nbdErrnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `E${errno}`;
}

/**
 * Turns an error a server returned for one request into a LifeboatError with a stable code.
 * Never lose the server's message: it usually names the real cause (a bad sector, a policy).
 */
export function nbdRequestError(
  errno: number,
  command: string,
  offset: number,
  length: number,
  serverMessage?: string,
  errorOffset?: number,
): LifeboatError {
  const name = nbdErrnoName(errno);
  const details: Record<string, unknown> = { errno, errnoName: name, command, offset, length };
  if (serverMessage !== undefined && serverMessage !== '') details['serverMessage'] = serverMessage;
  if (errorOffset !== undefined) details['errorOffset'] = errorOffset;
  const where = `${command} at offset ${errorOffset ?? offset} (${length} bytes)`;
  const said = serverMessage ? `: ${serverMessage}` : '';
  switch (errno) {
    case NBD.EIO:
      return new LifeboatError(
        'LB_NBD_IO',
        `The NBD server reported an I/O error for ${where}${said}. The data in that range could not be read or written; check the server's storage.`,
        { details },
      );
    case NBD.EPERM:
      return new LifeboatError(
        'LB_NBD_PERMISSION',
        `The NBD server refused ${where} (EPERM)${said}. The export is probably read-only; connect to a writable export.`,
        { details },
      );
    case NBD.EINVAL:
      return new LifeboatError(
        'LB_NBD_INVALID_REQUEST',
        `The NBD server rejected ${where} as invalid (EINVAL)${said}. Check offset, length and alignment against the export's size and block size.`,
        { details },
      );
    case NBD.ENOSPC:
      return new LifeboatError(
        'LB_NBD_NO_SPACE',
        `The NBD server has no space left for ${where} (ENOSPC)${said}. Free space on the server's storage.`,
        { details },
      );
    case NBD.EOVERFLOW:
      return new LifeboatError(
        'LB_NBD_OVERFLOW',
        `The NBD server could not answer ${where} in one reply (EOVERFLOW)${said}. Use a smaller request.`,
        { details },
      );
    case NBD.ENOTSUP:
      return new LifeboatError(
        'LB_NBD_NOT_SUPPORTED',
        `The NBD server does not support ${where} (ENOTSUP)${said}.`,
        { details },
      );
    case NBD.ESHUTDOWN:
      return new LifeboatError(
        'LB_NBD_SHUTDOWN',
        `The NBD server is shutting down and refused ${where} (ESHUTDOWN)${said}. Reconnect when it is back.`,
        { details },
      );
    default:
      return new LifeboatError(
        'LB_NBD_SERVER_ERROR',
        `The NBD server failed ${where} with ${name}${said}. See the server's log.`,
        { details },
      );
  }
}

/** A peer broke the NBD protocol: the connection cannot be trusted any more. */
export function nbdProtocolError(
  what: string,
  details: Record<string, unknown> = {},
): LifeboatError {
  return new LifeboatError(
    'LB_NBD_PROTOCOL',
    `The NBD peer broke the protocol: ${what}. The connection was closed; report this with the peer's name and version.`,
    { details },
  );
}
