/**
 * `ChatSocket`: one chat connection to a natter bot that reconnects wisely, explains itself
 * and loses nothing.
 *
 * The connection is an explicit state machine (see `ConnectionState`). Each attempt runs
 * health check → code registry → ticket → socket → `connection_established`; a close is
 * looked up in the server's close-code registry to decide between failing for good, asking
 * the app for a fresh token once, waiting for the server's hint, or backing off with full
 * jitter. Every callback carries the attempt's generation number, so a late event from an
 * abandoned socket can never move the machine.
 */

import { resolveEndpoints } from './config.js';
import { Emitter } from './emitter.js';
import { http, now as monoNow, uuid } from './http.js';
import { log, redact } from './log.js';
import { Outbox, type KeyValueStorage, type OutboxEntry } from './outbox.js';
import { CLIENT_CLOSE, ClosePolicy, fullJitterDelay, parseRetryHint, type BackoffOptions, type CloseVerdict } from './policy.js';
import {
  decodeCodeRegistry,
  encodeClientFrame,
  parseServerFrame,
  type AckFrame,
  type ConnectionEstablishedFrame,
  type ErrorFrame,
  type MessageDeltaFrame,
  type Preflight,
  type ServerFrame,
  type TicketResponse,
  type WireMessage,
} from './protocol.js';
import { FlightRecorder } from './recorder.js';
import { closeHeadline } from './words.js';

/** How a connection ended, as the UI shows it. */
export interface CloseInfo {
  code: number;
  reason: string;
  /** The registry's name for the code (`bot_not_found`, `abnormal_closure`, …). */
  name: string;
  /** Epoch ms. */
  at: number;
}

export type ConnectionState =
  | { kind: 'idle' }
  | { kind: 'checking'; attempt: number }
  | { kind: 'connecting'; attempt: number }
  | { kind: 'open'; connectionId: string; since: number; heartbeatIntervalMs: number }
  | { kind: 'reconnecting'; attempt: number; retryAt: number; lastClose: CloseInfo | null }
  | { kind: 'offline'; lastClose: CloseInfo | null }
  /** `status`: the health check's HTTP status, 0 when the server could not be reached at all. */
  | { kind: 'backend_unavailable'; attempt: number; retryAt: number; error: string; status: number }
  | { kind: 'failed'; code: number; reason: string; advice: string };

export type StateKind = ConnectionState['kind'];

/** A message the server refused, or a send that could not complete. */
export class ChatError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly retryAfterMs?: number,
  ) {
    super(message);
    this.name = 'ChatError';
  }
}

export interface ChatSocketEvents {
  state: ConnectionState;
  established: ConnectionEstablishedFrame;
  /** A message of the conversation, each seq once: bot replies, other tabs' messages, replays. */
  message: WireMessage;
  delta: MessageDeltaFrame;
  /** One of this client's messages is stored (also fired for outbox entries resent after a reload). */
  ack: AckFrame;
  /** An `error` frame (the socket stays up). */
  error: ErrorFrame;
  /** The outbox changed (an entry added, acknowledged or refused). */
  outbox: OutboxEntry[];
  /** A client message the server refused for good (`client_id` and the error). */
  rejected: { client_id: string; error: ErrorFrame };
}

/** Where online/offline and visibility come from; a test passes its own. */
export interface Environment {
  isOnline(): boolean;
  isVisible(): boolean;
  /** Subscribes to `online`, `offline` and `visibilitychange`; returns the unsubscribe. */
  listen(on: { online(): void; offline(): void; visible(): void }): () => void;
}

export function browserEnvironment(): Environment {
  return {
    isOnline: () => (typeof navigator === 'undefined' ? true : navigator.onLine !== false),
    isVisible: () => (typeof document === 'undefined' ? true : document.visibilityState !== 'hidden'),
    listen(on) {
      if (typeof window === 'undefined') return () => {};
      const vis = () => {
        if (document.visibilityState === 'visible') on.visible();
      };
      window.addEventListener('online', on.online);
      window.addEventListener('offline', on.offline);
      document.addEventListener('visibilitychange', vis);
      return () => {
        window.removeEventListener('online', on.online);
        window.removeEventListener('offline', on.offline);
        document.removeEventListener('visibilitychange', vis);
      };
    },
  };
}

