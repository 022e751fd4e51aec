import { useState, type ReactElement } from 'react';
import type { ApiError } from './api';

/** What {@link useFieldErrors} gives a form. */
export interface FieldErrors {
  /** The message to show at field `k` now (after it changed or a submit), or undefined. */
  shown(k: string): string | undefined;
  /** Marks a field as changed: its error shows from now on, as the user types. */
  touch(k: string): void;
  /**
   * Marks `keys` as tried (a Next or Submit); returns the first that has an error (focus it)
   * or undefined when they are all valid.
   */
  attempt(keys: string[]): string | undefined;
  /**
   * Shows the vault's refusal at the field it names (`details.field`), if the form has it;
   * returns that field.
   */
  refused(err: ApiError | undefined): string | undefined;
  /** Props for the input of field `k`: its id and, when in error, aria-invalid/describedby. */
  input(k: string): Record<string, string | boolean>;
  /** The error paragraph of field `k` (or nothing). */
  error(k: string): ReactElement | null;
}

/**
 * Field errors of a form with the API's rules checked as the user types: `errors` holds what
 * is wrong now (computed on every render); a field's error shows once it was changed or a
 * step was tried, and the vault's own refusal shows at the field it names. `prefix` makes the
 * element ids (`<prefix>-<field>` and `<prefix>-<field>-error`); `apiFields` maps the
 * vault's field names (`body.verify.guestPort`) to the form's.
 */
export function useFieldErrors(
  prefix: string,
  errors: Record<string, string | undefined>,
  apiFields: Record<string, string> = {},
): FieldErrors {
  const [touched, setTouched] = useState<Set<string>>(new Set());
  const [server, setServer] = useState<{ field: string; message: string }>();
  const shown = (k: string): string | undefined =>
    (touched.has(k) ? errors[k] : undefined) ?? (server?.field === k ? server.message : undefined);
  return {
    shown,
    touch: (k) => {
      if (server?.field === k) setServer(undefined);
      if (!touched.has(k)) setTouched((t) => new Set(t).add(k));
    },
    attempt: (keys) => {
      setTouched((t) => new Set([...t, ...keys]));
      return keys.find((k) => errors[k] !== undefined);
    },
    refused: (err) => {
      const raw = err?.details['field'];
      if (typeof raw !== 'string') {
        setServer(undefined);
        return undefined;
      }
      const bare = raw.replace(/^(body|query|params)\./, '');
      const field =
        apiFields[raw] ??
        apiFields[bare] ??
        Object.entries(apiFields).find(([api]) => bare.startsWith(`${api}.`))?.[1];
      setServer(field === undefined ? undefined : { field, message: err?.message ?? '' });
      return field;
    },
    input: (k) => ({
      id: `${prefix}-${k}`,
      ...(shown(k) !== undefined
        ? { 'aria-invalid': true, 'aria-describedby': `${prefix}-${k}-error` }
        : {}),
    }),
    error: (k) => {
      const msg = shown(k);
      return msg === undefined ? null : (
        <p className="field-error" id={`${prefix}-${k}-error`} role="alert">
          {msg}
        </p>
      );
    },
  };
}

/** True when `s` compiles as a regular expression (the vault checks the same). */
export function isRegExp(s: string): boolean {
  try {
    new RegExp(s);
    return true;
  } catch {
    return false;
  }
}
