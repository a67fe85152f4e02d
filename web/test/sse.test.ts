import { describe, expect, it, vi } from 'vitest';
import { EventStreamParser } from '../packages/client/src/event-stream';
import { SseTransport } from '../packages/client/src/sse-transport';
import type { TransportTarget } from '../packages/client/src/transport';
import { ChatSocket, type ChatSocketOptions } from '../packages/client/src/chat-socket';
import { FakeEnv, FakeWebSocket, MapStorage, established, fakeFetch, happyRoutes, wireMessage } from './fakes';

describe('EventStreamParser', () => {
  it('parses events, ids, multi-line data and comments across any chunking and line ending', () => {
    const wire =
      ': keep-alive\r\nevent: message\r\nid: 7\r\ndata: {"a":\r\ndata:1}\r\n\r\n' +
      'event:stream\ndata: x\n\n' +
      'data: plain\r\r' +
      'event: empty\n\n' +
      'id: 3\nevent: close\ndata: {"code":4401}\n\n';
    const expected = [
      { event: 'message', id: '7', data: '{"a":\n1}' },
      { event: 'stream', id: null, data: 'x' },
      { event: 'message', id: null, data: 'plain' },
      { event: 'close', id: '3', data: '{"code":4401}' },
    ];
    for (const size of [1, 2, 3, 7, wire.length]) {
      const p = new EventStreamParser();
      const out = [];
      for (let i = 0; i < wire.length; i += size) out.push(...p.push(wire.slice(i, i + size)));
      expect(out).toEqual(expected);
      expect(p.comments).toBe(1);
    }
  });
});

const TARGET: TransportTarget = {
  apiUrl: 'http://api.test',
  wsUrl: 'ws://api.test',
  botId: 'b1',
  auth: { kind: 'ticket', value: 'tkt' },
  afterSeq: 4,
  attemptId: 'att',
};

/** A fetch whose GET is an event stream the test writes to, and whose POSTs answer `answer`. */
function streamFetch(answer: (body: Record<string, unknown>) => { status: number; body?: unknown }) {
  const enc = new TextEncoder();
  let ctl!: ReadableStreamDefaultController<Uint8Array>;
  const body = new ReadableStream<Uint8Array>({ start: (c) => (ctl = c) });
  const posts: Array<{ url: string; auth: string | undefined; body: Record<string, unknown> }> = [];
  let signal: AbortSignal | undefined;
  const fetch = vi.fn(async (url: RequestInfo | URL, init: RequestInit = {}) => {
    if ((init.method ?? 'GET') === 'GET') {
      signal = init.signal ?? undefined;
      return new Response(body, { status: 200, headers: { 'Content-Type': 'text/event-stream' } });
    }
    const frame = JSON.parse(String(init.body)) as Record<string, unknown>;
    posts.push({ url: String(url), auth: (init.headers as Record<string, string>).Authorization, body: frame });
    const r = answer(frame);
    return new Response(r.body === undefined ? null : JSON.stringify(r.body), { status: r.status });
  });
  return {
    fetch: fetch as unknown as typeof globalThis.fetch,
    posts,
    aborted: () => signal?.aborted === true,
    write: (name: string, data: unknown, id?: number) =>
      ctl.enqueue(enc.encode(`event: ${name}\n${id === undefined ? '' : `id: ${id}\n`}data: ${JSON.stringify(data)}\n\n`)),
    comment: () => ctl.enqueue(enc.encode(': keep-alive\n\n')),
    end: () => ctl.close(),
  };
}

async function settle(): Promise<void> {
  for (let i = 0; i < 30; i++) await new Promise((r) => setTimeout(r, 0));
}

function listen() {
  const got: string[] = [];
  const events = {
    open: vi.fn(),
    message: (t: string) => got.push(JSON.parse(t).type),
    error: vi.fn(),
    close: vi.fn(),
  };
  return { got, events };
}

