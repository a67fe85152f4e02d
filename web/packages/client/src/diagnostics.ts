/**
 * `runWebSocketDiagnostics(botId, token)`: walks every layer between this page and a chat
 * connection — browser, network, API, CORS, token, bot, the server's preflight verdict,
 * handshake, `connection_established`, ping, stability — and reports each as a step with a
 * measured value, a one-line explanation and a fix. The first failing step is the layer at
 * fault. `testWebSocket(botId, token)` is the quick version: connect, ping, close, logged.
 *
 * Neither ever puts the token in its report or its log.
 */

import { resolveEndpoints } from './config.js';
import { createContext, type DiagnosticStep, type DiagnosticsOptions, type StepStatus } from './diagnostics-context.js';
import {
  checkAttempts,
  checkBotAndPreflight,
  checkEnvironment,
  checkServer,
  checkToken,
  checkTransportInUse,
} from './diagnostics-layers.js';
import { openSocket } from './diagnostics-socket.js';
import { checkSseLayer } from './diagnostics-sse.js';
import { checkWebSocket, SOCKET_STEPS } from './diagnostics-websocket.js';
import { http, now as monoNow } from './http.js';
import { redact } from './log.js';
import type { TicketResponse } from './protocol.js';
import { closeHeadline } from './words.js';

export { decodeJwt, type DiagnosticStep, type DiagnosticsOptions, type StepStatus } from './diagnostics-context.js';

export interface DiagnosticsReport {
  tool: 'natter-websocket-diagnostics';
  version: 1;
  started_at: string;
  duration_ms: number;
  bot_id: string;
  api_url: string;
  ws_url: string;
  page_origin: string | null;
  user_agent: string | null;
  steps: DiagnosticStep[];
  summary: {
    status: 'ok' | 'warn' | 'fail';
    failing_step: string | null;
    headline: string;
    /** What to change, when the headline alone does not say (a proxy that blocks the WebSocket). */
    fix?: string;
    /** How each transport fared: `blocked` is a WebSocket the network path would not carry. */
    transports: { websocket: TransportVerdict; sse: TransportVerdict };
  };
}

export type TransportVerdict = 'ok' | 'blocked' | 'fail' | 'skipped';

/** The headline when the WebSocket cannot pass but the SSE binding works. */
export const WS_BLOCKED_HEADLINE = 'WebSocket blocked — using HTTP streaming';

/** What to change in the proxy so that the WebSocket passes. */
export const PROXY_UPGRADE_FIX =
  'The chat works over HTTP streaming (one request per message sent). To let the WebSocket through, make the proxy pass the Upgrade and Connection headers (they are hop-by-hop and dropped unless forwarded), e.g. in nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade"; (and a proxy_read_timeout above the heartbeat). Then run Diagnose again.';

