/** @lifeboat/protocol: wire formats and the shared error model. */
export { LifeboatError, isLifeboatError } from './lifeboat-error.js';
export type { LifeboatErrorOptions } from './lifeboat-error.js';