describe('SseTransport', () => {
  it('opens the stream with the ticket and resume point, and posts frames only once the stream says where', async () => {
    const net = streamFetch((f) =>
      f.type === 'ping'
        ? { status: 200, body: { type: 'pong', id: f.id } }
        : { status: 200, body: { type: 'ack', client_id: f.client_id, message: wireMessage(5, { role: 'user' }), duplicate: false } },
    );
    const t = new SseTransport(TARGET, net.fetch, () => 'access-token');
    expect(t.url).toBe('http://api.test/api/sse/chat/b1?ticket=tkt&after_seq=4&attempt_id=att');
    const { got, events } = listen();
    t.open(events);
    expect(t.isOpen).toBe(false);
    await settle();
    expect(events.open).toHaveBeenCalledOnce();
    expect(t.isOpen).toBe(true);

    net.write('connection_established', established({ connection_id: 'conn-1' }));
    await settle();
    // Before the `stream` event there is nowhere to post: the frame waits, in order.
    t.send(JSON.stringify({ type: 'message', client_id: 'c1', content: 'hi' }));
    t.send(JSON.stringify({ type: 'ping', id: 1 }));
    await settle();
    expect(net.posts).toEqual([]);
    expect(t.bufferedAmount).toBeGreaterThan(0);

    net.write('stream', { connection_id: 'conn-1', post: '/api/sse/chat/b1/frames?stream=conn-1' });
    net.comment();
    net.write('message', { type: 'message', message: wireMessage(5, { role: 'user' }) }, 5);
    await settle();
    expect(net.posts.map((p) => [p.url, p.auth, p.body.type])).toEqual([
      ['http://api.test/api/sse/chat/b1/frames?stream=conn-1', 'Bearer access-token', 'message'],
      ['http://api.test/api/sse/chat/b1/frames?stream=conn-1', 'Bearer access-token', 'ping'],
    ]);
    // The POSTs' answers are reported like frames from the stream; `stream` itself is not.
    expect(got.sort()).toEqual(['ack', 'connection_established', 'message', 'pong']);
    expect(t.bufferedAmount).toBe(0);

    net.write('close', { code: 4408, name: 'heartbeat_timeout', reason: 'no frame for 60 s' });
    await settle();
    expect(events.close).toHaveBeenCalledWith(4408, 'no frame for 60 s');
    expect(t.isOpen).toBe(false);
    expect(net.aborted()).toBe(true);
  });

  it('reports an end without a close event as 1006, a refused POST as its close code, and nothing after close()', async () => {
    const a = streamFetch(() => ({ status: 200 }));
    const ta = new SseTransport(TARGET, a.fetch, () => 't');
    const la = listen();
    ta.open(la.events);
    await settle();
    a.end();
    await settle();
    expect(la.events.close).toHaveBeenCalledWith(1006, expect.stringContaining('without a close event'));

    const b = streamFetch(() => ({ status: 401, body: { error: { code: 'unauthorized', message: 'expired' } } }));
    const tb = new SseTransport(TARGET, b.fetch, () => 't');
    const lb = listen();
    tb.open(lb.events);
    await settle();
    b.write('stream', { post: '/api/sse/chat/b1/frames?stream=x' });
    tb.send(JSON.stringify({ type: 'ping', id: 1 }));
    await settle();
    expect(lb.events.error).toHaveBeenCalledOnce();
    expect(lb.events.close).toHaveBeenCalledWith(4401, expect.stringContaining('401'));

    const c = streamFetch(() => ({ status: 202 }));
    const tc = new SseTransport(TARGET, c.fetch, () => 't');
    const lc = listen();
    tc.open(lc.events);
    await settle();
    tc.close(1000, 'bye');
    c.write('message', { type: 'message', message: wireMessage(9) }, 9);
    await settle();
    expect(c.aborted()).toBe(true);
    expect(lc.got).toEqual([]);
    expect(lc.events.close).not.toHaveBeenCalled();
  });

  it('reports a stream that cannot be opened as an error and a 1006', async () => {
    const fetch = vi.fn(async () => {
      throw new TypeError('Failed to fetch');
    }) as unknown as typeof globalThis.fetch;
    const t = new SseTransport(TARGET, fetch, () => 't');
    const l = listen();
    t.open(l.events);
    await settle();
    expect(l.events.error).toHaveBeenCalledOnce();
    expect(l.events.close).toHaveBeenCalledWith(1006, expect.stringContaining('Failed to fetch'));
    expect(l.events.open).not.toHaveBeenCalled();
  });
});

