/**
 * The byte pipe under `ChatSocket`: open, send text, close with a code, and four events (open,
 * message, error, close). The connection state machine (`connection.ts`) never sees which
 * transport carries its frames, so another one (e.g. Server-Sent Events down and HTTP POST up)
 * can slot in behind the same `Transport` interface. Today there is one: the WebSocket.
 */

/** What a transport reports; none of these is called after `close()`. */
export interface TransportEvents {
  open(): void;
  /** One text frame from the server. */
  message(text: string): void;
  /** A sign of life that is no frame (an SSE keep-alive comment): the connection is not dead. */
  alive?(): void;
  /** Something went wrong; a `close` with the code follows. */
  error(): void;
  close(code: number, reason: string): void;
}

/** What a transport connects to: one conversation, with a credential and a resume point. */
export interface TransportTarget {
  apiUrl: string;
  wsUrl: string;
  botId: string;
  auth: { kind: 'ticket' | 'token'; value: string };
  /** Resume after this seq (null: from the conversation's end). */
  afterSeq: number | null;
  /** Sent to the server so that its connection ledger can tell attempts apart. */
  attemptId: string;
}

export interface Transport {
  /** Where it connects, credentials included: redact it before logging. */
  readonly url: string;
  /** Whether `send` would go out now. */
  readonly isOpen: boolean;
  /** Bytes accepted by `send` but not yet written to the network. */
  readonly bufferedAmount: number;
  /** Starts connecting; events follow later, never from inside `open`. Throws if it cannot start. */
  open(on: TransportEvents): void;
  send(text: string): void;
  /** Closes with a code and reason; no event is reported after this. */
  close(code: number, reason: string): void;
}

const OPEN = 1;

/** The chat socket, `GET /api/ws/chat/{bot}?ticket=…&after_seq=…&attempt_id=…`. */
export class WebSocketTransport implements Transport {
  readonly url: string;
  private ws: WebSocket | null = null;

  constructor(
    target: TransportTarget,
    private readonly Ctor: typeof WebSocket,
  ) {
    const params = new URLSearchParams();
    params.set(target.auth.kind, target.auth.value);
    if (target.afterSeq !== null) params.set('after_seq', String(target.afterSeq));
    params.set('attempt_id', target.attemptId);
    this.url = `${target.wsUrl}/api/ws/chat/${encodeURIComponent(target.botId)}?${params}`;
  }

  get isOpen(): boolean {
    return this.ws !== null && this.ws.readyState === OPEN;
  }

  get bufferedAmount(): number {
    return this.ws?.bufferedAmount ?? 0;
  }

  open(on: TransportEvents): void {
    const ws = new this.Ctor(this.url);
    this.ws = ws;
    ws.onopen = () => on.open();
    ws.onmessage = (ev: MessageEvent) => on.message(typeof ev.data === 'string' ? ev.data : '');
    ws.onerror = () => on.error();
    ws.onclose = (ev: CloseEvent) => on.close(ev.code, ev.reason);
  }

  send(text: string): void {
    this.ws?.send(text);
  }

  close(code: number, reason: string): void {
    const ws = this.ws;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    try {
      // Browsers only let a page close with 1000 or 3000–4999.
      // …and a reason of at most 123 bytes, or close() throws and the socket stays open.
      ws.close(code === 1000 || (code >= 3000 && code <= 4999) ? code : 1000, reason.slice(0, 60));
    } catch {
      // Already closed.
    }
  }
}
