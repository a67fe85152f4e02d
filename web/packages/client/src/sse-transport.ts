/**
 * The SSE binding behind the `Transport` interface, for networks that cannot carry a WebSocket:
 * `GET /api/sse/chat/{bot}` (read with `fetch`, so the `close` event is seen and no browser
 * reconnect runs behind the state machine's back) brings the server's frames down; each client
 * frame goes up as one `POST` to the path the `stream` event names, with the access token, and
 * the frame that POST answers (`ack`, `error`, `pong`) is reported as if it had come down the
 * stream. POSTs go one at a time, in the order `send` was called. A POST that gets no answer
 * (a network error, a 5xx) ends the connection as a 1006: the reconnect that follows resumes by
 * seq and resends unacknowledged messages by `client_id`, which the server stores once. Keep-alive
 * comments are reported as `alive`, so a quiet stream is not taken for a dead one.
 */

import { EventStreamParser } from './event-stream.js';
import type { Transport, TransportEvents, TransportTarget } from './transport.js';

type GetToken = () => string | null | Promise<string | null>;

/** The close code a refused POST maps to (null: not a reason to end the stream). */
function postRefusal(status: number): number | null {
  if (status === 401) return 4401;
  if (status === 403) return 4403;
  if (status === 400 || status === 404) return 1006;
  return null;
}

export class SseTransport implements Transport {
  readonly url: string;
  private readonly ctrl = new AbortController();
  private on: TransportEvents | null = null;
  private responded = false;
  private postPath: string | null = null;
  /** Frames waiting for the `stream` event or for the POST before them. */
  private queue: string[] = [];
  private posting = false;
  private done = false;

  constructor(
    private readonly target: TransportTarget,
    private readonly fetchImpl: typeof fetch,
    /** The access token for the POSTs (a ticket only opens the stream). */
    private readonly getToken: GetToken,
  ) {
    const params = new URLSearchParams();
    params.set(target.auth.kind, target.auth.value);
    if (target.afterSeq !== null) params.set('after_seq', String(target.afterSeq));
    params.set('attempt_id', target.attemptId);
    this.url = `${target.apiUrl}/api/sse/chat/${encodeURIComponent(target.botId)}?${params}`;
  }

  get isOpen(): boolean {
    return this.responded && !this.done;
  }

  get bufferedAmount(): number {
    return this.queue.reduce((n, t) => n + t.length, 0);
  }

  open(on: TransportEvents): void {
    this.on = on;
    void this.read();
  }

  send(text: string): void {
    if (this.done) return;
    this.queue.push(text);
    void this.pump();
  }

  close(_code: number, _reason: string): void {
    this.finish();
  }

  /** Ends the stream and every POST; no event is reported after this. */
  private finish(): TransportEvents | null {
    const on = this.on;
    this.done = true;
    this.on = null;
    this.queue = [];
    this.ctrl.abort();
    return on;
  }

  /** Reports a close (once) and ends everything. */
  private end(code: number, reason: string, error = false): void {
    if (this.done) return;
    const on = this.finish();
    if (error) on?.error();
    on?.close(code, reason);
  }

  private async read(): Promise<void> {
    let res: Response;
    try {
      res = await this.fetchImpl(this.url, {
        headers: { Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: this.ctrl.signal,
      });
    } catch (e) {
      this.end(1006, `the event stream could not be opened: ${(e as Error).message}`, true);
      return;
    }
    if (this.done) return;
    if (!res.ok || !res.body) {
      this.end(1006, `the event stream answered HTTP ${res.status}`, true);
      return;
    }
    this.responded = true;
    this.on?.open();
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    const parser = new EventStreamParser();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (this.done) return;
        if (done) break;
        const comments = parser.comments;
        for (const ev of parser.push(decoder.decode(value, { stream: true }))) {
          this.event(ev.event, ev.data);
          if (this.done) return;
        }
        // The server's keep-alives: nothing to deliver, but proof that the stream lives.
        if (parser.comments > comments) this.on?.alive?.();
      }
    } catch (e) {
      this.end(1006, `the event stream failed: ${(e as Error).message}`, true);
      return;
    }
    this.end(1006, 'the event stream ended without a close event');
  }

  private event(name: string, data: string): void {
    if (name === 'stream') {
      try {
        const post = (JSON.parse(data) as { post?: unknown }).post;
        if (typeof post === 'string') this.postPath = post;
      } catch {
        // Not ours to judge: the frames still flow; sends wait.
      }
      void this.pump();
      return;
    }
    if (name === 'close') {
      let code = 1006;
      let reason = 'the server closed the stream';
      try {
        const c = JSON.parse(data) as { code?: unknown; reason?: unknown };
        if (typeof c.code === 'number') code = c.code;
        if (typeof c.reason === 'string') reason = c.reason;
      } catch {
        // Keep the defaults.
      }
      this.end(code, reason);
      return;
    }
    this.on?.message(data);
  }

  /** Posts the queued frames one by one, once the stream said where. */
  private async pump(): Promise<void> {
    if (this.posting || !this.postPath) return;
    this.posting = true;
    try {
      while (!this.done && this.queue.length) {
        const text = this.queue[0];
        await this.post(this.postPath, text);
        this.queue.shift();
      }
    } finally {
      this.posting = false;
    }
  }

  private async post(path: string, text: string): Promise<void> {
    let token: string | null = null;
    try {
      token = await this.getToken();
    } catch {
      // No token: the POST goes without one and its 401 ends the stream as a 4401.
    }
    if (this.done) return;
    let res: Response;
    try {
      res = await this.fetchImpl(this.target.apiUrl + path, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', ...(token ? { Authorization: `Bearer ${token}` } : {}) },
        body: text,
        signal: this.ctrl.signal,
      });
    } catch (e) {
      // Lost on the way (or aborted by close()). Its answer will never come, and a message
      // would wait for it until the next reconnect, which a healthy stream never brings: end
      // the connection now, so the reconnect resumes by seq and resends by client_id (the
      // server stores a resend once).
      this.end(1006, `a frame POST failed: ${(e as Error).message}`, true);
      return;
    }
    if (this.done) return;
    if (res.status >= 500) {
      this.end(1006, `a frame POST answered HTTP ${res.status}`, true);
      return;
    }
    if (res.status === 200) {
      const body = await res.text().catch(() => '');
      if (!this.done && body) this.on?.message(body);
      return;
    }
    if (res.status === 202) return;
    const code = postRefusal(res.status);
    if (code !== null)
      this.end(code, `a frame POST answered HTTP ${res.status}: ${(await res.text().catch(() => '')).slice(0, 200)}`, true);
  }
}
