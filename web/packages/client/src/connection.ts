/**
 * The vocabulary of `ChatSocket`'s connection state machine (`machine.ts`): its states, model,
 * events and effects. The machine is pure: `step(model, event, world)` returns the
 * next model and the effects to run (open a transport, close it with a code, start or cancel a
 * timer, fetch the health check, emit a state, …), in order. It owns every decision — which
 * state follows a close, how long to wait before the next attempt, which seq to resume after —
 * and touches no timer, socket, fetch or clock itself; `ChatSocket` runs the effects and feeds
 * their outcomes back as events.
 *
 * Each attempt runs health check → code registry → credential (ticket or token) → transport →
 * `connection_established`. A close is looked up in the close-code registry to decide between
 * failing for good, asking the app for a fresh token once, waiting for the server's hint, or
 * backing off with full jitter. Every teardown bumps the model's generation, and every event
 * that answers an effect carries the generation it was started under: a late answer from an
 * abandoned attempt changes nothing.
 */

import type { BackoffOptions, CloseVerdict } from './policy.js';
import type { ConnectionEstablishedFrame, ServerFrame } from './protocol.js';

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
  /** `transport`: what carries the frames (`sse`: HTTP streaming); the machine always sets it. */
  | { kind: 'open'; connectionId: string; since: number; heartbeatIntervalMs: number; transport?: TransportKind }
  | { kind: 'reconnecting'; attempt: number; retryAt: number; lastClose: CloseInfo | null }
  | { kind: 'offline'; lastClose: CloseInfo | null }
  /** `status`: the health check's HTTP status, 0 when the server could not be reached at all. */
  | { kind: 'backend_unavailable'; attempt: number; retryAt: number; error: string; status: number }
  | { kind: 'failed'; code: number; reason: string; advice: string };

export type StateKind = ConnectionState['kind'];

/** What carries the frames: the WebSocket, or Server-Sent Events down and POSTs up. */
export type TransportKind = 'websocket' | 'sse';
/** `auto`: the WebSocket, switching to SSE when its handshake keeps failing (and back when it passes again). */
export type TransportMode = 'auto' | TransportKind;
/** Why the transport is SSE: `auto`'s reason to switch, or `configured` (`transport: 'sse'`). */
export type TransportWhy = 'connect_timeout' | '1006_twice' | 'preflight_ok' | 'configured';

/** The machine's settings (from `ChatSocketOptions`, with their defaults). */
export interface MachineConfig {
  connectTimeoutMs: number;
  stableAfterMs: number;
  livenessTimeoutMs: number;
  /** Undefined: half the server's heartbeat interval. */
  pingIntervalMs?: number;
  maxServerErrors: number;
  backoff: BackoffOptions;
  /** Undefined: `websocket` only (`ChatSocket` passes its option, whose default is `auto`). */
  transport?: TransportMode;
  /**
   * In `auto`, after switching to SSE: how long to wait before trying the WebSocket again in the
   * background (doubling after each failed probe, up to an hour or this, if longer). 0: never.
   * Undefined: 5 minutes.
   */
  wsRetryMs?: number;
}

/** What the machine reads from the world at each step; a test passes plain values. */
export interface World {
  /** Epoch ms. */
  now: number;
  online: boolean;
  /** Whether the app gave a `refreshToken` callback. */
  canRefresh: boolean;
  random(): number;
  /** The close-code registry's verdict. */
  verdict(code: number): CloseVerdict;
}

export interface Model {
  state: ConnectionState;
  botId: string | null;
  /** Bumped by every teardown; answers to effects of an older generation are ignored. */
  gen: number;
  /** Retries since the last stable connection. */
  attempt: number;
  reauthUsed: boolean;
  afterSeqResetUsed: boolean;
  /** Consecutive 1011 closes since the last stable connection. */
  serverErrors: number;
  codesLoaded: boolean;
  /** The highest seq seen on this conversation: the next attempt resumes after it. */
  lastSeq: number | null;
  established: ConnectionEstablishedFrame | null;
  openedAt: number;
  /** Epoch ms of the last frame from the server, 0 before the first. */
  lastFrameAt: number;
  lastClose: CloseInfo | null;
  /** A resend of the outbox is scheduled (after a `rate_limited` or `bot_busy`). */
  resendArmed: boolean;
  /** The transport of the next attempt (in `auto`: `sse` once the WebSocket was given up). */
  transport: TransportKind;
  /** Why `auto` switched to SSE (null: it did not). */
  transportWhy: TransportWhy | null;
  /** The wait before the next background WebSocket probe (0: the configured first wait). */
  wsProbeMs: number;
  /** WebSocket 1006s before `connection_established`, since the last established connection. */
  wsEarlyDrops: number;
  /** The last close was such a 1006 and its preflight is awaited. */
  earlyDrop: boolean;
  /** Epoch ms until which the server counts as restarting (after a 1012; 0: it is not). */
  restartUntil: number;
}

