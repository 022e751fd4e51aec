import { readFile, stat } from 'node:fs/promises';
import { extname, join, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FastifyInstance, FastifyReply } from 'fastify';

/** Where `vite build` of `@lifeboat/web` puts the portal (same path from `src/` and `dist/`). */
export const DEFAULT_PORTAL_DIR = fileURLToPath(new URL('../../../web/dist/', import.meta.url));

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
  '.json': 'application/json',
  '.txt': 'text/plain; charset=utf-8',
  '.woff2': 'font/woff2',
};

/**
 * Serves the built portal at `/` (static files, and index.html for any other non-API path so
 * the single-page app's own routes survive a reload). Registered before the route table is
 * recorded: these are not API routes, and they are public (the app itself logs in).
 */
export function registerPortalRoutes(app: FastifyInstance, dir = DEFAULT_PORTAL_DIR): void {
  const root = resolve(dir);

  const sendFile = async (reply: FastifyReply, file: string, immutable: boolean) => {
    const body = await readFile(file);
    return (
      reply
        .type(TYPES[extname(file)] ?? 'application/octet-stream')
        .header('cache-control', immutable ? 'public, max-age=31536000, immutable' : 'no-cache')
        .header('x-content-type-options', 'nosniff')
        // The portal loads only its own files and talks only to this vault; it is never framed
        // (an operator's session drives failovers: no clickjacking).
        .header(
          'content-security-policy',
          "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
        )
        .header('x-frame-options', 'DENY')
        .header('referrer-policy', 'no-referrer')
        .send(body)
    );
  };

  const handler = async (url: string, reply: FastifyReply): Promise<unknown> => {
    let path: string;
    try {
      path = decodeURIComponent(url.split('?')[0] ?? '/');
    } catch {
      return reply.callNotFound();
    }
    // API paths never fall back to the app: a wrong API URL must stay a JSON 404.
    if (path.startsWith('/api/') || path === '/api' || path === '/metrics') {
      return reply.callNotFound();
    }
    const index = join(root, 'index.html');
    const wanted = resolve(root, '.' + path);
    if (wanted.startsWith(root + sep) && (await isFile(wanted))) {
      return sendFile(reply, wanted, wanted.startsWith(join(root, 'assets') + sep));
    }
    // A missing bundle file is a 404, not the app (a stale page asking for an old build).
    if (path.startsWith('/assets/')) return reply.callNotFound();
    if (await isFile(index)) return sendFile(reply, index, false);
    return reply.status(404).send({
      code: 'LB_VAULT_PORTAL_NOT_BUILT',
      message: `The portal is not built (no ${index}). Run "npm run build -w @lifeboat/web" (scripts/install-deps.sh does), or use the API at /api/docs.`,
      details: { dir: root },
    });
  };

  const options = { config: { access: 'public' as const }, schema: { hide: true } };
  app.get('/', options, (request, reply) => handler(request.url, reply));
  app.get('/*', options, (request, reply) => handler(request.url, reply));
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}
