/**
 * The SSE steps of `runWebSocketDiagnostics`: chat over plain HTTP, for a path that cannot carry
 * the WebSocket. The event stream opens, says `connection_established`, and a ping POSTed to it
 * comes back as a pong.
 */

import { credential, type DiagContext, fmtMs, mayConnect, notEstablished, TITLES } from './diagnostics-context.js';
import { watchFrames } from './diagnostics-socket.js';
import { now as monoNow, uuid } from './http.js';
import { redact } from './log.js';
import { SseTransport } from './sse-transport.js';

const SSE_STEPS = ['sse_stream', 'sse_established', 'sse_ping'];

/** Runs the SSE steps (or skips them); true when all three worked. */
export async function checkSseLayer(ctx: DiagContext): Promise<boolean> {
  const may = mayConnect(ctx);
  const fetchImpl = ctx.fetch ?? (ctx.hasFetch ? globalThis.fetch.bind(globalThis) : null);
  if (!may || !fetchImpl) {
    for (const id of SSE_STEPS) ctx.skip(id, may ? 'skipped: no fetch' : undefined);
    return false;
  }
  const target = { apiUrl: ctx.apiUrl, wsUrl: ctx.wsUrl, botId: ctx.botId, auth: await credential(ctx), afterSeq: null, attemptId: uuid() };
  return checkSse(ctx, new SseTransport(target, fetchImpl, () => ctx.token!));
}

/** Opens the stream and runs its steps. Closes the stream; true when all three worked. */
async function checkSse(ctx: DiagContext, sse: SseTransport): Promise<boolean> {
  const { add, connectTimeout } = ctx;
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
    for (const id of SSE_STEPS.slice(SSE_STEPS.indexOf(failed) + 1)) add(id, 'skip', `skipped: "${TITLES[failed]}" failed`);
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
      notEstablished(ctx, 'sse_established', w.closed, 'event stream');
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