describe('ChatSocket with transport auto', () => {
  it('switches to SSE after a WebSocket 1006 the preflight cannot explain, resuming and resending without loss or doubles', async () => {
    vi.useFakeTimers();
    FakeWebSocket.reset();
    try {
      // The server stores the resent message as seq 6.
      const net = sseServer(async (f) =>
        f.type === 'ping'
          ? net.answer(f)
          : new Response(
              JSON.stringify({
                type: 'ack',
                client_id: f.client_id,
                message: wireMessage(6, { role: 'user', client_id: f.client_id }),
                duplicate: false,
              }),
              { status: 200 },
            ),
      );
      const { streams, posts, write } = net;
      const s = sseSocket(net.fetch, { transport: 'auto' });
      const messages: number[] = [];
      s.on('message', (m) => messages.push(m.seq));
      const flush = async () => {
        for (let i = 0; i < 10; i++) await vi.advanceTimersByTimeAsync(0);
      };
      s.connect('b1');
      await flush();
      FakeWebSocket.last.establish({ last_seq: 3 });
      FakeWebSocket.last.receive({ type: 'message', message: wireMessage(4) });
      FakeWebSocket.last.serverClose(1012, 'restart');
      const sent = s.send('while away', { clientId: 'c-away' });
      await vi.advanceTimersByTimeAsync(1000);
      await flush();
      // The next socket never gets through the path; the preflight says the server would admit it.
      FakeWebSocket.last.serverClose(1006, '');
      await flush();
      expect(s.transportKind).toBe('sse');
      await vi.advanceTimersByTimeAsync(10);
      await flush();
      expect(streams).toHaveLength(1);
      expect(new URL(streams[0].url).searchParams.get('after_seq')).toBe('4');
      write('connection_established', established({ last_seq: 5 }));
      write('message', { type: 'message', message: wireMessage(5) });
      write('stream', { post: '/api/sse/chat/b1/frames?stream=conn-1' });
      await flush();
      expect(s.state).toMatchObject({ kind: 'open', transport: 'sse' });
      expect(posts.filter((p) => p.type === 'message').map((p) => p.client_id)).toEqual(['c-away']);
      await expect(sent).resolves.toMatchObject({ client_id: 'c-away', message: { seq: 6 } });
      write('message', { type: 'message', message: wireMessage(6, { role: 'user', client_id: 'c-away' }) });
      write('message', { type: 'message', message: wireMessage(6, { role: 'user', client_id: 'c-away' }) });
      await flush();
      expect(messages).toEqual([4, 5, 6]);
      expect(s.outboxFor('b1')).toEqual([]);
      s.destroy();
    } finally {
      vi.useRealTimers();
    }
  });
});

/**
 * A server behind `fetch` for ChatSocket tests: each GET of the SSE binding is a stream the test
 * writes to; POSTed frames go to `post` (default: a pong for a ping, an ack for a message).
 */
