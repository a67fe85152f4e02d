/**
 * `ChatSocket`'s connection state machine, pure: `step(model, event, world, config)` returns
 * the next model and the effects to run, in order (see `connection.ts` for the vocabulary).
 * It decides everything about the connection — which state follows a close, how long to wait
 * before the next attempt, when a connection is dead, which seq to resume after — and touches
 * no timer, transport, fetch or clock itself.
 */

import type {
  ClosedBy,
  CloseInfo,
  ConnectionState,
  Credential,
  Effect,
  MachineConfig,
  MachineEvent,
  Model,
  Step,
  TimerName,
  TransportKind,
  TransportWhy,
  World,
} from './connection.js';
import { redact } from './log.js';
import { CLIENT_CLOSE, fullJitterDelay, hintDelay, parseRetryHint, RESTART_BACKOFF, type CloseVerdict } from './policy.js';
import type { ConnectionEstablishedFrame, ServerFrame } from './protocol.js';

/** One transition. The model passed in is not modified. */
export function step(model: Readonly<Model>, event: MachineEvent, world: World, config: MachineConfig): Step {
  const t = new Transition({ ...model }, world, config);
  t.handle(event);
  return { model: t.m, effects: t.fx };
}

/** The working copy of one transition: the model being changed and the effects so far. */
class Transition {
  readonly fx: Effect[] = [];

  constructor(
    readonly m: Model,
    private readonly w: World,
    private readonly c: MachineConfig,
  ) {}

  handle(e: MachineEvent): void {
    if ('gen' in e && e.gen !== this.m.gen) return;
    switch (e.type) {
      case 'connect':
        this.connect(e.botId, e.afterSeq);
        return;
      case 'disconnect':
        this.disconnect();
        return;
      case 'retry_now':
        this.retryNow();
        return;
      case 'online':
        this.online();
        return;
      case 'offline':
        this.offline();
        return;
      case 'visible':
        this.visible();
        return;
      case 'health':
        this.health(e);
        return;
      case 'codes':
        if (e.loaded) this.m.codesLoaded = true;
        this.getCredential();
        return;
      case 'credential':
        this.credential(e.credential);
        return;
      case 'frame':
        this.frame(e.frame);
        return;
      case 'closed':
        this.closed(e.code, e.reason, e.by);
        return;
      case 'preflight':
        this.preflight(e.closeCode, e.reason, e.ok === true);
        return;
      case 'reauth_result':
        this.reauthResult(e.ok);
        return;
      case 'liveness_failed':
        this.closed(CLIENT_CLOSE.LIVENESS_FAILED, `no pong within ${this.c.livenessTimeoutMs} ms after the tab became visible`, 'client');
        return;
      case 'timer':
        this.timer(e.name);
        return;
      case 'ws_probe':
        this.wsProbe(e.ok);
        return;
      case 'resend_later':
        if (!this.m.resendArmed) {
          this.m.resendArmed = true;
          this.setTimer('resend', e.ms);
        }
        return;
    }
  }

  // ---- helpers -------------------------------------------------------------------------

  private record(event: string, data: Record<string, unknown>): void {
    this.fx.push({ type: 'record', event, data });
  }

  private log(channel: 'connect' | 'close' | 'frame', format: string, ...args: unknown[]): void {
    this.fx.push({ type: 'log', channel, format, args });
  }

  private setState(state: ConnectionState): void {
    this.fx.push({ type: 'state', state, from: this.m.state.kind });
    this.m.state = state;
  }

  private setTimer(name: TimerName, ms: number, repeat = false): void {
    this.fx.push({ type: 'set_timer', gen: this.m.gen, name, ms, repeat });
  }

  /** Ends the current attempt: no answer to its effects will be heard after this. */
  private teardown(code: number, reason: string): void {
    this.m.gen += 1;
    this.m.resendArmed = false;
    this.fx.push({ type: 'teardown', code, reason });
  }

  private resetCounters(): void {
    this.m.attempt = 0;
    this.m.reauthUsed = false;
    this.m.afterSeqResetUsed = false;
    this.m.serverErrors = 0;
  }

  /**
   * Full jitter; for a failure while the server restarts (within the window after a 1012: the new
   * process not up yet) under a short ceiling.
   */
  private backoffDelay(restartAware = true): number {
    const restarting = restartAware && this.w.now < this.m.restartUntil;
    const opts = restarting ? { ...this.c.backoff, capMs: Math.min(this.c.backoff.capMs, RESTART_BACKOFF.capMs) } : this.c.backoff;
    return fullJitterDelay(this.m.attempt, opts, () => this.w.random());
  }

