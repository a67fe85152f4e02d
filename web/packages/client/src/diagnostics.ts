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
import type { TransportKind } from './connection.js';
import { http, now as monoNow, uuid } from './http.js';
import { log, redact } from './log.js';
import { ClosePolicy } from './policy.js';
import { SseTransport } from './sse-transport.js';
import { closeHeadline, transportWhyWords } from './words.js';
import {
  decodeCodeRegistry,
  parseServerFrame,
  PROTOCOL_VERSION,
  type BotView,
  type Preflight,
  type ServerFrame,
  type TicketResponse,
  type UserView,
} from './protocol.js';
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

/** The headline when the WebSocket cannot pass but the SSE binding works. */
export const WS_BLOCKED_HEADLINE = 'WebSocket blocked — using HTTP streaming';

/** What to change in the proxy so that the WebSocket passes. */
export const PROXY_UPGRADE_FIX =
  'The chat works over HTTP streaming (one request per message sent). To let the WebSocket through, make the proxy pass the Upgrade and Connection headers (they are hop-by-hop and dropped unless forwarded), e.g. in nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade"; (and a proxy_read_timeout above the heartbeat). Then run Diagnose again.';

const TITLES: Record<string, string> = {
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

function fmtMs(ms: number): string {
  return `${Math.round(ms)} ms`;
}

function originOf(url: string): string | null {
  try {
    return new URL(url).origin;
  } catch {
    return null;
  }
}

/** Frames and the close of one connection, whatever carries it, and waits on them. */
interface Watch {
  frames: ServerFrame[];
  closed: { code: number; reason: string } | null;
  waitFor<T>(pred: (f: ServerFrame) => T | undefined, timeoutMs: number): Promise<T | null>;
  waitClose(timeoutMs: number): Promise<{ code: number; reason: string } | null>;
  /** Feed a text frame from the server. */
  text(data: string): void;
  /** Feed the close. */
  close(code: number, reason: string): void;
}

interface LiveSocket extends Watch {
  ws: WebSocket;
}

function watchFrames(): Watch {
  const frames: ServerFrame[] = [];
  const listeners = new Set<() => void>();
  const wait = <V>(value: () => V | undefined, timeoutMs: number, onTimeout: V) =>
    new Promise<V>((resolve) => {
      const check = () => {
        const v = value();
        if (v !== undefined) done(v);
      };
      const t = setTimeout(() => done(onTimeout), timeoutMs);
      const done = (v: V) => {
        clearTimeout(t);
        listeners.delete(check);
        resolve(v);
      };
      listeners.add(check);
      check();
    });
  const changed = () => {
    for (const l of [...listeners]) l();
  };
  const w: Watch = {
    frames,
    closed: null,
    waitFor<T>(pred: (f: ServerFrame) => T | undefined, timeoutMs: number) {
      return wait<T | null>(
        () => {
          for (const f of frames) {
            const v = pred(f);
            if (v !== undefined) return v;
          }
          return w.closed ? null : undefined;
        },
        timeoutMs,
        null,
      );
    },
    waitClose(timeoutMs) {
      return wait(() => w.closed ?? undefined, timeoutMs, null);
    },
    text(data) {
      try {
        frames.push(parseServerFrame(data));
      } catch {
        // Unknown frames are not this tool's business.
      }
      changed();
    },
    close(code, reason) {
      w.closed = { code, reason };
      changed();
    },
  };
  return w;
}

function watchSocket(ws: WebSocket): LiveSocket {
  const live = Object.assign(watchFrames(), { ws });
  ws.onmessage = (ev: MessageEvent) => live.text(String(ev.data));
  ws.onclose = (ev: CloseEvent) => live.close(ev.code, ev.reason);
  return live;
}

async function openSocket(
  Ctor: typeof WebSocket,
  url: string,
  timeoutMs: number,
): Promise<{ live: LiveSocket; opened: boolean; handshakeMs: number; error?: string }> {
  const started = monoNow();
  let ws: WebSocket;
  try {
    ws = new Ctor(url);
  } catch (e) {
    const dummy = { onmessage: null, onclose: null } as unknown as WebSocket;
    return { live: watchSocket(dummy), opened: false, handshakeMs: 0, error: (e as Error).message };
  }
  const live = watchSocket(ws);
  const opened = await new Promise<boolean>((resolve) => {
    const t = setTimeout(() => resolve(false), timeoutMs);
    ws.onopen = () => {
      clearTimeout(t);
      resolve(true);
    };
    const prevClose = ws.onclose;
    ws.onclose = (ev: CloseEvent) => {
      clearTimeout(t);
      (prevClose as (ev: CloseEvent) => void)?.call(ws, ev);
      resolve(false);
    };
  });
  return { live, opened, handshakeMs: monoNow() - started };
}

/** Runs every check; never throws. */
export async function runWebSocketDiagnostics(
  botId: string,
  token: string | null | undefined,
  options: DiagnosticsOptions = {},
): Promise<DiagnosticsReport> {
  const started = monoNow();
  const startedAt = new Date().toISOString();
  const { apiUrl, wsUrl } = resolveEndpoints({ apiUrl: options.apiUrl, wsUrl: options.wsUrl });
  const timeoutMs = options.timeoutMs ?? 5000;
  const f = options.fetch;
  const Ctor = options.WebSocket ?? (globalThis.WebSocket as typeof WebSocket | undefined);
  const pageOrigin = typeof location !== 'undefined' && location.origin !== 'null' ? location.origin : null;
  const steps: DiagnosticStep[] = [];
  const policy = new ClosePolicy();
  let blocked: string | null = null; // id of the first failed step; later dependent steps skip

  const add = (id: string, status: StepStatus, detail: string, extra: Partial<DiagnosticStep> = {}): DiagnosticStep => {
    const step: DiagnosticStep = { id, title: TITLES[id] ?? id, status, detail: redact(detail), ...extra };
    if (step.fix) step.fix = redact(step.fix);
    steps.push(step);
    if (status === 'fail' && !blocked) blocked = id;
    log.diag('%s %s: %s', status.toUpperCase(), step.title, step.detail);
    options.onStep?.(step);
    return step;
  };
  const skip = (id: string, why = `skipped: "${TITLES[blocked ?? ''] ?? blocked}" failed`) => add(id, 'skip', why);

  // 1. Browser support
  const hasWs = typeof Ctor === 'function';
  const hasFetch = typeof (f ?? globalThis.fetch) === 'function';
  if (hasWs && hasFetch) add('browser', 'ok', 'WebSocket and fetch are available.');
  else
    add('browser', 'fail', `Missing: ${[!hasWs && 'WebSocket', !hasFetch && 'fetch'].filter(Boolean).join(', ')}.`, {
      fix: 'Use a current browser (Chrome, Firefox, Safari, Edge).',
    });

  // 2. Network
  const online = typeof navigator === 'undefined' ? true : navigator.onLine !== false;
  if (online) add('network', 'ok', 'The browser reports a network connection.');
  else
    add('network', 'warn', 'The browser reports no network connection (navigator.onLine is false).', {
      fix: 'Check Wi-Fi or cable; the connection resumes by itself when the network returns.',
    });

  // 3. API reachable
  const health = await http<{ status?: string; version?: string }>(apiUrl, '/api/health', { timeoutMs, fetch: f });
  const crossOrigin = pageOrigin !== null && originOf(apiUrl) !== pageOrigin;
  let corsSuspect = false;
  if (health.ok) {
    add(
      'api',
      health.ms > 1000 ? 'warn' : 'ok',
      `GET ${apiUrl}/api/health answered ${health.status} in ${fmtMs(health.ms)}${health.body?.version ? ` (natter ${health.body.version})` : ''}.`,
      {
        value: fmtMs(health.ms),
        ms: health.ms,
        ...(health.ms > 1000 ? { fix: 'The server or the network is slow; check the server load.' } : {}),
      },
    );
  } else if (health.network && crossOrigin && (f ?? globalThis.fetch)) {
    // A cross-origin fetch fails the same way for "server down" and "CORS refused": an opaque
    // no-cors request tells them apart.
    try {
      await (f ?? globalThis.fetch)(`${apiUrl}/api/health`, { mode: 'no-cors' });
      corsSuspect = true;
    } catch {
      corsSuspect = false;
    }
    if (corsSuspect) add('api', 'ok', `The server at ${apiUrl} answers, but the browser may not read its answers.`, { ms: health.ms });
    else
      add('api', 'fail', `The API at ${apiUrl} did not answer: ${health.message}.`, {
        fix: 'Start the server (natter serve) and check VITE_API_URL points at it.',
        ms: health.ms,
      });
  } else if (health.network) {
    add('api', 'fail', `The API at ${apiUrl} did not answer: ${health.message}.`, {
      fix: 'The backend is down or unreachable. Start the server (natter serve), check VITE_API_URL and any proxy in between.',
      ms: health.ms,
    });
  } else {
    add('api', 'fail', `GET /api/health answered ${health.status}: ${health.message}.`, {
      fix: 'The server is up but unhealthy: check its log and GET /api/ready.',
      ms: health.ms,
    });
  }

  // 4. CORS
  if (corsSuspect) {
    add('cors', 'fail', `The page's origin ${pageOrigin} is not allowed to call ${apiUrl}.`, {
      fix: `Start the server with --allowed-origin ${pageOrigin} (or serve the app from the server itself).`,
    });
  } else if (!crossOrigin) add('cors', 'ok', 'The page and the API share an origin: no CORS needed.');
  else if (health.ok) add('cors', 'ok', `Cross-origin (${pageOrigin} → ${originOf(apiUrl)}) and allowed.`);
  else skip('cors');

  // Ready: up is not enough when the database or the bus is down.
  if (health.ok) {
    const ready = await http<{ status: string; failed?: string[] }>(apiUrl, '/api/ready', { timeoutMs, fetch: f });
    if (ready.ok) add('ready', 'ok', 'The server and its dependencies are ready.', { ms: ready.ms });
    else if (ready.status === 503) {
      let failed: string[] = [];
      try {
        failed = (JSON.parse(ready.message) as { failed?: string[] }).failed ?? [];
      } catch {
        failed = [];
      }
      add('ready', 'fail', `The server is up but not ready: ${failed.join('; ') || ready.message}.`, {
        fix: 'A dependency of the server (its database or message bus) is down: check the server log; sockets will be refused with 1013 until it is back.',
      });
    } else add('ready', 'warn', `GET /api/ready answered ${ready.status}: ${ready.message}.`);
  } else skip('ready');

  // Registry, for naming close codes below.
  const codes = await http<unknown>(apiUrl, '/api/ws/codes', { timeoutMs, fetch: f });
  if (codes.ok) {
    try {
      policy.loadRegistry(decodeCodeRegistry(codes.body));
    } catch {
      // Keep the built-in copy.
    }
  }

  // 5. Token decoded
  let tokenOk = !!token;
  if (!token) {
    add('token_decoded', 'fail', 'No access token was given.', {
      fix: 'Log in, then run the diagnostics again (the app passes its token).',
    });
  } else {
    const claims = decodeJwt(token);
    if (!claims) {
      add('token_decoded', 'warn', 'The token is not a JWT the browser can read; only the server can judge it.', {
        value: `${token.length} chars`,
      });
    } else {
      const exp = typeof claims.exp === 'number' ? claims.exp : null;
      const iat = typeof claims.iat === 'number' ? claims.iat : null;
      const nowS = Date.now() / 1000;
      const left = exp !== null ? Math.round(exp - nowS) : null;
      const skew = iat !== null && iat > nowS + 5 ? Math.round(iat - nowS) : 0;
      const who = typeof claims.name === 'string' ? claims.name : typeof claims.sub === 'string' ? claims.sub : 'unknown user';
      const data = { expires_in_s: left, issued_ahead_s: skew || undefined };
      if (left !== null && left <= 0) {
        tokenOk = false;
        add('token_decoded', 'fail', `The token (for ${who}) expired ${-left} s ago by this computer's clock.`, {
          value: `expired ${-left} s ago`,
          fix: "Refresh the token or log in again. If you just logged in, this computer's clock is wrong.",
          data,
        });
      } else if (skew > 0) {
        add('token_decoded', 'warn', `The token was issued ${skew} s in this computer's future: the clocks disagree.`, {
          value: `skew ${skew} s`,
          fix: "Set this computer's clock automatically (NTP).",
          data,
        });
      } else if (left !== null && left < 60) {
        add('token_decoded', 'warn', `The token (for ${who}) expires in ${left} s.`, {
          value: `${left} s left`,
          fix: 'It will need a refresh soon; the app does that by itself.',
          data,
        });
      } else {
        add('token_decoded', 'ok', `A JWT for ${who}${left !== null ? `, valid for ${left} s more` : ''}.`, {
          value: left !== null ? `${left} s left` : undefined,
          data,
        });
      }
    }
  }

  // 6. Token accepted
  if (!health.ok && !corsSuspect) skip('token_accepted');
  else if (!token) skip('token_accepted', 'skipped: no token');
  else {
    const me = await http<UserView>(apiUrl, '/api/auth/me', { token, timeoutMs, fetch: f });
    if (me.ok)
      add('token_accepted', 'ok', `The server accepts the token: logged in as ${me.body.username}.`, {
        value: me.body.username,
        ms: me.ms,
      });
    else {
      tokenOk = false;
      add('token_accepted', 'fail', `GET /api/auth/me refused the token: ${me.code} (${me.message}).`, {
        value: me.code,
        fix:
          me.code === 'token_expired'
            ? 'The access token expired: refresh it or log in again.'
            : 'The token is not valid for this server: log in again (was the server data reset?).',
        ms: me.ms,
      });
    }
  }

  // 7. Bot
  let botOk = false;
  if (!health.ok && !corsSuspect) skip('bot');
  else if (!tokenOk) skip('bot', 'skipped: no accepted token');
  else {
    const bot = await http<BotView>(apiUrl, `/api/bots/${encodeURIComponent(botId)}`, { token: token!, timeoutMs, fetch: f });
    if (bot.ok) {
      botOk = true;
      add('bot', 'ok', `Bot "${bot.body.name}" exists; your role: ${bot.body.my_role}.`, { value: bot.body.name, ms: bot.ms });
    } else if (bot.status === 404 || bot.code === 'invalid_id') {
      add('bot', 'fail', `No bot has the id ${botId} (${bot.code}).`, {
        value: bot.code,
        fix: 'Check the bot id: pick the bot from the list (GET /api/bots).',
      });
    } else if (bot.status === 403) {
      add('bot', 'fail', `You may not use this bot: ${bot.message}.`, {
        value: 'forbidden',
        fix: "Ask the bot's owner to share it with you.",
      });
    } else {
      add('bot', 'fail', `GET /api/bots/${botId} answered ${bot.status}: ${bot.message}.`, { value: bot.code });
    }
  }

  // 8. Preflight
  let preflightOk = false;
  if (!health.ok && !corsSuspect) skip('preflight');
  else if (!token) skip('preflight', 'skipped: no token');
  else {
    const pf = await http<Preflight>(apiUrl, `/api/ws/preflight/${encodeURIComponent(botId)}`, { token, timeoutMs, fetch: f });
    if (!pf.ok)
      add('preflight', 'warn', `The preflight endpoint answered ${pf.status}: ${pf.message}.`, {
        fix: 'The server may be older than this client.',
      });
    else if (pf.body.ok) {
      preflightOk = true;
      add('preflight', 'ok', 'The server would accept this connection.', { ms: pf.ms });
    } else {
      const v = policy.verdict(pf.body.close_code ?? 0);
      add('preflight', 'fail', `The server would close the socket with ${pf.body.close_code} ${v.name}: ${pf.body.reason}.`, {
        value: String(pf.body.close_code),
        fix: v.description,
        data: { close_code: pf.body.close_code, retry: v.retry },
      });
    }
  }

  /** A one-time ticket for a connection when the server gives one, else the token (redacted in every report). */
  const credential = async (): Promise<TransportTarget['auth']> => {
    if (tokenOk && botOk) {
      const t = await http<TicketResponse>(apiUrl, '/api/ws/ticket', {
        method: 'POST',
        token: token!,
        body: { bot_id: botId },
        timeoutMs,
        fetch: f,
      });
      if (t.ok) return { kind: 'ticket', value: t.body.ticket };
    }
    return { kind: 'token', value: token! };
  };
  /** The step for a connection the server closed (or that went quiet) before `connection_established`. */
  const notEstablished = (id: string, c: { code: number; reason: string } | null, what: string, connectTimeout: number) => {
    if (!c)
      return add(id, 'fail', `No connection_established within ${connectTimeout} ms.`, {
        fix: 'The server is stuck or a proxy swallows frames: check the server log.',
      });
    const v = policy.verdict(c.code);
    return add(id, 'fail', `The server accepted the ${what}, then closed it with ${c.code} ${v.name}: ${c.reason || 'no reason'}.`, {
      value: String(c.code),
      data: { close_code: c.code },
      fix: v.description,
    });
  };
  const connectTimeout = options.connectTimeoutMs ?? 10_000;

  // 9–12. The socket itself.
  const socketSteps = ['handshake', 'established', 'ping', 'stability'];
  const mayConnect = (health.ok || corsSuspect) && !!token;
  // The WebSocket did not get through, in a way that points at the path rather than the server.
  let wsBlocked = false;
  if (!mayConnect || !hasWs) for (const id of socketSteps) skip(id);
  else {
    const auth = await credential();
    const query = `${auth.kind}=${encodeURIComponent(auth.value)}`;
    const attemptId = uuid();
    const url = `${wsUrl}/api/ws/chat/${encodeURIComponent(botId)}?${query}&attempt_id=${attemptId}`;
    const { live, opened, handshakeMs, error } = await openSocket(Ctor!, url, connectTimeout);
    if (!opened) {
      const closed = live.closed;
      const why =
        error ??
        (closed
          ? `closed with ${closed.code}${closed.reason ? ` (${closed.reason})` : ''} before opening`
          : `no answer within ${connectTimeout} ms`);
      wsBlocked = true;
      add('handshake', 'fail', `The WebSocket to ${redact(url)} did not open: ${why}.`, {
        fix: preflightOk
          ? 'The API works but WebSockets do not get through: a proxy, firewall, VPN or browser extension is blocking them, or VITE_WS_URL is wrong.'
          : 'Fix the failing step above first.',
        ms: handshakeMs,
        data: { attempt_id: attemptId },
      });
      for (const id of socketSteps.slice(1)) skip(id);
    } else {
      add('handshake', handshakeMs > 2000 ? 'warn' : 'ok', `The socket opened in ${fmtMs(handshakeMs)}.`, {
        value: fmtMs(handshakeMs),
        ms: handshakeMs,
        data: { attempt_id: attemptId },
      });
      const t0 = monoNow();
      const est = await live.waitFor((fr) => (fr.type === 'connection_established' ? fr : undefined), connectTimeout);
      if (!est) {
        const c = live.closed;
        // Opened, then dropped (1006) or silent: a proxy that answers 101 but carries no frames.
        wsBlocked = !c || c.code === 1006;
        notEstablished('established', c, 'socket', connectTimeout);
        for (const id of socketSteps.slice(2)) skip(id);
      } else {
        const ms = monoNow() - t0;
        const skew = Math.round((Date.parse(est.server_time) - Date.now()) / 1000);
        const problems: string[] = [];
        if (est.protocol_version !== PROTOCOL_VERSION)
          problems.push(`protocol version ${est.protocol_version}, this client speaks ${PROTOCOL_VERSION}`);
        if (Math.abs(skew) > 30) problems.push(`clocks differ by ${skew} s`);
        add(
          'established',
          problems.length ? 'warn' : 'ok',
          `Connection ${est.connection_id} as ${est.user.username} to "${est.bot.name}" in ${fmtMs(ms)}; heartbeat ${est.heartbeat_interval_ms} ms${problems.length ? `; ${problems.join('; ')}` : ''}.`,
          {
            value: fmtMs(ms),
            ms,
            data: { connection_id: est.connection_id, last_seq: est.last_seq, clock_skew_s: skew, limits: est.limits },
            ...(problems.length ? { fix: 'Update the client or the server so they match, and set clocks by NTP.' } : {}),
          },
        );

        // Ping samples.
        const samples: number[] = [];
        const n = options.pingSamples ?? 5;
        for (let i = 0; i < n && !live.closed; i++) {
          const id = `diag-${i}`;
          const sent = monoNow();
          try {
            live.ws.send(JSON.stringify({ type: 'ping', id }));
          } catch {
            break;
          }
          const pong = await live.waitFor((fr) => (fr.type === 'pong' && fr.id === id ? fr : undefined), 3000);
          if (pong) samples.push(monoNow() - sent);
        }
        if (samples.length === 0) {
          add('ping', 'fail', 'No pong came back.', { fix: 'The server does not answer app-level pings: check the server log.' });
        } else {
          const min = Math.min(...samples);
          const max = Math.max(...samples);
          const avg = samples.reduce((a, b) => a + b, 0) / samples.length;
          const lost = n - samples.length;
          add(
            'ping',
            lost || avg > 500 ? 'warn' : 'ok',
            `${samples.length}/${n} pongs; round-trip min ${fmtMs(min)}, avg ${fmtMs(avg)}, max ${fmtMs(max)}.`,
            {
              value: `avg ${fmtMs(avg)}`,
              data: { samples_ms: samples.map((s) => Math.round(s * 10) / 10), lost },
              ...(lost || avg > 500 ? { fix: 'The link is slow or lossy.' } : {}),
            },
          );
        }

        // Stability.
        const hold = options.stabilityMs ?? 3000;
        const c = await live.waitClose(hold);
        if (c) {
          const v = policy.verdict(c.code);
          add('stability', 'fail', `The connection dropped after connecting: ${c.code} ${v.name}${c.reason ? ` (${c.reason})` : ''}.`, {
            value: String(c.code),
            data: { close_code: c.code },
            fix: c.code === 1011 ? 'A server error after connect: look up the error id in the server log.' : v.description,
          });
        } else {
          add('stability', 'ok', `The connection stayed up for ${(hold / 1000).toFixed(1)} s.`, { value: `${(hold / 1000).toFixed(1)} s` });
        }
      }
      try {
        live.ws.close(1000, 'diagnostics done');
      } catch {
        // Already closed.
      }
    }
  }

  // The SSE binding: chat over plain HTTP, for a path that cannot carry the WebSocket.
  const sseSteps = ['sse_stream', 'sse_established', 'sse_ping'];
  const fetchImpl = f ?? (hasFetch ? globalThis.fetch.bind(globalThis) : null);
  let sseOk = false;
  if (!mayConnect || !fetchImpl) for (const id of sseSteps) skip(id, mayConnect ? 'skipped: no fetch' : undefined);
  else {
    const target = { apiUrl, wsUrl, botId, auth: await credential(), afterSeq: null, attemptId: uuid() };
    sseOk = await checkSse(new SseTransport(target, fetchImpl, () => token!), connectTimeout, add, notEstablished);
  }

  if (options.inUse) {
    const { transport, why } = options.inUse;
    if (transport === 'sse')
      add('transport', 'ok', `The chat uses HTTP streaming (SSE)${why ? `: ${transportWhyWords(why)}` : ''}.`, { value: 'HTTP streaming' });
    else add('transport', 'ok', 'The chat uses the WebSocket.', { value: 'WebSocket' });
  }

  // 13. The server's record of recent attempts (an observability endpoint, when it exists).
  if ((health.ok || corsSuspect) && tokenOk) {
    const a = await http<unknown>(apiUrl, `/api/connections?bot_id=${encodeURIComponent(botId)}&limit=10`, {
      token: token!,
      timeoutMs,
      fetch: f,
    });
    if (a.ok && Array.isArray(a.body)) {
      const rows = a.body as Array<{
        attempt_id: string;
        established: boolean;
        close_code: number | null;
        close_reason: string | null;
        closed_by: string | null;
        ended_at: string | null;
      }>;
      const ended = rows.filter((r) => r.ended_at);
      const refused = ended.filter((r) => r.closed_by === 'server' && r.close_code !== 1012);
      const last = ended[0];
      const lastText = last
        ? `latest: ${last.close_code ?? 'no close code'}${last.close_reason ? ` (${last.close_reason})` : ''}, closed by ${last.closed_by ?? 'unknown'}`
        : 'none ended yet';
      if (refused.length > 0 && refused[0] === last) {
        add('attempts', 'warn', `The server recorded ${rows.length} recent attempt(s); ${lastText}.`, {
          fix: 'See the close code’s meaning in the report above; the server’s record says why it ended.',
          data: { attempts: rows },
        });
      } else {
        add('attempts', 'ok', `The server recorded ${rows.length} recent attempt(s); ${lastText}.`, { data: { attempts: rows } });
      }
    } else if (a.status === 404) add('attempts', 'skip', 'This server does not keep a connection ledger.');
    else add('attempts', 'warn', `Could not read the server’s record of attempts (HTTP ${a.status}).`);
  } else skip('attempts');

  const failed = steps.filter((s) => s.status === 'fail');
  const firstFail = failed[0];
  const anyWarn = steps.some((s) => s.status === 'warn');
  const wsOk = socketSteps.every((id) => steps.some((s) => s.id === id && s.status !== 'fail' && s.status !== 'skip'));
  const transports: DiagnosticsReport['summary']['transports'] = {
    websocket: wsOk ? 'ok' : wsBlocked ? 'blocked' : steps.some((s) => s.id === 'handshake' && s.status === 'skip') ? 'skipped' : 'fail',
    sse: sseOk ? 'ok' : steps.some((s) => s.id === 'sse_stream' && s.status === 'skip') ? 'skipped' : 'fail',
  };
  // Only the socket failed, on the way, and chat works over HTTP streaming: a warning with the fix.
  const onlyWsBlocked = wsBlocked && sseOk && failed.every((s) => socketSteps.includes(s.id));
  const report: DiagnosticsReport = {
    tool: 'natter-websocket-diagnostics',
    version: 1,
    started_at: startedAt,
    duration_ms: Math.round(monoNow() - started),
    bot_id: botId,
    api_url: apiUrl,
    ws_url: wsUrl,
    page_origin: pageOrigin,
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
 * The SSE steps: the event stream opens, says `connection_established`, and a ping POSTed to it
 * comes back as a pong. Closes the stream; true when all three worked.
 */
async function checkSse(
  sse: SseTransport,
  connectTimeout: number,
  add: (id: string, status: StepStatus, detail: string, extra?: Partial<DiagnosticStep>) => DiagnosticStep,
  notEstablished: (id: string, c: { code: number; reason: string } | null, what: string, timeoutMs: number) => DiagnosticStep,
): Promise<boolean> {
  const w = watchFrames();
  const started = monoNow();
  let markOpen: (ok: boolean) => void = () => {};
  const opened = new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), connectTimeout);
    markOpen = (ok) => {
      clearTimeout(timer);
      resolve(ok);
    };
  });
  sse.open({
    open: () => markOpen(true),
    message: (text) => w.text(text),
    error: () => {},
    close: (code, reason) => {
      w.close(code, reason);
      markOpen(false);
    },
  });
  const skipAfter = (failed: string) => {
    const ids = ['sse_stream', 'sse_established', 'sse_ping'];
    for (const id of ids.slice(ids.indexOf(failed) + 1)) add(id, 'skip', `skipped: "${TITLES[failed]}" failed`);
  };
  try {
    if (!(await opened)) {
      const c = w.closed;
      add(
        'sse_stream',
        'fail',
        `The event stream ${redact(sse.url)} did not open: ${c ? c.reason : `no answer within ${connectTimeout} ms`}.`,
        {
          fix: 'Plain HTTP to the server works, but this long-lived response does not: a proxy may buffer or cut it (nginx: proxy_buffering off; the server sends X-Accel-Buffering: no), or the server is older than this client.',
          ms: monoNow() - started,
        },
      );
      skipAfter('sse_stream');
      return false;
    }
    const openMs = monoNow() - started;
    add('sse_stream', 'ok', `The event stream opened in ${fmtMs(openMs)}.`, { value: fmtMs(openMs), ms: openMs });
    const t0 = monoNow();
    const est = await w.waitFor((fr) => (fr.type === 'connection_established' ? fr : undefined), connectTimeout);
    if (!est) {
      notEstablished('sse_established', w.closed, 'event stream', connectTimeout);
      skipAfter('sse_established');
      return false;
    }
    const estMs = monoNow() - t0;
    add('sse_established', 'ok', `Connection ${est.connection_id} in ${fmtMs(estMs)}; keep-alive every ${est.heartbeat_interval_ms} ms.`, {
      value: fmtMs(estMs),
      ms: estMs,
      data: { connection_id: est.connection_id, last_seq: est.last_seq },
    });
    const p0 = monoNow();
    sse.send(JSON.stringify({ type: 'ping', id: 'diag-sse' }));
    const pong = await w.waitFor((fr) => (fr.type === 'pong' && fr.id === 'diag-sse' ? fr : undefined), 5000);
    if (!pong) {
      add('sse_ping', 'fail', 'A ping POSTed to the stream got no pong back.', {
        fix: 'The stream works but the POSTs of its frames do not: a proxy may refuse POST to /api/sse/, or the server is failing; check its log.',
      });
      return false;
    }
    const rtt = monoNow() - p0;
    add('sse_ping', 'ok', `The pong came back in ${fmtMs(rtt)}.`, { value: fmtMs(rtt), ms: rtt });
    return true;
  } finally {
    sse.close(1000, 'diagnostics done');
  }
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
