import { isBuiltInNetwork, reportedNetworks } from '@lifeboat/protocol/networks';
import type { Page } from '../api';
import { isRegExp, type FieldErrors } from '../form';
import { time } from '../format';
import type {
  Component,
  NetworkMapping,
  PointSelector,
  ProtectedItem,
  RecoveryPoint,
} from '../types';
import { useApi } from '../use-api';
import { Badge } from '../ui';

/** How the point is chosen in a wizard. */
export interface PointChoice {
  mode: 'latest' | 'latest-app' | 'at' | 'point';
  /** `datetime-local` value for `at`. */
  at: string;
  pointId: string;
}

/** The default choice: the latest point (or the given point). */
export function pointChoice(pointId?: string): PointChoice {
  return pointId === undefined || pointId === ''
    ? { mode: 'latest', at: '', pointId: '' }
    : { mode: 'point', at: '', pointId };
}

/** What is wrong with a point choice for `items` machines (the vault's rules). */
export function pointErrors(c: PointChoice, items: number): Record<string, string | undefined> {
  const e: Record<string, string | undefined> = {};
  if (c.mode === 'at') {
    const t = Date.parse(c.at);
    if (c.at === '' || !Number.isFinite(t)) e['at'] = 'Enter the date and time to recover to.';
  }
  if (c.mode === 'point') {
    if (items !== 1) e['pointId'] = 'A specific point is for one machine; choose latest instead.';
    else if (c.pointId === '') e['pointId'] = 'Choose a recovery point.';
  }
  return e;
}

/** The API's point selector of a choice. */
export function pointSelector(c: PointChoice): PointSelector {
  if (c.mode === 'latest-app') return { pick: 'latest-app' };
  if (c.mode === 'at') return { pick: 'latest', at: new Date(c.at).toISOString() };
  if (c.mode === 'point') return { pointId: c.pointId };
  return { pick: 'latest' };
}

/** A point choice in words, for reviews. */
export function pointWords(p: PointSelector | null | undefined): string {
  if (p === null || p === undefined) return 'The latest point';
  if ('pointId' in p) return `Point ${p.pointId}`;
  if (p.pick === 'latest-app') return 'The latest app-consistent point';
  return p.at !== undefined ? `The latest point at or before ${time(p.at)}` : 'The latest point';
}

/**
 * Choosing the recovery point: the latest, the latest app-consistent, the latest at or before
 * a time, or (for one machine) one of its points, listed by cut (a cut's points of every disk
 * go together).
 */
