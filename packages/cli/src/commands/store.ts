import { basename } from 'node:path';
import { Option } from 'commander';
import type { Command } from 'commander';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol/errors';
import { DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, Store, warmPackBuffer } from '@lifeboat/store';
import type { PointInfo, PointKind, Progress, StoreApi } from '@lifeboat/store';
import type { CliContext } from '../cli-context.js';
import { CliPrinter } from '../cli-printer.js';
import { readPassphrase, requireStore, resolveConfig } from '../config.js';
import type { CliConfig, GlobalCliOptions } from '../config.js';
import { DiskImage } from '../disk-image.js';
import type { ImageFormat } from '../disk-image.js';
import { ExitCode } from '../exit-codes.js';
import { readExtentsFile } from '../extents-file.js';
import { formatBytes, formatRate, formatTime } from '../format.js';
import { importImage, readChangedEarly } from '../import-image.js';
import { describeLocation, openBackend, openStore, storePassphrase } from '../open-store.js';
import { resolvePoint } from '../point-ref.js';
import { ProgressBar } from '../progress-bar.js';
import { restorePoint } from '../restore-point.js';
import { parseRetention } from '../retention-args.js';

interface Setup {
  config: CliConfig;
  out: CliPrinter;
}

function setup(ctx: CliContext, cmd: Command): Setup {
  const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
  return { config, out: new CliPrinter(ctx.io, config.json) };
}

function bar(ctx: CliContext, config: CliConfig, label: string): ProgressBar {
  return new ProgressBar({ out: ctx.io.stderr, enabled: config.progress, label, total: 0 });
}

// The store's own progress reports say their unit; the bar is made on the first report.
class StoreProgress {
  private bar: ProgressBar | undefined;
  constructor(
    private readonly ctx: CliContext,
    private readonly config: CliConfig,
    private readonly label: string,
  ) {}

  readonly update = (p: Progress): void => {
    this.bar ??= new ProgressBar({
      out: this.ctx.io.stderr,
      enabled: this.config.progress,
      label: this.label,
      total: p.total,
      unit: p.unit,
    });
    this.bar.update(p.done, p.total);
  };

  finish(): void {
    this.bar?.finish();
  }
}

function shortId(id: string): string {
  return id.slice(0, 12);
}

function usage(message: string, details: Record<string, unknown> = {}): LifeboatError {
  return new LifeboatError('LB_CLI_BAD_OPTION', message, { details });
}

/** Parses a byte size like `65536`, `64K`, `64KiB`, `1M`. */
function parseSize(option: string, value: string): number {
  const m = /^(\d+)\s*(k|kib|m|mib)?$/i.exec(value.trim());
  if (m === null)
    throw usage(`${option} ${value}: give a size in bytes, e.g. 65536 or 64K.`, { option, value });
  const unit = (m[2] ?? '').toLowerCase();
  const mult = unit.startsWith('k') ? 1024 : unit.startsWith('m') ? 1024 * 1024 : 1;
  return Number(m[1]) * mult;
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function parseLabels(values: readonly string[]): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const v of values) {
    const eq = v.indexOf('=');
    if (eq <= 0) throw usage(`--label ${v}: use KEY=VALUE.`, { option: '--label', value: v });
    labels[v.slice(0, eq)] = v.slice(eq + 1);
  }
  return labels;
}

function pointRow(p: PointInfo): string[] {
  const labels = Object.entries(p.labels)
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
  return [
    shortId(p.id),
    formatTime(p.time),
    p.kind,
    p.machine,
    p.disk,
    formatBytes(p.size),
    labels,
  ];
}

const POINT_HEADERS = ['ID', 'TIME', 'KIND', 'MACHINE', 'DISK', 'SIZE', 'LABELS'];

