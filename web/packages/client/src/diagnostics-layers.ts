/**
 * The layers of `runWebSocketDiagnostics` before and after the connections themselves:
 * browser and network, API, CORS and readiness, token, bot and preflight, the transport in use,
 * and the server's record of attempts. Each adds its steps to the context, in order.
 */

import { api, type DiagContext, decodeJwt, fmtMs, originOf, reachable } from './diagnostics-context.js';
import { decodeCodeRegistry, type BotView, type Preflight, type UserView } from './protocol.js';
import { transportWhyWords } from './words.js';

/** 1–2. Browser support and network. */
export function checkEnvironment(ctx: DiagContext): void {
  const { add } = ctx;
  ctx.hasWs = typeof ctx.Ctor === 'function';
  ctx.hasFetch = typeof (ctx.fetch ?? globalThis.fetch) === 'function';
  const { hasWs, hasFetch } = ctx;
  if (hasWs && hasFetch) add('browser', 'ok', 'WebSocket and fetch are available.');
  else
    add('browser', 'fail', `Missing: ${[!hasWs && 'WebSocket', !hasFetch && 'fetch'].filter(Boolean).join(', ')}.`, {
      fix: 'Use a current browser (Chrome, Firefox, Safari, Edge).',
    });

  const online = typeof navigator === 'undefined' ? true : navigator.onLine !== false;
  if (online) add('network', 'ok', 'The browser reports a network connection.');
  else
    add('network', 'warn', 'The browser reports no network connection (navigator.onLine is false).', {
      fix: 'Check Wi-Fi or cable; the connection resumes by itself when the network returns.',
    });
}

/** 3. API reachable; sets `healthOk` and `corsSuspect`. */
async function checkApi(ctx: DiagContext, crossOrigin: boolean): Promise<void> {
  const { add, apiUrl } = ctx;
  const f = ctx.fetch;
  const health = await api<{ status?: string; version?: string }>(ctx, '/api/health');
  ctx.healthOk = health.ok;
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
      ctx.corsSuspect = true;
    } catch {
      ctx.corsSuspect = false;
    }
    if (ctx.corsSuspect) add('api', 'ok', `The server at ${apiUrl} answers, but the browser may not read its answers.`, { ms: health.ms });
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
}