/** Runs every check; never throws. */
export async function runWebSocketDiagnostics(
  botId: string,
  token: string | null | undefined,
  options: DiagnosticsOptions = {},
): Promise<DiagnosticsReport> {
  const started = monoNow();
  const startedAt = new Date().toISOString();
  const ctx = createContext(botId, token, options);
  checkEnvironment(ctx);
  await checkServer(ctx);
  await checkToken(ctx);
  await checkBotAndPreflight(ctx);
  const wsBlocked = await checkWebSocket(ctx);
  const sseOk = await checkSseLayer(ctx);
  checkTransportInUse(ctx);
  await checkAttempts(ctx);

  const { steps } = ctx;
  const failed = steps.filter((s) => s.status === 'fail');
  const firstFail = failed[0];
  const anyWarn = steps.some((s) => s.status === 'warn');
  const wsOk = SOCKET_STEPS.every((id) => steps.some((s) => s.id === id && s.status !== 'fail' && s.status !== 'skip'));
  const transports: DiagnosticsReport['summary']['transports'] = {
    websocket: wsOk ? 'ok' : wsBlocked ? 'blocked' : steps.some((s) => s.id === 'handshake' && s.status === 'skip') ? 'skipped' : 'fail',
    sse: sseOk ? 'ok' : steps.some((s) => s.id === 'sse_stream' && s.status === 'skip') ? 'skipped' : 'fail',
  };
  // Only the socket failed, on the way, and chat works over HTTP streaming: a warning with the fix.
  const onlyWsBlocked = wsBlocked && sseOk && failed.every((s) => SOCKET_STEPS.includes(s.id));
  const report: DiagnosticsReport = {
    tool: 'natter-websocket-diagnostics',
    version: 1,
    started_at: startedAt,
    duration_ms: Math.round(monoNow() - started),
    bot_id: botId,
    api_url: ctx.apiUrl,
    ws_url: ctx.wsUrl,
    page_origin: ctx.pageOrigin,
    user_agent: typeof navigator !== 'undefined' ? navigator.userAgent : null,
    steps,
    summary: onlyWsBlocked
      ? { status: 'warn', failing_step: null, headline: WS_BLOCKED_HEADLINE, fix: PROXY_UPGRADE_FIX, transports }
      : firstFail
        ? { status: 'fail', failing_step: firstFail.id, headline: failHeadline(firstFail), transports }
        : {
            status: anyWarn ? 'warn' : 'ok',
            failing_step: null,
            headline: `${anyWarn ? 'Works, with warnings' : 'Everything works'}${transports.sse === 'ok' && wsOk ? ' (WebSocket and HTTP streaming)' : ''}.`,
            transports,
          },
  };
  return report;
}

/**
 * The report's headline when a step fails: one sentence a person understands. The step's own
 * detail (with URLs, status codes and the browser's words) stays in the step list.
 */
export function failHeadline(step: DiagnosticStep): string {
  const code = typeof step.data?.close_code === 'number' ? step.data.close_code : null;
  switch (step.id) {
    case 'browser':
      return 'This browser lacks something the chat needs: use a current browser.';
    case 'api':
      return "Can't reach the server: it is down, or something between here and it is blocking the way.";
    case 'cors':
      return "The server doesn't allow this page's address to use it.";
    case 'ready':
      return 'The server is up, but its database or message bus is not.';
    case 'token_decoded':
    case 'token_accepted':
      return 'Your login has expired or is not valid on this server: log in again.';
    case 'bot':
      return step.value === 'forbidden' ? "You don't have access to this bot." : "This bot doesn't exist, or you can't see it.";
    case 'preflight':
      return `The server would refuse the chat connection: ${lowerFirst(closeHeadline(code ?? 0) ?? 'no reason given')}.`;
    case 'handshake':
      return 'The server works, but the chat connection is blocked on the way (a proxy, firewall or extension).';
    case 'established':
    case 'stability':
      return code !== null
        ? `The server closed the chat connection: ${lowerFirst(closeHeadline(code) ?? 'no reason given')}.`
        : 'The server accepted the chat connection, then stopped answering.';
    case 'ping':
      return "The chat connection opened, but the server doesn't answer on it.";
    default:
      return `${step.title} failed.`;
  }
}

function lowerFirst(s: string): string {
  return /^[A-Z][a-z]/.test(s) ? s.charAt(0).toLowerCase() + s.slice(1) : s;
}

const MARK: Record<StepStatus, string> = { ok: '✓', warn: '⚠', fail: '✗', skip: '–' };

/** The report as text for a bug report ("copy report"). */
export function formatReport(r: DiagnosticsReport): string {
  const lines = [
    `natter WebSocket diagnostics — ${r.started_at} (${r.duration_ms} ms)`,
    `bot ${r.bot_id}; API ${r.api_url}; WS ${r.ws_url}; page ${r.page_origin ?? '-'}`,
    `browser: ${r.user_agent ?? '-'}`,
    `result: ${r.summary.status.toUpperCase()} — ${r.summary.headline}`,
    ...(r.summary.fix ? [`fix: ${r.summary.fix}`] : []),
    `transports: WebSocket ${r.summary.transports.websocket}, HTTP streaming ${r.summary.transports.sse}`,
    '',
  ];
  for (const s of r.steps) {
    lines.push(`${MARK[s.status]} ${s.title}${s.value ? ` [${s.value}]` : ''}: ${s.detail}`);
    if (s.fix && (s.status === 'fail' || s.status === 'warn')) lines.push(`    fix: ${s.fix}`);
  }
  return lines.join('\n');
}

