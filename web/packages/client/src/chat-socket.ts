/**
 * `ChatSocket`: one chat connection to a natter bot that reconnects wisely, explains itself
 * and loses nothing.
 *
 * This is the edge around the pure connection state machine (`connection.ts`): it feeds the
 * machine events (the app's calls, online/offline/visible, health and ticket answers, frames,
 * closes, timers) and runs the effects it returns with real timers, `fetch` and a `Transport`
 * (`transport.ts`). It also keeps what only the edge can: the outbox and its promises, the
 * pings in flight and their round-trip times, and the app's event handlers.
 */

import { resolveEndpoints } from './config.js';
import {
  initialModel,
  type ConnectionState,
  type Effect,
  type MachineConfig,
  type MachineEvent,
  type Model,
  type TimerName,
  type TransportKind,
  type TransportWhy,
  type World,
} from './connection.js';
import { Delivery } from './delivery.js';
import { Emitter } from './emitter.js';
import { browserEnvironment } from './environment.js';
import { ChatError, type ChatSocketEvents } from './events.js';
import { checkHealth, credentialFor, fetchCredential, fetchPreflight, loadCodes, refreshToken, type RestContext } from './handshake.js';
import { now as monoNow, uuid } from './http.js';
import { log, redact } from './log.js';
import { step } from './machine.js';
import type { ChatSocketOptions, ConnectOptions } from './options.js';
import { Outbox, type KeyValueStorage, type OutboxEntry } from './outbox.js';
import { Pinger } from './pinger.js';
import { ClosePolicy } from './policy.js';
import { encodeClientFrame, parseServerFrame, type AckFrame, type ConnectionEstablishedFrame, type ServerFrame } from './protocol.js';
import { FlightRecorder } from './recorder.js';
import { SseTransport } from './sse-transport.js';
import { WebSocketTransport, type Transport, type TransportTarget } from './transport.js';
import { closeHeadline } from './words.js';

