import { LifeboatError } from '@lifeboat/protocol/errors';
import type { CliIo } from './cli-context.js';

/**
 * Asks for a secret on the terminal without echoing it. Only called when stdin is a TTY;
 * Ctrl-C aborts with LB_CLI_ABORTED, Ctrl-D ends the input.
 */
export function promptHidden(prompt: string, io: CliIo): Promise<string> {
  const { stdin, stderr } = io;
  return new Promise((resolvePromise, reject) => {
    let value = '';
    stderr.write(prompt);
    const wasRaw = stdin.setRawMode !== undefined;
    stdin.setRawMode?.(true);
    stdin.setEncoding?.('utf8');
    const finish = (err?: Error): void => {
      stdin.removeListener('data', onData);
      if (wasRaw) stdin.setRawMode?.(false);
      stdin.pause();
      stderr.write('\n');
      if (err === undefined) resolvePromise(value);
      else reject(err);
    };
    const onData = (chunk: string | Buffer): void => {
      for (const ch of String(chunk)) {
        if (ch === '\r' || ch === '\n' || ch === '\u0004') return finish();
        if (ch === '\u0003') {
          return finish(new LifeboatError('LB_CLI_ABORTED', 'Interrupted at the prompt.'));
        }
        if (ch === '\u007f' || ch === '\b') value = value.slice(0, -1);
        else value += ch;
      }
    };
    stdin.on('data', onData);
    stdin.resume();
  });
}