export interface ChatSocketOptions {
  /** Default: `VITE_API_URL`, else the page's origin. */
  apiUrl?: string;
  /** Default: `VITE_WS_URL`, else `apiUrl` with ws(s)://. */
  wsUrl?: string;
  /** The current access token (or null when logged out). */
  getToken?: () => string | null | Promise<string | null>;
  /**
   * Asked once after a 4401 (or a 401 from the ticket endpoint): return a fresh access token,
   * or null if the session is over. The socket fails with "Session expired" on null.
   */
  refreshToken?: () => Promise<string | null>;
  /** Use `POST /api/ws/ticket` so the access token never appears in a URL. Default true. */
  useTicket?: boolean;
  /** From socket creation to `connection_established`. Default 10 000 ms. */
  connectTimeoutMs?: number;
  /** The `GET /api/health` check before each attempt. Default 3 000 ms. */
  healthTimeoutMs?: number;
  /** Backoff (full jitter): base 500 ms, cap 30 s. */
  backoff?: Partial<BackoffOptions>;
  /** A connection open this long resets the backoff. Default 30 000 ms. */
  stableAfterMs?: number;
  /** App-level ping period. Default half the server's heartbeat interval. */
  pingIntervalMs?: number;
  /** How long a hidden-then-visible tab waits for a pong before reconnecting. Default 5 000 ms. */
  livenessTimeoutMs?: number;
  /**
   * Consecutive 1011 closes (server errors) before giving up with `failed`, so a server that
   * crashes on every connection is not hammered forever. Default 10.
   */
  maxServerErrors?: number;
  /** Most unsent messages kept. Default 100. */
  outboxLimit?: number;
  /** Where the outbox persists. Default `sessionStorage`; null keeps it in memory. */
  storage?: KeyValueStorage | null;
  /** Flight recorder size. Default 200. */
  recorderCapacity?: number;
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
  environment?: Environment;
  random?: () => number;
}

export interface ConnectOptions {
  /** Resume after this seq (e.g. the last message of history the app already loaded). */
  afterSeq?: number;
}

interface Pending {
  resolve(a: AckFrame): void;
  reject(e: ChatError): void;
}

const OPEN = 1;

function defaultStorage(): KeyValueStorage | null {
  try {
    return typeof sessionStorage !== 'undefined' ? sessionStorage : null;
  } catch {
    return null;
  }
}

export class ChatSocket {
  readonly recorder: FlightRecorder;
  readonly outbox: Outbox;
  readonly policy = new ClosePolicy();

  private readonly events = new Emitter<ChatSocketEvents>();
  private readonly opts: Required<
    Pick<ChatSocketOptions, 'useTicket' | 'connectTimeoutMs' | 'healthTimeoutMs' | 'stableAfterMs' | 'livenessTimeoutMs'>
  > &
    ChatSocketOptions;
  private readonly backoffOpts: BackoffOptions;
  private readonly env: Environment;
  private readonly random: () => number;
  private apiUrl: string;
  private wsUrl: string;

  private _state: ConnectionState = { kind: 'idle' };
  private botId: string | null = null;
  private ws: WebSocket | null = null;
  /** Incremented by every attempt and teardown; callbacks of older generations do nothing. */
  private gen = 0;
  /** Retries since the last stable connection. */
  private attempt = 0;
  private reauthUsed = false;
  private afterSeqResetUsed = false;
  /** Consecutive 1011 closes since the last stable connection. */
  private serverErrors = 0;
  private codesLoaded = false;
  private _lastSeq: number | null = null;
  private established: ConnectionEstablishedFrame | null = null;
  private openedAt = 0;
  private lastFrameAt = 0;
  private lastClose: CloseInfo | null = null;

  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private connectTimer: ReturnType<typeof setTimeout> | null = null;
  private watchdogTimer: ReturnType<typeof setTimeout> | null = null;
  private stableTimer: ReturnType<typeof setTimeout> | null = null;
  private pingTimer: ReturnType<typeof setInterval> | null = null;
  private rateTimer: ReturnType<typeof setTimeout> | null = null;

  private pingSeq = 0;
  private pings = new Map<number, { sent: number; waiters: Array<(rtt: number | null) => void> }>();
  private rtts: number[] = [];
  private pending = new Map<string, Pending>();
  private unlisten: () => void;

  constructor(options: ChatSocketOptions = {}) {
    this.opts = {
      useTicket: true,
      connectTimeoutMs: 10_000,
      healthTimeoutMs: 3_000,
      stableAfterMs: 30_000,
      livenessTimeoutMs: 5_000,
      ...options,
    };
    const ep = resolveEndpoints({ apiUrl: options.apiUrl, wsUrl: options.wsUrl });
    this.apiUrl = ep.apiUrl;
    this.wsUrl = ep.wsUrl;
    this.backoffOpts = { baseMs: 500, capMs: 30_000, ...options.backoff };
    this.env = options.environment ?? browserEnvironment();
    this.random = options.random ?? Math.random;
    this.recorder = new FlightRecorder(options.recorderCapacity ?? 200);
    this.outbox = new Outbox(
      options.storage === undefined ? defaultStorage() : options.storage,
      'natter.outbox',
      options.outboxLimit ?? 100,
    );
    this.unlisten = this.env.listen({
      online: () => this.onOnline(),
      offline: () => this.onOffline(),
      visible: () => this.onVisible(),
    });
  }

