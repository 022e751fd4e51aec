/** @lifeboat/agent: public API. */
export { Agent } from './agent.js';
export type { AgentStatus, CutReport, SyncProgressReport } from './agent.js';
export { resolveAgentOptions } from './agent-options.js';
export type { AgentLogger, AgentOptions, CutHooks, ResolvedAgentOptions } from './agent-options.js';
export { loadAgentState, saveAgentState } from './agent-state.js';
export type { AgentState, DiskState, SyncProgress } from './agent-state.js';
export { discoverDisks } from './disk-discovery.js';
export type { BitmapInfo, DiscoveredDisk } from './disk-discovery.js';
export { HARDWARE_LABELS, hardwareLabels, readMachineHardware } from './machine-hardware.js';
export type { MachineHardware } from './machine-hardware.js';
export type { ReplicationSink, ResyncBaseline, SinkCutOptions } from './replication-sink.js';
export { StoreSink } from './store-sink.js';
export type { StoreSinkCut } from './store-sink.js';
export { AssignedMachine } from './assigned-machine.js';
export type { AssignedMachineTarget, MachineAssignment } from './assigned-machine.js';
export { discoverMachines } from './discover-machines.js';
export type { DiscoverMachinesOptions, InventoryMachine } from './discover-machines.js';
export { ManagedAgent, agentIdentity, registerAgent } from './managed-agent.js';
export type {
  ManagedAgentOptions,
  ManagedAgentStatus,
  ProcessServerAddress,
  RegisterAgentOptions,
} from './managed-agent.js';
export { ProcessServerApi } from './process-server-api.js';
export type { ProcessServerApiOptions } from './process-server-api.js';
