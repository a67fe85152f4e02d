/** What `ChatSocket` tells the app: its events, and the error a `send` rejects with. */

import type { ConnectionState } from './connection.js';
import type { OutboxEntry } from './outbox.js';
import type { AckFrame, ConnectionEstablishedFrame, ErrorFrame, MessageDeltaFrame, WireMessage } from './protocol.js';

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