  // ---- what the app asks for -----------------------------------------------------------

  private connect(botId: string, afterSeq: number | undefined): void {
    const kind = this.m.state.kind;
    if (botId === this.m.botId && kind !== 'idle' && kind !== 'failed') return;
    if (botId !== this.m.botId) this.m.lastSeq = null;
    this.teardown(1000, 'switching bots');
    this.m.botId = botId;
    if (afterSeq !== undefined) this.m.lastSeq = afterSeq;
    this.resetCounters();
    this.m.lastClose = null;
    this.record('connect', { bot_id: botId, after_seq: this.m.lastSeq });
    this.startAttempt();
  }

  private disconnect(): void {
    if (this.m.botId) this.record('disconnect', { bot_id: this.m.botId });
    this.teardown(1000, 'client disconnect');
    this.m.botId = null;
    this.fx.push({ type: 'reject_pending', code: 'disconnected', message: 'the connection was closed by the app' });
    this.setState({ kind: 'idle' });
  }

  private retryNow(): void {
    if (!this.m.botId) return;
    this.record('retry_now', { from: this.m.state.kind });
    this.teardown(CLIENT_CLOSE.CLIENT_RESET, 'retry requested');
    this.resetCounters();
    this.startAttempt();
  }

  // ---- one attempt ---------------------------------------------------------------------

  private startAttempt(): void {
    if (!this.m.botId) return;
    this.teardown(1000, 'new attempt');
    if (!this.w.online) {
      this.setState({ kind: 'offline', lastClose: this.m.lastClose });
      return;
    }
    this.setState({ kind: 'checking', attempt: this.m.attempt });
    this.fx.push({ type: 'check_health', gen: this.m.gen });
  }

  private health(h: { ok: boolean; network: boolean; status: number; message: string }): void {
    if (!h.ok) {
      const error = h.network ? `server unreachable (${h.message})` : `health check answered ${h.status}: ${h.message}`;
      this.scheduleRetry('backend_unavailable', this.backoffDelay(), error, h.network ? 0 : h.status);
      return;
    }
    if (!this.m.codesLoaded) this.fx.push({ type: 'load_codes', gen: this.m.gen });
    else this.getCredential();
  }

  private getCredential(): void {
    if (!this.m.botId) return;
    this.fx.push({ type: 'get_credential', gen: this.m.gen, botId: this.m.botId });
  }

  private credential(cred: Credential): void {
    if ('close' in cred) {
      this.closed(cred.close.code, cred.close.reason, 'auth');
      return;
    }
    if (!this.m.botId) return;
    this.setState({ kind: 'connecting', attempt: this.m.attempt });
    this.m.transport = this.nextTransport();
    this.fx.push({
      type: 'open_transport',
      gen: this.m.gen,
      botId: this.m.botId,
      auth: cred,
      afterSeq: this.m.lastSeq,
      transport: this.m.transport,
    });
    this.setTimer('connect', this.c.connectTimeoutMs);
  }

  // ---- frames --------------------------------------------------------------------------

  private frame(f: ServerFrame | null): void {
    this.m.lastFrameAt = this.w.now;
    this.armWatchdog();
    if (!f) return;
    switch (f.type) {
      case 'connection_established':
        this.established(f);
        return;
      case 'ack':
        // Over SSE the ack is the answer to a POST and may overtake earlier messages still on
        // their way down the stream; the acked message comes down the stream too, in order.
        if (this.m.transport === 'sse') break;
        if (this.m.lastSeq === null || f.message.seq > this.m.lastSeq) this.m.lastSeq = f.message.seq;
        break;
      case 'message':
        if (this.m.lastSeq !== null && f.message.seq <= this.m.lastSeq) {
          this.record('duplicate_dropped', { seq: f.message.seq, last_seq: this.m.lastSeq });
          this.log('frame', 'dropping seq %d (already have up to %d)', f.message.seq, this.m.lastSeq);
          return;
        }
        this.m.lastSeq = f.message.seq;
        break;
    }
    this.fx.push({ type: 'deliver', frame: f });
  }

