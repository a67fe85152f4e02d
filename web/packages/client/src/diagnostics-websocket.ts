/** Steps 9–12 of `runWebSocketDiagnostics`: the WebSocket's handshake, `connection_established`, ping and stability. */

import { credential, type DiagContext, fmtMs, mayConnect, notEstablished } from './diagnostics-context.js';
import { type LiveSocket, openSocket } from './diagnostics-socket.js';
import { now as monoNow, uuid } from './http.js';
import { redact } from './log.js';
import { PROTOCOL_VERSION } from './protocol.js';

export const SOCKET_STEPS = ['handshake', 'established', 'ping', 'stability'];

/**
 * Opens the socket and runs its steps (or skips them). True when the WebSocket did not get
 * through in a way that points at the path rather than the server.
 */
export async function checkWebSocket(ctx: DiagContext): Promise<boolean> {
  const { add, skip, botId, connectTimeout } = ctx;
  if (!mayConnect(ctx) || !ctx.hasWs) {
    for (const id of SOCKET_STEPS) skip(id);
    return false;
  }
  const auth = await credential(ctx);
  const query = `${auth.kind}=${encodeURIComponent(auth.value)}`;
  const attemptId = uuid();
  const url = `${ctx.wsUrl}/api/ws/chat/${encodeURIComponent(botId)}?${query}&attempt_id=${attemptId}`;
  const { live, opened, handshakeMs, error } = await openSocket(ctx.Ctor!, url, connectTimeout);
  if (!opened) {
    const closed = live.closed;
    const why =
      error ??
      (closed
        ? `closed with ${closed.code}${closed.reason ? ` (${closed.reason})` : ''} before opening`
        : `no answer within ${connectTimeout} ms`);
    add('handshake', 'fail', `The WebSocket to ${redact(url)} did not open: ${why}.`, {
      fix: ctx.preflightOk
        ? 'The API works but WebSockets do not get through: a proxy, firewall, VPN or browser extension is blocking them, or VITE_WS_URL is wrong.'
        : 'Fix the failing step above first.',
      ms: handshakeMs,
      data: { attempt_id: attemptId },
    });
    for (const id of SOCKET_STEPS.slice(1)) skip(id);
    return true;
  }
  add('handshake', handshakeMs > 2000 ? 'warn' : 'ok', `The socket opened in ${fmtMs(handshakeMs)}.`, {
    value: fmtMs(handshakeMs),
    ms: handshakeMs,
    data: { attempt_id: attemptId },
  });
  let blocked = false;
  if (await checkEstablished(ctx, live)) {
    await checkPing(ctx, live);
    await checkStability(ctx, live);
  } else {
    const c = live.closed;
    // Opened, then dropped (1006) or silent: a proxy that answers 101 but carries no frames.
    blocked = !c || c.code === 1006;
    notEstablished(ctx, 'established', c, 'socket');
    for (const id of SOCKET_STEPS.slice(2)) skip(id);
  }
  try {
    live.ws.close(1000, 'diagnostics done');
  } catch {
    // Already closed.
  }
  return blocked;
}

/** 10. `connection_established`, with the protocol version and the clocks checked; false when it never came. */
async function checkEstablished(ctx: DiagContext, live: LiveSocket): Promise<boolean> {
  const t0 = monoNow();
  const est = await live.waitFor((fr) => (fr.type === 'connection_established' ? fr : undefined), ctx.connectTimeout);
  if (!est) return false;
  const ms = monoNow() - t0;
  const skew = Math.round((Date.parse(est.server_time) - Date.now()) / 1000);
  const problems: string[] = [];
  if (est.protocol_version !== PROTOCOL_VERSION)
    problems.push(`protocol version ${est.protocol_version}, this client speaks ${PROTOCOL_VERSION}`);
  if (Math.abs(skew) > 30) problems.push(`clocks differ by ${skew} s`);
  ctx.add(
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
  return true;
}

/** 11. Ping samples. */
async function checkPing(ctx: DiagContext, live: LiveSocket): Promise<void> {
  const samples: number[] = [];
  const n = ctx.options.pingSamples ?? 5;
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
    ctx.add('ping', 'fail', 'No pong came back.', { fix: 'The server does not answer app-level pings: check the server log.' });
    return;
  }
  const min = Math.min(...samples);
  const max = Math.max(...samples);
  const avg = samples.reduce((a, b) => a + b, 0) / samples.length;
  const lost = n - samples.length;
  ctx.add(
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

/** 12. Stability: the connection stays up for `stabilityMs`. */
async function checkStability(ctx: DiagContext, live: LiveSocket): Promise<void> {
  const hold = ctx.options.stabilityMs ?? 3000;
  const c = await live.waitClose(hold);
  if (c) {
    const v = ctx.policy.verdict(c.code);
    ctx.add('stability', 'fail', `The connection dropped after connecting: ${c.code} ${v.name}${c.reason ? ` (${c.reason})` : ''}.`, {
      value: String(c.code),
      data: { close_code: c.code },
      fix: c.code === 1011 ? 'A server error after connect: look up the error id in the server log.' : v.description,
    });
  } else {
    ctx.add('stability', 'ok', `The connection stayed up for ${(hold / 1000).toFixed(1)} s.`, { value: `${(hold / 1000).toFixed(1)} s` });
  }
}
