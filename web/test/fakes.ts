/** Test doubles: a scriptable WebSocket, a routed fetch, an online/offline switch, storage. */

import type { Environment } from '../packages/client/src/chat-socket';

export class FakeWebSocket {
  static instances: FakeWebSocket[] = [];
  static reset(): void {
    FakeWebSocket.instances = [];
  }
  static get last(): FakeWebSocket {
    const ws = FakeWebSocket.instances.at(-1);
    if (!ws) throw new Error('no socket was created');
    return ws;
  }

  readyState = 0;
  bufferedAmount = 0;
  sent: string[] = [];
  closedByClient: { code?: number; reason?: string } | null = null;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  onclose: ((ev: { code: number; reason: string; wasClean: boolean }) => void) | null = null;

  constructor(readonly url: string) {
    FakeWebSocket.instances.push(this);
  }

  get query(): URLSearchParams {
    return new URL(this.url).searchParams;
  }

  /** Frames the client sent, parsed. */
  get frames(): Array<Record<string, unknown>> {
    return this.sent.map((s) => JSON.parse(s));
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error('InvalidStateError: not open');
    this.sent.push(data);
  }

  close(code?: number, reason?: string): void {
    this.closedByClient = { code, reason };
    this.readyState = 3;
  }

  // Server side.
  open(): void {
    this.readyState = 1;
    this.onopen?.({});
  }
  receive(frame: unknown): void {
    this.onmessage?.({ data: typeof frame === 'string' ? frame : JSON.stringify(frame) });
  }
  establish(over: Record<string, unknown> = {}): void {
    if (this.readyState !== 1) this.open();
    this.receive(established(over));
  }
  serverClose(code: number, reason = ''): void {
    this.readyState = 3;
    if (code === 1006) this.onerror?.({});
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
}

export function established(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    type: 'connection_established',
    connection_id: 'conn-1',
    protocol_version: 1,
    user: { id: 'u1', username: 'alice' },
    bot: { id: 'b1', name: 'Echo' },
    conversation_id: 'c1',
    last_seq: 0,
    heartbeat_interval_ms: 25_000,
    server_time: new Date().toISOString(),
    limits: { max_frame_bytes: 65536, max_content_chars: 16384, max_connections_per_user: 20, messages_per_second: 5, message_burst: 20 },
    ...over,
  };
}

export function wireMessage(seq: number, over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    id: `m${seq}`,
    conversation_id: 'c1',
    seq,
    role: 'bot',
    content: `msg ${seq}`,
    created_at: '2026-01-02T03:04:05Z',
    status: 'complete',
    ...over,
  };
}

export type Route = (req: {
  method: string;
  path: string;
  headers: Record<string, string>;
  body: unknown;
}) => { status: number; body?: unknown } | 'network_error' | undefined;

/** A fetch that answers from `route`; records every call. */
export function fakeFetch(
  route: Route,
): typeof fetch & { calls: Array<{ method: string; path: string; headers: Record<string, string> }> } {
  const calls: Array<{ method: string; path: string; headers: Record<string, string> }> = [];
  const f = async (input: RequestInfo | URL, init: RequestInit = {}) => {
    const url = new URL(String(input));
    const method = init.method ?? 'GET';
    const headers = (init.headers ?? {}) as Record<string, string>;
    const path = url.pathname + url.search;
    calls.push({ method, path, headers });
    const r = route({ method, path, headers, body: init.body ? JSON.parse(String(init.body)) : undefined });
    if (r === 'network_error' || r === undefined) throw new TypeError('Failed to fetch');
    // A minimal Response: settles in microtasks only, so fake timers need no real I/O.
    const text = r.body === undefined ? '' : JSON.stringify(r.body);
    return { ok: r.status >= 200 && r.status < 300, status: r.status, statusText: String(r.status), text: async () => text } as Response;
  };
  return Object.assign(f as typeof fetch, { calls });
}

/** The happy server: healthy, issues tickets, knows the code registry. */
export function happyRoutes(extra: Route = () => undefined): Route {
  return (req) => {
    const r = extra(req);
    if (r !== undefined) return r;
    if (req.path === '/api/health') return { status: 200, body: { status: 'ok', version: 'test' } };
    if (req.path === '/api/ready') return { status: 200, body: { status: 'ok' } };
    if (req.path === '/api/ws/ticket')
      return { status: 200, body: { ticket: `tkt-${Math.random().toString(36).slice(2)}`, expires_in: 30 } };
    if (req.path.startsWith('/api/ws/preflight/')) return { status: 200, body: { ok: true, close_code: null, reason: null } };
    return { status: 404, body: { error: { code: 'not_found', message: 'no such API endpoint' } } };
  };
}

export class FakeEnv implements Environment {
  online = true;
  visible = true;
  private handlers: { online(): void; offline(): void; visible(): void } | null = null;
  isOnline(): boolean {
    return this.online;
  }
  isVisible(): boolean {
    return this.visible;
  }
  listen(on: { online(): void; offline(): void; visible(): void }): () => void {
    this.handlers = on;
    return () => (this.handlers = null);
  }
  goOffline(): void {
    this.online = false;
    this.handlers?.offline();
  }
  goOnline(): void {
    this.online = true;
    this.handlers?.online();
  }
  becomeVisible(): void {
    this.visible = true;
    this.handlers?.visible();
  }
}

export class MapStorage {
  map = new Map<string, string>();
  getItem(k: string): string | null {
    return this.map.get(k) ?? null;
  }
  setItem(k: string, v: string): void {
    this.map.set(k, v);
  }
  removeItem(k: string): void {
    this.map.delete(k);
  }
}