  private established(f: ConnectionEstablishedFrame): void {
    this.fx.push({ type: 'clear_timer', name: 'connect' });
    const now = this.w.now;
    this.m.established = f;
    this.m.openedAt = now;
    if (this.m.lastSeq === null) this.m.lastSeq = f.last_seq;
    const skew = Date.parse(f.server_time) - now;
    this.log(
      'connect',
      'Chat WebSocket connection established: connection %s, last_seq %d, heartbeat %d ms',
      f.connection_id,
      f.last_seq,
      f.heartbeat_interval_ms,
    );
    this.record('established', {
      connection_id: f.connection_id,
      last_seq: f.last_seq,
      resume_from: this.m.lastSeq,
      heartbeat_interval_ms: f.heartbeat_interval_ms,
      clock_skew_ms: Number.isFinite(skew) ? skew : null,
    });
    this.setState({
      kind: 'open',
      connectionId: f.connection_id,
      since: now,
      heartbeatIntervalMs: f.heartbeat_interval_ms,
      transport: this.m.transport,
    });
    this.m.wsEarlyDrops = 0;
    this.m.restartUntil = 0;
    this.m.reauthUsed = false;
    this.m.afterSeqResetUsed = false;
    this.fx.push({ type: 'deliver', frame: f });
    const hb = Math.max(1000, f.heartbeat_interval_ms);
    this.setTimer('ping', this.c.pingIntervalMs ?? Math.max(500, Math.floor(hb / 2)), true);
    this.setTimer('stable', this.c.stableAfterMs);
    this.armWatchdog();
    this.flushOutbox();
    this.armWsProbe();
  }

  /** Two silent heartbeat intervals mean a dead connection; every frame restarts the count. */
  private armWatchdog(): void {
    if (this.m.state.kind !== 'open' || !this.m.established) return;
    this.setTimer('watchdog', 2 * this.m.established.heartbeat_interval_ms);
  }

  private flushOutbox(): void {
    if (!this.m.botId || this.m.state.kind !== 'open') return;
    this.fx.push({ type: 'flush_outbox', gen: this.m.gen, botId: this.m.botId });
  }

  private timer(name: TimerName): void {
    switch (name) {
      case 'retry':
        this.startAttempt();
        return;
      case 'connect':
        this.record('connect_timeout', { ms: this.c.connectTimeoutMs });
        this.closed(CLIENT_CLOSE.CONNECT_TIMEOUT, `no connection_established within ${this.c.connectTimeoutMs} ms`, 'client');
        return;
      case 'watchdog': {
        const limit = 2 * (this.m.established?.heartbeat_interval_ms ?? 0);
        this.closed(CLIENT_CLOSE.HEARTBEAT_LOST, `no frame from the server for ${limit} ms`, 'client');
        return;
      }
      case 'stable':
        this.m.attempt = 0;
        this.m.serverErrors = 0;
        // A WebSocket that stays up: the next switch to SSE probes after the first wait again.
        if (this.m.transport === 'websocket') this.m.wsProbeMs = 0;
        this.record('stable', { after_ms: this.c.stableAfterMs });
        return;
      case 'ping':
        this.fx.push({ type: 'send_ping' });
        return;
      case 'resend':
        this.m.resendArmed = false;
        this.flushOutbox();
        return;
      case 'ws_probe':
        if (this.m.botId && this.m.state.kind === 'open' && this.m.transport === 'sse')
          this.fx.push({ type: 'probe_websocket', gen: this.m.gen, botId: this.m.botId });
        return;
    }
  }

  // ---- closes and what follows them ----------------------------------------------------

  /** Decides what follows a close (or a refusal before the transport). */
  private closed(code: number, rawReason: string, by: ClosedBy): void {
    const wasOpen = this.m.state.kind === 'open';
    // A WebSocket that never got as far as `connection_established`, in `auto`: maybe the path
    // (a proxy that strips `Upgrade`) rather than the server.
    const early = this.m.state.kind === 'connecting' && this.m.transport === 'websocket' && this.c.transport === 'auto';
    this.m.earlyDrop = false;
    const v = this.w.verdict(code);
    // Reasons are shown and logged: never let a credential through.
    const reason = redact(rawReason);
    const info: CloseInfo = { code, reason, name: v.name, at: this.w.now };
    this.m.lastClose = info;
    this.fx.push({
      type: 'report_close',
      info,
      verdict: v,
      by,
      wasOpen,
      openMs: wasOpen ? this.w.now - this.m.openedAt : 0,
      connectionId: wasOpen ? this.m.established?.connection_id : undefined,
    });
    this.teardown(code === 1006 || code < 3000 ? 1000 : code, reason);
    if (early && code === CLIENT_CLOSE.CONNECT_TIMEOUT && by === 'client') {
      this.switchToSse('connect_timeout');
      return;
    }
    if (early && code === 1006 && by === 'server') {
      this.m.wsEarlyDrops += 1;
      if (this.m.wsEarlyDrops >= 2) {
        this.switchToSse('1006_twice');
        return;
      }
      this.m.earlyDrop = true;
    }
    if (code === 1006 && by === 'server') {
      // The browser hides why a socket dropped; ask the server what it would say now.
      if (this.m.botId) this.fx.push({ type: 'preflight', gen: this.m.gen, botId: this.m.botId, afterSeq: this.m.lastSeq });
      else this.applyPolicy(v, info);
      return;
    }
    this.applyPolicy(v, info);
  }

