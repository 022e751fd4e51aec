import { useState } from 'react';
import { api, query, type Page } from '../api';
import { useFieldErrors } from '../form';
import { STATE_LABELS } from '../format';
import { useMachines } from '../names';
import { Link, navigate, useLocation } from '../router';
import type { Component, ProtectedItem, RecoveryRun } from '../types';
import { useApi } from '../use-api';
import { ErrorBox, PageHeader } from '../ui';
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

const STEPS = ['Recovery point', 'Network and checks', 'Confirm'] as const;
const FIELD_STEP = fieldSteps(0, 1, { item: 0, confirm: 2 });
const API_FIELDS: Record<string, string> = { protectedItemId: 'item', ...RUN_API_FIELDS };

/**
 * The failover wizard for one protected machine: unplanned from a chosen point, or planned (a
 * last sync of the running source, then it stops); the network (its network mapping's target
 * network, on a recovery host that has it, else the isolated one), checks, recovery host and
 * boot; a confirmation by typing the machine's name. Then the run's page offers change of point and
 * commit. The rules are the vault's, checked as the operator types.
 */
export function FailoverPage() {
  const { params } = useLocation();
  const itemId = params.get('item') ?? '';
  const item = useApi<ProtectedItem>(
    itemId === '' ? null : `/api/protected-items/${encodeURIComponent(itemId)}`,
  );
  const machines = useMachines(item.data === undefined ? [] : [item.data.machineId]);
  const name = item.data === undefined ? itemId : (machines[item.data.machineId]?.name ?? '');
  const hosts = useRecoveryHosts();
  const mappings = useNetworkMappings();
  const [planned, setPlanned] = useState(false);
  const [point, setPoint] = useState(() => pointChoice(params.get('point') ?? undefined));
  const [verify, setVerify] = useState(VERIFY_DEFAULT);
  const [hostId, setHostId] = useState('');
  const [boot, setBoot] = useState(BOOT_DEFAULT);
  const [confirm, setConfirm] = useState('');

  // The vault allows one failover per item at a time, and another only after one failed.
  const runs = useApi<Page<RecoveryRun>>(
    itemId === '' ? null : `/api/failovers${query({ protectedItemId: itemId, limit: 20 })}`,
  );
  const active = runs.data?.items.find((r) => r.state !== 'failed');
  const lastFailed = runs.data?.items[0]?.state === 'failed';
  const ps = useApi<Component>(
    item.data === undefined
      ? null
      : `/api/process-servers/${encodeURIComponent(item.data.processServerId)}`,
  );

  const errors: Record<string, string | undefined> = {};
  const state = item.data?.state;
  if (itemId === '') errors['item'] = 'Open this wizard from a machine’s page.';
  else if (active !== undefined)
    errors['item'] =
      `${name} already has a failover (${active.state}); change its point or commit it on its page.`;
  else if (
    state !== undefined &&
    !(state === 'protected' || state === 'resync-needed' || (state === 'failed-over' && lastFailed))
  )
    errors['item'] =
      `${name} is ${STATE_LABELS[state] ?? state}; a failover needs it protected or needing a resync.`;
  if (planned && ps.data !== undefined && ps.data.status !== 'healthy')
    errors['mode'] =
      `Its process server ${ps.data.name} sends no heartbeats, so it cannot sync a last time and stop the source. Choose an unplanned failover.`;
  if (!planned) Object.assign(errors, pointErrors(point, 1));
  Object.assign(errors, verifyErrors(verify));
  Object.assign(errors, hostErrors(hostId, hosts.data?.items));
  const needs = mappedNetworks('failover', [item.data], mappings.data?.items);
  Object.assign(errors, networkErrors(needs, hostId, hosts.data?.items));
  Object.assign(errors, bootErrors(boot));
  const isolated =
    'No network: user networking restricted so the machine reaches nothing (the checked guest port is forwarded from the recovery host’s 127.0.0.1)';
  const networkText = networkWords(needs, 1, () => name, isolated);
  if (confirm.trim() !== name) errors['confirm'] = `Type ${name} to confirm.`;
  const f = useFieldErrors('fo', errors, API_FIELDS);
  const { step, setStep, busy, refusal, next } = useRunWizard({
    prefix: 'fo',
    f,
    stepFields: [['item', ...POINT_STEP_FIELDS], CHECK_STEP_FIELDS, ['confirm']],
    fieldStep: FIELD_STEP,
    submit: async () => {
      const run = await api<RecoveryRun>('POST', '/api/failovers', {
        protectedItemId: itemId,
        ...(planned ? { planned: true } : { point: pointSelector(point) }),
        verify: verifyBody(verify),
        ...(hostId !== '' ? { recoveryHostId: hostId } : {}),
        ...bootBody(boot),
      });
      navigate(`/failovers/${encodeURIComponent(run.id)}`);
    },
  });

  return (
    <>
      <p className="crumbs">
        <Link to={`/machines/${encodeURIComponent(itemId)}`}>{name || 'Machine'}</Link> /
      </p>
      <PageHeader title={`Fail over ${name}`} />
      <p className="muted">
        Boots the machine on a recovery host for real: the vault stops replicating it once it runs.
        You can still change the point until you commit.
      </p>
      <WizardSteps steps={STEPS} step={step} />
      <ErrorBox error={item.error ?? hosts.error ?? refusal} />
      {active !== undefined ? (
        <p>
          <Link to={`/failovers/${encodeURIComponent(active.id)}`}>Open its failover</Link>
        </p>
      ) : null}
      <form onSubmit={next} noValidate className="card wizard" aria-label="Failover">
        {f.error('item')}
        {step === 0 ? (
          <>
            <fieldset className="field">
              <legend>Kind of failover</legend>
              <label className="choice">
                <input
                  type="radio"
                  name="fo-kind"
                  id="fo-mode"
                  checked={!planned}
                  onChange={() => setPlanned(false)}
                />{' '}
                Unplanned: the source is lost; boot a recovery point
              </label>
              <label className="choice">
                <input
                  type="radio"
                  name="fo-kind"
                  checked={planned}
                  onChange={() => setPlanned(true)}
                />{' '}
                Planned: the source still runs; sync it one last time, stop it, boot that point (no
                data lost)
              </label>
            </fieldset>
            {!planned ? (
              <PointFields value={point} onChange={setPoint} itemId={itemId || undefined} f={f} />
            ) : null}
          </>
        ) : null}
        {step === 1 ? (
          <>
            <div className="field" id="fo-network">
              <span className="label">Network</span>
              <p className="muted" data-testid="fo-network">
                {needs.length > 0
                  ? `${networkText}: the recovery host attaches its network interfaces to that network’s bridge.`
                  : item.data?.networkMappingId !== null && item.data !== undefined
                    ? `${isolated}. Its network mapping names no recovery-site bridge network.`
                    : `${isolated}. Give the machine a network mapping to fail over onto a real network.`}
              </p>
              {f.error('network')}
            </div>
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
        {step === 2 ? (
          <>
            <dl className="facts" data-testid="fo-review">
              <dt>Machine</dt>
              <dd>{name}</dd>
              <dt>Point</dt>
              <dd>
                {planned
                  ? 'Planned: a last sync, then the source stops'
                  : pointWords(pointSelector(point))}
              </dd>
              <dt>Network</dt>
              <dd>{networkText}</dd>
              <dt>Recovery host</dt>
              <dd>
                {hostId === ''
                  ? 'Automatic'
                  : (hosts.data?.items.find((h) => h.id === hostId)?.name ?? hostId)}
              </dd>
            </dl>
            <div className="field">
              <label htmlFor="fo-confirm">Type the machine’s name to confirm</label>
              <input
                type="text"
                autoComplete="off"
                value={confirm}
                {...f.input('confirm')}
                onChange={(e) => {
                  f.touch('confirm');
                  setConfirm(e.target.value);
                }}
              />
              {f.error('confirm')}
            </div>
          </>
        ) : null}
        <WizardButtons
          step={step}
          steps={STEPS.length}
          busy={busy}
          onBack={() => setStep((s) => s - 1)}
          cancelTo={`/machines/${encodeURIComponent(itemId)}`}
          finish="Fail over now"
          finishing="Starting…"
          kind="danger"
        />
      </form>
    </>
  );
}
