/**
 * Plain words for what happened to a connection, for a person rather than a developer: the
 * status line says "Connection lost", and the close code with its registry name (1006
 * `abnormal_closure`) stays one click away. `test/status.test.ts` checks every code of the
 * registry against a table.
 */

const HEADLINES: Record<number, string> = {
  1000: 'The connection was closed',
  1002: 'The app and the server misunderstood each other',
  1005: 'Connection lost',
  1006: 'Connection lost',
  1007: 'The app and the server misunderstood each other',
  1008: "This site isn't allowed to connect to the server",
  1009: 'A message was too large for the server',
  1011: 'The server ran into a problem',
  1012: 'The server is restarting',
  1013: 'The server is busy',
  // The client's own codes (policy.ts CLIENT_CLOSE).
  4000: 'The server took too long to answer',
  4001: 'The server stopped answering',
  4002: "You're offline",
  4003: 'The connection stopped answering',
  4400: "The server couldn't accept the connection request",
  4401: 'Your session has expired',
  4403: "You don't have access to this bot",
  4404: "This bot doesn't exist",
  4408: 'The server stopped hearing from this tab',
  4409: 'This tab fell behind the conversation',
  4429: 'Too many tabs are open',
};

/**
 * What a close means, in a few plain words ("Connection lost"), or null for a close that
 * needs no words (the client's own reset before a retry). Unknown codes read as a lost
 * connection: they are retried like one.
 */
export function closeHeadline(code: number): string | null {
  if (code === 4004) return null;
  return HEADLINES[code] ?? 'Connection lost';
}

const WHAT_TO_DO: Record<number, string> = {
  1000: 'Press Retry to connect again.',
  1002: 'Reload the page. If it happens again, run Diagnose and send the report to whoever runs the server.',
  1007: 'Reload the page. If it happens again, run Diagnose and send the report to whoever runs the server.',
  1008: "Whoever runs the server must allow this site's address.",
  1011: 'Run Diagnose and send the report to whoever runs the server.',
  4400: 'Reload the page. If it happens again, run Diagnose and send the report to whoever runs the server.',
  4401: 'Log in again.',
  4403: "Ask the bot's owner to share it with you.",
  4404: 'Check the link, or pick the bot from the list.',
};

/** What a person can do about a close that ends the connection, in plain words. */
export function closeAdvice(code: number): string {
  return WHAT_TO_DO[code] ?? 'Press Retry to try again, or Diagnose to find out more.';
}

/** The technical name of a close, as the details and the flight recorder show it. */
export function closeTechnical(close: { code: number; name: string; reason?: string }): string {
  return `${close.code} ${close.name}${close.reason ? `: ${close.reason}` : ''}`;
}

const TRANSPORT_WHY: Record<string, string> = {
  connect_timeout: 'the WebSocket never got as far as connecting here (it timed out)',
  '1006_twice': 'the WebSocket dropped twice before connecting here',
  preflight_ok: 'the WebSocket dropped before connecting while the server said it would admit it, so something on the way blocks it',
  configured: "the app asked for it (transport: 'sse')",
};

/** Why a chat uses HTTP streaming (a `transport_switch`'s `why`), in plain words. */
export function transportWhyWords(why: string): string {
  return TRANSPORT_WHY[why] ?? why;
}
