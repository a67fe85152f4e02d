import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import createDebug from 'debug';
import { ChatSocket, type ChatSocketOptions, type ConnectionState } from '../packages/client/src/chat-socket';
import { FakeEnv, FakeWebSocket, MapStorage, fakeFetch, happyRoutes, wireMessage, type Route } from './fakes';

const TOKEN = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSIsIm5hbWUiOiJhbGljZSJ9.SECRETSIGNATURExyz';

async function flush(): Promise<void> {
  for (let i = 0; i < 5; i++) {
    await vi.advanceTimersByTimeAsync(0);
    for (let j = 0; j < 20; j++) await Promise.resolve();
  }
}

function setup(o: { routes?: Route; socket?: Partial<ChatSocketOptions>; storage?: MapStorage } = {}) {
  const env = new FakeEnv();
  const storage = o.storage ?? new MapStorage();
  const fetch = fakeFetch(happyRoutes(o.routes));
  const refresh = vi.fn(async () => `fresh-${TOKEN}`);
  let token: string | null = TOKEN;
  const s = new ChatSocket({
    apiUrl: 'http://api.test',
    getToken: () => token,
    refreshToken: refresh,
    WebSocket: FakeWebSocket as unknown as typeof WebSocket,
    fetch,
    environment: env,
    storage,
    random: () => 0.999999,
    ...o.socket,
  });
  const states: ConnectionState[] = [];
  s.on('state', (st) => states.push(st));
  const kinds = () => states.map((x) => x.kind);
  return { s, env, storage, fetch, refresh, states, kinds, setToken: (t: string | null) => (token = t) };
}

beforeEach(() => {
  vi.useFakeTimers();
  FakeWebSocket.reset();
});
afterEach(() => {
  vi.useRealTimers();
});

