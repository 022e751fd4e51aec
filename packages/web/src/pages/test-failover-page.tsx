import { useEffect, useState } from 'react';
import { api, query, type Page } from '../api';
import { useFieldErrors } from '../form';
import { ago, STATE_LABELS } from '../format';
import { useMachines } from '../names';
import { navigate, useLocation } from '../router';
import type { ProtectedItem, RecoveryRun } from '../types';
import { useApi } from '../use-api';
import { Badge, ErrorBox, PageHeader } from '../ui';
import { useRunWizard, WizardButtons, WizardSteps } from '../wizard';
import {
  BOOT_DEFAULT,
  bootBody,
  bootErrors,
  BootFields,
  CHECK_STEP_FIELDS,
  hostErrors,
  mappedNetworks,
  networkErrors,
  networkWords,
  pointChoice,
  pointErrors,
  PointFields,
  POINT_STEP_FIELDS,
  pointSelector,
  pointWords,
  RecoveryHostField,
  useNetworkMappings,
  useRecoveryHosts,
  VERIFY_DEFAULT,
  verifyBody,
  verifyErrors,
  VerifyFields,
  fieldSteps,
  RUN_API_FIELDS,
} from './recovery-fields';

const STEPS = ['Machines', 'Recovery point', 'Network and checks', 'Review'] as const;
// Which step shows each field (to go back to the field the vault refused).
const FIELD_STEP = fieldSteps(1, 2, { machines: 0, group: 0 });
const API_FIELDS: Record<string, string> = {
  protectedItemIds: 'machines',
  consistencyGroup: 'group',
  ...RUN_API_FIELDS,
};

/** Items the vault boots: not enabling or disabled, with a point of every disk. */
const bootable = (i: ProtectedItem) =>
  i.lastPointAt !== null && i.state !== 'enabling' && i.state !== 'disabled';

/**
 * The test-failover wizard: machines (chosen one by one, or a consistency group), the point,
 * the isolated network and the boot checks, a review; then the run's page shows the boot
 * result with its screenshot, and its cleanup. Opened from a machine's timeline with the
 * machine (and point) filled in. The rules are the vault's, checked as the operator types.
 */
