/**
 * Logging through the `debug` package, under `websocket:*` (enable with
 * `localStorage.debug = 'websocket:*'` and reload). Anything that might carry a credential
 * goes through `redact` first: tokens and tickets never reach a log line.
 */
import createDebug from 'debug';

/** A `debug` logger, typed here so the published types need no `@types/debug`. */
export type Logger = (formatter: unknown, ...args: unknown[]) => void;

export const log: Record<'state' | 'close' | 'frame' | 'connect' | 'outbox' | 'diag', Logger> = {
  state: createDebug('websocket:state'),
  close: createDebug('websocket:close'),
  frame: createDebug('websocket:frame'),
  connect: createDebug('websocket:connect'),
  outbox: createDebug('websocket:outbox'),
  diag: createDebug('websocket:diagnostics'),
};

const SECRET_PARAMS = /([?&](?:token|ticket|access_token|refresh_token)=)[^&#\s"']*/gi;
const BEARER = /(Bearer\s+)[A-Za-z0-9._~+/=-]+/g;
// Three base64url segments: a JWT wherever it appears.
const JWT = /\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\b/g;

/** Removes tokens, tickets and JWTs from a string (a URL, a message). */
export function redact(s: string): string {
  return s.replace(SECRET_PARAMS, '$1<redacted>').replace(BEARER, '$1<redacted>').replace(JWT, '<redacted-jwt>');
}
