import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { kvmAvailable, qemuAccelerator } from './kvm.js';
import { startQemuStorageDaemon, type QemuStorageDaemon } from './qemu-storage-daemon.js';
import { QmpClient, type QmpEvent } from './qmp-client.js';

const exec = promisify(execFile);
let dir: string;
let qsd: QemuStorageDaemon | undefined;
let image: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-qmp-'));
  image = join(dir, 'disk.qcow2');
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, '16M']);
  qsd = await startQemuStorageDaemon({
    blockdevs: [
      { driver: 'file', 'node-name': 'disk0-file', filename: image },
      { driver: 'qcow2', 'node-name': 'disk0', file: 'disk0-file' },
    ],
    nbdSocket: join(dir, 'nbd.sock'),
  });
});
afterAll(async () => {
  await qsd?.stop();
  await rm(dir, { recursive: true, force: true });
});

async function code(p: Promise<unknown>): Promise<string> {
  return p.then(
    () => 'success',
    (e: unknown) => (isLifeboatError(e) ? e.code : String(e)),
  );
}

interface NodeInfo {
  'node-name': string;
  'dirty-bitmaps'?: { name: string; recording: boolean; persistent: boolean }[];
}

describe('QmpClient against qemu-storage-daemon', () => {
  it('greets, lists block nodes and reports QEMU errors with their class', async () => {
    const qmp = (qsd as QemuStorageDaemon).qmp;
    expect(qmp.greeting.version.qemu.major).toBeGreaterThanOrEqual(7);
    const nodes = await qmp.execute<NodeInfo[]>('query-named-block-nodes', { flat: true });
    expect(nodes.map((n) => n['node-name'])).toEqual(
      expect.arrayContaining(['disk0', 'disk0-file']),
    );
    const err = await qmp
      .execute('block-dirty-bitmap-add', { node: 'nope', name: 'x' })
      .catch((e: unknown) => e);
    expect(isLifeboatError(err, 'LB_QMP_COMMAND')).toBe(true);
    expect(isLifeboatError(err) && err.details).toMatchObject({
      command: 'block-dirty-bitmap-add',
      errorClass: 'GenericError',
    });
    expect(await code(qmp.execute('no-such-command'))).toBe('LB_QMP_COMMAND');
  });

  it('says so when the monitor is held by another client', async () => {
    const busy = QmpClient.connect(
      { path: (qsd as QemuStorageDaemon).qmpSocket },
      { connectTimeoutMs: 300 },
    );
    expect(await code(busy)).toBe('LB_QMP_TIMEOUT');
  });

  it('adds persistent bitmaps and cuts in one transaction (add new, disable old)', async () => {
    const qmp = (qsd as QemuStorageDaemon).qmp;
    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'b0', persistent: true });
    await qmp.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b1', persistent: true } },
        { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'b0' } },
      ],
    });
    const nodes = await qmp.execute<NodeInfo[]>('query-named-block-nodes', { flat: true });
    const bitmaps = nodes.find((n) => n['node-name'] === 'disk0')?.['dirty-bitmaps'] ?? [];
    const byName = Object.fromEntries(bitmaps.map((b) => [b.name, b]));
    expect(byName['b0']).toMatchObject({ recording: false, persistent: true });
    expect(byName['b1']).toMatchObject({ recording: true, persistent: true });
    // A failing action rolls the whole transaction back: b2 must not exist afterwards.
    expect(
      await code(
        qmp.execute('transaction', {
          actions: [
            { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b2' } },
            { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'missing' } },
          ],
        }),
      ),
    ).toBe('LB_QMP_COMMAND');
    const after = await qmp.execute<NodeInfo[]>('query-named-block-nodes', { flat: true });
    const names = (after.find((n) => n['node-name'] === 'disk0')?.['dirty-bitmaps'] ?? []).map(
      (b) => b.name,
    );
    expect(names.sort()).toEqual(['b0', 'b1']);
  });

  it('delivers events to waitForEvent and to the async iterator', async () => {
    const qmp = (qsd as QemuStorageDaemon).qmp;
    await qmp.execute('block-export-add', {
      type: 'nbd',
      id: 'ev',
      'node-name': 'disk0',
      name: 'ev',
      writable: false,
    });
    const seen: QmpEvent[] = [];
    const iter = (async () => {
      for await (const e of qmp.events()) {
        seen.push(e);
        if (e.event === 'BLOCK_EXPORT_DELETED') break;
      }
    })();
    const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (e) => e.data['id'] === 'ev', 10_000);
    await qmp.execute('block-export-del', { id: 'ev' });
    const e = await deleted;
    expect(e.data).toEqual({ id: 'ev' });
    expect(e.timestamp.seconds).toBeGreaterThan(0);
    await iter;
    expect(seen.map((x) => x.event)).toContain('BLOCK_EXPORT_DELETED');
    expect(await code(qmp.waitForEvent('NEVER_HAPPENS', () => true, 50))).toBe('LB_QMP_TIMEOUT');
  });

  it('persists the bitmaps into the qcow2 image on a clean stop', async () => {
    await (qsd as QemuStorageDaemon).stop();
    qsd = undefined;
    const { stdout } = await exec('qemu-img', ['info', '--output=json', image]);
    const info = JSON.parse(stdout) as {
      'format-specific': { data: { bitmaps?: { name: string; flags: string[] }[] } };
    };
    const bitmaps = info['format-specific'].data.bitmaps ?? [];
    expect(bitmaps.map((b) => b.name).sort()).toEqual(['b0', 'b1']);
    // Not "in-use": QEMU quit cleanly and wrote them back, so they are consistent.
    for (const b of bitmaps) expect(b.flags).not.toContain('in-use');
    expect(bitmaps.find((b) => b.name === 'b1')?.flags).toContain('auto');
  });

  it('fails to start with a clear error when a block device is wrong', async () => {
    const err = await startQemuStorageDaemon({
      blockdevs: [{ driver: 'file', 'node-name': 'x', filename: join(dir, 'missing.img') }],
    }).catch((e: unknown) => e);
    expect(isLifeboatError(err, 'LB_QMP_START_FAILED')).toBe(true);
    expect(String((err as Error).message)).toMatch(/missing\.img/);
  });

  it('detects KVM consistently with the accelerator choice', async () => {
    const kvm = await kvmAvailable();
    expect(typeof kvm).toBe('boolean');
    expect(await qemuAccelerator()).toBe(kvm ? 'kvm' : 'tcg');
  });
});

