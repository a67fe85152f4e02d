/** A small typed event emitter: `on` returns the function that unsubscribes. */
export class Emitter<Events extends { [K in keyof Events]: unknown }> {
  private handlers = new Map<keyof Events, Set<(v: never) => void>>();

  on<K extends keyof Events>(event: K, fn: (value: Events[K]) => void): () => void {
    let set = this.handlers.get(event);
    if (!set) {
      set = new Set();
      this.handlers.set(event, set);
    }
    set.add(fn as (v: never) => void);
    return () => set!.delete(fn as (v: never) => void);
  }

  emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const fn of this.handlers.get(event) ?? []) {
      try {
        (fn as (v: Events[K]) => void)(value);
      } catch (e) {
        console.error(`natter: a "${String(event)}" handler threw`, e);
      }
    }
  }
}
