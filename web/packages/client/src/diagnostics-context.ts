/**
 * What every layer of `runWebSocketDiagnostics` shares: the options, the resolved endpoints,
 * the step list with its `add`/`skip`, and the flags one layer leaves for the next.
 */

import { resolveEndpoints } from './config.js';
import type { TransportKind } from './connection.js';
import { http, type HttpOptions, type HttpResult } from './http.js';
import { log, redact } from './log.js';
import { ClosePolicy } from './policy.js';
import type { TicketResponse } from './protocol.js';
import type { TransportTarget } from './transport.js';

export type StepStatus = 'ok' | 'warn' | 'fail' | 'skip';

export interface DiagnosticStep {
  id: string;
  title: string;
  status: StepStatus;
  /** The measured value, e.g. "12 ms" or "alice". */
  value?: string;
  /** One line: what was found. */
  detail: string;
  /** What to do about it (for warn and fail). */
  fix?: string;
  ms?: number;
  data?: Record<string, unknown>;
}

export interface DiagnosticsOptions {
  apiUrl?: string;
  wsUrl?: string;
  /** How long to hold the connection open for the stability step. Default 3 000 ms. */
  stabilityMs?: number;
  /** Ping samples. Default 5. */
  pingSamples?: number;
  /** Timeout of each HTTP step. Default 5 000 ms. */
  timeoutMs?: number;
  /** Timeout from socket creation to `connection_established`. Default 10 000 ms. */
  connectTimeoutMs?: number;
  fetch?: typeof fetch;
  WebSocket?: typeof WebSocket;
  /** Called after each step (the UI shows the report filling in). */
  onStep?: (step: DiagnosticStep) => void;
  /**
   * What the app's chat connection uses now, and why (`ChatSocket.transportInfo`): reported as
   * the step "Transport in use".
   */
  inUse?: { transport: TransportKind; why: string | null };
}

export const TITLES: Record<string, string> = {
  browser: 'Browser support',
  network: 'Network',
  api: 'API reachable',
  cors: 'CORS',
  ready: 'Server ready (database, message bus)',
  token_decoded: 'Token readable',
  token_accepted: 'Token accepted',
  bot: 'Bot exists and is allowed',
  preflight: "Server's preflight verdict",
  handshake: 'WebSocket handshake',
  established: 'connection_established',
  ping: 'Ping round-trip',
  stability: 'Stability',
  sse_stream: 'HTTP streaming (SSE): event stream opens',
  sse_established: 'HTTP streaming: connection_established',
  sse_ping: 'HTTP streaming: ping by POST',
  transport: 'Transport in use',
  attempts: "Server's record of recent attempts",
};