  private preflight(closeCode: number | null, reason: string, ok: boolean): void {
    const info = this.m.lastClose;
    const earlyDrop = this.m.earlyDrop;
    this.m.earlyDrop = false;
    if (!info) return;
    if (closeCode) {
      const v = this.w.verdict(closeCode);
      if (v.retry !== 'backoff') {
        this.log('close', 'preflight explains the 1006: %d %s', closeCode, reason);
        this.applyPolicy(v, { ...info, code: closeCode, reason, name: v.name });
        return;
      }
    }
    if (earlyDrop && ok) {
      this.switchToSse('preflight_ok');
      return;
    }
    this.applyPolicy(this.w.verdict(1006), info);
  }

  /** The transport of the next attempt: the configured one, or in `auto` the current choice. */
  private nextTransport(): TransportKind {
    const mode = this.c.transport ?? 'websocket';
    return mode === 'auto' ? this.m.transport : mode;
  }

  /**
   * `auto` gives the WebSocket up for SSE and retries at once: resuming after the last seq seen
   * and resending the outbox by client_id as on any reconnect, so the switch loses and doubles
   * nothing. SSE stays until a background probe finds that the WebSocket gets through again
   * (`armWsProbe`, `wsProbe`).
   */
  private switchToSse(why: Exclude<TransportWhy, 'configured'>): void {
    this.m.transport = 'sse';
    this.m.transportWhy = why;
    this.m.wsEarlyDrops = 0;
    this.record('transport_switch', { from: 'websocket', to: 'sse', why });
    this.log('connect', 'the WebSocket cannot connect here (%s): switching to HTTP streaming (SSE)', why);
    this.scheduleRetry('reconnecting', 0);
  }

  /** The first wait before probing the WebSocket again; 0: never. */
  private wsRetryMs(): number {
    return this.c.wsRetryMs ?? 300_000;
  }

  /** In `auto` on SSE (which `auto` switched to): the background WebSocket probe's timer. */
  private armWsProbe(): void {
    if (this.c.transport !== 'auto' || this.m.transport !== 'sse' || !this.m.transportWhy || this.wsRetryMs() <= 0) return;
    if (!this.m.wsProbeMs) this.m.wsProbeMs = this.wsRetryMs();
    this.setTimer('ws_probe', this.m.wsProbeMs);
  }

  /**
   * A probe WebSocket got through: the path carries WebSockets again. Switch back now, through a
   * reconnect like any other: resuming after the last seq seen and resending the outbox by
   * client_id (a message whose POST was cut off by the switch is stored once), so nothing is
   * lost or doubled. A failed probe doubles the wait before the next one, up to an hour.
   */
  private wsProbe(ok: boolean): void {
    if (this.m.transport !== 'sse') return;
    if (!ok) {
      this.m.wsProbeMs = Math.min(2 * (this.m.wsProbeMs || this.wsRetryMs()), Math.max(3_600_000, this.wsRetryMs()));
      this.record('ws_probe', { ok, next_ms: this.m.wsProbeMs });
      this.armWsProbe();
      return;
    }
    this.record('ws_probe', { ok });
    this.m.transport = 'websocket';
    this.m.transportWhy = null;
    this.m.wsEarlyDrops = 0;
    this.record('transport_switch', { from: 'sse', to: 'websocket', why: 'probe_ok' });
    this.log('connect', 'a WebSocket gets through again: switching back from HTTP streaming');
    if (this.m.state.kind === 'open') this.startAttempt();
  }

