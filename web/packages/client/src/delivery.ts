/**
 * The outbox at the edge: the promises of `send`, writing messages to the transport, and what
 * acks, replayed copies and refusals do to them. Entries wait in the persisted `Outbox` until
 * the server acknowledges them; `ChatSocket` asks for a flush whenever a connection opens.
 */

import type { Emitter } from './emitter.js';
import { ChatError, type ChatSocketEvents } from './events.js';
import { uuid } from './http.js';
import { log } from './log.js';
import type { Outbox } from './outbox.js';
import { encodeClientFrame, type AckFrame, type ErrorFrame, type Limits, type WireMessage } from './protocol.js';
import type { FlightRecorder } from './recorder.js';
import type { Transport } from './transport.js';

interface Pending {
  resolve(a: AckFrame): void;
  reject(e: ChatError): void;
}

/** Where messages go now: the open transport (or null) and the limits the server announced. */
export type Link = () => { transport: Transport | null; limits: Limits | undefined };

export class Delivery {
  private pending = new Map<string, Pending>();

  constructor(
    readonly outbox: Outbox,
    private readonly events: Emitter<ChatSocketEvents>,
    private readonly recorder: FlightRecorder,
    private readonly link: Link,
    /** The server asked to wait `ms` before resending (`rate_limited`, `bot_busy`). */
    private readonly resendLater: (ms: number) => void,
  ) {}

  /** Queues a message (unless `clientId` is already queued) and writes it at once if `writeNow`. */
  send(botId: string, content: string, clientId: string | undefined, writeNow: boolean): Promise<AckFrame> {
    const client_id = clientId ?? uuid();
    if (!this.outbox.has(client_id)) {
      try {
        this.outbox.add({ client_id, bot_id: botId, content });
      } catch (e) {
        return Promise.reject(new ChatError('outbox_full', (e as Error).message));
      }
      log.outbox('queued %s (%d waiting)', client_id, this.outbox.size);
      this.events.emit('outbox', this.outbox.forBot(botId));
    }
    const p = new Promise<AckFrame>((resolve, reject) => this.pending.set(client_id, { resolve, reject }));
    if (writeNow) this.write(client_id, content);
    return p;
  }

  /** Writes every waiting message of a bot, oldest first. */
  flush(botId: string): void {
    const waiting = this.outbox.forBot(botId);
    if (waiting.length) this.recorder.record('outbox_flush', { count: waiting.length });
    for (const e of waiting) this.write(e.client_id, e.content);
  }

  private write(client_id: string, content: string): void {
    const { transport, limits } = this.link();
    if (!transport?.isOpen) return;
    const frame = encodeClientFrame({ type: 'message', client_id, content });
    // A frame over the server's limit would close the socket with 1009, and resending it after
    // the reconnect would close it again: refuse it here instead of looping.
    const bytes = new TextEncoder().encode(frame).length;
    if (limits && bytes > limits.max_frame_bytes) {
      this.errorFrame({
        type: 'error',
        code: 'content_too_long',
        message: `the message is ${bytes} bytes as a frame; the server's limit is ${limits.max_frame_bytes}`,
        client_id,
      });
      return;
    }
    transport.send(frame);
    this.outbox.markSent(client_id);
    log.outbox('→ message %s', client_id);
  }

  /** Resolves a send: removes it from the outbox and tells the app. */
  settle(client_id: string, ack: AckFrame): void {
    const entry = this.outbox.remove(client_id);
    const p = this.pending.get(client_id);
    this.pending.delete(client_id);
    if (!entry && !p) {
      // Already settled (e.g. by a replayed copy): a second ack changes nothing.
      this.recorder.record('ack_again', { client_id, seq: ack.message.seq });
      return;
    }
    this.recorder.record('ack', { client_id, seq: ack.message.seq, duplicate: ack.duplicate });
    log.outbox('acked %s as seq %d%s', client_id, ack.message.seq, ack.duplicate ? ' (duplicate)' : '');
    p?.resolve(ack);
    this.events.emit('ack', ack);
    if (entry) this.events.emit('outbox', this.outbox.forBot(entry.bot_id));
  }

  /** A new message of the conversation: a replayed copy of our own whose ack was lost settles it. */
  message(m: WireMessage): void {
    if (m.client_id && (this.outbox.has(m.client_id) || this.pending.has(m.client_id))) {
      this.settle(m.client_id, { type: 'ack', client_id: m.client_id, message: m, duplicate: true });
    }
  }

  errorFrame(f: ErrorFrame): void {
    this.recorder.record('error_frame', { code: f.code, message: f.message, client_id: f.client_id, retry_after_ms: f.retry_after_ms });
    log.frame('error frame %s: %s', f.code, f.message);
    if (f.client_id && this.outbox.has(f.client_id)) {
      if (f.code === 'rate_limited' || f.code === 'bot_busy') {
        // Still ours to send: keep it and resend everything waiting after the hint.
        this.resendLater(f.retry_after_ms ?? 1000);
      } else {
        const entry = this.outbox.remove(f.client_id);
        const p = this.pending.get(f.client_id);
        this.pending.delete(f.client_id);
        p?.reject(new ChatError(f.code, f.message, f.retry_after_ms));
        this.events.emit('rejected', { client_id: f.client_id, error: f });
        if (entry) this.events.emit('outbox', this.outbox.forBot(entry.bot_id));
      }
    }
    this.events.emit('error', f);
  }

  /** Drops one message (the user gave up on it). */
  discard(clientId: string): void {
    const e = this.outbox.remove(clientId);
    this.pending.get(clientId)?.reject(new ChatError('discarded', 'the message was discarded'));
    this.pending.delete(clientId);
    if (e) this.events.emit('outbox', this.outbox.forBot(e.bot_id));
  }

  /** Drops every message, of every bot. */
  clear(): void {
    const bots = new Set(this.outbox.all().map((e) => e.bot_id));
    this.outbox.clear();
    this.rejectAll(new ChatError('discarded', 'the outbox was cleared'));
    this.events.emit('outbox', []);
    this.recorder.record('outbox_cleared', { bots: bots.size });
  }

  /** Rejects every waiting `send` promise (the entries stay in the outbox). */
  rejectAll(e: ChatError): void {
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) p.reject(e);
  }
}