function sseServer(post?: (f: Record<string, unknown>) => Promise<Response>) {
  const enc = new TextEncoder();
  const streams: Array<{ url: string; ctl: ReadableStreamDefaultController<Uint8Array> }> = [];
  const posts: Array<Record<string, unknown>> = [];
  let seq = 0;
  const rest = fakeFetch(happyRoutes());
  const answer = async (f: Record<string, unknown>) => {
    if (f.type === 'ping') return new Response(JSON.stringify({ type: 'pong', id: f.id }), { status: 200 });
    seq += 1;
    const message = wireMessage(seq, { role: 'user', client_id: f.client_id, content: f.content });
    return new Response(JSON.stringify({ type: 'ack', client_id: f.client_id, message, duplicate: false }), { status: 200 });
  };
  const fetch = (async (input: RequestInfo | URL, init: RequestInit = {}) => {
    const url = String(input);
    if (url.includes('/api/sse/chat/') && (init.method ?? 'GET') === 'GET') {
      let ctl!: ReadableStreamDefaultController<Uint8Array>;
      const body = new ReadableStream<Uint8Array>({ start: (c) => (ctl = c) });
      streams.push({ url, ctl });
      return new Response(body, { status: 200 });
    }
    if (url.includes('/frames?stream=')) {
      const f = JSON.parse(String(init.body)) as Record<string, unknown>;
      posts.push(f);
      return (post ?? answer)(f);
    }
    return rest(input, init);
  }) as typeof globalThis.fetch;
  const last = () => streams[streams.length - 1];
  return {
    fetch,
    streams,
    posts,
    answer,
    write: (name: string, data: unknown) => last().ctl.enqueue(enc.encode(`event: ${name}\ndata: ${JSON.stringify(data)}\n\n`)),
    comment: () => last().ctl.enqueue(enc.encode(': keep-alive\n\n')),
    /** connection_established and the `stream` event, on the latest stream. */
    establish(over: Record<string, unknown> = {}) {
      this.write('connection_established', established(over));
      this.write('stream', { post: '/api/sse/chat/b1/frames?stream=conn-1' });
    },
  };
}

function sseSocket(fetch: typeof globalThis.fetch, over: Partial<ChatSocketOptions> = {}) {
  return new ChatSocket({
    apiUrl: 'http://api.test',
    transport: 'sse',
    getToken: () => 'tok',
    WebSocket: FakeWebSocket as unknown as typeof WebSocket,
    fetch,
    environment: new FakeEnv(),
    storage: new MapStorage(),
    random: () => 0,
    ...over,
  });
}

const flushTimers = async () => {
  for (let i = 0; i < 30; i++) await vi.advanceTimersByTimeAsync(0);
};

describe('ChatSocket over SSE', () => {
  it('counts keep-alive comments as life: a quiet stream is not declared dead', async () => {
    vi.useFakeTimers();
    try {
      const net = sseServer();
      // No pings of its own for a long while: only the stream's keep-alives say it is alive.
      const s = sseSocket(net.fetch, { pingIntervalMs: 600_000 });
      s.connect('b1');
      await flushTimers();
      net.establish({ heartbeat_interval_ms: 1000 });
      await flushTimers();
      expect(s.state.kind).toBe('open');
      // Far past the 2 × heartbeat watchdog, with a keep-alive every heartbeat.
      for (let i = 0; i < 6; i++) {
        net.comment();
        await vi.advanceTimersByTimeAsync(1000);
      }
      expect(s.state.kind).toBe('open');
      const closes = JSON.parse(s.exportFlightRecorder()).events.filter((e: { type: string }) => e.type === 'close');
      expect(closes).toEqual([]);
      // And without them it is declared dead, as before.
      await vi.advanceTimersByTimeAsync(2500);
      expect(s.state.kind).not.toBe('open');
      s.destroy();
    } finally {
      vi.useRealTimers();
    }
  });

  it('does not leave a message whose POST failed waiting for a reconnect that may never come', async () => {
    for (const failure of ['network', 'http 503'] as const) {
      vi.useFakeTimers();
      try {
        let failNext = true;
        const net = sseServer(async (f) => {
          if (f.type === 'message' && failNext) {
            failNext = false;
            if (failure === 'network') throw new TypeError('Failed to fetch');
            return new Response('{"error":{"code":"unavailable","message":"busy"}}', { status: 503 });
          }
          return net.answer(f);
        });
        const s = sseSocket(net.fetch, { pingIntervalMs: 600_000 });
        const acks: string[] = [];
        s.connect('b1');
        await flushTimers();
        net.establish({ heartbeat_interval_ms: 60_000 });
        await flushTimers();
        const sent = s.send('hello', { clientId: 'c-1' }).then((a) => acks.push(a.client_id));
        await flushTimers();
        // Well within a heartbeat: the message is acked, after one more POST under the same client_id.
        await vi.advanceTimersByTimeAsync(5000);
        if (net.streams.length > 1) net.establish({ heartbeat_interval_ms: 60_000 });
        await vi.advanceTimersByTimeAsync(5000);
        await flushTimers();
        expect(acks, failure).toEqual(['c-1']);
        await sent;
        const messagePosts = net.posts.filter((p) => p.type === 'message');
        expect(messagePosts.map((p) => p.client_id)).toEqual(['c-1', 'c-1']);
        expect(s.outboxFor('b1')).toEqual([]);
        s.destroy();
      } finally {
        vi.useRealTimers();
      }
    }
  });
});

