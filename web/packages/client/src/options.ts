/** The options of `ChatSocket` and of its `connect`. */

import type { TransportMode } from './connection.js';
import type { Environment } from './environment.js';
import type { KeyValueStorage } from './outbox.js';
import type { BackoffOptions } from './policy.js';

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
  /**
   * What carries the frames. `websocket`; `sse`: Server-Sent Events down and a POST per frame
   * up (for networks whose proxies cannot carry a WebSocket); `auto` (the default): the
   * WebSocket, switching to `sse` when its handshake fails in a
   * way that points at the network path (a connect timeout, two 1006s before
   * `connection_established`, or a 1006 while the server's preflight says all is well).
   * On SSE, `auto` tries the WebSocket again in the background (see `websocketRetryMs`) and
   * switches back when it gets through.
   */
  transport?: TransportMode;
  /**
   * `auto` after switching to SSE: the wait before a background probe WebSocket tries the path
   * again, doubling after each failed probe up to an hour. 0: never switch back. Default
   * 300 000 ms (5 minutes).
   */
  websocketRetryMs?: number;
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