  /** Changes the credentials callbacks (an app that creates the singleton before login). */
  configure(options: Pick<ChatSocketOptions, 'getToken' | 'refreshToken' | 'apiUrl' | 'wsUrl'>): void {
    if (options.getToken) this.opts.getToken = options.getToken;
    if (options.refreshToken) this.opts.refreshToken = options.refreshToken;
    if (options.apiUrl || options.wsUrl) {
      const ep = resolveEndpoints({
        apiUrl: options.apiUrl ?? this.apiUrl,
        wsUrl: options.wsUrl ?? (options.apiUrl ? undefined : this.wsUrl),
      });
      this.apiUrl = ep.apiUrl;
      this.wsUrl = ep.wsUrl;
    }
  }

  // ---- public surface ------------------------------------------------------------------

  get state(): ConnectionState {
    return this._state;
  }
  /** The highest seq seen on this conversation (null before the first connection). */
  get lastSeq(): number | null {
    return this._lastSeq;
  }
  get endpoints(): { apiUrl: string; wsUrl: string } {
    return { apiUrl: this.apiUrl, wsUrl: this.wsUrl };
  }
  getCurrentBotId(): string | null {
    return this.botId;
  }
  isConnected(): boolean {
    return this._state.kind === 'open';
  }
  /** The last `connection_established` of the current connection (null when not open). */
  getConnectionInfo(): ConnectionEstablishedFrame | null {
    return this._state.kind === 'open' ? this.established : null;
  }
  /** Recent ping round-trip times in ms, newest last. */
  getRtts(): number[] {
    return this.rtts.slice();
  }
  on<K extends keyof ChatSocketEvents>(event: K, fn: (v: ChatSocketEvents[K]) => void): () => void {
    return this.events.on(event, fn);
  }

  /** Opens (or switches) the connection to a bot. Calling it again for the same bot is a no-op. */
  connect(botId: string, options: ConnectOptions = {}): void {
    if (botId === this.botId && this._state.kind !== 'idle' && this._state.kind !== 'failed') return;
    if (botId !== this.botId) this._lastSeq = null;
    this.teardown(1000, 'switching bots');
    this.botId = botId;
    if (options.afterSeq !== undefined) this._lastSeq = options.afterSeq;
    this.attempt = 0;
    this.reauthUsed = false;
    this.afterSeqResetUsed = false;
    this.serverErrors = 0;
    this.lastClose = null;
    this.recorder.record('connect', { bot_id: botId, after_seq: this._lastSeq });
    void this.startAttempt();
  }

  /** Closes the connection and stops reconnecting. The outbox is kept. */
  disconnect(): void {
    if (this.botId) this.recorder.record('disconnect', { bot_id: this.botId });
    this.teardown(1000, 'client disconnect');
    this.botId = null;
    this.rejectPending(new ChatError('disconnected', 'the connection was closed by the app'));
    this.setState({ kind: 'idle' });
  }

  /** Reconnects at once, skipping any backoff wait (the UI's Retry button). */
  retryNow(): void {
    if (!this.botId) return;
    this.recorder.record('retry_now', { from: this._state.kind });
    this.teardown(CLIENT_CLOSE.CLIENT_RESET, 'retry requested');
    this.attempt = 0;
    this.reauthUsed = false;
    this.afterSeqResetUsed = false;
    this.serverErrors = 0;
    void this.startAttempt();
  }

  /**
   * Sends a message. It waits in the outbox (persisted) until the server acknowledges it,
   * surviving reconnects; the promise resolves with the `ack`. Pass `clientId` to retry an
   * earlier message under its original id.
   */
  send(content: string, options: { clientId?: string } = {}): Promise<AckFrame> {
    const botId = this.botId;
    if (!botId) return Promise.reject(new ChatError('not_connected', 'connect to a bot before sending'));
    const client_id = options.clientId ?? uuid();
    if (!this.outbox.has(client_id)) {
      try {
        this.outbox.add({ client_id, bot_id: botId, content });
      } catch (e) {
        return Promise.reject(new ChatError('outbox_full', (e as Error).message));
      }
      log.outbox('queued %s (%d waiting)', client_id, this.outbox.size);
      this.events.emit('outbox', this.outbox.forBot(botId));
    }
    const p = new Promise<AckFrame>((resolve, reject) => this.pending.set(client_id, { resolve, reject }));
    if (this._state.kind === 'open') this.writeMessage(client_id, content);
    return p;
  }

  /** Outbox entries (unacknowledged messages) of a bot, oldest first. */
  outboxFor(botId: string): OutboxEntry[] {
    return this.outbox.forBot(botId);
  }

  /** Drops every unsent message, of every bot (call it on logout). */
  clearOutbox(): void {
    const bots = new Set(this.outbox.all().map((e) => e.bot_id));
    this.outbox.clear();
    this.rejectPending(new ChatError('discarded', 'the outbox was cleared'));
    this.events.emit('outbox', []);
    this.recorder.record('outbox_cleared', { bots: bots.size });
  }

  /** Asks the server to stop a bot reply that is streaming (`message_delta`s with this id). */
  cancel(messageId: string): boolean {
    if (!this.ws || this.ws.readyState !== OPEN || this._state.kind !== 'open') return false;
    this.ws.send(encodeClientFrame({ type: 'cancel', message_id: messageId }));
    this.recorder.record('cancel', { message_id: messageId });
    return true;
  }

