import { LifeboatError } from '@lifeboat/protocol/errors';
import type { RetentionPolicy } from '@lifeboat/store';

const DURATION = /^[1-9]\d*(?:s|m|h|d|w)$/;

function checkDuration(value: string, rule: string): string {
  if (!DURATION.test(value)) {
    throw new LifeboatError(
      'LB_CLI_BAD_OPTION',
      `--keep ${rule}: "${value}" is not a duration. Use a number and a unit (s, m, h, d, w), e.g. 24h or 7d.`,
      { details: { option: '--keep', value: rule } },
    );
  }
  return value;
}

/**
 * Builds a retention policy from `--keep` values: `24h` keeps every point of the last 24 hours,
 * `7d:1h` one per hour for 7 days, `90d:1d` one per day for 90 days.
 */
export function parseRetention(keep: readonly string[], keepApp?: string): RetentionPolicy {
  if (keep.length === 0) {
    throw new LifeboatError(
      'LB_CLI_BAD_OPTION',
      'Give at least one --keep rule, e.g. --keep 24h --keep 7d:1h --keep 90d:1d.',
      { details: { option: '--keep' } },
    );
  }
  const rules = keep.map((rule) => {
    const [span, every, ...rest] = rule.split(':');
    if (rest.length > 0 || span === undefined) {
      throw new LifeboatError(
        'LB_CLI_BAD_OPTION',
        `--keep ${rule}: use FOR or FOR:EVERY, e.g. 7d:1h.`,
        {
          details: { option: '--keep', value: rule },
        },
      );
    }
    return every === undefined
      ? { for: checkDuration(span, rule) }
      : { for: checkDuration(span, rule), every: checkDuration(every, rule) };
  });
  return keepApp === undefined
    ? { rules }
    : { rules, keepAppConsistentFor: checkDuration(keepApp, `--keep-app ${keepApp}`) };
}