describe('QmpClient against a misbehaving peer', () => {
  // QEMU never hangs on purpose or speaks broken JSON; a fake monitor is the way to test that.
  let server: Server | undefined;
  const sockets: Socket[] = [];
  afterAll(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => (server ? server.close(() => r()) : r()));
  });

  async function fake(
    onLine: (s: Socket, msg: { execute: string; id: string }) => void,
    greeting?: string,
  ): Promise<string> {
    const path = join(dir, `fake-${Math.random().toString(36).slice(2)}.sock`);
    await new Promise<void>((r) => server?.close(() => r()) ?? r());
    server = createServer((s) => {
      sockets.push(s);
      s.on('error', () => undefined);
      s.write(
        greeting ??
          '{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}\r\n',
      );
      let buf = '';
      s.on('data', (d: Buffer) => {
        buf += d.toString();
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const msg = JSON.parse(buf.slice(0, nl)) as { execute: string; id: string };
          buf = buf.slice(nl + 1);
          if (msg.execute === 'qmp_capabilities')
            s.write(`{"return": {}, "id": ${JSON.stringify(msg.id)}}\r\n`);
          else onLine(s, msg);
        }
      });
    });
    await new Promise<void>((r) => server?.listen(path, r));
    return path;
  }

  it('speaks over TCP too, ignores late replies and refuses commands after close', async () => {
    await fake((s, msg) => {
      // A late answer to the timed-out command, then the real one, then an event.
      if (msg.execute === 'slow') return;
      s.write(`{"return": {"late": true}, "id": "lb-2"}\r\n`);
      s.write(`{"return": {"ok": 1}, "id": ${JSON.stringify(msg.id)}}\r\n`);
    });
    // The same fake handler on a TCP listener (ephemeral port).
    const handler = server?.listeners('connection')[0] as (s: Socket) => void;
    const tcpServer = createServer(handler);
    await new Promise<void>((r) => tcpServer.listen(0, '127.0.0.1', r));
    const port = (tcpServer.address() as { port: number }).port;
    try {
      const qmp = await QmpClient.connect({ host: '127.0.0.1', port });
      expect(await code(qmp.execute('slow', undefined, { timeoutMs: 50 }))).toBe('LB_QMP_TIMEOUT');
      expect(await qmp.execute('query-version')).toEqual({ ok: 1 });
      await qmp.close();
      expect(await code(qmp.execute('query-version'))).toBe('LB_QMP_CLOSED');
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => tcpServer.close(() => r()));
    }
  });

  it('times out a command that gets no answer, and rejects pending ones when the connection drops', async () => {
    let peer: Socket | undefined;
    const path = await fake((s) => (peer = s));
    const qmp = await QmpClient.connect({ path });
    expect(await code(qmp.execute('query-status', undefined, { timeoutMs: 100 }))).toBe(
      'LB_QMP_TIMEOUT',
    );
    const pending = code(qmp.execute('query-block'));
    const waiting = code(qmp.waitForEvent('SHUTDOWN'));
    await new Promise((r) => setTimeout(r, 50));
    peer?.destroy();
    expect(await pending).toBe('LB_QMP_CONNECTION_LOST');
    expect(await waiting).toBe('LB_QMP_CONNECTION_LOST');
    expect(await code(qmp.execute('query-block'))).toBe('LB_QMP_CONNECTION_LOST');
  });

  it('closes on a reply that is not JSON and refuses a non-QMP greeting', async () => {
    let path = await fake((s) => s.write('this is not json\r\n'));
    const qmp = await QmpClient.connect({ path });
    expect(await code(qmp.execute('query-block'))).toBe('LB_QMP_PROTOCOL');
    path = await fake(() => undefined, 'SSH-2.0-OpenSSH_9.2\r\n');
    expect(await code(QmpClient.connect({ path }))).toBe('LB_QMP_HANDSHAKE');
    expect(await code(QmpClient.connect({ path: join(dir, 'absent.sock') }))).toBe(
      'LB_QMP_CONNECT',
    );
  });
});