export type { CloseInfo, ConnectionState, StateKind, TransportKind, TransportMode, TransportWhy } from './connection.js';
export { browserEnvironment, type Environment } from './environment.js';
export { ChatError, type ChatSocketEvents } from './events.js';
export type { ChatSocketOptions, ConnectOptions } from './options.js';

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
  private readonly config: MachineConfig;
  private readonly world: World;
  private apiUrl: string;
  private wsUrl: string;

  /** Everything the state machine decides from; changed only by `dispatch`. */
  private model: Model = initialModel();
  private transport: Transport | null = null;
  /** The background WebSocket probe in flight (`auto` on SSE), closed by any teardown. */
  private probe: Transport | null = null;
  private timers = new Map<TimerName, { handle: ReturnType<typeof setTimeout>; repeat: boolean }>();

  private readonly pinger: Pinger;
  private readonly delivery: Delivery;
  private unlisten: () => void;

  constructor(options: ChatSocketOptions = {}) {
    const opts = {
      useTicket: true,
      connectTimeoutMs: 10_000,
      healthTimeoutMs: 3_000,
      stableAfterMs: 30_000,
      livenessTimeoutMs: 5_000,
      ...options,
    };
    this.opts = opts;
    const ep = resolveEndpoints({ apiUrl: options.apiUrl, wsUrl: options.wsUrl });
    this.apiUrl = ep.apiUrl;
    this.wsUrl = ep.wsUrl;
    this.config = {
      connectTimeoutMs: opts.connectTimeoutMs,
      stableAfterMs: opts.stableAfterMs,
      livenessTimeoutMs: opts.livenessTimeoutMs,
      pingIntervalMs: opts.pingIntervalMs,
      maxServerErrors: opts.maxServerErrors ?? 10,
      backoff: { baseMs: 500, capMs: 30_000, ...options.backoff },
      transport: opts.transport ?? 'auto',
      wsRetryMs: opts.websocketRetryMs,
    };
    const env = options.environment ?? browserEnvironment();
    const random = options.random ?? Math.random;
    const policy = this.policy;
    this.world = {
      get now() {
        return Date.now();
      },
      get online() {
        return env.isOnline();
      },
      get canRefresh() {
        return !!opts.refreshToken;
      },
      random: () => random(),
      verdict: (code) => policy.verdict(code),
    };
    this.recorder = new FlightRecorder(options.recorderCapacity ?? 200);
    this.outbox = new Outbox(
      options.storage === undefined ? defaultStorage() : options.storage,
      'natter.outbox',
      options.outboxLimit ?? 100,
    );
    this.pinger = new Pinger(this.recorder);
    this.delivery = new Delivery(
      this.outbox,
      this.events,
      this.recorder,
      () => ({ transport: this.transport, limits: this.model.established?.limits }),
      (ms) => this.dispatch({ type: 'resend_later', ms }),
    );
    this.unlisten = env.listen({
      online: () => this.dispatch({ type: 'online' }),
      offline: () => this.dispatch({ type: 'offline' }),
      visible: () => this.dispatch({ type: 'visible' }),
    });
  }

  /**
   * Changes the credentials callbacks (an app that creates the singleton before login), the
   * endpoints, or the transport mode (from the next attempt on).
   */
  configure(options: Pick<ChatSocketOptions, 'getToken' | 'refreshToken' | 'apiUrl' | 'wsUrl' | 'transport'>): void {
    if (options.transport) this.config.transport = options.transport;
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
    return this.model.state;
  }
  /** The highest seq seen on this conversation (null before the first connection). */
  get lastSeq(): number | null {
    return this.model.lastSeq;
  }
  /**
   * What carries the frames of the current (or next) connection: `websocket`, or `sse` (HTTP
   * streaming) when so configured or after `auto` gave the WebSocket up.
   */
  get transportKind(): TransportKind {
    return this.model.transport;
  }
  /**
   * The transport of the current (or next) connection and why: `why` is `auto`'s reason to
   * have switched to SSE (`connect_timeout`, `1006_twice`, `preflight_ok`), `configured` when
   * the app asked for SSE, null on the WebSocket. Diagnose reports it (`inUse`).
   */
  get transportInfo(): { transport: TransportKind; why: TransportWhy | null } {
    const transport = this.model.transport;
    if (transport !== 'sse') return { transport, why: null };
    return { transport, why: this.config.transport === 'sse' ? 'configured' : this.model.transportWhy };
  }
  get endpoints(): { apiUrl: string; wsUrl: string } {
    return { apiUrl: this.apiUrl, wsUrl: this.wsUrl };
  }
  getCurrentBotId(): string | null {
    return this.model.botId;
  }
  isConnected(): boolean {
    return this.model.state.kind === 'open';
  }
  /** The last `connection_established` of the current connection (null when not open). */
  getConnectionInfo(): ConnectionEstablishedFrame | null {
    return this.model.state.kind === 'open' ? this.model.established : null;
  }
  /** Recent ping round-trip times in ms, newest last. */
  getRtts(): number[] {
    return this.pinger.recent();
  }
  on<K extends keyof ChatSocketEvents>(event: K, fn: (v: ChatSocketEvents[K]) => void): () => void {
    return this.events.on(event, fn);
  }

  /** Opens (or switches) the connection to a bot. Calling it again for the same bot is a no-op. */
  connect(botId: string, options: ConnectOptions = {}): void {
    this.dispatch({ type: 'connect', botId, afterSeq: options.afterSeq });
  }

  /** Closes the connection and stops reconnecting. The outbox is kept. */
  disconnect(): void {
    this.dispatch({ type: 'disconnect' });
  }

  /** Reconnects at once, skipping any backoff wait (the UI's Retry button). */
  retryNow(): void {
    this.dispatch({ type: 'retry_now' });
  }

  /**
   * Sends a message. It waits in the outbox (persisted) until the server acknowledges it,
   * surviving reconnects; the promise resolves with the `ack`. Pass `clientId` to retry an
   * earlier message under its original id.
   */
  send(content: string, options: { clientId?: string } = {}): Promise<AckFrame> {
    const botId = this.model.botId;
    if (!botId) return Promise.reject(new ChatError('not_connected', 'connect to a bot before sending'));
    return this.delivery.send(botId, content, options.clientId, this.model.state.kind === 'open');
  }

  /** Outbox entries (unacknowledged messages) of a bot, oldest first. */
  outboxFor(botId: string): OutboxEntry[] {
    return this.outbox.forBot(botId);
  }

  /** Drops every unsent message, of every bot (call it on logout). */
  clearOutbox(): void {
    this.delivery.clear();
  }

  /** Asks the server to stop a bot reply that is streaming (`message_delta`s with this id). */
  cancel(messageId: string): boolean {
    if (!this.transport?.isOpen || this.model.state.kind !== 'open') return false;
    this.transport.send(encodeClientFrame({ type: 'cancel', message_id: messageId }));
    this.recorder.record('cancel', { message_id: messageId });
    return true;
  }

  /** Drops an unsent message from the outbox (the user gave up on it). */
  discard(clientId: string): void {
    this.delivery.discard(clientId);
  }

  /** Sends an app-level ping; resolves with the round-trip in ms, or null on timeout. */
  ping(timeoutMs = 5000): Promise<number | null> {
    if (!this.transport?.isOpen || this.model.state.kind !== 'open') return Promise.resolve(null);
    return this.pinger.wait(this.pinger.send(this.transport), timeoutMs);
  }

  /** The flight recorder as JSON, for bug reports. Holds no tokens. */
  exportFlightRecorder(): string {
    return this.recorder.toJSON({
      api_url: this.apiUrl,
      ws_url: this.wsUrl,
      bot_id: this.model.botId,
      state: this.model.state,
      transport: this.model.transport,
      last_seq: this.model.lastSeq,
      outbox_size: this.outbox.size,
      last_frame_at: this.model.lastFrameAt || null,
      user_agent: typeof navigator !== 'undefined' ? navigator.userAgent : undefined,
    });
  }

  /** Stops everything and removes the online/offline listeners. */
  destroy(): void {
    this.disconnect();
    this.unlisten();
  }

  // ---- running the state machine -------------------------------------------------------

  /**
   * One step of the machine, then its effects in order. An effect may re-enter (an app's
   * `state` handler calling `connect`); effects of a generation torn down meanwhile are skipped.
   */
  private dispatch(event: MachineEvent): void {
    const { model, effects } = step(this.model, event, this.world, this.config);
    this.model = model;
    for (const fx of effects) {
      if ('gen' in fx && fx.gen !== this.model.gen) continue;
      this.run(fx);
    }
  }

  private live(gen: number): boolean {
    return gen === this.model.gen;
  }

  private run(fx: Effect): void {
    switch (fx.type) {
      case 'state': {
        const detail: Record<string, unknown> = { ...fx.state };
        delete detail.kind;
        this.recorder.record('state', { from: fx.from, to: fx.state.kind, ...detail });
        log.state('%s → %s %o', fx.from, fx.state.kind, detail);
        this.events.emit('state', fx.state);
        return;
      }
      case 'record':
        this.recorder.record(fx.event, fx.data);
        return;
      case 'log':
        log[fx.channel](fx.format, ...fx.args);
        return;
      case 'teardown':
        this.teardown(fx.code, fx.reason);
        return;
      case 'set_timer':
        this.setTimer(fx.gen, fx.name, fx.ms, fx.repeat);
        return;
      case 'clear_timer':
        this.clearTimer(fx.name);
        return;
      case 'check_health':
        this.answer(checkHealth(this.rest(), fx.gen));
        return;
      case 'load_codes':
        this.answer(loadCodes(this.rest(), this.policy, fx.gen));
        return;
      case 'get_credential':
        this.answer(fetchCredential(this.rest(), fx.gen, fx.botId, this.opts.getToken, this.opts.useTicket));
        return;
      case 'open_transport':
        this.openTransport(fx);
        return;
      case 'preflight':
        this.answer(fetchPreflight(this.rest(), fx.gen, fx.botId, fx.afterSeq, this.opts.getToken));
        return;
      case 'refresh_token':
        this.answer(refreshToken(fx.gen, this.opts.refreshToken));
        return;
      case 'liveness_ping':
        void this.ping(fx.timeoutMs).then((rtt) => {
          if (rtt === null) this.dispatch({ type: 'liveness_failed', gen: fx.gen });
        });
        return;
      case 'send_ping':
        this.pinger.send(this.transport);
        return;
      case 'flush_outbox':
        this.delivery.flush(fx.botId);
        return;
      case 'probe_websocket':
        void this.probeWebSocket(fx.gen, fx.botId);
        return;
      case 'report_close': {
        const { info, verdict: v } = fx;
        this.recorder.record('close', {
          code: info.code,
          name: v.name,
          said: closeHeadline(info.code),
          reason: info.reason,
          by: fx.by,
          retry: v.retry,
          was_open: fx.wasOpen,
          open_ms: fx.openMs,
          connection_id: fx.connectionId,
          buffered_amount: this.transport?.bufferedAmount ?? 0,
        });
        log.close(
          'Chat WebSocket disconnected: %d %s - %s (%s; policy %s)',
          info.code,
          v.name,
          info.reason || '(no reason)',
          v.description,
          v.retry,
        );
        return;
      }
      case 'deliver':
        this.deliver(fx.frame);
        return;
      case 'reject_pending':
        this.delivery.rejectAll(new ChatError(fx.code, fx.message));
        return;
    }
  }

  private setTimer(gen: number, name: TimerName, ms: number, repeat: boolean): void {
    this.clearTimer(name);
    const fire = () => {
      if (!repeat) this.timers.delete(name);
      this.dispatch({ type: 'timer', gen, name });
    };
    this.timers.set(name, { handle: repeat ? setInterval(fire, ms) : setTimeout(fire, ms), repeat });
  }

  private clearTimer(name: TimerName): void {
    const t = this.timers.get(name);
    if (!t) return;
    this.timers.delete(name);
    if (t.repeat) clearInterval(t.handle);
    else clearTimeout(t.handle);
  }

  /** Ends the current transport, timers and pings: nothing of them reaches the machine after this. */
  private teardown(code: number, reason: string): void {
    for (const name of [...this.timers.keys()]) this.clearTimer(name);
    this.pinger.abandon();
    const t = this.transport;
    this.transport = null;
    t?.close(code, reason);
    this.probe?.close(1000, 'probe abandoned');
    this.probe = null;
  }

  // ---- the effects on the network ------------------------------------------------------

  private rest(): RestContext {
    return {
      apiUrl: this.apiUrl,
      timeoutMs: this.opts.healthTimeoutMs,
      fetch: this.opts.fetch,
      recorder: this.recorder,
      live: (gen) => this.live(gen),
    };
  }

  /** Feeds the machine what a network effect answers (nothing if its attempt was abandoned). */
  private answer(p: Promise<MachineEvent | null>): void {
    void p.then((e) => {
      if (e) this.dispatch(e);
    });
  }

  /** The one place that picks a transport; the machine never knows which. */
  private createTransport(kind: TransportKind, target: TransportTarget): Transport {
    if (kind === 'sse') {
      const getToken = this.opts.getToken;
      return new SseTransport(target, this.opts.fetch ?? globalThis.fetch.bind(globalThis), () => (getToken ? getToken() : null));
    }
    return new WebSocketTransport(target, this.opts.WebSocket ?? globalThis.WebSocket);
  }

  private openTransport(fx: Extract<Effect, { type: 'open_transport' }>): void {
    const { gen, botId } = fx;
    const attemptId = uuid();
    const transport = this.createTransport(fx.transport, {
      apiUrl: this.apiUrl,
      wsUrl: this.wsUrl,
      botId,
      auth: fx.auth,
      afterSeq: fx.afterSeq,
      attemptId,
    });
    const safeUrl = redact(transport.url);
    log.connect('Attempting to connect to chat WebSocket: %s', safeUrl);
    this.recorder.record('ws_connect', {
      url: safeUrl,
      attempt: this.model.attempt,
      attempt_id: attemptId,
      auth: fx.auth.kind,
      transport: fx.transport,
    });
    const started = monoNow();
    const live = () => this.live(gen);
    try {
      transport.open({
        open: () => {
          if (!live()) return;
          const ms = Math.round(monoNow() - started);
          log.connect('Chat WebSocket connected for bot: %s (handshake %d ms)', botId, ms);
          this.recorder.record('ws_open', { handshake_ms: ms });
        },
        message: (text) => {
          if (live()) this.onText(gen, text);
        },
        alive: () => {
          if (live()) this.dispatch({ type: 'frame', gen, frame: null });
        },
        error: () => {
          if (!live()) return;
          log.close('Chat WebSocket error (the close event that follows has the code)');
          this.recorder.record('ws_error', { buffered_amount: transport.bufferedAmount });
        },
        close: (code, reason) => {
          if (live()) this.dispatch({ type: 'closed', gen, code, reason, by: 'server' });
        },
      });
    } catch (e) {
      this.dispatch({ type: 'closed', gen, code: 1006, reason: `could not create the WebSocket: ${(e as Error).message}`, by: 'client' });
      return;
    }
    this.transport = transport;
  }

  /**
   * `auto` on SSE tries the WebSocket again beside it: a probe socket from the conversation's
   * end (no replay), closed as soon as it says `connection_established` (or fails, or times
   * out); the machine hears whether it got through.
   */
  private async probeWebSocket(gen: number, botId: string): Promise<void> {
    const auth = await credentialFor(this.rest(), botId, this.opts.getToken, this.opts.useTicket);
    if (!this.live(gen)) return;
    let ok = false;
    if (!('close' in auth)) {
      const attemptId = uuid();
      const target = { apiUrl: this.apiUrl, wsUrl: this.wsUrl, botId, auth, afterSeq: null, attemptId };
      const probe = this.createTransport('websocket', target);
      this.recorder.record('ws_probe_start', { url: redact(probe.url), attempt_id: attemptId });
      ok = await new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => resolve(false), this.opts.connectTimeoutMs);
        const done = (v: boolean) => {
          clearTimeout(timer);
          resolve(v);
        };
        try {
          probe.open({
            open: () => {},
            message: (text) => {
              try {
                if (parseServerFrame(text).type === 'connection_established') done(true);
              } catch {
                // Not the frame we wait for.
              }
            },
            error: () => {},
            close: () => done(false),
          });
          this.probe = probe;
        } catch {
          done(false);
        }
      });
      probe.close(1000, 'probe done');
      if (this.probe === probe) this.probe = null;
    }
    if (this.live(gen)) this.dispatch({ type: 'ws_probe', gen, ok });
  }

  // ---- frames ----------------------------------------------------------------------------

  private onText(gen: number, text: string): void {
    let f: ServerFrame | null = null;
    try {
      f = parseServerFrame(text);
    } catch (e) {
      log.frame('ignoring a frame: %s', (e as Error).message);
      this.recorder.record('bad_frame', { error: (e as Error).message, bytes: text.length });
    }
    if (f && f.type !== 'pong') log.frame('← %s', f.type);
    this.dispatch({ type: 'frame', gen, frame: f });
  }

  /** A frame the machine let through (a message not seen before, an ack, …). */
  private deliver(f: ServerFrame): void {
    switch (f.type) {
      case 'connection_established':
        this.events.emit('established', f);
        return;
      case 'ack':
        this.delivery.settle(f.client_id, f);
        return;
      case 'message':
        this.delivery.message(f.message);
        this.events.emit('message', f.message);
        return;
      case 'message_delta':
        this.events.emit('delta', f);
        return;
      case 'pong':
        this.pinger.pong(f.id, this.transport?.bufferedAmount ?? 0);
        return;
      case 'error':
        this.delivery.errorFrame(f);
        return;
    }
  }
}
