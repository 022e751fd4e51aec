import { execFile } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { existsSync } from 'node:fs';
import { copyFile, mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import type { CliInput } from './cli-context.js';
import { runCli } from './main.js';

const exec = promisify(execFile);
const packaging = join(import.meta.dirname, '..', '..', '..', 'packaging');

async function help(args: string[]): Promise<string> {
  let stdout = '';
  const stdin = Object.assign(new EventEmitter(), {
    isTTY: false,
    resume: () => undefined,
    pause: () => undefined,
  }) as CliInput;
  const code = await runCli([...args, '--help'], {
    io: {
      stdout: { write: (s: string) => (stdout += s) },
      stderr: { write: () => undefined, isTTY: false },
      stdin,
      env: {},
      cwd: tmpdir(),
    },
  });
  expect(code).toBe(0);
  return stdout;
}

/** The unit's ExecStart as words, continuation lines joined. */
function execStart(unit: string): string[] {
  const m = /^ExecStart=((?:.*\\\n)*.*)$/m.exec(unit);
  return (m?.[1] ?? '').replace(/\\\n/g, ' ').trim().split(/\s+/);
}

describe('systemd units in packaging/', () => {
  it('run `lifeboat agent start` with options it has (also those the comments suggest)', async () => {
    const units = (await readdir(packaging)).filter((f) => f.endsWith('.service'));
    expect(units.sort()).toEqual(['lifeboat-agent.service', 'lifeboat-agent@.service']);
    const options = await help(['agent', 'start']);
    for (const name of units) {
      const unit = await readFile(join(packaging, name), 'utf8');
      for (const section of ['[Unit]', '[Service]', '[Install]'])
        expect(unit, `${name} ${section}`).toContain(`\n${section}\n`);
      const words = execStart(unit);
      expect(words.slice(0, 3), name).toEqual(['/usr/bin/lifeboat', 'agent', 'start']);
      // Every option of the command line and of the comments' LIFEBOAT_AGENT_ARGS examples
      // (not systemctl's).
      const comments = unit
        .split('\n')
        .filter((l) => l.startsWith('#') && !l.includes('systemctl'))
        .join('\n');
      const flags = new Set(
        [
          ...words.filter((w) => w.startsWith('--')),
          ...(comments.match(/--[a-z][a-z-]*/g) ?? []),
        ].map((f) => f.replace(/=.*$/, '')),
      );
      for (const f of flags) expect(options, `${name}: ${f}`).toMatch(new RegExp(`${f}[ ,<]`));
      // The template protects one machine (--qmp, its id from the instance name); the host unit
      // is managed by the vault and gets its machines from their assignments.
      if (name.includes('@')) expect(words).toEqual(expect.arrayContaining(['--qmp', '--machine']));
      else expect(words).not.toContain('--qmp');
      expect(words).toEqual(expect.arrayContaining(['--process-server', '--state-dir']));
    }
  });

  it.skipIf(!existsSync('/usr/bin/systemd-analyze'))(
    'pass systemd-analyze verify but for the binary, which a package installs',
    async () => {
      const dir = await mkdtemp(join(tmpdir(), 'lifeboat-units-'));
      try {
        await copyFile(
          join(packaging, 'lifeboat-agent.service'),
          join(dir, 'lifeboat-agent.service'),
        );
        await copyFile(
          join(packaging, 'lifeboat-agent@.service'),
          join(dir, 'lifeboat-agent@vm1.service'),
        );
        const r = await exec('systemd-analyze', [
          'verify',
          join(dir, 'lifeboat-agent.service'),
          join(dir, 'lifeboat-agent@vm1.service'),
        ]).catch((e: { stdout?: string; stderr?: string }) => e);
        const lines = `${r.stdout ?? ''}\n${r.stderr ?? ''}`
          .split('\n')
          .map((l) => l.trim())
          .filter(Boolean);
        const other = lines.filter(
          (l) => !/Command \/usr\/bin\/lifeboat is not executable/.test(l),
        );
        expect(other).toEqual([]);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    },
  );
});