describe('ChatSocket with transport auto, on SSE', () => {
  it('probes the WebSocket in the background and switches back when it gets through, losing and doubling nothing', async () => {
    vi.useFakeTimers();
    FakeWebSocket.reset();
    try {
      // A message POST that is still on its way when the switch cuts it off.
      const net = sseServer((f) => (f.type === 'message' ? new Promise<Response>(() => {}) : net.answer(f)));
      const s = sseSocket(net.fetch, { transport: 'auto', websocketRetryMs: 60_000, pingIntervalMs: 600_000 });
      const messages: number[] = [];
      s.on('message', (m) => messages.push(m.seq));
      s.connect('b1');
      await flushTimers();
      FakeWebSocket.last.serverClose(1006, '');
      await flushTimers();
      await vi.advanceTimersByTimeAsync(10);
      await flushTimers();
      expect(s.transportInfo).toEqual({ transport: 'sse', why: 'preflight_ok' });
      net.establish({ last_seq: 2, heartbeat_interval_ms: 600_000 });
      net.write('message', { type: 'message', message: wireMessage(3) });
      await flushTimers();
      expect(s.state).toMatchObject({ kind: 'open', transport: 'sse' });
      const sockets = FakeWebSocket.instances.length;
      // A minute later a probe socket tries the path; this time it gets through.
      await vi.advanceTimersByTimeAsync(60_000);
      await flushTimers();
      expect(FakeWebSocket.instances.length).toBe(sockets + 1);
      const probe = FakeWebSocket.last;
      expect(probe.query.get('after_seq')).toBeNull();
      const sent = s.send('during the switch', { clientId: 'c-sw' });
      await flushTimers();
      expect(net.posts.filter((p) => p.type === 'message').map((p) => p.client_id)).toEqual(['c-sw']);
      probe.establish({ connection_id: 'probe' });
      await flushTimers();
      expect(probe.closedByClient).not.toBeNull();
      // Back on the WebSocket, resuming after seq 3; the message goes out on it.
      await flushTimers();
      const ws = FakeWebSocket.last;
      expect(ws).not.toBe(probe);
      expect(ws.query.get('after_seq')).toBe('3');
      ws.establish({ last_seq: 4 });
      await flushTimers();
      expect(s.state).toMatchObject({ kind: 'open', transport: 'websocket' });
      expect(s.transportInfo).toEqual({ transport: 'websocket', why: null });
      const resent = ws.frames.filter((f) => f.type === 'message');
      expect(resent.map((f) => f.client_id)).toEqual(['c-sw']);
      // The server had stored the cut-off POST: the resend is acked as that message, once.
      ws.receive({ type: 'ack', client_id: 'c-sw', message: wireMessage(4, { role: 'user', client_id: 'c-sw' }), duplicate: true });
      ws.receive({ type: 'message', message: wireMessage(5) });
      await expect(sent).resolves.toMatchObject({ client_id: 'c-sw', message: { seq: 4 } });
      expect(messages).toEqual([3, 5]);
      expect(s.outboxFor('b1')).toEqual([]);
      const events = JSON.parse(s.exportFlightRecorder()).events.filter((e: { type: string }) => e.type === 'transport_switch');
      expect(events.map((e: { to: string; why: string }) => `${e.to}:${e.why}`)).toEqual(['sse:preflight_ok', 'websocket:probe_ok']);
      s.destroy();
    } finally {
      vi.useRealTimers();
    }
  });
});