/** Reads a JWT's payload without verifying it (only the server can). */
export function decodeJwt(token: string): Record<string, unknown> | null {
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const pad = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const json = atob(pad); // in every browser, and in Node 16+
    const v = JSON.parse(decodeURIComponent(escape(json)));
    return typeof v === 'object' && v ? (v as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

export function fmtMs(ms: number): string {
  return `${Math.round(ms)} ms`;
}

export function originOf(url: string): string | null {
  try {
    return new URL(url).origin;
  } catch {
    return null;
  }
}

export interface DiagContext {
  botId: string;
  token: string | null | undefined;
  options: DiagnosticsOptions;
  apiUrl: string;
  wsUrl: string;
  /** Timeout of each HTTP step. */
  timeoutMs: number;
  /** Timeout from socket (or stream) creation to `connection_established`. */
  connectTimeout: number;
  fetch: typeof fetch | undefined;
  Ctor: typeof WebSocket | undefined;
  pageOrigin: string | null;
  policy: ClosePolicy;
  steps: DiagnosticStep[];
  /** Id of the first failed step; later dependent steps skip. */
  blocked: string | null;
  hasWs: boolean;
  hasFetch: boolean;
  /** GET /api/health answered. */
  healthOk: boolean;
  /** The server answers, but CORS may keep the browser from reading it. */
  corsSuspect: boolean;
  tokenOk: boolean;
  botOk: boolean;
  preflightOk: boolean;
  add(id: string, status: StepStatus, detail: string, extra?: Partial<DiagnosticStep>): DiagnosticStep;
  skip(id: string, why?: string): DiagnosticStep;
}

export function createContext(botId: string, token: string | null | undefined, options: DiagnosticsOptions): DiagContext {
  const { apiUrl, wsUrl } = resolveEndpoints({ apiUrl: options.apiUrl, wsUrl: options.wsUrl });
  const ctx: DiagContext = {
    botId,
    token,
    options,
    apiUrl,
    wsUrl,
    timeoutMs: options.timeoutMs ?? 5000,
    connectTimeout: options.connectTimeoutMs ?? 10_000,
    fetch: options.fetch,
    Ctor: options.WebSocket ?? (globalThis.WebSocket as typeof WebSocket | undefined),
    pageOrigin: typeof location !== 'undefined' && location.origin !== 'null' ? location.origin : null,
    policy: new ClosePolicy(),
    steps: [],
    blocked: null,
    hasWs: false,
    hasFetch: false,
    healthOk: false,
    corsSuspect: false,
    tokenOk: false,
    botOk: false,
    preflightOk: false,
    add(id, status, detail, extra = {}) {
      const step: DiagnosticStep = { id, title: TITLES[id] ?? id, status, detail: redact(detail), ...extra };
      if (step.fix) step.fix = redact(step.fix);
      ctx.steps.push(step);
      if (status === 'fail' && !ctx.blocked) ctx.blocked = id;
      log.diag('%s %s: %s', status.toUpperCase(), step.title, step.detail);
      options.onStep?.(step);
      return step;
    },
    skip(id, why = `skipped: "${TITLES[ctx.blocked ?? ''] ?? ctx.blocked}" failed`) {
      return ctx.add(id, 'skip', why);
    },
  };
  return ctx;
}

/** A REST call with the diagnostics' timeout and fetch. */
export function api<T>(ctx: DiagContext, path: string, opts: HttpOptions = {}): Promise<HttpResult<T>> {
  return http<T>(ctx.apiUrl, path, { ...opts, timeoutMs: ctx.timeoutMs, fetch: ctx.fetch });
}

/** The server answered, or would if CORS let the browser read it. */
export function reachable(ctx: DiagContext): boolean {
  return ctx.healthOk || ctx.corsSuspect;
}

/** There is a server to connect to and a token to connect with. */
export function mayConnect(ctx: DiagContext): boolean {
  return reachable(ctx) && !!ctx.token;
}

/** A one-time ticket for a connection when the server gives one, else the token (redacted in every report). */
export async function credential(ctx: DiagContext): Promise<TransportTarget['auth']> {
  if (ctx.tokenOk && ctx.botOk) {
    const t = await api<TicketResponse>(ctx, '/api/ws/ticket', { method: 'POST', token: ctx.token!, body: { bot_id: ctx.botId } });
    if (t.ok) return { kind: 'ticket', value: t.body.ticket };
  }
  return { kind: 'token', value: ctx.token! };
}

/** The step for a connection the server closed (or that went quiet) before `connection_established`. */
export function notEstablished(ctx: DiagContext, id: string, c: { code: number; reason: string } | null, what: string): DiagnosticStep {
  if (!c)
    return ctx.add(id, 'fail', `No connection_established within ${ctx.connectTimeout} ms.`, {
      fix: 'The server is stuck or a proxy swallows frames: check the server log.',
    });
  const v = ctx.policy.verdict(c.code);
  return ctx.add(id, 'fail', `The server accepted the ${what}, then closed it with ${c.code} ${v.name}: ${c.reason || 'no reason'}.`, {
    value: String(c.code),
    data: { close_code: c.code },
    fix: v.description,
  });
}
