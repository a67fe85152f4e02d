/**
 * The effects of the connection state machine that wait on the network, run by `ChatSocket`:
 * the health check, the code registry, the credential for the next attempt (a single-use
 * ticket, else the token), the preflight that explains a 1006, and the token refresh. Each
 * resolves with the event to feed back to the machine, or null when its attempt was abandoned
 * meanwhile (then it records nothing either).
 */

import type { Credential, MachineEvent } from './connection.js';
import { http, type HttpResult } from './http.js';
import { log } from './log.js';
import type { ClosePolicy } from './policy.js';
import { decodeCodeRegistry, type Preflight, type TicketResponse } from './protocol.js';
import type { FlightRecorder } from './recorder.js';

export interface RestContext {
  apiUrl: string;
  timeoutMs: number;
  fetch?: typeof fetch;
  recorder: FlightRecorder;
  /** Whether the attempt of generation `gen` is still the current one. */
  live(gen: number): boolean;
}

export async function checkHealth(ctx: RestContext, gen: number): Promise<MachineEvent | null> {
  const health = await http<unknown>(ctx.apiUrl, '/api/health', { timeoutMs: ctx.timeoutMs, fetch: ctx.fetch });
  if (!ctx.live(gen)) return null;
  ctx.recorder.record('health', {
    ok: health.ok,
    status: health.status,
    ms: Math.round(health.ms),
    ...(health.ok ? {} : { error: health.message }),
  });
  return health.ok
    ? { type: 'health', gen, ok: true, network: false, status: health.status, message: '' }
    : { type: 'health', gen, ok: false, network: !!health.network, status: health.status, message: health.message };
}

/** Loads the server's close-code registry into `policy`; the built-in copy stays if it cannot. */
export async function loadCodes(ctx: RestContext, policy: ClosePolicy, gen: number): Promise<MachineEvent | null> {
  const codes = await http<unknown>(ctx.apiUrl, '/api/ws/codes', { timeoutMs: ctx.timeoutMs, fetch: ctx.fetch });
  if (!ctx.live(gen)) return null;
  let loaded = false;
  if (codes.ok) {
    try {
      policy.loadRegistry(decodeCodeRegistry(codes.body));
      loaded = true;
      ctx.recorder.record('codes_loaded', { close_codes: policy.fromServer });
    } catch (e) {
      log.connect('code registry unreadable, using the built-in copy: %s', (e as Error).message);
    }
  }
  return { type: 'codes', gen, loaded };
}

type GetToken = (() => string | null | Promise<string | null>) | undefined;

/** A ticket (preferred) or the token, or the close code to act on when neither can be had. */
export async function fetchCredential(
  ctx: RestContext,
  gen: number,
  botId: string,
  getToken: GetToken,
  useTicket: boolean,
): Promise<MachineEvent | null> {
  const credential = await credentialFor(ctx, botId, getToken, useTicket);
  return ctx.live(gen) ? { type: 'credential', gen, credential } : null;
}

/** A ticket for one connection (or the token, where the server has no tickets), or the refusal as a close. */
export async function credentialFor(ctx: RestContext, botId: string, getToken: GetToken, useTicket: boolean): Promise<Credential> {
  const token = getToken ? await getToken() : null;
  if (!token) return { close: { code: 4401, reason: 'not logged in: no access token' } };
  if (!useTicket) return { kind: 'token', value: token };
  const r = await http<TicketResponse>(ctx.apiUrl, '/api/ws/ticket', {
    method: 'POST',
    token,
    body: { bot_id: botId },
    timeoutMs: ctx.timeoutMs,
    fetch: ctx.fetch,
  });
  ctx.recorder.record('ticket', { ok: r.ok, status: r.status, ms: Math.round(r.ms), ...(r.ok ? {} : { code: r.code }) });
  if (r.ok && typeof r.body?.ticket === 'string') return { kind: 'ticket', value: r.body.ticket };
  const refusal = ticketRefusal(r);
  if (refusal) return { close: refusal };
  // No ticket service (older server) or a transient failure: the token in the URL still works.
  log.connect('ticket unavailable (%s); using the token', r.ok ? 'bad body' : r.code);
  return { kind: 'token', value: token };
}

/**
 * The ticket endpoint runs the same checks as the socket: its refusal as the close code the
 * socket would have sent (null: not a refusal, e.g. an older server without tickets).
 */
export function ticketRefusal(r: HttpResult<unknown>): { code: number; reason: string } | null {
  if (r.ok) return null;
  if (r.status === 401) return { code: 4401, reason: `${r.code}: ${r.message}` };
  if (r.status === 403) return { code: 4403, reason: r.message };
  if (r.status === 404 && r.code === 'not_found' && !/endpoint/.test(r.message)) return { code: 4404, reason: r.message };
  if (r.status === 400) return { code: 4400, reason: r.message };
  return null;
}

/** After a 1006 (the browser hides why a socket dropped): asks the server what it would say now. */
export async function fetchPreflight(
  ctx: RestContext,
  gen: number,
  botId: string,
  afterSeq: number | null,
  getToken: GetToken,
): Promise<MachineEvent | null> {
  const token = getToken ? await getToken() : null;
  if (!ctx.live(gen)) return null;
  if (!token) return { type: 'preflight', gen, closeCode: null, reason: '' };
  const q = afterSeq !== null ? `?after_seq=${afterSeq}` : '';
  const r = await http<Preflight>(ctx.apiUrl, `/api/ws/preflight/${encodeURIComponent(botId)}${q}`, {
    token,
    timeoutMs: ctx.timeoutMs,
    fetch: ctx.fetch,
  });
  if (!ctx.live(gen)) return null;
  ctx.recorder.record('preflight', r.ok ? { ok: r.body.ok, close_code: r.body.close_code, reason: r.body.reason } : { error: r.message });
  const refused = r.ok && !r.body.ok && r.body.close_code ? r.body : null;
  return { type: 'preflight', gen, closeCode: refused?.close_code ?? null, reason: refused?.reason ?? '', ok: r.ok && r.body.ok === true };
}

/** Asks the app for a fresh access token (after a 4401). */
export async function refreshToken(gen: number, refresh: (() => Promise<string | null>) | undefined): Promise<MachineEvent> {
  let token: string | null = null;
  try {
    token = (await refresh?.()) ?? null;
  } catch (e) {
    log.close('token refresh failed: %s', (e as Error).message);
  }
  return { type: 'reauth_result', gen, ok: !!token };
}
