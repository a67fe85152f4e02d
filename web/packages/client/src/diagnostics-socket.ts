/** Watching one diagnostics connection: its frames and its close, whatever carries it. */

import { now as monoNow } from './http.js';
import { parseServerFrame, type ServerFrame } from './protocol.js';

/** Frames and the close of one connection, whatever carries it, and waits on them. */
export interface Watch {
  frames: ServerFrame[];
  closed: { code: number; reason: string } | null;
  waitFor<T>(pred: (f: ServerFrame) => T | undefined, timeoutMs: number): Promise<T | null>;
  waitClose(timeoutMs: number): Promise<{ code: number; reason: string } | null>;
  /** Feed a text frame from the server. */
  text(data: string): void;
  /** Feed the close. */
  close(code: number, reason: string): void;
}

export interface LiveSocket extends Watch {
  ws: WebSocket;
}

export function watchFrames(): Watch {
  const frames: ServerFrame[] = [];
  const listeners = new Set<() => void>();
  const wait = <V>(value: () => V | undefined, timeoutMs: number, onTimeout: V) =>
    new Promise<V>((resolve) => {
      const check = () => {
        const v = value();
        if (v !== undefined) done(v);
      };
      const t = setTimeout(() => done(onTimeout), timeoutMs);
      const done = (v: V) => {
        clearTimeout(t);
        listeners.delete(check);
        resolve(v);
      };
      listeners.add(check);
      check();
    });
  const changed = () => {
    for (const l of [...listeners]) l();
  };
  const w: Watch = {
    frames,
    closed: null,
    waitFor<T>(pred: (f: ServerFrame) => T | undefined, timeoutMs: number) {
      return wait<T | null>(
        () => {
          for (const f of frames) {
            const v = pred(f);
            if (v !== undefined) return v;
          }
          return w.closed ? null : undefined;
        },
        timeoutMs,
        null,
      );
    },
    waitClose(timeoutMs) {
      return wait(() => w.closed ?? undefined, timeoutMs, null);
    },
    text(data) {
      try {
        frames.push(parseServerFrame(data));
      } catch {
        // Unknown frames are not this tool's business.
      }
      changed();
    },
    close(code, reason) {
      w.closed = { code, reason };
      changed();
    },
  };
  return w;
}

export function watchSocket(ws: WebSocket): LiveSocket {
  const live = Object.assign(watchFrames(), { ws });
  ws.onmessage = (ev: MessageEvent) => live.text(String(ev.data));
  ws.onclose = (ev: CloseEvent) => live.close(ev.code, ev.reason);
  return live;
}

export async function openSocket(
  Ctor: typeof WebSocket,
  url: string,
  timeoutMs: number,
): Promise<{ live: LiveSocket; opened: boolean; handshakeMs: number; error?: string }> {
  const started = monoNow();
  let ws: WebSocket;
  try {
    ws = new Ctor(url);
  } catch (e) {
    const dummy = { onmessage: null, onclose: null } as unknown as WebSocket;
    return { live: watchSocket(dummy), opened: false, handshakeMs: 0, error: (e as Error).message };
  }
  const live = watchSocket(ws);
  const opened = await new Promise<boolean>((resolve) => {
    const t = setTimeout(() => resolve(false), timeoutMs);
    ws.onopen = () => {
      clearTimeout(t);
      resolve(true);
    };
    const prevClose = ws.onclose;
    ws.onclose = (ev: CloseEvent) => {
      clearTimeout(t);
      (prevClose as (ev: CloseEvent) => void)?.call(ws, ev);
      resolve(false);
    };
  });
  return { live, opened, handshakeMs: monoNow() - started };
}
