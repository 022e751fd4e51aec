/** @lifeboat/qmp: public API. */
export {
  QmpClient,
  type QmpTarget,
  type QmpClientOptions,
  type QmpExecuteOptions,
  type QmpGreeting,
  type QmpEvent,
} from './qmp-client.js';
export {
  startQemuStorageDaemon,
  ownChild,
  spawnOwned,
  type QemuStorageDaemon,
  type QemuStorageDaemonOptions,
} from './qemu-storage-daemon.js';
export { kvmAvailable, qemuAccelerator } from './kvm.js';
export { kvmBootsKernel } from './kvm-boots-kernel.js';
export { GuestAgentClient } from './guest-agent-client.js';
export type { GuestExecResult } from './guest-agent-client.js';
export {
  startFleecing,
  type FleeceDisk,
  type FleecingOptions,
  type FleecingCut,
} from './fleecing.js';
