/** @lifeboat/agent: public API. */
export { Agent } from './agent.js';
export type { AgentStatus, CutReport, SyncProgressReport } from './agent.js';
export { resolveAgentOptions } from './agent-options.js';
export type { AgentLogger, AgentOptions, CutHooks, ResolvedAgentOptions } from './agent-options.js';
export { loadAgentState, saveAgentState } from './agent-state.js';
export type { AgentState, DiskState, SyncProgress } from './agent-state.js';
export { discoverDisks } from './disk-discovery.js';
export type { BitmapInfo, DiscoveredDisk } from './disk-discovery.js';
export type { ReplicationSink, ResyncBaseline, SinkCutOptions } from './replication-sink.js';
export { StoreSink } from './store-sink.js';
export type { StoreSinkCut } from './store-sink.js';
