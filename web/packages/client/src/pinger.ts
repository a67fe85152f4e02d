/** App-level pings over the transport: ids in flight, their waiters, and recent round-trip times. */

import { now as monoNow } from './http.js';
import { encodeClientFrame } from './protocol.js';
import type { FlightRecorder } from './recorder.js';
import type { Transport } from './transport.js';

export class Pinger {
  private seq = 0;
  private inFlight = new Map<number, { sent: number; waiters: Array<(rtt: number | null) => void> }>();
  private rtts: number[] = [];

  constructor(private readonly recorder: FlightRecorder) {}

  /** Recent round-trip times in ms, newest last. */
  recent(): number[] {
    return this.rtts.slice();
  }

  /** Sends a ping if the transport is open; returns its id either way. */
  send(t: Transport | null): number {
    const id = ++this.seq;
    if (!t?.isOpen) return id;
    this.inFlight.set(id, { sent: monoNow(), waiters: [] });
    // Forget pings that were never answered, so the map stays small.
    for (const k of this.inFlight.keys()) if (k < id - 10) this.inFlight.delete(k);
    t.send(encodeClientFrame({ type: 'ping', id }));
    return id;
  }

  /** Resolves with the round-trip of ping `id`, or null if no pong comes within `timeoutMs`. */
  wait(id: number, timeoutMs: number): Promise<number | null> {
    return new Promise((resolve) => {
      const entry = this.inFlight.get(id);
      const t = setTimeout(() => resolve(null), timeoutMs);
      entry?.waiters.push((rtt) => {
        clearTimeout(t);
        resolve(rtt);
      });
    });
  }

  pong(id: unknown, bufferedAmount: number): void {
    if (typeof id !== 'number') return;
    const p = this.inFlight.get(id);
    if (!p) return;
    this.inFlight.delete(id);
    const rtt = Math.round((monoNow() - p.sent) * 10) / 10;
    this.rtts.push(rtt);
    if (this.rtts.length > 20) this.rtts.shift();
    this.recorder.record('rtt', { ms: rtt, buffered_amount: bufferedAmount });
    for (const w of p.waiters) w(rtt);
  }

  /** The transport is gone: every waiter hears null now. */
  abandon(): void {
    for (const p of this.inFlight.values()) for (const w of p.waiters) w(null);
    this.inFlight.clear();
  }
}