export function TestFailoverPage() {
  const { params } = useLocation();
  const [by, setBy] = useState<'machines' | 'group'>('machines');
  const [chosen, setChosen] = useState<string[]>(() =>
    (params.get('item') ?? '').split(',').filter((s) => s !== ''),
  );
  const [search, setSearch] = useState('');
  const [group, setGroup] = useState('');
  const [point, setPoint] = useState(() => pointChoice(params.get('point') ?? undefined));
  const [network, setNetwork] = useState<'' | 'isolated-user' | 'segment'>('');
  const [verify, setVerify] = useState(VERIFY_DEFAULT);
  const [hostId, setHostId] = useState('');
  const [boot, setBoot] = useState(BOOT_DEFAULT);

  const found = useApi<Page<ProtectedItem>>(
    by === 'machines' ? `/api/protected-items${query({ q: search, limit: 20 })}` : null,
  );
  const members = useApi<Page<ProtectedItem>>(
    by === 'group' && group.trim() !== ''
      ? `/api/protected-items${query({ consistencyGroup: group.trim(), limit: 100 })}`
      : null,
  );
  const [known, setKnown] = useState<Record<string, ProtectedItem>>({});
  useEffect(() => {
    const add = (items: ProtectedItem[] | undefined) =>
      items !== undefined && items.length > 0
        ? setKnown((k) => ({ ...k, ...Object.fromEntries(items.map((i) => [i.id, i])) }))
        : undefined;
    add(found.data?.items);
    add(members.data?.items);
  }, [found.data, members.data]);
  // Items that came with the link are looked up once.
  useEffect(() => {
    for (const id of chosen) {
      if (known[id] !== undefined) continue;
      void api<ProtectedItem>('GET', `/api/protected-items/${encodeURIComponent(id)}`).then(
        (i) => setKnown((k) => ({ ...k, [i.id]: i })),
        () => undefined,
      );
    }
  }, [chosen.join(',')]);
  const machines = useMachines(Object.values(known).map((i) => i.machineId));
  const nameOf = (id: string) => {
    const i = known[id];
    return i === undefined ? id : (machines[i.machineId]?.name ?? i.machineId);
  };
  const hosts = useRecoveryHosts();
  const mappings = useNetworkMappings();

  const groupMembers = (members.data?.items ?? []).filter((i) => i.state !== 'disabled');
  const targets =
    by === 'machines' ? chosen : group.trim() === '' ? [] : groupMembers.map((i) => i.id);
  const oneItem = targets.length === 1 ? targets[0] : undefined;

  const errors: Record<string, string | undefined> = {};
  if (by === 'machines') {
    if (chosen.length === 0) errors['machines'] = 'Choose at least one machine.';
    else if (chosen.length > 20) errors['machines'] = 'At most 20 machines in one test failover.';
    else {
      const none = chosen.filter((id) => known[id] !== undefined && !bootable(known[id]));
      if (none.length > 0)
        errors['machines'] =
          `${none.map(nameOf).join(', ')}: no recovery point of every disk to boot yet (or disabled).`;
    }
  } else if (group.trim() === '') errors['group'] = 'Enter the consistency group.';
  else if (group.length > 200) errors['group'] = 'At most 200 characters.';
  else if (members.data !== undefined && groupMembers.length === 0)
    errors['group'] = `No protected machine is in group "${group.trim()}".`;
  Object.assign(errors, pointErrors(point, targets.length));
  Object.assign(errors, verifyErrors(verify));
  Object.assign(errors, hostErrors(hostId, hosts.data?.items));
  // Machines whose network mapping names a test network boot on it when the network is automatic.
  const needs = mappedNetworks(
    'test-failover',
    targets.map((id) => known[id]),
    mappings.data?.items,
    network !== '',
  );
  Object.assign(errors, networkErrors(needs, hostId, hosts.data?.items));
  Object.assign(errors, bootErrors(boot));
  const f = useFieldErrors('tf', errors, API_FIELDS);
  const { step, setStep, busy, refusal, next } = useRunWizard({
    prefix: 'tf',
    f,
    stepFields: [
      by === 'machines' ? ['machines'] : ['group'],
      POINT_STEP_FIELDS,
      CHECK_STEP_FIELDS,
      [],
    ],
    fieldStep: FIELD_STEP,
    // Start at the point step when the machine (and point) came with the link.
    initialStep: chosen.length > 0 && params.get('point') !== null ? 1 : 0,
    submit: async () => {
      const run = await api<RecoveryRun & { jobId: string }>('POST', '/api/test-failovers', {
        ...(by === 'machines' ? { protectedItemIds: chosen } : { consistencyGroup: group.trim() }),
        point: pointSelector(point),
        ...(network !== '' ? { network } : {}),
        verify: verifyBody(verify),
        ...(hostId !== '' ? { recoveryHostId: hostId } : {}),
        ...bootBody(boot),
      });
      navigate(`/test-failovers/${encodeURIComponent(run.id)}`);
    },
  });

  const toggle = (id: string, on: boolean) => {
    f.touch('machines');
    setChosen((c) => (on ? [...new Set([...c, id])] : c.filter((x) => x !== id)));
  };

  return (
    <>
      <PageHeader title="Test failover" />
      <p className="muted">
        Boots recovery points on a recovery host in an isolated network, checks that they boot, and
        leaves production untouched (replication goes on). Clean up when you are done.
      </p>
      <WizardSteps steps={STEPS} step={step} />
      <ErrorBox error={found.error ?? members.error ?? hosts.error ?? refusal} />
      <form onSubmit={next} noValidate className="card wizard" aria-label="Test failover">
        {step === 0 ? (
          <>
            <fieldset className="field">
              <legend>Boot</legend>
              <label className="choice">
                <input
                  type="radio"
                  name="tf-by"
                  checked={by === 'machines'}
                  onChange={() => setBy('machines')}
                />{' '}
                Machines I choose
              </label>
              <label className="choice">
                <input
                  type="radio"
                  name="tf-by"
                  checked={by === 'group'}
                  onChange={() => setBy('group')}
                />{' '}
                A consistency group (its machines boot from one cut, on one private network)
              </label>
            </fieldset>
            {by === 'machines' ? (
              <fieldset className="field" {...f.input('machines')}>
                <legend>Machines ({chosen.length} chosen)</legend>
                {chosen.length > 0 ? (
                  <ul className="plain" data-testid="tf-chosen">
                    {chosen.map((id) => (
                      <li key={id}>
                        <strong>{nameOf(id)}</strong>{' '}
                        <button type="button" onClick={() => toggle(id, false)}>
                          Remove<span className="sr-only"> {nameOf(id)}</span>
                        </button>
                      </li>
                    ))}
                  </ul>
                ) : null}
                <label htmlFor="tf-search" className="sr-only">
                  Find machines by name
                </label>
                <input
                  id="tf-search"
                  type="search"
                  placeholder="Find by name"
                  value={search}
                  onChange={(e) => setSearch(e.target.value)}
                />
                <ul className="plain choices" data-testid="tf-candidates">
                  {(found.data?.items ?? []).map((i) => (
                    <li key={i.id}>
                      <label>
                        <input
                          type="checkbox"
                          checked={chosen.includes(i.id)}
                          disabled={!bootable(i) && !chosen.includes(i.id)}
                          onChange={(e) => toggle(i.id, e.target.checked)}
                        />{' '}
                        {machines[i.machineId]?.name ?? i.machineId}{' '}
                        <Badge value={i.state} label={STATE_LABELS[i.state] ?? i.state} />{' '}
                        <span className="muted small">
                          {i.lastPointAt === null
                            ? 'no recovery point yet'
                            : `last point ${ago(i.lastPointAt)}`}
                        </span>
                      </label>
                    </li>
                  ))}
                </ul>
                {f.error('machines')}
              </fieldset>
            ) : (
              <div className="field">
                <label htmlFor="tf-group">Consistency group</label>
                <input
                  type="text"
                  value={group}
                  {...f.input('group')}
                  onChange={(e) => {
                    f.touch('group');
                    setGroup(e.target.value);
                  }}
                />
                {f.error('group')}
                {groupMembers.length > 0 ? (
                  <p className="muted small" data-testid="tf-members">
                    {groupMembers.length} {groupMembers.length === 1 ? 'machine' : 'machines'}:{' '}
                    {groupMembers.map((i) => nameOf(i.id)).join(', ')}
                  </p>
                ) : null}
              </div>
            )}
          </>
        ) : null}
        {step === 1 ? (
          <PointFields value={point} onChange={setPoint} itemId={oneItem} f={f} />
        ) : null}
        {step === 2 ? (
          <>
            <fieldset className="field" id="tf-network">
              <legend>Isolated network</legend>
              {(
                [
                  [
                    '',
                    'Automatic: the test network of each machine’s network mapping where it names one; otherwise no network for one machine, a private segment for several',
                  ],
                  ['isolated-user', 'No network (user networking restricted: reaches nothing)'],
                  ['segment', 'A private segment only these machines share'],
                ] as const
              ).map(([v, label]) => (
                <label key={v} className="choice">
                  <input
                    type="radio"
                    name="tf-network-radio"
                    checked={network === v}
                    onChange={() => {
                      f.touch('network');
                      setNetwork(v);
                    }}
                  />{' '}
                  {label}
                </label>
              ))}
              {f.error('network')}
            </fieldset>
            <VerifyFields value={verify} onChange={setVerify} f={f} />
            <RecoveryHostField
              value={hostId}
              onChange={setHostId}
              hosts={hosts.data?.items}
              f={f}
            />
            <BootFields value={boot} onChange={setBoot} f={f} />
          </>
        ) : null}
        {step === 3 ? (
          <dl className="facts" data-testid="tf-review">
            <dt>Machines</dt>
            <dd>
              {by === 'group' ? `Group ${group.trim()}: ` : ''}
              {targets.map(nameOf).join(', ')}
            </dd>
            <dt>Point</dt>
            <dd>{pointWords(pointSelector(point))}</dd>
            <dt>Network</dt>
            <dd>
              {network === ''
                ? networkWords(
                    needs,
                    targets.length,
                    nameOf,
                    targets.length > 1 ? 'A private segment (automatic)' : 'No network (automatic)',
                  )
                : network === 'segment'
                  ? 'A private segment'
                  : 'No network'}
            </dd>
            <dt>Checks</dt>
            <dd>
              {[
                verify.console !== '' ? `console shows /${verify.console}/` : '',
                verify.guestPort !== ''
                  ? `port ${verify.guestPort} answers${verify.expect !== '' ? ` /${verify.expect}/` : ''}`
                  : '',
                verify.screenshot ? 'screenshot' : '',
              ]
                .filter((s) => s !== '')
                .join(', ') || 'It starts'}
            </dd>
            <dt>Recovery host</dt>
            <dd>
              {hostId === ''
                ? 'Automatic'
                : (hosts.data?.items.find((h) => h.id === hostId)?.name ?? hostId)}
            </dd>
          </dl>
        ) : null}
        <WizardButtons
          step={step}
          steps={STEPS.length}
          busy={busy}
          onBack={() => setStep((s) => s - 1)}
          cancelTo="/recovery"
          finish="Start test failover"
          finishing="Starting…"
        />
      </form>
    </>
  );
}
