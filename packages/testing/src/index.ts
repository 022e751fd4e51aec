/** @lifeboat/testing: public API. */
export { startAzurite, AZURITE_ACCOUNT, AZURITE_ACCOUNT_KEY } from './azurite.js';
export type { Azurite, AzuriteOptions } from './azurite.js';
export { makeTempDir, withTempDir } from './temp-dir.js';
export type { TempDir } from './temp-dir.js';
export { startPostgres } from './postgres.js';
export type { PostgresOptions, PostgresServer } from './postgres.js';
export { buildTestImage, createRootOverlay, copyRootImage, testImageAppend } from './test-image.js';
export type { TestImage, TestImageOptions, TestImageAppendOptions } from './test-image.js';
export { importRaw } from './import-raw.js';
export { startVm } from './start-vm.js';
export type { StartVmOptions, TestVm, VmDisk, VmNet } from './start-vm.js';
export { startStorageDaemon } from './start-storage-daemon.js';
export type {
  StartStorageDaemonOptions,
  StorageDaemon,
  DaemonDisk,
} from './start-storage-daemon.js';
export { ManagedProcess } from './managed-process.js';
export type { StopOptions } from './managed-process.js';
export { runCommand } from './run-command.js';
export type { RunCommandOptions, CommandResult } from './run-command.js';
export { readExt4File, listExt4Dir, checkExt4, replayExt4Journal } from './guest-files.js';
export type { Ext4Check } from './guest-files.js';