  private applyPolicy(v: CloseVerdict, info: CloseInfo): void {
    if (!this.m.botId) return;
    // A server that lost data no longer has our resume point: start over from its end, once.
    if (info.code === 4400 && /after_seq/.test(info.reason) && this.m.lastSeq !== null && !this.m.afterSeqResetUsed) {
      this.m.afterSeqResetUsed = true;
      this.m.lastSeq = null;
      this.record('resume_reset', { reason: info.reason });
      this.scheduleRetry('reconnecting', 0);
      return;
    }
    if (info.code === 1011) {
      this.m.serverErrors += 1;
      if (this.m.serverErrors >= this.c.maxServerErrors) {
        this.fail(
          info.code,
          `the server failed ${this.m.serverErrors} times in a row: ${info.reason}`,
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
        this.reauth(info, v);
        return;
      case 'after_hint':
        this.scheduleRetry('reconnecting', this.hintOrBackoff(info.reason));
        return;
      case 'backoff':
        if (info.code === 1012) {
          // The server is restarting and says when to come back (spread over its clients). A
          // 1012 is an answer, not a failure: without a hint it backs off as any close does.
          const delay = this.hintOrBackoff(info.reason, false);
          this.m.restartUntil = this.w.now + RESTART_BACKOFF.windowMs;
          this.scheduleRetry('reconnecting', delay);
          return;
        }
        this.scheduleRetry('reconnecting', this.backoffDelay());
        return;
    }
  }

  private hintOrBackoff(reason: string, restartAware = true): number {
    const hint = parseRetryHint(reason);
    return hint !== null ? hintDelay(hint, () => this.w.random()) : this.backoffDelay(restartAware);
  }

  private reauth(info: CloseInfo, v: CloseVerdict): void {
    if (this.m.reauthUsed || !this.w.canRefresh) {
      const reason = this.m.reauthUsed ? `Session expired, log in again (${info.reason})` : info.reason;
      this.fail(info.code, reason, v.description);
      return;
    }
    this.m.reauthUsed = true;
    this.setState({ kind: 'reconnecting', attempt: this.m.attempt, retryAt: this.w.now, lastClose: info });
    this.record('reauth', { reason: redact(info.reason) });
    this.fx.push({ type: 'refresh_token', gen: this.m.gen });
  }

  private reauthResult(ok: boolean): void {
    this.record('reauth_result', { ok });
    if (!ok) {
      this.fail(4401, 'Session expired, log in again', 'The session could not be refreshed. Log in again.');
      return;
    }
    this.startAttempt();
  }

  private scheduleRetry(kind: 'reconnecting' | 'backend_unavailable', delay: number, error = '', status = 0): void {
    this.m.attempt += 1;
    const retryAt = this.w.now + delay;
    if (kind === 'reconnecting') this.setState({ kind, attempt: this.m.attempt, retryAt, lastClose: this.m.lastClose });
    else this.setState({ kind, attempt: this.m.attempt, retryAt, error, status });
    this.setTimer('retry', delay);
  }

  private fail(code: number, rawReason: string, advice: string): void {
    const reason = redact(rawReason);
    this.teardown(1000, 'failed');
    this.setState({ kind: 'failed', code, reason, advice });
    this.fx.push({ type: 'reject_pending', code: 'connection_failed', message: `the connection failed: ${reason}` });
  }

  // ---- network and visibility ----------------------------------------------------------

  private offline(): void {
    const kind = this.m.state.kind;
    if (!this.m.botId || kind === 'idle' || kind === 'failed') return;
    const info: CloseInfo = { code: CLIENT_CLOSE.OFFLINE, reason: 'the browser went offline', name: 'offline', at: this.w.now };
    this.record('offline', { was: kind });
    if (kind === 'open') this.m.lastClose = info;
    this.teardown(CLIENT_CLOSE.OFFLINE, 'offline');
    this.setState({ kind: 'offline', lastClose: this.m.lastClose });
  }

  private online(): void {
    this.record('online', { state: this.m.state.kind });
    if (this.m.botId && this.m.state.kind === 'offline') {
      this.m.attempt = 0;
      this.startAttempt();
    }
  }

  private visible(): void {
    const st = this.m.state;
    if (st.kind === 'reconnecting' || st.kind === 'backend_unavailable') {
      // Shown again: try now rather than wait out a backoff that grew while nobody looked (and
      // that background timers stretch further). The attempt count stays, so a server still
      // down is backed off from as before.
      this.record('visible_retry', { early_ms: st.retryAt - this.w.now, attempt: st.attempt });
      this.startAttempt();
      return;
    }
    if (st.kind !== 'open') return;
    const quietMs = this.m.lastFrameAt ? this.w.now - this.m.lastFrameAt : 0;
    if (this.m.established && quietMs > this.m.established.heartbeat_interval_ms) {
      // A frozen (phone) tab: pings should have brought pongs long ago; this connection is dead.
      this.record('visible_check', { quiet_ms: quietMs });
      this.closed(CLIENT_CLOSE.LIVENESS_FAILED, `nothing heard for ${quietMs} ms while the tab was hidden`, 'client');
      return;
    }
    this.record('visible_check', {});
    this.fx.push({ type: 'liveness_ping', gen: this.m.gen, timeoutMs: this.c.livenessTimeoutMs });
  }
}
