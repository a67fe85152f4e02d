/**
 * The flight recorder: the last N connection events in a ring buffer, for bug reports.
 * Events hold no tokens or tickets (URLs are redacted before they get here).
 */

export interface FlightEvent {
  /** Epoch ms. */
  t: number;
  type: string;
  [k: string]: unknown;
}

export class FlightRecorder {
  private buf: FlightEvent[] = [];
  private next = 0;
  private total = 0;

  constructor(readonly capacity = 200) {}

  record(type: string, data: Record<string, unknown> = {}, now = Date.now()): FlightEvent {
    const e: FlightEvent = { ...data, t: now, type };
    if (this.buf.length < this.capacity) this.buf.push(e);
    else this.buf[this.next] = e;
    this.next = (this.next + 1) % this.capacity;
    this.total += 1;
    return e;
  }

  /** Events oldest first. */
  events(): FlightEvent[] {
    if (this.buf.length < this.capacity) return this.buf.slice();
    return [...this.buf.slice(this.next), ...this.buf.slice(0, this.next)];
  }

  /** How many events were ever recorded (older ones beyond the capacity are gone). */
  get recorded(): number {
    return this.total;
  }

  clear(): void {
    this.buf = [];
    this.next = 0;
  }

  toJSON(extra: Record<string, unknown> = {}): string {
    return JSON.stringify(
      { exported_at: new Date().toISOString(), capacity: this.capacity, recorded: this.total, ...extra, events: this.events() },
      null,
      2,
    );
  }
}
