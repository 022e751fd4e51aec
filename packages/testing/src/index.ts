/** @lifeboat/testing: public API. */
export { startAzurite, AZURITE_ACCOUNT, AZURITE_ACCOUNT_KEY } from './azurite.js';
export type { Azurite, AzuriteOptions } from './azurite.js';
export { makeTempDir, withTempDir } from './temp-dir.js';
export type { TempDir } from './temp-dir.js';
export { startPostgres } from './postgres.js';
export type { PostgresOptions, PostgresServer } from './postgres.js';
