/**
 * The few REST calls the connection and the diagnostics make: health, code registry, ticket,
 * preflight, whoami, bot. Every call has a timeout; errors come back as values, not throws,
 * so callers can tell "server said no" from "server unreachable".
 */

import type { ApiErrorBody } from './protocol.js';

export type HttpResult<T> =
  | { ok: true; status: number; body: T; ms: number }
  | { ok: false; status: number; code: string; message: string; ms: number; network?: boolean };

export interface HttpOptions {
  method?: string;
  token?: string | null;
  body?: unknown;
  timeoutMs?: number;
  fetch?: typeof fetch;
}

/** Calls `apiUrl + path` and decodes natter's JSON answer or its `{"error": …}` body. */
export async function http<T>(apiUrl: string, path: string, opts: HttpOptions = {}): Promise<HttpResult<T>> {
  const f = opts.fetch ?? globalThis.fetch.bind(globalThis);
  const ctrl = typeof AbortController !== 'undefined' ? new AbortController() : null;
  const timeoutMs = opts.timeoutMs ?? 8000;
  const timer = setTimeout(() => ctrl?.abort(), timeoutMs);
  const started = now();
  const headers: Record<string, string> = {};
  if (opts.token) headers.Authorization = `Bearer ${opts.token}`;
  if (opts.body !== undefined) headers['Content-Type'] = 'application/json';
  try {
    const r = await f(apiUrl + path, {
      method: opts.method ?? 'GET',
      headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      signal: ctrl?.signal,
    });
    const ms = now() - started;
    const text = await r.text();
    let body: unknown = null;
    if (text) {
      try {
        body = JSON.parse(text);
      } catch {
        body = null;
      }
    }
    if (r.ok) return { ok: true, status: r.status, body: body as T, ms };
    const err = (body as ApiErrorBody | null)?.error;
    return {
      ok: false,
      status: r.status,
      code: err?.code ?? `http_${r.status}`,
      message: err?.message ?? (text.slice(0, 200) || r.statusText || `HTTP ${r.status}`),
      ms,
    };
  } catch (e) {
    const ms = now() - started;
    const aborted = (e as Error)?.name === 'AbortError';
    return {
      ok: false,
      status: 0,
      code: aborted ? 'timeout' : 'network_error',
      message: aborted ? `no answer within ${timeoutMs} ms` : String((e as Error)?.message ?? e),
      ms,
      network: true,
    };
  } finally {
    clearTimeout(timer);
  }
}

export function now(): number {
  return typeof performance !== 'undefined' ? performance.now() : Date.now();
}

/** A random UUID (v4), with a fallback for old browsers and non-secure origins. */
export function uuid(): string {
  const c = globalThis.crypto as Crypto | undefined;
  if (c?.randomUUID) {
    try {
      return c.randomUUID();
    } catch {
      // randomUUID needs a secure context; fall through.
    }
  }
  const b = new Uint8Array(16);
  if (c?.getRandomValues) c.getRandomValues(b);
  else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