describe('state machine', () => {
  it('goes idle → checking → connecting → open, with a ticket and no token in the URL', async () => {
    const { s, kinds, fetch } = setup();
    expect(s.state.kind).toBe('idle');
    s.connect('b1');
    await flush();
    expect(kinds()).toEqual(['checking', 'connecting']);
    const ws = FakeWebSocket.last;
    expect(ws.url).toMatch(/^ws:\/\/api\.test\/api\/ws\/chat\/b1\?ticket=tkt-/);
    expect(ws.url).not.toContain(TOKEN);
    expect(ws.query.get('attempt_id')).toMatch(/^[0-9a-f-]{36}$/);
    expect(fetch.calls.map((c) => c.path)).toEqual(['/api/health', '/api/ws/codes', '/api/ws/ticket']);
    ws.establish({ connection_id: 'conn-9', last_seq: 4 });
    expect(s.state).toMatchObject({ kind: 'open', connectionId: 'conn-9' });
    expect(s.isConnected()).toBe(true);
    expect(s.getCurrentBotId()).toBe('b1');
    expect(s.lastSeq).toBe(4);
    s.disconnect();
    expect(s.state.kind).toBe('idle');
    expect(ws.closedByClient?.code).toBe(1000);
    expect(s.getCurrentBotId()).toBeNull();
  });

  it('puts the token in the URL only when tickets are turned off', async () => {
    const { s } = setup({ socket: { useTicket: false } });
    s.connect('b1');
    await flush();
    expect(FakeWebSocket.last.query.get('token')).toBe(TOKEN);
  });

  it('backs off without opening sockets while the health check fails', async () => {
    let healthy = false;
    const { s, kinds } = setup({ routes: (r) => (r.path === '/api/health' && !healthy ? 'network_error' : undefined) });
    s.connect('b1');
    await flush();
    expect(s.state).toMatchObject({ kind: 'backend_unavailable', attempt: 1 });
    expect((s.state as { error: string }).error).toMatch(/unreachable/);
    await vi.advanceTimersByTimeAsync(499);
    await flush();
    expect(s.state).toMatchObject({ kind: 'backend_unavailable', attempt: 2 });
    await vi.advanceTimersByTimeAsync(999);
    await flush();
    expect(s.state).toMatchObject({ kind: 'backend_unavailable', attempt: 3 });
    expect(FakeWebSocket.instances).toHaveLength(0);
    healthy = true;
    await vi.advanceTimersByTimeAsync(1999);
    await flush();
    expect(FakeWebSocket.instances).toHaveLength(1);
    expect(kinds().slice(-2)).toEqual(['checking', 'connecting']);
  });

  it('reconnects after 1012 with growing full-jitter delays, and resets after 30 s stable', async () => {
    const { s } = setup();
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish();
    const delays: number[] = [];
    for (let i = 0; i < 8; i++) {
      FakeWebSocket.last.serverClose(1012, 'server restarting; reconnect with backoff');
      await flush();
      const st = s.state as Extract<ConnectionState, { kind: 'reconnecting' }>;
      expect(st.kind).toBe('reconnecting');
      expect(st.lastClose).toMatchObject({ code: 1012, name: 'server_restarting' });
      const delay = st.retryAt - Date.now();
      delays.push(delay);
      const before = FakeWebSocket.instances.length;
      await vi.advanceTimersByTimeAsync(Math.max(0, delay - 1));
      expect(FakeWebSocket.instances.length).toBe(before); // not early
      await vi.advanceTimersByTimeAsync(1);
      await flush();
      expect(FakeWebSocket.instances.length).toBe(before + 1);
    }
    expect(delays).toEqual([499, 999, 1999, 3999, 7999, 15999, 29999, 29999]);
    // Stable for 30 s: the next drop starts from the base again.
    FakeWebSocket.last.establish();
    await vi.advanceTimersByTimeAsync(30_000);
    FakeWebSocket.last.serverClose(1012, 'restarting');
    await flush();
    expect((s.state as { retryAt: number }).retryAt - Date.now()).toBe(499);
  });

  it('does not reset the backoff on a connection that drops before 30 s', async () => {
    const { s } = setup();
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish();
    FakeWebSocket.last.serverClose(1011, 'internal error (error id 1)');
    await flush();
    await vi.advanceTimersByTimeAsync(499);
    await flush();
    FakeWebSocket.last.establish();
    await vi.advanceTimersByTimeAsync(10_000);
    FakeWebSocket.last.serverClose(1011, 'internal error (error id 2)');
    await flush();
    expect((s.state as { retryAt: number }).retryAt - Date.now()).toBe(999);
  });

  it('honours the 1013 retry hint', async () => {
    const { s } = setup({ socket: { random: () => 0 } });
    s.connect('b1');
    await flush();
    FakeWebSocket.last.serverClose(1013, 'message bus unavailable; retry_after_ms=5000');
    await flush();
    expect(s.state.kind).toBe('reconnecting');
    await vi.advanceTimersByTimeAsync(4999);
    expect(FakeWebSocket.instances).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1);
    await flush();
    expect(FakeWebSocket.instances).toHaveLength(2);
  });

  for (const [code, reason] of [
    [4404, 'no bot with id b1'],
    [4403, 'this bot is private and not shared with you'],
    [4400, 'bot id is not a valid UUID'],
    [1008, 'origin http://evil is not allowed'],
  ] as const) {
    it(`fails for good on ${code}, with advice and no retry loop`, async () => {
      const { s } = setup();
      s.connect('b1');
      await flush();
      FakeWebSocket.last.serverClose(code, reason);
      await flush();
      expect(s.state).toMatchObject({ kind: 'failed', code, reason });
      expect((s.state as { advice: string }).advice.length).toBeGreaterThan(10);
      await vi.advanceTimersByTimeAsync(10 * 60_000);
      await flush();
      expect(FakeWebSocket.instances).toHaveLength(1);
      expect(s.state.kind).toBe('failed');
    });
  }

  it('on 4401 asks the app for a fresh token once, then connects', async () => {
    const { s, refresh, setToken } = setup({ socket: { useTicket: false } });
    s.connect('b1');
    await flush();
    refresh.mockImplementationOnce(async () => {
      setToken('fresh-token');
      return 'fresh-token';
    });
    FakeWebSocket.last.serverClose(4401, 'token expired: refresh it and reconnect');
    await flush();
    expect(refresh).toHaveBeenCalledTimes(1);
    expect(FakeWebSocket.instances).toHaveLength(2);
    expect(FakeWebSocket.last.query.get('token')).toBe('fresh-token');
    FakeWebSocket.last.establish();
    expect(s.state.kind).toBe('open');
  });

  it('fails with "Session expired" when the refreshed token is refused too', async () => {
    const { s, refresh } = setup();
    s.connect('b1');
    await flush();
    FakeWebSocket.last.serverClose(4401, 'invalid token: malformed or bad signature');
    await flush();
    expect(FakeWebSocket.instances).toHaveLength(2);
    FakeWebSocket.last.serverClose(4401, 'invalid token: malformed or bad signature');
    await flush();
    expect(refresh).toHaveBeenCalledTimes(1);
    expect(s.state).toMatchObject({ kind: 'failed', code: 4401 });
    expect((s.state as { reason: string }).reason).toMatch(/Session expired, log in again/);
    await vi.advanceTimersByTimeAsync(5 * 60_000);
    expect(FakeWebSocket.instances).toHaveLength(2);
  });

  it('fails at once when the app has no fresh token', async () => {
    const { s, refresh } = setup();
    refresh.mockImplementation(async () => null as unknown as string);
    s.connect('b1');
    await flush();
    FakeWebSocket.last.serverClose(4401, 'token expired');
    await flush();
    expect(s.state).toMatchObject({ kind: 'failed', code: 4401, reason: 'Session expired, log in again' });
  });

  it('maps a 401 from the ticket endpoint to the 4401 policy', async () => {
    let expired = true;
    const { s, refresh } = setup({
      routes: (r) =>
        r.path === '/api/ws/ticket' && expired
          ? { status: 401, body: { error: { code: 'token_expired', message: 'expired' } } }
          : undefined,
    });
    refresh.mockImplementation(async () => {
      expired = false;
      return 'new';
    });
    s.connect('b1');
    await flush();
    expect(refresh).toHaveBeenCalledTimes(1);
    expect(FakeWebSocket.instances).toHaveLength(1);
    FakeWebSocket.last.establish();
    expect(s.state.kind).toBe('open');
  });

  it('maps a 404 from the ticket endpoint to failed without a socket', async () => {
    const { s } = setup({
      routes: (r) =>
        r.path === '/api/ws/ticket' ? { status: 404, body: { error: { code: 'not_found', message: 'no bot with id b1' } } } : undefined,
    });
    s.connect('b1');
    await flush();
    expect(s.state).toMatchObject({ kind: 'failed', code: 4404 });
    expect(FakeWebSocket.instances).toHaveLength(0);
  });

  it('asks the preflight after a 1006 and stops if it names a terminal code', async () => {
    const { s, fetch } = setup({
      routes: (r) =>
        r.path.startsWith('/api/ws/preflight/')
          ? { status: 200, body: { ok: false, close_code: 4403, reason: 'not shared with you' } }
          : undefined,
    });
    s.connect('b1');
    await flush();
    FakeWebSocket.last.serverClose(1006);
    await flush();
    const pf = fetch.calls.find((c) => c.path.startsWith('/api/ws/preflight/b1'));
    expect(pf?.headers.Authorization).toBe(`Bearer ${TOKEN}`);
    expect(s.state).toMatchObject({ kind: 'failed', code: 4403, reason: 'not shared with you' });
  });

  it('backs off after a 1006 the preflight cannot explain', async () => {
    const { s } = setup();
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish();
    FakeWebSocket.last.serverClose(1006);
    await flush();
    expect(s.state).toMatchObject({ kind: 'reconnecting', lastClose: { code: 1006, name: 'abnormal_closure' } });
  });

  it('times out a connection that never says connection_established', async () => {
    const { s } = setup({ socket: { connectTimeoutMs: 10_000 } });
    s.connect('b1');
    await flush();
    const ws = FakeWebSocket.last;
    ws.open();
    await vi.advanceTimersByTimeAsync(9_999);
    expect(s.state.kind).toBe('connecting');
    await vi.advanceTimersByTimeAsync(1);
    expect(s.state).toMatchObject({ kind: 'reconnecting', lastClose: { code: 4000, name: 'connect_timeout' } });
    expect(ws.closedByClient).not.toBeNull();
  });

  it('pings and treats two silent heartbeat intervals as a dead connection', async () => {
    const { s } = setup();
    s.connect('b1');
    await flush();
    const ws = FakeWebSocket.last;
    ws.establish({ heartbeat_interval_ms: 1000 });
    await vi.advanceTimersByTimeAsync(500);
    expect(ws.frames.filter((f) => f.type === 'ping')).toHaveLength(1);
    // Pongs keep it alive.
    for (let i = 0; i < 6; i++) {
      const ping = ws.frames.filter((f) => f.type === 'ping').at(-1)!;
      ws.receive({ type: 'pong', id: ping.id, server_time: new Date().toISOString() });
      await vi.advanceTimersByTimeAsync(500);
    }
    expect(s.state.kind).toBe('open');
    expect(s.getRtts().length).toBeGreaterThan(0);
    // Silence (the last pong came 500 ms ago): dead 2 × 1000 ms after it.
    await vi.advanceTimersByTimeAsync(1499);
    expect(s.state.kind).toBe('open');
    await vi.advanceTimersByTimeAsync(1);
    expect(s.state).toMatchObject({ kind: 'reconnecting', lastClose: { code: 4001, name: 'heartbeat_lost' } });
  });

  it('pauses retries while offline and reconnects at once when the network returns', async () => {
    const { s, env } = setup();
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish();
    env.goOffline();
    expect(s.state.kind).toBe('offline');
    expect(FakeWebSocket.last.closedByClient).not.toBeNull();
    await vi.advanceTimersByTimeAsync(10 * 60_000);
    await flush();
    expect(FakeWebSocket.instances).toHaveLength(1);
    env.goOnline();
    await flush();
    expect(FakeWebSocket.instances).toHaveLength(2);
    expect(s.state.kind).toBe('connecting');
  });

  it('starts offline when the browser is offline', async () => {
    const { s, env } = setup();
    env.online = false;
    s.connect('b1');
    await flush();
    expect(s.state.kind).toBe('offline');
    expect(FakeWebSocket.instances).toHaveLength(0);
  });

  it('checks liveness when a hidden tab becomes visible', async () => {
    const { s, env } = setup({ socket: { livenessTimeoutMs: 5000 } });
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish({ heartbeat_interval_ms: 60_000 });
    env.becomeVisible();
    const ping = FakeWebSocket.last.frames.find((f) => f.type === 'ping');
    expect(ping).toBeDefined();
    await vi.advanceTimersByTimeAsync(5000);
    await flush();
    expect(s.state).toMatchObject({ kind: 'reconnecting', lastClose: { code: 4003 } });
  });

  it('gives up after 10 server errors in a row, without a stable connection between', async () => {
    const { s } = setup({ socket: { connectTimeoutMs: 3_600_000 } });
    s.connect('b1');
    await flush();
    for (let i = 1; i <= 10; i++) {
      FakeWebSocket.last.establish();
      FakeWebSocket.last.serverClose(1011, `internal error (error id e${i})`);
      await flush();
      if (i < 10) {
        expect(s.state.kind).toBe('reconnecting');
        await vi.advanceTimersByTimeAsync(30_000);
        await flush();
      }
    }
    expect(s.state).toMatchObject({ kind: 'failed', code: 1011 });
    expect((s.state as { reason: string }).reason).toMatch(/10 times in a row: internal error \(error id e10\)/);
    expect((s.state as { advice: string }).advice).toMatch(/Diagnose/);
    const n = FakeWebSocket.instances.length;
    await vi.advanceTimersByTimeAsync(10 * 60_000);
    expect(FakeWebSocket.instances.length).toBe(n);
    // Retry starts a fresh count.
    s.retryNow();
    await flush();
    FakeWebSocket.last.establish();
    FakeWebSocket.last.serverClose(1011, 'again');
    await flush();
    expect(s.state.kind).toBe('reconnecting');
  });

  it('runs an overdue retry when a throttled background tab becomes visible', async () => {
    const { s, env } = setup();
    s.connect('b1');
    await flush();
    FakeWebSocket.last.serverClose(1012, 'restarting');
    await flush();
    expect(s.state.kind).toBe('reconnecting');
    // The clock moves on but the (throttled) timer has not fired.
    vi.setSystemTime(Date.now() + 60_000);
    env.becomeVisible();
    await flush();
    expect(FakeWebSocket.instances).toHaveLength(2);
  });

  it('shown again, reconnects at once even when the backoff has long to go, keeping the attempt count', async () => {
    // WebSocket only: these 1006s before connection_established would make `auto` switch to SSE.
    const { s, env } = setup({ socket: { random: () => 0.99, transport: 'websocket' } });
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish();
    for (let i = 0; i < 6; i++) {
      FakeWebSocket.last.serverClose(1006, '');
      await flush();
      await vi.advanceTimersByTimeAsync((s.state as { retryAt: number }).retryAt - Date.now());
      await flush();
    }
    FakeWebSocket.last.serverClose(1006, '');
    await flush();
    const st = s.state as { kind: string; attempt: number; retryAt: number };
    expect(st.kind).toBe('reconnecting');
    expect(st.retryAt - Date.now()).toBeGreaterThan(10_000);
    const n = FakeWebSocket.instances.length;
    env.becomeVisible();
    await flush();
    expect(FakeWebSocket.instances).toHaveLength(n + 1);
    // Still down: the next wait follows the backoff from where it was, not from zero.
    FakeWebSocket.last.serverClose(1006, '');
    await flush();
    expect((s.state as { attempt: number }).attempt).toBe(st.attempt + 1);
  });

  it('shown again after a freeze, a socket that has been quiet too long is replaced at once', async () => {
    const { s, env } = setup({ socket: { livenessTimeoutMs: 5000 } });
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish({ heartbeat_interval_ms: 20_000 });
    // Frozen: no timer ran, no frame came.
    vi.setSystemTime(Date.now() + 120_000);
    env.becomeVisible();
    await flush();
    expect(s.state).toMatchObject({ kind: 'reconnecting', lastClose: { code: 4003 } });
  });

  it('Retry skips the backoff wait', async () => {
    // WebSocket only: the connect timeouts while waiting would make `auto` switch to SSE.
    const { s } = setup({ socket: { transport: 'websocket' } });
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish();
    for (let i = 0; i < 5; i++) {
      FakeWebSocket.last.serverClose(1011, 'boom');
      await flush();
      await vi.advanceTimersByTimeAsync(60_000);
      await flush();
    }
    FakeWebSocket.last.serverClose(1011, 'boom');
    await flush();
    expect(s.state.kind).toBe('reconnecting');
    const n = FakeWebSocket.instances.length;
    s.retryNow();
    await flush();
    expect(FakeWebSocket.instances.length).toBe(n + 1);
  });

  it('ignores events from an abandoned socket', async () => {
    const { s } = setup();
    s.connect('b1');
    await flush();
    const first = FakeWebSocket.last;
    const onclose = first.onclose!;
    s.retryNow();
    await flush();
    onclose({ code: 4404, reason: 'late', wasClean: true });
    expect(s.state.kind).toBe('connecting');
  });
});

