/** @lifeboat/testing: public API. */
export {};
export { startPostgres } from './postgres.js';
export type { PostgresOptions, PostgresServer } from './postgres.js';