/** 3–4. API reachable, CORS, server ready; then the close-code registry, for naming close codes. */
export async function checkServer(ctx: DiagContext): Promise<void> {
  const { add, skip, apiUrl, pageOrigin } = ctx;
  const crossOrigin = pageOrigin !== null && originOf(apiUrl) !== pageOrigin;
  await checkApi(ctx, crossOrigin);

  if (ctx.corsSuspect) {
    add('cors', 'fail', `The page's origin ${pageOrigin} is not allowed to call ${apiUrl}.`, {
      fix: `Start the server with --allowed-origin ${pageOrigin} (or serve the app from the server itself).`,
    });
  } else if (!crossOrigin) add('cors', 'ok', 'The page and the API share an origin: no CORS needed.');
  else if (ctx.healthOk) add('cors', 'ok', `Cross-origin (${pageOrigin} → ${originOf(apiUrl)}) and allowed.`);
  else skip('cors');

  // Ready: up is not enough when the database or the bus is down.
  if (ctx.healthOk) {
    const ready = await api<{ status: string; failed?: string[] }>(ctx, '/api/ready');
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

  const codes = await api<unknown>(ctx, '/api/ws/codes');
  if (codes.ok) {
    try {
      ctx.policy.loadRegistry(decodeCodeRegistry(codes.body));
    } catch {
      // Keep the built-in copy.
    }
  }
}

/** 5. Token readable: what the browser can tell from the JWT's claims. */
function checkTokenDecoded(ctx: DiagContext, token: string): void {
  const { add } = ctx;
  const claims = decodeJwt(token);
  if (!claims) {
    add('token_decoded', 'warn', 'The token is not a JWT the browser can read; only the server can judge it.', {
      value: `${token.length} chars`,
    });
    return;
  }
  const exp = typeof claims.exp === 'number' ? claims.exp : null;
  const iat = typeof claims.iat === 'number' ? claims.iat : null;
  const nowS = Date.now() / 1000;
  const left = exp !== null ? Math.round(exp - nowS) : null;
  const skew = iat !== null && iat > nowS + 5 ? Math.round(iat - nowS) : 0;
  const who = typeof claims.name === 'string' ? claims.name : typeof claims.sub === 'string' ? claims.sub : 'unknown user';
  const data = { expires_in_s: left, issued_ahead_s: skew || undefined };
  if (left !== null && left <= 0) {
    ctx.tokenOk = false;
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

/** 5–6. Token readable and accepted; sets `tokenOk`. */
export async function checkToken(ctx: DiagContext): Promise<void> {
  const { add, skip, token } = ctx;
  ctx.tokenOk = !!token;
  if (!token) {
    add('token_decoded', 'fail', 'No access token was given.', {
      fix: 'Log in, then run the diagnostics again (the app passes its token).',
    });
  } else checkTokenDecoded(ctx, token);

  if (!reachable(ctx)) skip('token_accepted');
  else if (!token) skip('token_accepted', 'skipped: no token');
  else {
    const me = await api<UserView>(ctx, '/api/auth/me', { token });
    if (me.ok)
      add('token_accepted', 'ok', `The server accepts the token: logged in as ${me.body.username}.`, {
        value: me.body.username,
        ms: me.ms,
      });
    else {
      ctx.tokenOk = false;
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
}

/** 7–8. The bot, and the server's preflight verdict on a connection to it; sets `botOk` and `preflightOk`. */
export async function checkBotAndPreflight(ctx: DiagContext): Promise<void> {
  const { add, skip, botId, token } = ctx;
  if (!reachable(ctx)) skip('bot');
  else if (!ctx.tokenOk) skip('bot', 'skipped: no accepted token');
  else {
    const bot = await api<BotView>(ctx, `/api/bots/${encodeURIComponent(botId)}`, { token: token! });
    if (bot.ok) {
      ctx.botOk = true;
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

  if (!reachable(ctx)) skip('preflight');
  else if (!token) skip('preflight', 'skipped: no token');
  else {
    const pf = await api<Preflight>(ctx, `/api/ws/preflight/${encodeURIComponent(botId)}`, { token });
    if (!pf.ok)
      add('preflight', 'warn', `The preflight endpoint answered ${pf.status}: ${pf.message}.`, {
        fix: 'The server may be older than this client.',
      });
    else if (pf.body.ok) {
      ctx.preflightOk = true;
      add('preflight', 'ok', 'The server would accept this connection.', { ms: pf.ms });
    } else {
      const v = ctx.policy.verdict(pf.body.close_code ?? 0);
      add('preflight', 'fail', `The server would close the socket with ${pf.body.close_code} ${v.name}: ${pf.body.reason}.`, {
        value: String(pf.body.close_code),
        fix: v.description,
        data: { close_code: pf.body.close_code, retry: v.retry },
      });
    }
  }
}

/** What the app's chat connection uses now, when the caller said. */
export function checkTransportInUse(ctx: DiagContext): void {
  if (!ctx.options.inUse) return;
  const { transport, why } = ctx.options.inUse;
  if (transport === 'sse')
    ctx.add('transport', 'ok', `The chat uses HTTP streaming (SSE)${why ? `: ${transportWhyWords(why)}` : ''}.`, {
      value: 'HTTP streaming',
    });
  else ctx.add('transport', 'ok', 'The chat uses the WebSocket.', { value: 'WebSocket' });
}

interface AttemptRow {
  attempt_id: string;
  established: boolean;
  close_code: number | null;
  close_reason: string | null;
  closed_by: string | null;
  ended_at: string | null;
}

/** 13. The server's record of recent attempts (an observability endpoint, when it exists). */
export async function checkAttempts(ctx: DiagContext): Promise<void> {
  const { add, skip, botId } = ctx;
  if (!(reachable(ctx) && ctx.tokenOk)) {
    skip('attempts');
    return;
  }
  const a = await api<unknown>(ctx, `/api/connections?bot_id=${encodeURIComponent(botId)}&limit=10`, { token: ctx.token! });
  if (a.ok && Array.isArray(a.body)) {
    const rows = a.body as AttemptRow[];
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
}