describe('nothing lost, nothing doubled', () => {
  it('queues while disconnected and sends with the same client_id on reconnect', async () => {
    const { s, storage } = setup();
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish({ last_seq: 0 });
    FakeWebSocket.last.serverClose(1012, 'restarting');
    await flush();
    const acked = s.send('hello while down');
    const outboxEvents: number[] = [];
    s.on('outbox', (o) => outboxEvents.push(o.length));
    expect(s.outboxFor('b1')).toHaveLength(1);
    expect(storage.getItem('natter.outbox')).toContain('hello while down');
    const cid = s.outboxFor('b1')[0].client_id;
    await vi.advanceTimersByTimeAsync(500);
    await flush();
    const ws = FakeWebSocket.last;
    expect(ws.query.get('after_seq')).toBe('0');
    ws.establish({ last_seq: 0 });
    const sent = ws.frames.filter((f) => f.type === 'message');
    expect(sent).toEqual([{ type: 'message', client_id: cid, content: 'hello while down' }]);
    ws.receive({
      type: 'ack',
      client_id: cid,
      duplicate: false,
      message: wireMessage(1, { role: 'user', client_id: cid, content: 'hello while down' }),
    });
    await expect(acked).resolves.toMatchObject({ client_id: cid, message: { seq: 1 } });
    expect(s.outboxFor('b1')).toHaveLength(0);
    expect(storage.getItem('natter.outbox')).toBeNull();
    expect(outboxEvents).toEqual([0]);
  });

  it('resends an unacknowledged message after a drop; a duplicate ack settles it once', async () => {
    const { s } = setup();
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish({ last_seq: 3 });
    const p = s.send('hi');
    const cid = FakeWebSocket.last.frames.find((f) => f.type === 'message')!.client_id;
    // The server stored it, but the socket died before the ack.
    FakeWebSocket.last.serverClose(1006);
    await flush();
    await vi.advanceTimersByTimeAsync(500);
    await flush();
    const ws = FakeWebSocket.last;
    expect(ws.query.get('after_seq')).toBe('3');
    ws.establish({ last_seq: 4 });
    expect(ws.frames.filter((f) => f.type === 'message').map((f) => f.client_id)).toEqual([cid]);
    const acks: unknown[] = [];
    s.on('ack', (a) => acks.push(a));
    const messages: number[] = [];
    s.on('message', (m) => messages.push(m.seq));
    // Replay of seq 4 (our own message) settles it…
    ws.receive({ type: 'message', message: wireMessage(4, { role: 'user', client_id: cid, content: 'hi' }) });
    await expect(p).resolves.toMatchObject({ message: { seq: 4 } });
    // …and the server's duplicate ack is harmless.
    ws.receive({ type: 'ack', client_id: cid, duplicate: true, message: wireMessage(4, { role: 'user', client_id: cid }) });
    expect(s.outboxFor('b1')).toHaveLength(0);
    expect(messages).toEqual([4]);
    expect(acks).toHaveLength(1); // settled once, by the replay
  });

  it('drops frames whose seq it already has, and resumes from the highest seq', async () => {
    const { s } = setup();
    s.connect('b1', { afterSeq: 2 });
    await flush();
    expect(FakeWebSocket.last.query.get('after_seq')).toBe('2');
    const seen: number[] = [];
    s.on('message', (m) => seen.push(m.seq));
    FakeWebSocket.last.establish({ last_seq: 5 });
    for (const seq of [3, 4, 3, 5, 4, 5, 6]) FakeWebSocket.last.receive({ type: 'message', message: wireMessage(seq) });
    expect(seen).toEqual([3, 4, 5, 6]);
    expect(s.lastSeq).toBe(6);
    FakeWebSocket.last.serverClose(1012);
    await flush();
    await vi.advanceTimersByTimeAsync(500);
    await flush();
    expect(FakeWebSocket.last.query.get('after_seq')).toBe('6');
  });

  it('keeps the outbox across a reload and sends it on the next connection', async () => {
    const storage = new MapStorage();
    const a = setup({ storage });
    a.s.connect('b1');
    await flush();
    void a.s.send('typed before reload').catch(() => {});
    a.s.destroy();
    FakeWebSocket.reset();
    const b = setup({ storage });
    const acks: string[] = [];
    b.s.on('ack', (x) => acks.push(x.client_id));
    b.s.connect('b1');
    await flush();
    FakeWebSocket.last.establish();
    const frames = FakeWebSocket.last.frames.filter((f) => f.type === 'message');
    expect(frames.map((f) => f.content)).toEqual(['typed before reload']);
    FakeWebSocket.last.receive({
      type: 'ack',
      client_id: frames[0].client_id,
      duplicate: false,
      message: wireMessage(1, { role: 'user' }),
    });
    expect(acks).toEqual([frames[0].client_id]);
    expect(b.s.outboxFor('b1')).toHaveLength(0);
  });

  it('rejects a message the server refuses, and retries a rate-limited one after the hint', async () => {
    const { s } = setup();
    s.connect('b1');
    await flush();
    const ws = FakeWebSocket.last;
    ws.establish();
    const tooLong = s.send('x'.repeat(10));
    const cid1 = ws.frames.at(-1)!.client_id;
    ws.receive({ type: 'error', code: 'content_too_long', message: 'content is 10 characters; the limit is 5', client_id: cid1 });
    await expect(tooLong).rejects.toMatchObject({ code: 'content_too_long' });
    expect(s.outboxFor('b1')).toHaveLength(0);

    const limited = s.send('later');
    const cid2 = ws.frames.at(-1)!.client_id;
    ws.receive({ type: 'error', code: 'rate_limited', message: 'wait', client_id: cid2, retry_after_ms: 200 });
    expect(s.outboxFor('b1')).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(199);
    expect(ws.frames.filter((f) => f.client_id === cid2)).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(ws.frames.filter((f) => f.client_id === cid2)).toHaveLength(2);
    ws.receive({ type: 'ack', client_id: cid2, duplicate: false, message: wireMessage(1, { role: 'user' }) });
    await expect(limited).resolves.toMatchObject({ client_id: cid2 });
  });

  it('refuses a message too big for a frame instead of looping on 1009', async () => {
    const { s } = setup();
    s.connect('b1');
    await flush();
    const ws = FakeWebSocket.last;
    ws.establish({
      limits: { max_frame_bytes: 100, max_content_chars: 16384, max_connections_per_user: 20, messages_per_second: 5, message_burst: 20 },
    });
    const rejected: string[] = [];
    s.on('rejected', (r) => rejected.push(r.error.code));
    await expect(s.send('😀'.repeat(30))).rejects.toMatchObject({ code: 'content_too_long' });
    expect(ws.frames.filter((f) => f.type === 'message')).toHaveLength(0);
    expect(s.outboxFor('b1')).toHaveLength(0);
    expect(rejected).toEqual(['content_too_long']);
  });

  it('clears the outbox on request (logout), rejecting what was waiting', async () => {
    const { s, storage } = setup();
    s.connect('b1');
    await flush();
    const p = s.send('not for the next user');
    s.clearOutbox();
    await expect(p).rejects.toMatchObject({ code: 'discarded' });
    expect(storage.getItem('natter.outbox')).toBeNull();
    FakeWebSocket.last.establish();
    expect(FakeWebSocket.last.frames.filter((f) => f.type === 'message')).toHaveLength(0);
  });

  it('bounds the outbox', async () => {
    const { s } = setup({ socket: { outboxLimit: 2 } });
    s.connect('b1');
    await flush();
    void s.send('1').catch(() => {});
    void s.send('2').catch(() => {});
    await expect(s.send('3')).rejects.toMatchObject({ code: 'outbox_full' });
  });

  it('starts over once without after_seq when the server no longer has the resume point', async () => {
    const { s } = setup();
    s.connect('b1', { afterSeq: 40 });
    await flush();
    FakeWebSocket.last.serverClose(4400, "after_seq 40 is beyond the conversation's last seq 3");
    await flush();
    await vi.advanceTimersByTimeAsync(0);
    await flush();
    expect(FakeWebSocket.instances).toHaveLength(2);
    expect(FakeWebSocket.last.query.has('after_seq')).toBe(false);
    FakeWebSocket.last.serverClose(4400, 'after_seq 40 is beyond');
    await flush();
    expect(s.state).toMatchObject({ kind: 'failed', code: 4400 });
  });

  it('sends cancel for a streaming reply', async () => {
    const { s } = setup();
    s.connect('b1');
    await flush();
    expect(s.cancel('m9')).toBe(false); // not open yet
    FakeWebSocket.last.establish();
    expect(s.cancel('m9')).toBe(true);
    expect(FakeWebSocket.last.frames.at(-1)).toEqual({ type: 'cancel', message_id: 'm9' });
  });

  it('passes deltas through', async () => {
    const { s } = setup();
    s.connect('b1');
    await flush();
    FakeWebSocket.last.establish();
    const deltas: string[] = [];
    s.on('delta', (d) => deltas.push(d.delta));
    FakeWebSocket.last.receive({ type: 'message_delta', message_id: 'm9', in_reply_to: 'm8', delta: 'hel' });
    FakeWebSocket.last.receive({ type: 'message_delta', message_id: 'm9', in_reply_to: 'm8', delta: 'lo' });
    expect(deltas).toEqual(['hel', 'lo']);
  });
});