/** Registers `lifeboat store init|import|points|restore|verify|prune|gc|stats|passwd`. */
export function registerStoreCommands(program: Command, ctx: CliContext): void {
  const store = program
    .command('store')
    .description('the target store: import disk images, list, restore and check recovery points');

  store
    .command('init')
    .description('create a new, empty store at --store with a new passphrase')
    .option(
      '--chunk-size <size>',
      'chunk size, a power of two from 4K to 1M (fixed for the store)',
      '64K',
    )
    .addOption(new Option('--kdf-cost <n>', 'scrypt cost N (tests lower it)').hideHelp())
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/lifeboat store init --passphrase-file pp.txt\n',
    )
    .action(async (opts: { chunkSize: string; kdfCost?: string }, cmd: Command) => {
      const { config, out } = setup(ctx, cmd);
      const location = requireStore(config);
      const chunkSize = parseSize('--chunk-size', opts.chunkSize);
      const kdfCost =
        opts.kdfCost === undefined ? undefined : parseSize('--kdf-cost', opts.kdfCost);
      const passphrase = await storePassphrase(config, ctx, true);
      const backend = await openBackend(location, true);
      let created: StoreApi;
      try {
        created = await Store.init({
          backend,
          passphrase,
          chunkSize,
          ...(kdfCost === undefined ? {} : { kdfCost }),
        });
      } catch (err) {
        await backend.close().catch(() => undefined);
        throw err;
      }
      ctx.cleanups.push(() => created.close());
      out.json({ id: created.id, location: created.location, chunkSize: created.chunkSize });
      out.line(
        `created store ${created.id} at ${describeLocation(location)} (chunk size ${formatBytes(created.chunkSize)})`,
      );
      out.line('Keep the passphrase safe: without it nobody, including you, can read the store.');
    });

  store
    .command('import')
    .description('import a raw or qcow2 disk image as a new recovery point')
    .argument('<image>', 'disk image file (raw or qcow2)')
    .option('--disk <name>', "the disk's name (default: the image file's name)")
    .option('--machine <name>', "the machine's name (default: the disk's name)")
    .option(
      '--changed-extents <file>',
      "read only these ranges (one 'OFFSET LENGTH' in bytes per line) and commit on top of the disk's latest point",
    )
    .addOption(
      new Option('--format <format>', 'image format (default: detected by qemu-img)').choices([
        'raw',
        'qcow2',
      ]),
    )
    .addOption(
      new Option('--kind <kind>', 'consistency of the point')
        .choices(['crash', 'app'])
        .default('crash'),
    )
    .option('--time <iso-time>', 'when the image was taken (default: now)')
    .option('--label <key=value>', 'a label on the point (repeatable)', collect, [])
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/lifeboat --passphrase-file pp.txt store import web-vda.qcow2 --machine web --disk vda\n',
    )
    .action(
      async (
        imagePath: string,
        opts: {
          disk?: string;
          machine?: string;
          changedExtents?: string;
          format?: ImageFormat;
          kind: PointKind;
          time?: string;
          label: string[];
        },
        cmd: Command,
      ) => {
        const { config, out } = setup(ctx, cmd);
        requireStore(config);
        const labels = parseLabels(opts.label);
        let time: Date | undefined;
        if (opts.time !== undefined) {
          time = new Date(opts.time);
          if (Number.isNaN(time.getTime())) {
            throw usage(`--time ${opts.time}: give an ISO time like 2026-11-25T22:00:00Z.`, {
              option: '--time',
            });
          }
        }
        const disk = opts.disk ?? basename(imagePath);
        const machine = opts.machine ?? disk;
        // Unwrapping the key (scrypt, a few hundred ms by design) runs on the thread pool while
        // the image is probed and mapped and the extents are read: they need no key. With a
        // prompt, the image is checked first, so a bad path never waits for a passphrase.
        const early = config.passphrase.kind !== 'prompt';
        // The disk's write lock is taken meanwhile too (prepareWrite).
        const opening = early
          ? openStore(config, ctx, { prepareWrite: { machine, disk } })
          : undefined;
        opening?.catch(() => undefined);
        // Should the command fail before it takes the store (a bad image or extents file), the
        // store still opens: close it then too, which lets go of the prepared lock.
        if (opening !== undefined) {
          ctx.cleanups.push(async () => {
            await (await opening.catch(() => undefined))?.close();
          });
        }
        const image = await DiskImage.open(imagePath, {
          ...(opts.format === undefined ? {} : { format: opts.format }),
          // A changed-extents import is a fraction of a second, of which qemu-img info would
          // be a tenth: a file that plainly is raw is taken as raw (see DiskImageOptions).
          sniffRaw: opts.changedExtents !== undefined,
          signal: ctx.signal,
        });
        ctx.cleanups.push(() => image.close());
        // The map is read ahead while the key unwraps, except where it is not used at all: the
        // changed ranges of a raw file are read as they are (a qemu-img process for nothing
        // took a core for 20-30 ms of a 0.3 s command).
        if (image.info.format !== 'raw' || opts.changedExtents === undefined)
          image.map().catch(() => undefined);
        const changed =
          opts.changedExtents === undefined
            ? undefined
            : await readExtentsFile(opts.changedExtents, image.info.size);
        // Reading the changed ranges needs no key either: start it now, for the store's
        // default chunk size (a store made with another just reads them again).
        const earlyReads =
          changed === undefined || opening === undefined
            ? undefined
            : readChangedEarly(image, changed, DEFAULT_CHUNK_SIZE);
        // The first pack's buffer is touched while the key derives, not while chunks are
        // sealed into it (see warmPackBuffer).
        if (opening !== undefined) void warmPackBuffer(DEFAULT_PACK_SIZE);
        const target = await (opening ??
          openStore(config, ctx, { prepareWrite: { machine, disk } }));
        const progress = bar(ctx, config, 'import');
        const result = await importImage({
          store: target,
          image,
          machine,
          disk,
          ...(changed === undefined ? {} : { changed }),
          ...(earlyReads === undefined ? {} : { early: earlyReads }),
          commit: { kind: opts.kind, labels, ...(time === undefined ? {} : { time }) },
          onProgress: (done, total) => progress.update(done, total),
          signal: ctx.signal,
        });
        progress.finish();
        const seconds = progress.elapsedSeconds();
        out.json({ ...result, format: image.info.format, seconds });
        out.line(
          `point ${result.point.id} of ${machine}/${disk} (${image.info.format}, ${formatBytes(image.info.size)})` +
            (result.base === undefined ? '' : ` on top of ${shortId(result.base)}`),
        );
        out.line(
          `read ${formatBytes(result.bytesRead)} in ${seconds.toFixed(1)} s (${formatRate(result.bytesRead / Math.max(seconds, 1e-3))}); ` +
            `${formatBytes(result.bytesZero)} zero or unallocated of ${formatBytes(result.bytesCovered)} ${changed === undefined ? 'imported' : 'changed'}`,
        );
      },
    );

  store
    .command('points')
    .description('list recovery points, oldest first')
    .option('--machine <name>', 'only this machine')
    .option('--disk <name>', 'only this disk')
    .addOption(
      new Option('--kind <kind>', 'only crash- or app-consistent points').choices(['crash', 'app']),
    )
    .option(
      '--cut <id>',
      "only the points of this cut (one per disk; the cut id a process server's log names)",
    )
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/lifeboat --passphrase-file pp.txt store points --machine web --json\n',
    )
    .action(
      async (
        opts: { machine?: string; disk?: string; kind?: PointKind; cut?: string },
        cmd: Command,
      ) => {
        const { config, out } = setup(ctx, cmd);
        const target = await openStore(config, ctx);
        const points = await target.listPoints({
          ...(opts.machine === undefined ? {} : { machine: opts.machine }),
          ...(opts.disk === undefined ? {} : { disk: opts.disk }),
          ...(opts.cut === undefined ? {} : { cut: opts.cut }),
          ...(opts.kind === undefined ? {} : { kind: opts.kind }),
        });
        const damaged = target.damagedPointObjects().map((d) => ({
          id: d.id,
          object: d.object,
          code: isLifeboatError(d.error) ? d.error.code : 'LB_STORE_CORRUPT_POINT',
          message: d.error.message,
        }));
        out.json({ points, damaged });
        if (points.length === 0) out.line('no points');
        else out.table(POINT_HEADERS, points.map(pointRow), new Set([5]));
        if (damaged.length > 0) {
          // A point that cannot be read is an integrity fault, not an absent point: say so.
          out.line(
            `${damaged.length} point object(s) could not be read and are not listed above; run "lifeboat store verify" for every fault:`,
          );
          out.table(
            ['POINT', 'OBJECT', 'CODE', 'MESSAGE'],
            damaged.map((d) => [shortId(d.id), d.object, d.code, d.message]),
          );
          ctx.exitCode = ExitCode.integrityFault;
        }
      },
    );

  store
    .command('restore')
    .description('write a recovery point as a sparse raw image')
    .argument('<point>', 'point id (or its first characters), or "latest"')
    .argument('<out>', 'raw image file to create')
    .option('--machine <name>', 'with "latest": the machine')
    .option('--disk <name>', 'with "latest": the disk')
    .option('--force', 'replace <out> if it exists')
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/lifeboat --passphrase-file pp.txt store restore latest web-vda.raw --machine web --disk vda\n',
    )
    .action(
      async (
        ref: string,
        outPath: string,
        opts: { machine?: string; disk?: string; force?: boolean },
        cmd: Command,
      ) => {
        const { config, out } = setup(ctx, cmd);
        // A restore reads each chunk once, in order: a big cache would only raise peak memory.
        const target = await openStore(config, ctx, { cacheBytes: 8 * 1024 * 1024 });
        const point = await resolvePoint(target, ref, {
          ...(opts.machine === undefined ? {} : { machine: opts.machine }),
          ...(opts.disk === undefined ? {} : { disk: opts.disk }),
        });
        const progress = bar(ctx, config, 'restore');
        const result = await restorePoint({
          store: target,
          pointId: point.id,
          out: outPath,
          force: opts.force === true,
          onProgress: (done, total) => progress.update(done, total),
          signal: ctx.signal,
        });
        progress.finish();
        const seconds = progress.elapsedSeconds();
        out.json({ ...result, seconds });
        out.line(
          `restored point ${point.id} (${point.machine}/${point.disk}) to ${outPath}: ${formatBytes(result.size)}, ` +
            `${formatBytes(result.bytesData)} of data in ${seconds.toFixed(1)} s (${formatRate(result.bytesData / Math.max(seconds, 1e-3))})`,
        );
      },
    );

  store
    .command('verify')
    .description('read and check every object; exits 3 when a fault is found')
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/lifeboat --passphrase-file pp.txt store verify --json\n',
    )
    .action(async (_opts: unknown, cmd: Command) => {
      const { config, out } = setup(ctx, cmd);
      const target = await openStore(config, ctx);
      const progress = new StoreProgress(ctx, config, 'verify');
      const report = await target.verify({ onProgress: progress.update });
      progress.finish();
      out.json(report);
      out.line(
        `checked ${report.pointsChecked} points, ${report.chunksChecked} chunks, ${formatBytes(report.bytesChecked)}: ` +
          (report.ok ? 'no faults' : `${report.faults.length} fault(s)`),
      );
      if (!report.ok) {
        out.table(
          ['CODE', 'OBJECT', 'POINTS AFFECTED', 'MESSAGE'],
          report.faults.map((f) => [
            f.code,
            f.object,
            f.points.length === 0 ? '-' : f.points.map(shortId).join(','),
            f.message,
          ]),
        );
        ctx.exitCode = ExitCode.integrityFault;
      }
    });

  store
    .command('prune')
    .description('remove points by a retention policy, then collect garbage')
    .option('--keep <rule>', 'FOR or FOR:EVERY, e.g. 24h, 7d:1h, 90d:1d (repeatable)', collect, [])
    .option('--keep-app <for>', 'keep app-consistent points at least this long')
    .option('--machine <name>', 'only this machine')
    .option('--dry-run', 'only say what would be removed')
    .option('--no-gc', 'do not collect garbage after removing points')
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/lifeboat --passphrase-file pp.txt store prune --keep 24h --keep 7d:1h --dry-run\n',
    )
    .action(
      async (
        opts: { keep: string[]; keepApp?: string; machine?: string; dryRun?: boolean; gc: boolean },
        cmd: Command,
      ) => {
        const { config, out } = setup(ctx, cmd);
        const policy = parseRetention(opts.keep, opts.keepApp);
        const target = await openStore(config, ctx);
        const dryRun = opts.dryRun === true;
        const report = await target.prune(policy, {
          dryRun,
          ...(opts.machine === undefined ? {} : { machine: opts.machine }),
        });
        let gc;
        if (!dryRun && opts.gc && report.removed.length > 0) {
          const progress = new StoreProgress(ctx, config, 'gc');
          gc = await target.gc({ onProgress: progress.update });
          progress.finish();
        }
        out.json({
          dryRun,
          policy,
          kept: report.kept,
          removed: report.removed,
          ...(gc === undefined ? {} : { gc }),
        });
        out.line(
          `${dryRun ? 'would remove' : 'removed'} ${report.removed.length} point(s), kept ${report.kept.length}`,
        );
        if (report.removed.length > 0)
          out.table(POINT_HEADERS, report.removed.map(pointRow), new Set([5]));
        if (gc !== undefined) {
          out.line(
            `gc: freed ${formatBytes(gc.bytesFreed)}, ${gc.packsDeleted} pack(s) deleted, ${gc.packsRepacked} repacked`,
          );
        }
      },
    );

  store
    .command('gc')
    .description('delete and repack data no point references (takes an exclusive lock)')
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/lifeboat --passphrase-file pp.txt store gc\n',
    )
    .action(async (_opts: unknown, cmd: Command) => {
      const { config, out } = setup(ctx, cmd);
      const target = await openStore(config, ctx);
      const progress = new StoreProgress(ctx, config, 'gc');
      const gc = await target.gc({ onProgress: progress.update });
      progress.finish();
      out.json(gc);
      out.line(
        `freed ${formatBytes(gc.bytesFreed)}: ${gc.objectsDeleted} object(s) deleted, ${gc.packsDeleted} pack(s) deleted, ${gc.packsRepacked} repacked`,
      );
    });

  store
    .command('stats')
    .description('sizes: logical, unique, stored, dedup ratio')
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/lifeboat --passphrase-file pp.txt store stats --json\n',
    )
    .action(async (_opts: unknown, cmd: Command) => {
      const { config, out } = setup(ctx, cmd);
      const target = await openStore(config, ctx);
      const s = await target.stats();
      out.json({ id: target.id, location: target.location, chunkSize: target.chunkSize, ...s });
      out.table(
        ['FIGURE', 'VALUE'],
        [
          ['store', `${target.id} at ${describeLocation(requireStore(config))}`],
          ['chunk size', formatBytes(target.chunkSize)],
          ['points', String(s.points)],
          ['machines', String(s.machines)],
          ['disks', String(s.disks)],
          ['logical size', formatBytes(s.logicalBytes)],
          ['unique data', formatBytes(s.uniqueBytes)],
          ['stored', formatBytes(s.storedBytes)],
          ['dedup ratio', `${s.dedupRatio.toFixed(2)}x`],
          ['packs', String(s.packs)],
          ['chunks', String(s.chunks)],
        ],
      );
    });

  store
    .command('passwd')
    .description('change the passphrase (re-wraps the key; no data is rewritten)')
    .option(
      '--new-passphrase-file <file>',
      'the new passphrase (or LIFEBOAT_NEW_PASSPHRASE, or a prompt)',
    )
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/lifeboat --passphrase-file old.txt store passwd --new-passphrase-file new.txt\n',
    )
    .action(async (_opts: unknown, cmd: Command) => {
      const { config, out } = setup(ctx, cmd);
      const target = await openStore(config, ctx);
      const next = await readPassphrase(
        config.newPassphrase,
        { prompt: 'new passphrase: ', confirm: true },
        ctx.io,
        {
          code: 'LB_CLI_NO_PASSPHRASE',
          message:
            'No new passphrase. Set LIFEBOAT_NEW_PASSPHRASE or pass --new-passphrase-file (a prompt is shown only when stdin is a terminal).',
        },
      );
      await target.changePassphrase(next);
      out.json({ id: target.id, changed: true });
      out.line(`passphrase of store ${target.id} changed; the old one no longer opens it`);
    });
}
