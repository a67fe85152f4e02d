import { beforeEach, describe, expect, it } from 'vitest';
import { decodeJwt, formatReport, runWebSocketDiagnostics, type DiagnosticsOptions } from '../packages/client/src/diagnostics';
import { FakeWebSocket, established, fakeFetch, happyRoutes, type Route } from './fakes';

const TOKEN = `eyJhbGciOiJIUzI1NiJ9.${Buffer.from(JSON.stringify({ sub: 'u1', name: 'alice', exp: Math.floor(Date.now() / 1000) + 900, iat: Math.floor(Date.now() / 1000) })).toString('base64url')}.SIGNATURE-SECRET`;
const BOT = '00000000-0000-0000-0000-00000000000b';

/** A socket whose server opens, says connection_established and answers pings. */
function autoSocket(behaviour: { closeWith?: [number, string]; afterEstablished?: [number, string]; never?: boolean } = {}) {
  return class extends FakeWebSocket {
    constructor(url: string) {
      super(url);
      if (behaviour.never) return;
      setTimeout(() => {
        if (behaviour.closeWith) return this.serverClose(...behaviour.closeWith);
        this.open();
        this.receive(established());
        if (behaviour.afterEstablished) setTimeout(() => this.serverClose(...behaviour.afterEstablished!), 5);
      }, 1);
    }
    send(data: string): void {
      super.send(data);
      const f = JSON.parse(data);
      if (f.type === 'ping') setTimeout(() => this.receive({ type: 'pong', id: f.id, server_time: new Date().toISOString() }), 1);
    }
  };
}

const okRoutes: Route = (r) => {
  if (r.path === '/api/auth/me')
    return r.headers.Authorization === `Bearer ${TOKEN}`
      ? { status: 200, body: { id: 'u1', username: 'alice', is_admin: false, created_at: '' } }
      : { status: 401, body: { error: { code: 'invalid_token', message: 'bad signature' } } };
  if (r.path === `/api/bots/${BOT}`) return { status: 200, body: { id: BOT, name: 'Echo', my_role: 'owner' } };
  if (r.path.startsWith('/api/connections'))
    return {
      status: 200,
      body: [
        { attempt_id: 'a1', established: true, close_code: 1000, close_reason: '', closed_by: 'client', ended_at: '2026-01-01T00:00:00Z' },
      ],
    };
  if (r.path.startsWith('/api/bots/')) return { status: 404, body: { error: { code: 'not_found', message: 'no bot' } } };
  return undefined;
};

/**
 * The SSE binding in front of `rest`: `ok` streams connection_established and the `stream`
 * event and answers ping POSTs with a pong; `down` answers the stream with 502 (a proxy whose
 * server is gone); `silent` opens the stream and says nothing.
 */
function sseFetch(rest: typeof fetch, mode: 'ok' | 'down' | 'silent', seen: Array<{ method: string; url: string }>) {
  const enc = new TextEncoder();
  return (async (input: RequestInfo | URL, init: RequestInit = {}) => {
    const url = String(input);
    const method = init.method ?? 'GET';
    if (!url.includes('/api/sse/chat/')) return rest(input, init);
    seen.push({ method, url });
    if (mode === 'down') return new Response('bad gateway', { status: 502 });
    if (method === 'POST') {
      const f = JSON.parse(String(init.body)) as Record<string, unknown>;
      return new Response(JSON.stringify({ type: 'pong', id: f.id, server_time: new Date().toISOString() }), { status: 200 });
    }
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        init.signal?.addEventListener('abort', () => c.error(new DOMException('aborted', 'AbortError')));
        if (mode === 'silent') return;
        const ev = (name: string, data: unknown) => c.enqueue(enc.encode(`event: ${name}\ndata: ${JSON.stringify(data)}\n\n`));
        ev('connection_established', established({ connection_id: 'sse-conn' }));
        ev('stream', { connection_id: 'sse-conn', post: `/api/sse/chat/${BOT}/frames?stream=sse-conn` });
        c.enqueue(enc.encode(': keep-alive\n\n'));
      },
    });
    return new Response(body, { status: 200, headers: { 'Content-Type': 'text/event-stream' } });
  }) as typeof fetch;
}