describe('logs and flight recorder', () => {
  it('records state changes and closes, and never a token or ticket', async () => {
    const lines: string[] = [];
    createDebug.enable('websocket:*');
    const prevLog = createDebug.log;
    createDebug.log = (...args: unknown[]) => void lines.push(args.map(String).join(' '));
    try {
      const { s } = setup();
      s.connect('b1');
      await flush();
      const ticket = FakeWebSocket.last.query.get('ticket')!;
      FakeWebSocket.last.establish();
      FakeWebSocket.last.serverClose(4401, `invalid token ${TOKEN}`);
      await flush();
      const json = s.exportFlightRecorder();
      const events = JSON.parse(json).events as Array<{ type: string; code?: number }>;
      expect(events.map((e) => e.type)).toEqual(
        expect.arrayContaining(['connect', 'state', 'health', 'ticket', 'ws_connect', 'established', 'close', 'reauth']),
      );
      expect(events.find((e) => e.type === 'close')?.code).toBe(4401);
      const all = `${json}\n${lines.join('\n')}`;
      expect(lines.some((l) => l.includes('open'))).toBe(true);
      expect(lines.some((l) => /Attempting to connect to chat WebSocket/.test(l))).toBe(true);
      expect(all).not.toContain(TOKEN);
      expect(all).not.toContain('SECRETSIGNATURE');
      expect(all).not.toContain(ticket);
    } finally {
      createDebug.log = prevLog;
      createDebug.disable();
    }
  });
});
