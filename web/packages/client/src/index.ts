/**
 * `@natter/client`, natter's browser client library: `ChatSocket` (and the singleton
 * `chatWebSocketService`), the diagnostics, plain words for close codes, and the wire types.
 * Framework-free; the only dependency is `debug`.
 */

import { ChatSocket } from './chat-socket.js';
import { runWebSocketDiagnostics, testWebSocket } from './diagnostics.js';

export * from './chat-socket.js';
export * from './diagnostics.js';
export * from './protocol.js';
export { ClosePolicy, CLIENT_CLOSE, DEFAULT_CLOSE_CODES, fullJitterDelay, parseRetryHint } from './policy.js';
export { Outbox, OutboxFullError, type OutboxEntry } from './outbox.js';
export { FlightRecorder, type FlightEvent } from './recorder.js';
export { resolveEndpoints, type Endpoints } from './config.js';
export { redact } from './log.js';
export { WebSocketTransport, type Transport, type TransportEvents, type TransportTarget } from './transport.js';
export { SseTransport } from './sse-transport.js';
export { EventStreamParser, type StreamEvent } from './event-stream.js';
export { http, uuid, type HttpOptions, type HttpResult } from './http.js';
export { closeAdvice, closeHeadline, closeTechnical } from './words.js';

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
  w.testWebSocket = (botId: string, token?: string | null) =>
    testWebSocket(botId, token ?? localStorage.getItem('access_token'), service.endpoints);
  w.runWebSocketDiagnostics = (botId: string, token?: string | null) =>
    runWebSocketDiagnostics(botId, token ?? localStorage.getItem('access_token'), service.endpoints);
  w.natter = {
    ChatSocket,
    chatWebSocketService: service,
    testWebSocket,
    runWebSocketDiagnostics,
    exportFlightRecorder: () => service.exportFlightRecorder(),
  };
}
