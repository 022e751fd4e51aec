import { useState, type FormEvent, type ReactNode } from 'react';
import { ApiError } from './api';
import type { FieldErrors } from './form';
import { Link } from './router';

/** The numbered list of a wizard's steps, the current one marked for screen readers too. */
export function WizardSteps({ steps, step }: { steps: readonly string[]; step: number }) {
  return (
    <ol className="wizard-steps" aria-label="Steps">
      {steps.map((s, i) => (
        <li key={s} aria-current={i === step ? 'step' : undefined}>
          {i + 1}. {s}
        </li>
      ))}
    </ol>
  );
}

/**
 * Back (or Cancel on the first step) and Next (the form's submit), and on the last step the
 * button that does the work: a submit as well, so Enter in the last field does it too.
 */
export function WizardButtons(props: {
  step: number;
  steps: number;
  busy: boolean;
  onBack: () => void;
  /** Where Cancel leads. */
  cancelTo: string;
  /** The last button's words, and while it works. */
  finish: ReactNode;
  finishing: ReactNode;
  /** `danger` for what cannot be undone. @default 'primary' */
  kind?: 'primary' | 'danger';
}) {
  return (
    <div className="wizard-buttons">
      {props.step > 0 ? (
        <button type="button" onClick={props.onBack} disabled={props.busy}>
          Back
        </button>
      ) : (
        <Link to={props.cancelTo}>Cancel</Link>
      )}
      {props.step < props.steps - 1 ? (
        <button type="submit" className="primary">
          Next
        </button>
      ) : (
        <button type="submit" className={props.kind ?? 'primary'} disabled={props.busy}>
          {props.busy ? props.finishing : props.finish}
        </button>
      )}
    </div>
  );
}

/** What {@link useRunWizard} gives a wizard page. */
export interface RunWizard {
  step: number;
  setStep: (step: number | ((s: number) => number)) => void;
  busy: boolean;
  /** The vault's refusal of the last submit, to show in the page's error box. */
  refusal: ApiError | undefined;
  /** The form's submit: checks this step's fields, then goes on or, on the last step, submits. */
  next: (e: FormEvent) => void;
}

/**
 * The steps of a wizard that ends in one API call (a failover, a test failover): Next checks
 * the fields of the step shown and focuses the first wrong one (`<prefix>-<field>`); the last
 * step checks every field, going back to the step of the first wrong one, then runs `submit`;
 * a refusal by the vault is kept for the error box and shown at the field it names, on its step.
 */
export function useRunWizard(options: {
  prefix: string;
  f: FieldErrors;
  /** The fields each step shows, in step order. */
  stepFields: readonly (readonly string[])[];
  /** The step of each field the vault may name. */
  fieldStep: Readonly<Record<string, number>>;
  submit: () => Promise<void>;
  /** The step to open on. @default 0 */
  initialStep?: number;
}): RunWizard {
  const { prefix, f, stepFields, fieldStep, submit } = options;
  const [step, setStep] = useState(options.initialStep ?? 0);
  const [busy, setBusy] = useState(false);
  const [refusal, setRefusal] = useState<ApiError>();
  const start = async () => {
    const bad = f.attempt(stepFields.flat());
    if (bad !== undefined) {
      setStep(fieldStep[bad] ?? 0);
      return;
    }
    setBusy(true);
    setRefusal(undefined);
    try {
      await submit();
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      setRefusal(err);
      const ours = f.refused(err);
      if (ours !== undefined) setStep(fieldStep[ours] ?? step);
    } finally {
      setBusy(false);
    }
  };
  const next = (e: FormEvent) => {
    e.preventDefault();
    const bad = f.attempt([...(stepFields[step] ?? [])]);
    if (bad !== undefined) {
      document.getElementById(`${prefix}-${bad}`)?.focus();
      return;
    }
    if (step < stepFields.length - 1) setStep((s) => s + 1);
    else if (!busy) void start();
  };
  return { step, setStep, busy, refusal, next };
}
