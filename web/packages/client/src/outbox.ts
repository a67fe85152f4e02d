/**
 * Messages sent but not yet acknowledged. Bounded, and persisted to `sessionStorage` (per
 * tab, surviving a reload) so that a reload or a dropped connection loses nothing: entries go
 * out again with the same `client_id`, which the server uses to store each message once.
 */

export interface OutboxEntry {
  client_id: string;
  bot_id: string;
  content: string;
  /** Epoch ms when the app called `send`. */
  queued_at: number;
  /** How many times the frame was written to a socket. */
  sends: number;
}

export class OutboxFullError extends Error {
  constructor(limit: number) {
    super(`the outbox already holds ${limit} unsent messages; wait for the connection to come back`);
    this.name = 'OutboxFullError';
  }
}

/** The subset of `Storage` the outbox uses, so tests can pass a map. */
export type KeyValueStorage = Pick<Storage, 'getItem' | 'setItem' | 'removeItem'>;

export class Outbox {
  private entries: OutboxEntry[] = [];

  constructor(
    private readonly storage: KeyValueStorage | null,
    private readonly key: string,
    readonly limit = 100,
  ) {
    this.entries = this.read();
  }

  private read(): OutboxEntry[] {
    if (!this.storage) return [];
    try {
      const raw = this.storage.getItem(this.key);
      const v = raw ? JSON.parse(raw) : [];
      return Array.isArray(v)
        ? v.filter((e) => e && typeof e.client_id === 'string' && typeof e.content === 'string' && typeof e.bot_id === 'string')
        : [];
    } catch {
      return [];
    }
  }

  private write(): void {
    if (!this.storage) return;
    try {
      if (this.entries.length === 0) this.storage.removeItem(this.key);
      else this.storage.setItem(this.key, JSON.stringify(this.entries));
    } catch {
      // Storage full or disabled: the outbox still works for this page's lifetime.
    }
  }

  add(entry: Omit<OutboxEntry, 'sends' | 'queued_at'> & { queued_at?: number }): OutboxEntry {
    if (this.entries.length >= this.limit) throw new OutboxFullError(this.limit);
    const e: OutboxEntry = { queued_at: Date.now(), ...entry, sends: 0 };
    this.entries.push(e);
    this.write();
    return e;
  }

  markSent(client_id: string): void {
    const e = this.entries.find((x) => x.client_id === client_id);
    if (e) {
      e.sends += 1;
      this.write();
    }
  }

  /** Removes an entry (acknowledged or refused); returns it if it was there. */
  remove(client_id: string): OutboxEntry | undefined {
    const i = this.entries.findIndex((x) => x.client_id === client_id);
    if (i < 0) return undefined;
    const [e] = this.entries.splice(i, 1);
    this.write();
    return e;
  }

  /** Forgets every entry (e.g. when the user logs out: they must not go out as someone else). */
  clear(): void {
    this.entries = [];
    this.write();
  }

  has(client_id: string): boolean {
    return this.entries.some((x) => x.client_id === client_id);
  }

  /** Entries for one bot, oldest first. */
  forBot(bot_id: string): OutboxEntry[] {
    return this.entries.filter((e) => e.bot_id === bot_id).map((e) => ({ ...e }));
  }

  all(): OutboxEntry[] {
    return this.entries.map((e) => ({ ...e }));
  }

  get size(): number {
    return this.entries.length;
  }
}