  /** Drops an unsent message from the outbox (the user gave up on it). */
  discard(clientId: string): void {
    const e = this.outbox.remove(clientId);
    this.pending.get(clientId)?.reject(new ChatError('discarded', 'the message was discarded'));
    this.pending.delete(clientId);
    if (e) this.events.emit('outbox', this.outbox.forBot(e.bot_id));
  }

  /** Sends an app-level ping; resolves with the round-trip in ms, or null on timeout. */
  ping(timeoutMs = 5000): Promise<number | null> {
    if (!this.ws || this.ws.readyState !== OPEN || this._state.kind !== 'open') return Promise.resolve(null);
    const id = this.sendPing();
    return new Promise((resolve) => {
      const entry = this.pings.get(id);
      const t = setTimeout(() => resolve(null), timeoutMs);
      entry?.waiters.push((rtt) => {
        clearTimeout(t);
        resolve(rtt);
      });
    });
  }

  /** The flight recorder as JSON, for bug reports. Holds no tokens. */
  exportFlightRecorder(): string {
    return this.recorder.toJSON({
      api_url: this.apiUrl,
      ws_url: this.wsUrl,
      bot_id: this.botId,
      state: this._state,
      last_seq: this._lastSeq,
      outbox_size: this.outbox.size,
      last_frame_at: this.lastFrameAt || null,
      user_agent: typeof navigator !== 'undefined' ? navigator.userAgent : undefined,
    });
  }

  /** Stops everything and removes the online/offline listeners. */
  destroy(): void {
    this.disconnect();
    this.unlisten();
  }

  // ---- the state machine ---------------------------------------------------------------

  private setState(s: ConnectionState): void {
    const prev = this._state.kind;
    this._state = s;
    const detail: Record<string, unknown> = { ...s };
    delete detail.kind;
    this.recorder.record('state', { from: prev, to: s.kind, ...detail });
    log.state('%s → %s %o', prev, s.kind, detail);
    this.events.emit('state', s);
  }

  private clearTimers(): void {
    for (const t of [this.retryTimer, this.connectTimer, this.watchdogTimer, this.stableTimer, this.rateTimer]) if (t) clearTimeout(t);
    if (this.pingTimer) clearInterval(this.pingTimer);
    this.retryTimer = this.connectTimer = this.watchdogTimer = this.stableTimer = this.pingTimer = this.rateTimer = null;
  }

