/**
 * natter's browser client library: `ChatSocket` (and the singleton `chatWebSocketService`),
 * the diagnostics, and the wire types. Framework-free; the only dependency is `debug`.
 */

import { ChatSocket } from './chat-socket';
import { runWebSocketDiagnostics, testWebSocket } from './diagnostics';

export * from './chat-socket';
export * from './diagnostics';
export * from './protocol';
export { ClosePolicy, CLIENT_CLOSE, DEFAULT_CLOSE_CODES, fullJitterDelay, parseRetryHint } from './policy';
export { Outbox, OutboxFullError, type OutboxEntry } from './outbox';
export { FlightRecorder, type FlightEvent } from './recorder';
export { resolveEndpoints, type Endpoints } from './config';
export { redact } from './log';

/**
 * The shared connection, under the name the seed's console snippets use. Configure it with
 * `chatWebSocketService.configure({ getToken, refreshToken })` before `connect`.
 */
export const chatWebSocketService = new ChatSocket({
  getToken: () => (typeof localStorage !== 'undefined' ? localStorage.getItem('access_token') : null),
});

/**
 * Puts `chatWebSocketService`, `testWebSocket` and `runWebSocketDiagnostics` on `window`, so
 * the seed's console snippets work as written.
 */
export function installOnWindow(service: ChatSocket = chatWebSocketService): void {
  if (typeof window === 'undefined') return;
  const w = window as unknown as Record<string, unknown>;
  w.chatWebSocketService = service;
  w.testWebSocket = (botId: string, token?: string | null) => testWebSocket(botId, token ?? localStorage.getItem('access_token'), service.endpoints);
  w.runWebSocketDiagnostics = (botId: string, token?: string | null) =>
    runWebSocketDiagnostics(botId, token ?? localStorage.getItem('access_token'), service.endpoints);
  w.natter = { ChatSocket, chatWebSocketService: service, testWebSocket, runWebSocketDiagnostics, exportFlightRecorder: () => service.exportFlightRecorder() };
}