export interface QuickTestResult {
  ok: boolean;
  steps: Array<{ step: string; ok: boolean; ms: number; detail: string }>;
}

/** Connect, ping, close — logging each step to the console, as the seed's snippet expects. */
export async function testWebSocket(
  botId: string,
  token: string | null | undefined,
  options: Pick<DiagnosticsOptions, 'apiUrl' | 'wsUrl' | 'fetch' | 'WebSocket'> = {},
): Promise<QuickTestResult> {
  const { apiUrl, wsUrl } = resolveEndpoints({ apiUrl: options.apiUrl, wsUrl: options.wsUrl });
  const Ctor = options.WebSocket ?? globalThis.WebSocket;
  const result: QuickTestResult = { ok: false, steps: [] };
  const step = (name: string, ok: boolean, ms: number, detail: string) => {
    const d = redact(detail);
    result.steps.push({ step: name, ok, ms: Math.round(ms), detail: d });
    (ok ? console.log : console.warn)(`[testWebSocket] ${ok ? '✓' : '✗'} ${name} (${Math.round(ms)} ms): ${d}`);
  };
  const health = await http<unknown>(apiUrl, '/api/health', { timeoutMs: 5000, fetch: options.fetch });
  step('health', health.ok, health.ms, health.ok ? `GET ${apiUrl}/api/health ${health.status}` : `backend unreachable: ${health.message}`);
  if (!health.ok) return result;
  if (!token) {
    step('token', false, 0, 'no token given: testWebSocket(botId, localStorage.getItem("access_token"))');
    return result;
  }
  let query = `token=${encodeURIComponent(token)}`;
  const t = await http<TicketResponse>(apiUrl, '/api/ws/ticket', {
    method: 'POST',
    token,
    body: { bot_id: botId },
    timeoutMs: 5000,
    fetch: options.fetch,
  });
  if (t.ok) query = `ticket=${encodeURIComponent(t.body.ticket)}`;
  step('ticket', true, t.ms, t.ok ? 'got a one-time ticket' : `no ticket (${t.code}: ${t.message}); using the token`);
  const url = `${wsUrl}/api/ws/chat/${encodeURIComponent(botId)}?${query}`;
  console.log(`[testWebSocket] Attempting to connect to chat WebSocket: ${redact(url)}`);
  const { live, opened, handshakeMs, error } = await openSocket(Ctor, url, 10_000);
  step(
    'open',
    opened,
    handshakeMs,
    opened ? 'socket open' : `did not open: ${error ?? (live.closed ? `${live.closed.code} ${live.closed.reason}` : 'timeout')}`,
  );
  if (!opened) return result;
  const t0 = monoNow();
  const est = await live.waitFor((f) => (f.type === 'connection_established' ? f : undefined), 10_000);
  step(
    'connection_established',
    !!est,
    monoNow() - t0,
    est
      ? `connection ${est.connection_id}, last_seq ${est.last_seq}`
      : live.closed
        ? `closed ${live.closed.code}: ${live.closed.reason}`
        : 'timeout',
  );
  if (est) {
    const p0 = monoNow();
    live.ws.send(JSON.stringify({ type: 'ping', id: 'test' }));
    const pong = await live.waitFor((f) => (f.type === 'pong' ? f : undefined), 5000);
    step('ping', !!pong, monoNow() - p0, pong ? 'pong received' : 'no pong');
    result.ok = !!pong;
  }
  live.ws.close(1000, 'test done');
  step('close', true, 0, 'closed');
  return result;
}
