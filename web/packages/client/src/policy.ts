/**
 * What to do after a close: the retry policy per close code (from the server's
 * `GET /api/ws/codes` registry, with a built-in copy used until it has loaded), the retry
 * hint of 1013, and the full-jitter exponential backoff.
 */

import type { CloseCodeInfo, CodeRegistry, RetryPolicy } from './protocol.js';

/**
 * Codes the client itself gives a close that the server did not explain. They live in the
 * 4000–4099 range that natter leaves to clients and never appear on the wire.
 */
export const CLIENT_CLOSE = {
  /** No `connection_established` within the connection timeout. */
  CONNECT_TIMEOUT: 4000,
  /** No frame from the server for two heartbeat intervals. */
  HEARTBEAT_LOST: 4001,
  /** The browser went offline. */
  OFFLINE: 4002,
  /** A hidden tab came back and its socket did not answer a ping. */
  LIVENESS_FAILED: 4003,
  /** The app called `retryNow()` (or `disconnect()`). */
  CLIENT_RESET: 4004,
} as const;

/** Built-in copy of the server registry, used before `/api/ws/codes` answers or if it fails. */
export const DEFAULT_CLOSE_CODES: CloseCodeInfo[] = [
  { code: 1000, name: 'normal', retry: 'stop', description: 'The connection was closed normally.' },
  { code: 1002, name: 'protocol_error', retry: 'stop', description: 'The client sent a frame that breaks the WebSocket protocol.' },
  { code: 1007, name: 'invalid_payload', retry: 'stop', description: 'A text frame was not valid UTF-8.' },
  {
    code: 1008,
    name: 'origin_not_allowed',
    retry: 'stop',
    description: "The page's Origin is not allowed by the server. Add it to the server's --allowed-origin list.",
  },
  { code: 1009, name: 'frame_too_large', retry: 'backoff', description: 'A frame was larger than the server allows.' },
  {
    code: 1011,
    name: 'internal_error',
    retry: 'backoff',
    description: 'The server hit an internal error; the reason carries an error id that is in the server log.',
  },
  {
    code: 1012,
    name: 'server_restarting',
    retry: 'backoff',
    description: 'The server is restarting. Reconnect after the hint in the reason (retry_after_ms=N), then with backoff.',
  },
  {
    code: 1013,
    name: 'try_again_later',
    retry: 'after_hint',
    description: 'The server is overloaded; retry after the hint in the reason.',
  },
  { code: 4400, name: 'bad_request', retry: 'stop', description: 'The request is malformed (bad bot id, after_seq or attempt_id).' },
  {
    code: 4401,
    name: 'unauthorized',
    retry: 'reauth_once',
    description: 'The token or ticket is missing, invalid or expired. Log in again.',
  },
  {
    code: 4403,
    name: 'forbidden',
    retry: 'stop',
    description: "You are not allowed to chat with this bot. Ask the bot's owner to share it.",
  },
  { code: 4404, name: 'bot_not_found', retry: 'stop', description: 'No bot has this id. Check the bot id.' },
  {
    code: 4408,
    name: 'heartbeat_timeout',
    retry: 'backoff',
    description: 'The server heard nothing from this client for two heartbeat intervals.',
  },
  { code: 4409, name: 'slow_consumer', retry: 'backoff', description: 'The client did not read its messages fast enough.' },
  { code: 4429, name: 'too_many_connections', retry: 'backoff', description: 'Too many open connections for this user. Close other tabs.' },
];

const CLIENT_SIDE: Record<number, { name: string; description: string }> = {
  1005: { name: 'no_status', description: 'The connection closed without a close code.' },
  1006: {
    name: 'abnormal_closure',
    description: 'The connection dropped without a close frame: the server went away, the network broke, or a proxy/firewall cut it.',
  },
  [CLIENT_CLOSE.CONNECT_TIMEOUT]: { name: 'connect_timeout', description: 'The server did not confirm the connection in time.' },
  [CLIENT_CLOSE.HEARTBEAT_LOST]: { name: 'heartbeat_lost', description: 'Nothing was heard from the server for two heartbeat intervals.' },
  [CLIENT_CLOSE.OFFLINE]: { name: 'offline', description: 'The browser went offline.' },
  [CLIENT_CLOSE.LIVENESS_FAILED]: { name: 'liveness_failed', description: 'The connection did not answer a ping.' },
  [CLIENT_CLOSE.CLIENT_RESET]: { name: 'client_reset', description: 'The client closed the connection to reconnect.' },
};

export interface CloseVerdict {
  code: number;
  name: string;
  retry: RetryPolicy;
  description: string;
}

/** Looks close codes up in the registry; anything unknown is retried with backoff. */
export class ClosePolicy {
  private byCode = new Map<number, CloseCodeInfo>();
  /** Whether the table came from the server (false: the built-in copy). */
  fromServer = false;

  constructor(codes: CloseCodeInfo[] = DEFAULT_CLOSE_CODES) {
    this.load(codes);
  }

  load(codes: CloseCodeInfo[], fromServer = false): void {
    this.byCode = new Map(codes.map((c) => [c.code, c]));
    this.fromServer = fromServer;
  }

  loadRegistry(reg: CodeRegistry): void {
    this.load(reg.close_codes, true);
  }

  verdict(code: number): CloseVerdict {
    const known = this.byCode.get(code);
    if (known) return { ...known };
    const client = CLIENT_SIDE[code];
    if (client) return { code, ...client, retry: 'backoff' };
    return { code, name: 'unknown', retry: 'backoff', description: `Close code ${code} is not in the registry.` };
  }
}

/** Reads `retry_after_ms=N` from a 1013 or 1012 reason. */
export function parseRetryHint(reason: string): number | null {
  const m = /retry_after_ms=(\d+)/.exec(reason);
  return m ? Number(m[1]) : null;
}

/** The wait a retry hint asks for: the hint plus up to a tenth of it (at most 1 s) of jitter. */
export function hintDelay(hintMs: number, random: () => number = Math.random): number {
  return hintMs + Math.floor(random() * Math.min(1000, hintMs / 10 + 1));
}

/**
 * After a 1012 the server is restarting, not gone: for `windowMs` the backoff's ceiling is
 * `capMs`, so a client that tried while the new process was not up yet is back within ~2 s of
 * its return instead of backing off to 16 or 30 s. Ends when a connection gets through.
 */
export const RESTART_BACKOFF = { capMs: 2_000, windowMs: 60_000 } as const;

export interface BackoffOptions {
  baseMs: number;
  capMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { baseMs: 500, capMs: 30_000 };

/**
 * Full jitter ("Exponential Backoff And Jitter", AWS architecture blog): a uniformly random
 * delay in [0, min(cap, base * 2^attempt)). `attempt` counts from 0.
 */
export function fullJitterDelay(attempt: number, opts: BackoffOptions = DEFAULT_BACKOFF, random: () => number = Math.random): number {
  const ceiling = Math.min(opts.capMs, opts.baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}