export function initialModel(): Model {
  return {
    state: { kind: 'idle' },
    botId: null,
    gen: 0,
    attempt: 0,
    reauthUsed: false,
    afterSeqResetUsed: false,
    serverErrors: 0,
    codesLoaded: false,
    lastSeq: null,
    established: null,
    openedAt: 0,
    lastFrameAt: 0,
    lastClose: null,
    resendArmed: false,
    transport: 'websocket',
    transportWhy: null,
    wsProbeMs: 0,
    wsEarlyDrops: 0,
    earlyDrop: false,
    restartUntil: 0,
  };
}

/** The machine's timers; each is cancelled by a teardown. `ping` repeats. */
export type TimerName = 'retry' | 'connect' | 'watchdog' | 'stable' | 'ping' | 'resend' | 'ws_probe';

/** A credential for the transport, or the close code to act on when none can be had. */
export type Credential = { kind: 'ticket' | 'token'; value: string } | { close: { code: number; reason: string } };

/** Who ended a connection: the server (or the network), the client's own checks, or the credential step. */
export type ClosedBy = 'server' | 'client' | 'auth';

export type MachineEvent =
  | { type: 'connect'; botId: string; afterSeq?: number }
  | { type: 'disconnect' }
  | { type: 'retry_now' }
  | { type: 'online' }
  | { type: 'offline' }
  | { type: 'visible' }
  | { type: 'health'; gen: number; ok: boolean; network: boolean; status: number; message: string }
  | { type: 'codes'; gen: number; loaded: boolean }
  | { type: 'credential'; gen: number; credential: Credential }
  /**
   * A frame from the transport; null when it could not be parsed or was a keep-alive (either
   * still proves the link is alive).
   */
  | { type: 'frame'; gen: number; frame: ServerFrame | null }
  | { type: 'closed'; gen: number; code: number; reason: string; by: ClosedBy }
  /**
   * The server's preflight verdict after a 1006 (`closeCode` null: it had nothing to say;
   * `ok`: it answered that a connection would be admitted now).
   */
  | { type: 'preflight'; gen: number; closeCode: number | null; reason: string; ok?: boolean }
  | { type: 'reauth_result'; gen: number; ok: boolean }
  | { type: 'liveness_failed'; gen: number }
  | { type: 'timer'; gen: number; name: TimerName }
  /** The server asked to wait before resending (`rate_limited`, `bot_busy`). */
  | { type: 'resend_later'; ms: number }
  /** Whether a background probe WebSocket reached `connection_established`. */
  | { type: 'ws_probe'; gen: number; ok: boolean };

export type Effect =
  | { type: 'state'; state: ConnectionState; from: StateKind }
  | { type: 'record'; event: string; data: Record<string, unknown> }
  | { type: 'log'; channel: 'connect' | 'close' | 'frame'; format: string; args: unknown[] }
  /** End the current transport (closing it with `code`), every timer and every ping waiter. */
  | { type: 'teardown'; code: number; reason: string }
  /** `repeat`: fire every `ms` until cleared (the ping timer). */
  | { type: 'set_timer'; gen: number; name: TimerName; ms: number; repeat: boolean }
  | { type: 'clear_timer'; name: TimerName }
  | { type: 'check_health'; gen: number }
  | { type: 'load_codes'; gen: number }
  | { type: 'get_credential'; gen: number; botId: string }
  | {
      type: 'open_transport';
      gen: number;
      botId: string;
      auth: { kind: 'ticket' | 'token'; value: string };
      afterSeq: number | null;
      transport: TransportKind;
    }
  | { type: 'preflight'; gen: number; botId: string; afterSeq: number | null }
  | { type: 'refresh_token'; gen: number }
  | { type: 'liveness_ping'; gen: number; timeoutMs: number }
  | { type: 'send_ping' }
  | { type: 'flush_outbox'; gen: number; botId: string }
  /**
   * Open a WebSocket beside the SSE connection, only to see whether it reaches
   * `connection_established` now; close it at once and answer with `ws_probe`.
   */
  | { type: 'probe_websocket'; gen: number; botId: string }
  /** A close the app and the flight recorder hear about (the edge adds what only it knows). */
  | { type: 'report_close'; info: CloseInfo; verdict: CloseVerdict; by: ClosedBy; wasOpen: boolean; openMs: number; connectionId?: string }
  /** A frame for the app: `established`, `ack` and replayed messages settle the outbox. */
  | { type: 'deliver'; frame: ServerFrame }
  | { type: 'reject_pending'; code: string; message: string };

export interface Step {
  model: Model;
  effects: Effect[];
}