async function diag(
  o: {
    token?: string | null;
    bot?: string;
    routes?: Route;
    ws?: ReturnType<typeof autoSocket>;
    sse?: 'ok' | 'down' | 'silent';
    seen?: Array<{ method: string; url: string }>;
    inUse?: DiagnosticsOptions['inUse'];
  } = {},
) {
  return runWebSocketDiagnostics(o.bot ?? BOT, o.token === undefined ? TOKEN : o.token, {
    apiUrl: 'http://api.test',
    fetch: sseFetch(fakeFetch(happyRoutes((r) => o.routes?.(r) ?? okRoutes(r))), o.sse ?? 'ok', o.seen ?? []),
    inUse: o.inUse,
    WebSocket: (o.ws ?? autoSocket()) as unknown as typeof WebSocket,
    stabilityMs: 30,
    pingSamples: 3,
    connectTimeoutMs: 200,
  });
}

beforeEach(() => FakeWebSocket.reset());

describe('runWebSocketDiagnostics', () => {
  it('reports the server’s record of recent attempts, warning when the latest was refused', async () => {
    const refused = await diag({
      routes: (r) =>
        r.path.startsWith('/api/connections')
          ? {
              status: 200,
              body: [
                {
                  attempt_id: 'a2',
                  established: false,
                  close_code: 4403,
                  close_reason: 'this bot is private and not shared with you',
                  closed_by: 'server',
                  ended_at: '2026-01-01T00:00:01Z',
                },
              ],
            }
          : undefined,
    });
    const step = refused.steps.find((s) => s.id === 'attempts')!;
    expect(step.status).toBe('warn');
    expect(step.detail).toContain('4403');
    const none = await diag({
      routes: (r) =>
        r.path.startsWith('/api/connections') ? { status: 404, body: { error: { code: 'not_found', message: 'no' } } } : undefined,
    });
    expect(none.steps.find((s) => s.id === 'attempts')?.status).toBe('skip');
  });

  it('passes every layer on a healthy setup, and holds no token', async () => {
    const r = await diag();
    const by = Object.fromEntries(r.steps.map((s) => [s.id, s.status]));
    expect(by).toMatchObject({
      browser: 'ok',
      network: 'ok',
      api: 'ok',
      cors: 'ok',
      ready: 'ok',
      token_decoded: 'ok',
      token_accepted: 'ok',
      bot: 'ok',
      preflight: 'ok',
      handshake: 'ok',
      established: 'ok',
      ping: 'ok',
      stability: 'ok',
      sse_stream: 'ok',
      sse_established: 'ok',
      sse_ping: 'ok',
      attempts: 'ok',
    });
    expect(r.summary).toMatchObject({ status: 'ok', failing_step: null });
    expect(r.steps.find((s) => s.id === 'ping')?.data?.samples_ms).toHaveLength(3);
    // The socket used a ticket, and nothing in the report or its text gives the token away.
    expect(FakeWebSocket.last.query.get('ticket')).toMatch(/^tkt-/);
    const text = JSON.stringify(r) + formatReport(r);
    expect(text).not.toContain('SIGNATURE-SECRET');
    expect(text).not.toContain(FakeWebSocket.last.query.get('ticket'));
  });

  it('names the token for a bad token', async () => {
    const bad = TOKEN.replace('SIGNATURE-SECRET', 'forged');
    const r = await diag({ token: bad });
    expect(r.summary.failing_step).toBe('token_accepted');
    expect(r.steps.find((s) => s.id === 'token_accepted')?.detail).toMatch(/invalid_token/);
    expect(r.steps.find((s) => s.id === 'bot')?.status).toBe('skip');
  });

  it('names an expired token before asking the server', async () => {
    const expired = `eyJhbGciOiJIUzI1NiJ9.${Buffer.from(JSON.stringify({ sub: 'u1', exp: 1000 })).toString('base64url')}.sig`;
    const r = await diag({ token: expired });
    expect(r.summary.failing_step).toBe('token_decoded');
    expect(r.steps.find((s) => s.id === 'token_decoded')?.fix).toMatch(/log in again/i);
  });

  it('names readiness when the database is down', async () => {
    const r = await diag({
      routes: (q) =>
        q.path === '/api/ready' ? { status: 503, body: { status: 'unavailable', failed: ['store: disk I/O error'] } } : undefined,
    });
    expect(r.summary.failing_step).toBe('ready');
    expect(r.steps.find((s) => s.id === 'ready')?.detail).toMatch(/store: disk I\/O error/);
  });

  it('names the bot for a missing bot', async () => {
    const r = await diag({
      bot: '11111111-2222-4333-8444-555555555555',
      routes: (q) =>
        q.path.startsWith('/api/ws/preflight/') ? { status: 200, body: { ok: false, close_code: 4404, reason: 'no bot' } } : undefined,
    });
    expect(r.summary.failing_step).toBe('bot');
    expect(r.steps.find((s) => s.id === 'preflight')).toMatchObject({ status: 'fail', value: '4404' });
  });

  it('names the API for a stopped server', async () => {
    const r = await diag({ routes: () => 'network_error' });
    expect(r.summary.failing_step).toBe('api');
    expect(r.steps.find((s) => s.id === 'api')?.fix).toMatch(/Start the server/);
    expect(FakeWebSocket.instances).toHaveLength(0);
  });

  it('names the handshake when the API works but sockets are blocked and HTTP streaming fails too', async () => {
    for (const sse of ['down', 'silent'] as const) {
      const r = await diag({ ws: autoSocket({ closeWith: [1006, ''] }), sse });
      expect(r.summary.status).toBe('fail');
      expect(r.summary.failing_step).toBe('handshake');
      expect(r.steps.find((s) => s.id === 'handshake')?.fix).toMatch(/proxy, firewall/);
      const failed = sse === 'down' ? 'sse_stream' : 'sse_established';
      expect(r.steps.find((s) => s.id === failed)).toMatchObject({ status: 'fail', title: expect.stringMatching(/HTTP streaming/) });
      expect(r.summary.transports).toEqual({ websocket: 'blocked', sse: 'fail' });
    }
  });

  it('says "WebSocket blocked — using HTTP streaming" when only the socket is blocked, with the proxy fix', async () => {
    const seen: Array<{ method: string; url: string }> = [];
    for (const ws of [autoSocket({ closeWith: [1006, ''] }), autoSocket({ never: true })]) {
      const r = await diag({ ws, seen });
      expect(r.summary).toMatchObject({ status: 'warn', failing_step: null, headline: 'WebSocket blocked — using HTTP streaming' });
      expect(r.summary.fix).toMatch(/Upgrade and Connection headers/);
      expect(r.summary.fix).toContain('proxy_set_header Upgrade $http_upgrade;');
      expect(r.summary.fix).toContain('proxy_set_header Connection "upgrade";');
      expect(r.summary.transports).toEqual({ websocket: 'blocked', sse: 'ok' });
      const by = Object.fromEntries(r.steps.map((s) => [s.id, s.status]));
      expect(by).toMatchObject({ handshake: 'fail', sse_stream: 'ok', sse_established: 'ok', sse_ping: 'ok' });
      expect(formatReport(r)).toContain('proxy_set_header Upgrade');
    }
    // The stream used a ticket of its own, the ping went up by POST, and no token is in a URL.
    const stream = seen.find((x) => x.method === 'GET')!;
    expect(new URL(stream.url).searchParams.get('ticket')).toMatch(/^tkt-/);
    expect(seen.some((x) => x.method === 'POST' && x.url.endsWith('/frames?stream=sse-conn'))).toBe(true);
    expect(JSON.stringify(seen)).not.toContain('SIGNATURE-SECRET');
  });

  it('says so when both transports work', async () => {
    const r = await diag();
    expect(r.summary).toMatchObject({ status: 'ok', failing_step: null, transports: { websocket: 'ok', sse: 'ok' } });
    expect(r.summary.headline).toMatch(/WebSocket and HTTP streaming/);
  });

  it('keeps a real failure ahead of a working HTTP stream', async () => {
    const r = await diag({ ws: autoSocket({ afterEstablished: [1011, 'internal error (error id 42)'] }) });
    expect(r.summary.status).toBe('fail');
    const p = await diag({
      routes: (q) =>
        q.path.startsWith('/api/ws/preflight/') ? { status: 200, body: { ok: false, close_code: 4429, reason: 'too many' } } : undefined,
      ws: autoSocket({ closeWith: [1006, ''] }),
    });
    expect(p.summary).toMatchObject({ status: 'fail', failing_step: 'preflight' });
  });

  it('says which transport the chat uses and why', async () => {
    const sse = await diag({ ws: autoSocket({ closeWith: [1006, ''] }), inUse: { transport: 'sse', why: 'preflight_ok' } });
    const step = sse.steps.find((s) => s.id === 'transport')!;
    expect(step).toMatchObject({ status: 'ok', title: 'Transport in use', value: 'HTTP streaming' });
    expect(step.detail).toMatch(/HTTP streaming.*WebSocket/);
    const ws = await diag({ inUse: { transport: 'websocket', why: null } });
    expect(ws.steps.find((s) => s.id === 'transport')).toMatchObject({ value: 'WebSocket' });
    expect((await diag()).steps.some((s) => s.id === 'transport')).toBe(false);
  });

  it('names a server error after connect', async () => {
    const r = await diag({ ws: autoSocket({ afterEstablished: [1011, 'internal error (error id 42)'] }) });
    const failing = r.steps.find((s) => s.status === 'fail')!;
    expect(['ping', 'stability']).toContain(failing.id);
    expect(JSON.stringify(r.steps)).toMatch(/1011/);
  });

  it('reports a close before connection_established with its code', async () => {
    const ws = class extends FakeWebSocket {
      constructor(url: string) {
        super(url);
        setTimeout(() => {
          this.open();
          this.serverClose(4403, 'this bot is private and not shared with you');
        }, 1);
      }
    };
    const r = await diag({ ws: ws as unknown as ReturnType<typeof autoSocket> });
    expect(r.summary.failing_step).toBe('established');
    expect(r.steps.find((s) => s.id === 'established')?.detail).toMatch(/4403 forbidden: this bot is private/);
    expect(r.summary.headline).toBe("The server closed the chat connection: you don't have access to this bot.");
  });

  it('headlines a failure with one plain sentence: no URL, no browser words, no code names', async () => {
    const cases = [
      await diag({ routes: () => 'network_error' }),
      await diag({ bot: '11111111-2222-4333-8444-555555555555' }),
      await diag({ token: null }),
      await diag({ ws: autoSocket({ closeWith: [1006, ''] }), sse: 'down' }),
      await diag({
        routes: (q) =>
          q.path.startsWith('/api/ws/preflight/') ? { status: 200, body: { ok: false, close_code: 4429, reason: 'too many' } } : undefined,
      }),
    ];
    for (const r of cases) {
      const h = r.summary.headline;
      expect(r.summary.status).toBe('fail');
      expect(h, h).toMatch(/^[A-Z].*[.]$/);
      expect(h, h).not.toMatch(/https?:|wss?:|\/api\/|fetch|\b[a-z]+_[a-z_]+\b|\b[14]\d{3}\b/i);
      expect(h.length, h).toBeLessThan(110);
    }
    expect(cases[0].summary.headline).toMatch(/^Can't reach the server/);
    expect(cases[4].summary.headline).toBe('The server would refuse the chat connection: too many tabs are open.');
  });
});

describe('decodeJwt', () => {
  it('reads the payload, and refuses what is not a JWT', () => {
    expect(decodeJwt(TOKEN)).toMatchObject({ sub: 'u1', name: 'alice' });
    expect(decodeJwt('opaque')).toBeNull();
    expect(decodeJwt('a.###.c')).toBeNull();
  });
});