  /** Ends the current attempt: no callback of it will run after this. */
  private teardown(code: number, reason: string): void {
    this.gen += 1;
    this.clearTimers();
    for (const p of this.pings.values()) for (const w of p.waiters) w(null);
    this.pings.clear();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
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

  private async startAttempt(): Promise<void> {
    const botId = this.botId;
    if (!botId) return;
    this.teardown(1000, 'new attempt');
    const gen = this.gen;
    const live = () => gen === this.gen && this.botId === botId;

    if (!this.env.isOnline()) {
      this.setState({ kind: 'offline', lastClose: this.lastClose });
      return;
    }
    this.setState({ kind: 'checking', attempt: this.attempt });
    const health = await http<unknown>(this.apiUrl, '/api/health', { timeoutMs: this.opts.healthTimeoutMs, fetch: this.opts.fetch });
    if (!live()) return;
    this.recorder.record('health', {
      ok: health.ok,
      status: health.status,
      ms: Math.round(health.ms),
      ...(health.ok ? {} : { error: health.message }),
    });
    if (!health.ok) {
      const error = health.network ? `server unreachable (${health.message})` : `health check answered ${health.status}: ${health.message}`;
      this.scheduleRetry(
        'backend_unavailable',
        fullJitterDelay(this.attempt, this.backoffOpts, this.random),
        error,
        health.network ? 0 : health.status,
      );
      return;
    }

    if (!this.codesLoaded) {
      const codes = await http<unknown>(this.apiUrl, '/api/ws/codes', { timeoutMs: this.opts.healthTimeoutMs, fetch: this.opts.fetch });
      if (!live()) return;
      if (codes.ok) {
        try {
          this.policy.loadRegistry(decodeCodeRegistry(codes.body));
          this.codesLoaded = true;
          this.recorder.record('codes_loaded', { close_codes: this.policy.fromServer });
        } catch (e) {
          log.connect('code registry unreadable, using the built-in copy: %s', (e as Error).message);
        }
      }
    }

    const cred = await this.credential(botId);
    if (!live()) return;
    if ('close' in cred) {
      this.onClosed(gen, cred.close.code, cred.close.reason, 'auth');
      return;
    }

    this.setState({ kind: 'connecting', attempt: this.attempt });
    const params = new URLSearchParams();
    params.set(cred.kind, cred.value);
    if (this._lastSeq !== null) params.set('after_seq', String(this._lastSeq));
    const attemptId = uuid();
    params.set('attempt_id', attemptId);
    const url = `${this.wsUrl}/api/ws/chat/${encodeURIComponent(botId)}?${params}`;
    const safeUrl = redact(url);
    log.connect('Attempting to connect to chat WebSocket: %s', safeUrl);
    this.recorder.record('ws_connect', { url: safeUrl, attempt: this.attempt, attempt_id: attemptId, auth: cred.kind });
    const Ctor = this.opts.WebSocket ?? globalThis.WebSocket;
    let ws: WebSocket;
    try {
      ws = new Ctor(url);
    } catch (e) {
      this.onClosed(gen, 1006, `could not create the WebSocket: ${(e as Error).message}`, 'client');
      return;
    }
    this.ws = ws;
    const started = monoNow();
    this.connectTimer = setTimeout(() => {
      if (!live()) return;
      this.recorder.record('connect_timeout', { ms: this.opts.connectTimeoutMs });
      this.onClosed(gen, CLIENT_CLOSE.CONNECT_TIMEOUT, `no connection_established within ${this.opts.connectTimeoutMs} ms`, 'client');
    }, this.opts.connectTimeoutMs);
    ws.onopen = () => {
      if (!live()) return;
      const ms = Math.round(monoNow() - started);
      log.connect('Chat WebSocket connected for bot: %s (handshake %d ms)', botId, ms);
      this.recorder.record('ws_open', { handshake_ms: ms });
    };
    ws.onmessage = (ev: MessageEvent) => {
      if (!live()) return;
      this.onFrame(gen, typeof ev.data === 'string' ? ev.data : '');
    };
    ws.onerror = () => {
      if (!live()) return;
      log.close('Chat WebSocket error (the close event that follows has the code)');
      this.recorder.record('ws_error', { buffered_amount: ws.bufferedAmount });
    };
    ws.onclose = (ev: CloseEvent) => {
      if (!live()) return;
      this.onClosed(gen, ev.code, ev.reason, 'server');
    };
  }

  /** A ticket (preferred) or the token, or the close code to act on when neither can be had. */
  private async credential(
    botId: string,
  ): Promise<{ kind: 'ticket' | 'token'; value: string } | { close: { code: number; reason: string } }> {
    const token = this.opts.getToken ? await this.opts.getToken() : null;
    if (!token) return { close: { code: 4401, reason: 'not logged in: no access token' } };
    if (!this.opts.useTicket) return { kind: 'token', value: token };
    const r = await http<TicketResponse>(this.apiUrl, '/api/ws/ticket', {
      method: 'POST',
      token,
      body: { bot_id: botId },
      timeoutMs: this.opts.healthTimeoutMs,
      fetch: this.opts.fetch,
    });
    this.recorder.record('ticket', { ok: r.ok, status: r.status, ms: Math.round(r.ms), ...(r.ok ? {} : { code: r.code }) });
    if (r.ok && typeof r.body?.ticket === 'string') return { kind: 'ticket', value: r.body.ticket };
    if (!r.ok) {
      // The ticket endpoint runs the same checks as the socket: map its refusal to the close
      // code the socket would have sent, so one policy table decides.
      if (r.status === 401) return { close: { code: 4401, reason: `${r.code}: ${r.message}` } };
      if (r.status === 403) return { close: { code: 4403, reason: r.message } };
      if (r.status === 404 && r.code === 'not_found' && !/endpoint/.test(r.message)) return { close: { code: 4404, reason: r.message } };
      if (r.status === 400) return { close: { code: 4400, reason: r.message } };
    }
    // No ticket service (older server) or a transient failure: the token in the URL still works.
    log.connect('ticket unavailable (%s); using the token', r.ok ? 'bad body' : r.code);
    return { kind: 'token', value: token };
  }

  private onFrame(gen: number, text: string): void {
    this.lastFrameAt = Date.now();
    this.armWatchdog(gen);
    let f: ServerFrame;
    try {
      f = parseServerFrame(text);
    } catch (e) {
      log.frame('ignoring a frame: %s', (e as Error).message);
      this.recorder.record('bad_frame', { error: (e as Error).message, bytes: text.length });
      return;
    }
    if (f.type !== 'pong') log.frame('← %s', f.type);
    switch (f.type) {
      case 'connection_established':
        this.onEstablished(gen, f);
        return;
      case 'ack':
        this.onAck(f);
        return;
      case 'message':
        this.onMessage(f.message);
        return;
      case 'message_delta':
        this.events.emit('delta', f);
        return;
      case 'pong':
        this.onPong(f.id);
        return;
      case 'error':
        this.onErrorFrame(f);
        return;
    }
  }

  private onEstablished(gen: number, f: ConnectionEstablishedFrame): void {
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.connectTimer = null;
    this.established = f;
    this.openedAt = Date.now();
    if (this._lastSeq === null) this._lastSeq = f.last_seq;
    const skew = Date.parse(f.server_time) - Date.now();
    log.connect(
      'Chat WebSocket connection established: connection %s, last_seq %d, heartbeat %d ms',
      f.connection_id,
      f.last_seq,
      f.heartbeat_interval_ms,
    );
    this.recorder.record('established', {
      connection_id: f.connection_id,
      last_seq: f.last_seq,
      resume_from: this._lastSeq,
      heartbeat_interval_ms: f.heartbeat_interval_ms,
      clock_skew_ms: Number.isFinite(skew) ? skew : null,
    });
    this.setState({ kind: 'open', connectionId: f.connection_id, since: this.openedAt, heartbeatIntervalMs: f.heartbeat_interval_ms });
    this.reauthUsed = false;
    this.afterSeqResetUsed = false;
    this.events.emit('established', f);
    const hb = Math.max(1000, f.heartbeat_interval_ms);
    this.pingTimer = setInterval(
      () => {
        if (gen === this.gen) this.sendPing();
      },
      this.opts.pingIntervalMs ?? Math.max(500, Math.floor(hb / 2)),
    );
    this.stableTimer = setTimeout(() => {
      if (gen !== this.gen) return;
      this.attempt = 0;
      this.serverErrors = 0;
      this.recorder.record('stable', { after_ms: this.opts.stableAfterMs });
    }, this.opts.stableAfterMs);
    this.armWatchdog(gen);
    this.flushOutbox();
  }

  private armWatchdog(gen: number): void {
    if (this._state.kind !== 'open' || !this.established) return;
    if (this.watchdogTimer) clearTimeout(this.watchdogTimer);
    const limit = 2 * this.established.heartbeat_interval_ms;
    this.watchdogTimer = setTimeout(() => {
      if (gen !== this.gen) return;
      this.onClosed(gen, CLIENT_CLOSE.HEARTBEAT_LOST, `no frame from the server for ${limit} ms`, 'client');
    }, limit);
  }

  private onAck(f: AckFrame): void {
    if (this._lastSeq === null || f.message.seq > this._lastSeq) this._lastSeq = f.message.seq;
    this.settle(f.client_id, f);
  }

  /** Resolves a send: removes it from the outbox and tells the app. */
  private settle(client_id: string, ack: AckFrame): void {
    const entry = this.outbox.remove(client_id);
    const p = this.pending.get(client_id);
    this.pending.delete(client_id);
    if (!entry && !p) {
      // Already settled (e.g. by a replayed copy): a second ack changes nothing.
      this.recorder.record('ack_again', { client_id, seq: ack.message.seq });
      return;
    }
    this.recorder.record('ack', { client_id, seq: ack.message.seq, duplicate: ack.duplicate });
    log.outbox('acked %s as seq %d%s', client_id, ack.message.seq, ack.duplicate ? ' (duplicate)' : '');
    p?.resolve(ack);
    this.events.emit('ack', ack);
    if (entry) this.events.emit('outbox', this.outbox.forBot(entry.bot_id));
  }

  private onMessage(m: WireMessage): void {
    if (this._lastSeq !== null && m.seq <= this._lastSeq) {
      this.recorder.record('duplicate_dropped', { seq: m.seq, last_seq: this._lastSeq });
      log.frame('dropping seq %d (already have up to %d)', m.seq, this._lastSeq);
      return;
    }
    this._lastSeq = m.seq;
    // A replayed copy of our own message whose ack was lost: it is stored, so it is sent.
    if (m.client_id && (this.outbox.has(m.client_id) || this.pending.has(m.client_id))) {
      this.settle(m.client_id, { type: 'ack', client_id: m.client_id, message: m, duplicate: true });
    }
    this.events.emit('message', m);
  }

  private onPong(id: unknown): void {
    if (typeof id !== 'number') return;
    const p = this.pings.get(id);
    if (!p) return;
    this.pings.delete(id);
    const rtt = Math.round((monoNow() - p.sent) * 10) / 10;
    this.rtts.push(rtt);
    if (this.rtts.length > 20) this.rtts.shift();
    this.recorder.record('rtt', { ms: rtt, buffered_amount: this.ws?.bufferedAmount ?? 0 });
    for (const w of p.waiters) w(rtt);
  }

  private onErrorFrame(f: ErrorFrame): void {
    this.recorder.record('error_frame', { code: f.code, message: f.message, client_id: f.client_id, retry_after_ms: f.retry_after_ms });
    log.frame('error frame %s: %s', f.code, f.message);
    if (f.client_id && this.outbox.has(f.client_id)) {
      if (f.code === 'rate_limited' || f.code === 'bot_busy') {
        // Still ours to send: keep it and resend everything waiting after the hint.
        const wait = f.retry_after_ms ?? 1000;
        if (!this.rateTimer) {
          const gen = this.gen;
          this.rateTimer = setTimeout(() => {
            this.rateTimer = null;
            if (gen === this.gen) this.flushOutbox();
          }, wait);
        }
      } else {
        const entry = this.outbox.remove(f.client_id);
        const p = this.pending.get(f.client_id);
        this.pending.delete(f.client_id);
        p?.reject(new ChatError(f.code, f.message, f.retry_after_ms));
        this.events.emit('rejected', { client_id: f.client_id, error: f });
        if (entry) this.events.emit('outbox', this.outbox.forBot(entry.bot_id));
      }
    }
    this.events.emit('error', f);
  }

  private writeMessage(client_id: string, content: string): void {
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN) return;
    const frame = encodeClientFrame({ type: 'message', client_id, content });
    // A frame over the server's limit would close the socket with 1009, and resending it after
    // the reconnect would close it again: refuse it here instead of looping.
    const limits = this.established?.limits;
    const bytes = new TextEncoder().encode(frame).length;
    if (limits && bytes > limits.max_frame_bytes) {
      this.onErrorFrame({
        type: 'error',
        code: 'content_too_long',
        message: `the message is ${bytes} bytes as a frame; the server's limit is ${limits.max_frame_bytes}`,
        client_id,
      });
      return;
    }
    ws.send(frame);
    this.outbox.markSent(client_id);
    log.outbox('→ message %s', client_id);
  }

