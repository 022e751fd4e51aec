import type { CliIo } from './cli-context.js';
import { formatTable } from './format.js';

/**
 * Prints a command's result: human text by default, one JSON document on stdout with --json.
 * Commands call both `human` and `json`; the printer keeps only what the mode wants.
 */
export class CliPrinter {
  constructor(
    private readonly io: CliIo,
    /** True with --json. */
    readonly jsonMode: boolean,
  ) {}

  /** A line of human output (dropped in JSON mode). */
  line(text = ''): void {
    if (!this.jsonMode) this.io.stdout.write(`${text}\n`);
  }

  /** An aligned table (dropped in JSON mode). */
  table(
    headers: readonly string[],
    rows: ReadonlyArray<readonly string[]>,
    right?: Set<number>,
  ): void {
    if (!this.jsonMode) this.io.stdout.write(formatTable(headers, rows, right));
  }

  /** The JSON result (printed only in JSON mode), one document per command. */
  json(value: unknown): void {
    if (this.jsonMode) this.io.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
  }

  /** A note on stderr for humans (dropped in JSON mode so stderr stays quiet for scripts). */
  note(text: string): void {
    if (!this.jsonMode) this.io.stderr.write(`${text}\n`);
  }
}