export function PointFields(props: {
  value: PointChoice;
  onChange: (c: PointChoice) => void;
  /** The one machine's protected item, when one is chosen (lists its points). */
  itemId: string | undefined;
  f: FieldErrors;
}) {
  const { value, onChange, f } = props;
  const points = useApi<Page<RecoveryPoint>>(
    props.itemId === undefined
      ? null
      : `/api/protected-items/${encodeURIComponent(props.itemId)}/points?limit=200`,
  );
  // One entry per cut (or per point when a point has no cut): any point of a cut names it.
  const seen = new Set<string>();
  const all = points.data?.items ?? [];
  const cuts = all.filter((p) => {
    const k = p.cut ?? p.id;
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
  const chosen = all.find((p) => p.id === value.pointId);
  const shownId =
    chosen === undefined
      ? value.pointId
      : (cuts.find((p) => (p.cut ?? p.id) === (chosen.cut ?? chosen.id))?.id ?? value.pointId);
  const set = (c: Partial<PointChoice>, field: string) => {
    f.touch(field);
    onChange({ ...value, ...c });
  };
  return (
    <fieldset className="field" {...f.input('mode')}>
      <legend>Recovery point</legend>
      {(
        [
          ['latest', 'The latest point'],
          ['latest-app', 'The latest app-consistent point'],
          ['at', 'The latest point at or before a time'],
          ...(props.itemId !== undefined ? [['point', 'A point from the list'] as const] : []),
        ] as const
      ).map(([mode, label]) => (
        <label key={mode} className="choice">
          <input
            type="radio"
            name={`${String(f.input('mode')['id'])}-radio`}
            value={mode}
            checked={value.mode === mode}
            onChange={() => set({ mode }, 'mode')}
          />{' '}
          {label}
        </label>
      ))}
      {value.mode === 'at' ? (
        <div className="field">
          <label htmlFor={f.input('at')['id'] as string}>Recover to (your local time)</label>
          <input
            type="datetime-local"
            step={1}
            value={value.at}
            {...f.input('at')}
            onChange={(e) => set({ at: e.target.value }, 'at')}
          />
          {f.error('at')}
        </div>
      ) : null}
      {value.mode === 'point' ? (
        <div className="field">
          <label htmlFor={f.input('pointId')['id'] as string}>Point</label>
          <select
            value={shownId}
            {...f.input('pointId')}
            onChange={(e) => set({ pointId: e.target.value }, 'pointId')}
          >
            <option value="">Choose…</option>
            {shownId !== '' && !cuts.some((p) => p.id === shownId) ? (
              <option value={shownId}>{shownId}</option>
            ) : null}
            {cuts.map((p) => (
              <option key={`${p.targetStoreId}/${p.id}`} value={p.id}>
                {time(p.time)} — {p.kind === 'app' ? 'app-consistent' : 'crash-consistent'}
              </option>
            ))}
          </select>
          {f.error('pointId')}
        </div>
      ) : null}
      {value.mode !== 'point' ? f.error('pointId') : null}
      {f.error('mode')}
    </fieldset>
  );
}

/** Verification of a boot, as the user types it. */
export interface VerifyChoice {
  console: string;
  guestPort: string;
  expect: string;
  screenshot: boolean;
}

/** The default verification: a screenshot only. */
export const VERIFY_DEFAULT: VerifyChoice = {
  console: '',
  guestPort: '',
  expect: '',
  screenshot: true,
};

/** What is wrong with the verification (the vault's rules). */
export function verifyErrors(v: VerifyChoice): Record<string, string | undefined> {
  const e: Record<string, string | undefined> = {};
  if (v.console.length > 500) e['console'] = 'At most 500 characters.';
  else if (!isRegExp(v.console)) e['console'] = 'Not a valid regular expression.';
  if (v.guestPort !== '') {
    const port = Number(v.guestPort);
    if (!/^\d+$/.test(v.guestPort) || port < 1 || port > 65535)
      e['guestPort'] = 'A TCP port from 1 to 65535, or leave empty.';
  }
  if (v.expect !== '') {
    if (v.guestPort === '') e['expect'] = 'Give the guest port whose answer this must match.';
    else if (v.expect.length > 500) e['expect'] = 'At most 500 characters.';
    else if (!isRegExp(v.expect)) e['expect'] = 'Not a valid regular expression.';
  }
  return e;
}

/** The API's `verify` object. */
export function verifyBody(v: VerifyChoice): Record<string, unknown> {
  return {
    ...(v.console !== '' ? { console: v.console } : {}),
    ...(v.guestPort !== '' ? { guestPort: Number(v.guestPort) } : {}),
    ...(v.expect !== '' ? { expect: v.expect } : {}),
    screenshot: v.screenshot,
  };
}

/** The boot checks: console pattern, guest port and its answer, screenshot. */
export function VerifyFields(props: {
  value: VerifyChoice;
  onChange: (v: VerifyChoice) => void;
  f: FieldErrors;
}) {
  const { value, onChange, f } = props;
  const set = (c: Partial<VerifyChoice>, field: string) => {
    f.touch(field);
    onChange({ ...value, ...c });
  };
  return (
    <fieldset className="field">
      <legend>Verify the boot</legend>
      <div className="field">
        <label htmlFor={f.input('console')['id'] as string}>
          Console must show (regular expression, optional)
        </label>
        <input
          type="text"
          value={value.console}
          placeholder="e.g. login:"
          {...f.input('console')}
          onChange={(e) => set({ console: e.target.value }, 'console')}
        />
        {f.error('console')}
      </div>
      <div className="field">
        <label htmlFor={f.input('guestPort')['id'] as string}>
          Guest TCP port that must answer (optional)
        </label>
        <input
          type="text"
          inputMode="numeric"
          value={value.guestPort}
          placeholder="e.g. 22"
          {...f.input('guestPort')}
          onChange={(e) => set({ guestPort: e.target.value.trim() }, 'guestPort')}
        />
        {f.error('guestPort')}
      </div>
      <div className="field">
        <label htmlFor={f.input('expect')['id'] as string}>
          Its answer must match (regular expression, optional)
        </label>
        <input
          type="text"
          value={value.expect}
          placeholder="e.g. SSH-2\.0"
          {...f.input('expect')}
          onChange={(e) => set({ expect: e.target.value }, 'expect')}
        />
        {f.error('expect')}
      </div>
      <label className="choice">
        <input
          type="checkbox"
          checked={value.screenshot}
          onChange={(e) => set({ screenshot: e.target.checked }, 'screenshot')}
        />{' '}
        Take a screenshot of the console
      </label>
    </fieldset>
  );
}

/** Recovery hosts to choose from, with their health. */
export function useRecoveryHosts() {
  return useApi<Page<Component>>('/api/recovery-hosts?limit=1000');
}

/** How the machines boot, as the user types it. */
export interface BootChoice {
  how: 'recorded' | 'bios' | 'uefi' | 'kernel';
  kernel: string;
  append: string;
  initrd: string;
  cpus: string;
  memoryMiB: string;
}

/** The default boot: as the points' labels (or the machine's inventory) say. */
export const BOOT_DEFAULT: BootChoice = {
  how: 'recorded',
  kernel: '',
  append: '',
  initrd: '',
  cpus: '',
  memoryMiB: '',
};

/** What is wrong with the boot choice (the vault's rules). */
export function bootErrors(b: BootChoice): Record<string, string | undefined> {
  const e: Record<string, string | undefined> = {};
  if (b.how === 'kernel') {
    if (b.kernel.trim() === '') e['kernel'] = 'Enter the kernel file’s path on the recovery host.';
    else if (b.kernel.length > 1000) e['kernel'] = 'At most 1000 characters.';
    if (b.append.length > 2000) e['append'] = 'At most 2000 characters.';
    if (b.initrd.length > 1000) e['initrd'] = 'At most 1000 characters.';
  }
  const int = (s: string) => (/^\d+$/.test(s) ? Number(s) : NaN);
  if (b.cpus !== '' && !(int(b.cpus) >= 1 && int(b.cpus) <= 64))
    e['cpus'] = 'From 1 to 64, or leave empty.';
  if (b.memoryMiB !== '' && !(int(b.memoryMiB) >= 64 && int(b.memoryMiB) <= 1_048_576))
    e['memoryMiB'] = 'From 64 to 1048576 MiB, or leave empty.';
  return e;
}

/** The API's `boot`, `cpus` and `memoryMiB` of a boot choice. */
export function bootBody(b: BootChoice): Record<string, unknown> {
  return {
    ...(b.how === 'bios' || b.how === 'uefi' ? { boot: { firmware: b.how } } : {}),
    ...(b.how === 'kernel'
      ? {
          boot: {
            kernel: b.kernel.trim(),
            ...(b.append !== '' ? { append: b.append } : {}),
            ...(b.initrd.trim() !== '' ? { initrd: b.initrd.trim() } : {}),
          },
        }
      : {}),
    ...(b.cpus !== '' ? { cpus: Number(b.cpus) } : {}),
    ...(b.memoryMiB !== '' ? { memoryMiB: Number(b.memoryMiB) } : {}),
  };
}

/** How to boot: as recorded, BIOS or UEFI from the disk, or a kernel file; CPUs and memory. */
export function BootFields(props: {
  value: BootChoice;
  onChange: (b: BootChoice) => void;
  f: FieldErrors;
}) {
  const { value, onChange, f } = props;
  const set = (c: Partial<BootChoice>, field: string) => {
    f.touch(field);
    onChange({ ...value, ...c });
  };
  const text = (k: 'kernel' | 'append' | 'initrd' | 'cpus' | 'memoryMiB', label: string) => (
    <div className="field">
      <label htmlFor={f.input(k)['id'] as string}>{label}</label>
      <input
        type="text"
        value={value[k]}
        {...(k === 'cpus' || k === 'memoryMiB' ? { inputMode: 'numeric' as const } : {})}
        {...f.input(k)}
        onChange={(e) => set({ [k]: e.target.value }, k)}
      />
      {f.error(k)}
    </div>
  );
  return (
    <fieldset className="field">
      <legend>Boot</legend>
      {(
        [
          ['recorded', 'As the recovery points record it (or the recovery host’s default)'],
          ['bios', 'From the disk, BIOS'],
          ['uefi', 'From the disk, UEFI'],
          ['kernel', 'A kernel file on the recovery host (for disks without a boot loader)'],
        ] as const
      ).map(([how, label]) => (
        <label key={how} className="choice">
          <input
            type="radio"
            name={`${String(f.input('how')['id'])}-radio`}
            checked={value.how === how}
            onChange={() => set({ how }, 'how')}
          />{' '}
          {label}
        </label>
      ))}
      {value.how === 'kernel' ? (
        <>
          {text('kernel', 'Kernel file (a path the recovery host allows)')}
          {text('append', 'Kernel command line (optional)')}
          {text('initrd', 'Initial RAM disk file (optional)')}
        </>
      ) : null}
      {text('cpus', 'CPUs (optional; default: the machine’s)')}
      {text('memoryMiB', 'Memory in MiB (optional; default: the machine’s)')}
    </fieldset>
  );
}

/** What is wrong with the recovery host choice ('' = automatic). */
export function hostErrors(
  hostId: string,
  hosts: Component[] | undefined,
): Record<string, string | undefined> {
  if (hosts === undefined) return {};
  if (hostId === '') {
    return hosts.some((h) => h.status === 'healthy')
      ? {}
      : {
          host: 'No recovery host is registered and healthy. Start one (lifeboat recovery-host start) or check its heartbeats.',
        };
  }
  const h = hosts.find((x) => x.id === hostId);
  if (h === undefined) return { host: 'That recovery host is no longer registered.' };
  if (h.status !== 'healthy')
    return { host: `${h.name} sends no heartbeats (${h.status}); choose another or automatic.` };
  return {};
}

/** A machine's recovery-site network, from its item's network mapping. */
export interface MappedNetwork {
  itemId: string;
  network: string;
  mapping: NetworkMapping;
}

export function useNetworkMappings() {
  return useApi<Page<NetworkMapping>>('/api/network-mappings?limit=1000');
}

/**
 * The network each machine boots on, as the vault decides it: a failover takes its mapping's
 * target network; a test failover its test network when the mapping sets one (and no network
 * was chosen in the wizard), else the run's isolated network. Items without one are left out.
 */
export function mappedNetworks(
  kind: 'failover' | 'test-failover',
  items: Array<ProtectedItem | undefined>,
  mappings: NetworkMapping[] | undefined,
  chosen = false,
): MappedNetwork[] {
  if (chosen || mappings === undefined) return [];
  const out: MappedNetwork[] = [];
  for (const i of items) {
    if (i === undefined || i.networkMappingId === null) continue;
    const mapping = mappings.find((m) => m.id === i.networkMappingId);
    if (mapping === undefined) continue;
    const network = kind === 'failover' ? mapping.targetNetwork : mapping.testNetwork;
    if (network === null || isBuiltInNetwork(network)) continue;
    out.push({ itemId: i.id, network, mapping });
  }
  return out;
}

/** The networks a recovery host reported in its last heartbeat: name -> its bridge exists. */
export function hostNetworks(h: Component): Map<string, boolean> {
  return reportedNetworks(h.health);
}

/**
 * What is wrong with the machines' mapped networks on the chosen recovery host (or, chosen
 * automatically, on every healthy one): the vault's LB_VAULT_NETWORK_UNAVAILABLE, as you type.
 */
export function networkErrors(
  needs: MappedNetwork[],
  hostId: string,
  hosts: Component[] | undefined,
): Record<string, string | undefined> {
  if (needs.length === 0 || hosts === undefined) return {};
  const names = [...new Set(needs.map((n) => n.network))];
  const lacks = (h: Component) => names.filter((n) => hostNetworks(h).get(n) !== true);
  if (hostId === '') {
    const healthy = hosts.filter((h) => h.status === 'healthy');
    if (healthy.length === 0 || healthy.some((h) => lacks(h).length === 0)) return {};
    return {
      network: `No healthy recovery host has network ${lacks(healthy[0]!).join(', ')} with its bridge. Start one with --network ${names[0]}=bridge:<bridge>, or fix the network mapping.`,
    };
  }
  const h = hosts.find((x) => x.id === hostId);
  if (h === undefined || h.status !== 'healthy') return {};
  const missing = lacks(h);
  if (missing.length === 0) return {};
  const declared = missing.filter((n) => hostNetworks(h).has(n));
  return {
    network:
      declared.length > 0
        ? `${h.name} declares network ${declared.join(', ')}, but its bridge does not exist there. Create the bridge, or choose another recovery host.`
        : `${h.name} has no network ${missing.join(', ')} (it has ${[...hostNetworks(h).keys()].join(', ') || 'none'}). Start it with --network ${missing[0]}=bridge:<bridge>, or choose another recovery host.`,
  };
}

/** The sentence saying which network the machines boot on. */
export function networkWords(
  needs: MappedNetwork[],
  count: number,
  nameOf: (itemId: string) => string,
  isolated: string,
): string {
  if (needs.length === 0) return isolated;
  const on = needs.map(
    (n) => `${count > 1 ? `${nameOf(n.itemId)}: ` : ''}${n.network} (mapping ${n.mapping.name})`,
  );
  const rest = count - needs.length;
  return `${on.join('; ')}${rest > 0 ? `; the other ${rest === 1 ? 'machine' : `${rest} machines`}: ${isolated.toLowerCase()}` : ''}`;
}

/** The recovery host: automatic (the healthy one with the fewest runs) or a named one. */
export function RecoveryHostField(props: {
  value: string;
  onChange: (id: string) => void;
  hosts: Component[] | undefined;
  f: FieldErrors;
}) {
  const { f } = props;
  return (
    <div className="field">
      <label htmlFor={f.input('host')['id'] as string}>Recovery host</label>
      <select
        value={props.value}
        {...f.input('host')}
        onChange={(e) => {
          f.touch('host');
          props.onChange(e.target.value);
        }}
      >
        <option value="">Automatic (the healthy host with the fewest runs)</option>
        {(props.hosts ?? []).map((h) => {
          const nets = [...hostNetworks(h).keys()];
          return (
            <option key={h.id} value={h.id}>
              {h.name} ({h.status}
              {nets.length > 0 ? `; networks ${nets.join(', ')}` : ''})
            </option>
          );
        })}
      </select>
      {f.error('host')}
    </div>
  );
}

/** Where a run lives in the API (under /api) and the portal. */
export function runPath(kind: 'test-failover' | 'failover', id: string): string {
  return `/${kind === 'failover' ? 'failovers' : 'test-failovers'}/${encodeURIComponent(id)}`;
}

/** A run's state as a badge. */
export function RunState({ state }: { state: string }) {
  const tone =
    state === 'failed'
      ? 'failed'
      : state === 'running' || state === 'booted' || state === 'hydrated' || state === 'cleaned-up'
        ? 'succeeded'
        : state === 'committed'
          ? 'succeeded'
          : 'running';
  return <Badge value={tone} label={state} />;
}

/** The vault's field paths of a recovery run's request (point, network, checks, host, boot), as the wizards name the fields. */
export const RUN_API_FIELDS: Readonly<Record<string, string>> = {
  point: 'mode',
  'point.at': 'at',
  'point.pointId': 'pointId',
  'point.pick': 'mode',
  network: 'network',
  'networkMapping.targetNetwork': 'network',
  'networkMapping.testNetwork': 'network',
  'verify.console': 'console',
  'verify.guestPort': 'guestPort',
  'verify.expect': 'expect',
  verify: 'console',
  recoveryHostId: 'host',
  boot: 'how',
  'boot.kernel': 'kernel',
  'boot.append': 'append',
  'boot.initrd': 'initrd',
  cpus: 'cpus',
  memoryMiB: 'memoryMiB',
};

/** The fields of a recovery wizard's point step. */
export const POINT_STEP_FIELDS = ['mode', 'at', 'pointId'] as const;
/** The fields of a recovery wizard's network-and-checks step. */
export const CHECK_STEP_FIELDS = [
  'network',
  'console',
  'guestPort',
  'expect',
  'host',
  'how',
  'kernel',
  'append',
  'initrd',
  'cpus',
  'memoryMiB',
] as const;

/** Which wizard step shows each field: the point's fields on one, the checks' on another, plus a page's own. */
export function fieldSteps(
  pointStep: number,
  checkStep: number,
  own: Record<string, number>,
): Record<string, number> {
  const steps: Record<string, number> = { ...own };
  for (const f of POINT_STEP_FIELDS) steps[f] = pointStep;
  for (const f of CHECK_STEP_FIELDS) steps[f] = checkStep;
  return steps;
}