  private flushOutbox(): void {
    if (!this.botId || this._state.kind !== 'open') return;
    const waiting = this.outbox.forBot(this.botId);
    if (waiting.length) this.recorder.record('outbox_flush', { count: waiting.length });
    for (const e of waiting) this.writeMessage(e.client_id, e.content);
  }

  private sendPing(): number {
    const id = ++this.pingSeq;
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN) return id;
    this.pings.set(id, { sent: monoNow(), waiters: [] });
    // Forget pings that were never answered, so the map stays small.
    for (const k of this.pings.keys()) if (k < id - 10) this.pings.delete(k);
    ws.send(encodeClientFrame({ type: 'ping', id }));
    return id;
  }

  /** Decides what follows a close (or a refusal before the socket). */
  private onClosed(gen: number, code: number, reason: string, by: 'server' | 'client' | 'auth'): void {
    if (gen !== this.gen) return;
    const wasOpen = this._state.kind === 'open';
    const openMs = wasOpen ? Date.now() - this.openedAt : 0;
    const v = this.policy.verdict(code);
    // Reasons are shown and logged: never let a credential through.
    reason = redact(reason);
    const info: CloseInfo = { code, reason, name: v.name, at: Date.now() };
    this.lastClose = info;
    this.recorder.record('close', {
      code,
      name: v.name,
      said: closeHeadline(code),
      reason: redact(reason),
      by,
      retry: v.retry,
      was_open: wasOpen,
      open_ms: openMs,
      connection_id: wasOpen ? this.established?.connection_id : undefined,
      buffered_amount: this.ws?.bufferedAmount ?? 0,
    });
    log.close(
      'Chat WebSocket disconnected: %d %s - %s (%s; policy %s)',
      code,
      v.name,
      redact(reason) || '(no reason)',
      v.description,
      v.retry,
    );
    this.teardown(code === 1006 || code < 3000 ? 1000 : code, reason);
    const myGen = this.gen;

    if (code === 1006 && by === 'server') {
      // The browser hides why a socket dropped; ask the server what it would say now.
      void this.preflightAfter1006(myGen, info);
      return;
    }
    this.applyPolicy(v, info);
  }

  private async preflightAfter1006(gen: number, info: CloseInfo): Promise<void> {
    const botId = this.botId;
    const token = this.opts.getToken ? await this.opts.getToken() : null;
    if (gen !== this.gen) return;
    if (botId && token) {
      const q = this._lastSeq !== null ? `?after_seq=${this._lastSeq}` : '';
      const r = await http<Preflight>(this.apiUrl, `/api/ws/preflight/${encodeURIComponent(botId)}${q}`, {
        token,
        timeoutMs: this.opts.healthTimeoutMs,
        fetch: this.opts.fetch,
      });
      if (gen !== this.gen) return;
      this.recorder.record(
        'preflight',
        r.ok ? { ok: r.body.ok, close_code: r.body.close_code, reason: r.body.reason } : { error: r.message },
      );
      if (r.ok && !r.body.ok && r.body.close_code) {
        const v = this.policy.verdict(r.body.close_code);
        if (v.retry !== 'backoff') {
          log.close('preflight explains the 1006: %d %s', r.body.close_code, r.body.reason);
          this.applyPolicy(v, { ...info, code: r.body.close_code, reason: r.body.reason ?? '', name: v.name });
          return;
        }
      }
    }
    this.applyPolicy(this.policy.verdict(1006), info);
  }

  private applyPolicy(v: CloseVerdict, info: CloseInfo): void {
    if (!this.botId) return;
    // A server that lost data no longer has our resume point: start over from its end, once.
    if (info.code === 4400 && /after_seq/.test(info.reason) && this._lastSeq !== null && !this.afterSeqResetUsed) {
      this.afterSeqResetUsed = true;
      this._lastSeq = null;
      this.recorder.record('resume_reset', { reason: info.reason });
      this.scheduleRetry('reconnecting', 0);
      return;
    }
    if (info.code === 1011) {
      this.serverErrors += 1;
      const max = this.opts.maxServerErrors ?? 10;
      if (this.serverErrors >= max) {
        this.fail(
          info.code,
          `the server failed ${this.serverErrors} times in a row: ${info.reason}`,
          `${v.description} Run Diagnose and send the report (with the error id) to the server's operator.`,
        );
        return;
      }
    }
    switch (v.retry) {
      case 'stop':
        this.fail(info.code, info.reason, v.description);
        return;
      case 'reauth_once':
        void this.reauth(info, v);
        return;
      case 'after_hint': {
        const hint = parseRetryHint(info.reason);
        const delay =
          hint !== null
            ? hint + Math.floor(this.random() * Math.min(1000, hint / 10 + 1))
            : fullJitterDelay(this.attempt, this.backoffOpts, this.random);
        this.scheduleRetry('reconnecting', delay);
        return;
      }
      case 'backoff':
        this.scheduleRetry('reconnecting', fullJitterDelay(this.attempt, this.backoffOpts, this.random));
        return;
    }
  }

  private async reauth(info: CloseInfo, v: CloseVerdict): Promise<void> {
    if (this.reauthUsed || !this.opts.refreshToken) {
      const reason = this.reauthUsed ? `Session expired, log in again (${info.reason})` : info.reason;
      this.fail(info.code, reason, v.description);
      return;
    }
    this.reauthUsed = true;
    const gen = this.gen;
    this.setState({ kind: 'reconnecting', attempt: this.attempt, retryAt: Date.now(), lastClose: info });
    this.recorder.record('reauth', { reason: redact(info.reason) });
    let token: string | null = null;
    try {
      token = await this.opts.refreshToken();
    } catch (e) {
      log.close('token refresh failed: %s', (e as Error).message);
    }
    if (gen !== this.gen) return;
    this.recorder.record('reauth_result', { ok: !!token });
    if (!token) return this.fail(4401, 'Session expired, log in again', 'The session could not be refreshed. Log in again.');
    void this.startAttempt();
  }

  private scheduleRetry(kind: 'reconnecting' | 'backend_unavailable', delay: number, error = '', status = 0): void {
    this.attempt += 1;
    const retryAt = Date.now() + delay;
    const gen = this.gen;
    if (kind === 'reconnecting') this.setState({ kind, attempt: this.attempt, retryAt, lastClose: this.lastClose });
    else this.setState({ kind, attempt: this.attempt, retryAt, error, status });
    this.retryTimer = setTimeout(() => {
      if (gen === this.gen) void this.startAttempt();
    }, delay);
  }

  private fail(code: number, reason: string, advice: string): void {
    reason = redact(reason);
    this.teardown(1000, 'failed');
    this.setState({ kind: 'failed', code, reason, advice });
    this.rejectPending(new ChatError('connection_failed', `the connection failed: ${reason}`));
  }

  private rejectPending(e: ChatError): void {
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) p.reject(e);
  }

  // ---- network and visibility ------------------------------------------------------------

  private onOffline(): void {
    if (!this.botId || this._state.kind === 'idle' || this._state.kind === 'failed') return;
    const info: CloseInfo = { code: CLIENT_CLOSE.OFFLINE, reason: 'the browser went offline', name: 'offline', at: Date.now() };
    this.recorder.record('offline', { was: this._state.kind });
    if (this._state.kind === 'open') this.lastClose = info;
    this.teardown(CLIENT_CLOSE.OFFLINE, 'offline');
    this.setState({ kind: 'offline', lastClose: this.lastClose });
  }

  private onOnline(): void {
    this.recorder.record('online', { state: this._state.kind });
    if (this.botId && this._state.kind === 'offline') {
      this.attempt = 0;
      void this.startAttempt();
    }
  }

  private onVisible(): void {
    const st = this._state;
    if (st.kind === 'reconnecting' || st.kind === 'backend_unavailable') {
      // Shown again: try now rather than wait out a backoff that grew while nobody looked (and
      // that background timers stretch further). The attempt count stays, so a server still
      // down is backed off from as before.
      this.recorder.record('visible_retry', { early_ms: st.retryAt - Date.now(), attempt: st.attempt });
      void this.startAttempt();
      return;
    }
    if (st.kind !== 'open') return;
    const gen = this.gen;
    const quietMs = this.lastFrameAt ? Date.now() - this.lastFrameAt : 0;
    if (this.established && quietMs > this.established.heartbeat_interval_ms) {
      // A frozen (phone) tab: pings should have brought pongs long ago; this socket is dead.
      this.recorder.record('visible_check', { quiet_ms: quietMs });
      this.onClosed(gen, CLIENT_CLOSE.LIVENESS_FAILED, `nothing heard for ${quietMs} ms while the tab was hidden`, 'client');
      return;
    }
    this.recorder.record('visible_check', {});
    void this.ping(this.opts.livenessTimeoutMs).then((rtt) => {
      if (gen !== this.gen || rtt !== null) return;
      this.onClosed(
        gen,
        CLIENT_CLOSE.LIVENESS_FAILED,
        `no pong within ${this.opts.livenessTimeoutMs} ms after the tab became visible`,
        'client',
      );
    });
  }
}
