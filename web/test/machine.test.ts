import { describe, expect, it } from 'vitest';
import {
  initialModel,
  type Effect,
  type MachineConfig,
  type MachineEvent,
  type Model,
  type World,
} from '../packages/client/src/connection';
import { step } from '../packages/client/src/machine';
import { ClosePolicy } from '../packages/client/src/policy';
import type { ServerFrame } from '../packages/client/src/protocol';
import { WebSocketTransport } from '../packages/client/src/transport';
import { FakeWebSocket, established, wireMessage } from './fakes';

const policy = new ClosePolicy();
const CONFIG: MachineConfig = {
  connectTimeoutMs: 10_000,
  stableAfterMs: 30_000,
  livenessTimeoutMs: 5_000,
  maxServerErrors: 10,
  backoff: { baseMs: 500, capMs: 30_000 },
};

/** Feeds events to the pure machine and keeps the last step's effects; no timer or socket exists. */
class Driver {
  model: Model = initialModel();
  fx: Effect[] = [];
  world: World = {
    now: 1_000_000,
    online: true,
    canRefresh: true,
    random: () => 0.999999,
    verdict: (code) => policy.verdict(code),
  };
  config: MachineConfig = CONFIG;

  /** One event; a function gets the model (for the current generation). */
  send(e: MachineEvent | ((m: Model) => MachineEvent)): Effect[] {
    const r = step(this.model, typeof e === 'function' ? e(this.model) : e, this.world, this.config);
    this.model = r.model;
    this.fx = r.effects;
    return r.effects;
  }

  of<T extends Effect['type']>(type: T): Array<Extract<Effect, { type: T }>> {
    return this.fx.filter((f): f is Extract<Effect, { type: T }> => f.type === type);
  }

  timer(name: Extract<Effect, { type: 'set_timer' }>['name']): Extract<Effect, { type: 'set_timer' }> | undefined {
    return this.of('set_timer').find((t) => t.name === name);
  }

  /** connect → health → codes → credential: the machine waits for the transport. */
  connect(botId = 'b1', afterSeq?: number): void {
    this.send({ type: 'connect', botId, afterSeq });
    this.send((m) => ({ type: 'health', gen: m.gen, ok: true, network: false, status: 200, message: '' }));
    if (this.of('load_codes').length) this.send((m) => ({ type: 'codes', gen: m.gen, loaded: true }));
    this.send((m) => ({ type: 'credential', gen: m.gen, credential: { kind: 'ticket', value: 'tkt' } }));
  }

  frame(f: Record<string, unknown>): Effect[] {
    return this.send((m) => ({ type: 'frame', gen: m.gen, frame: f as unknown as ServerFrame }));
  }

  establish(over: Record<string, unknown> = {}): Effect[] {
    return this.frame(established(over));
  }

  close(code: number, reason = '', by: 'server' | 'client' | 'auth' = 'server'): Effect[] {
    return this.send((m) => ({ type: 'closed', gen: m.gen, code, reason, by }));
  }

  fire(name: Extract<Effect, { type: 'set_timer' }>['name']): Effect[] {
    return this.send((m) => ({ type: 'timer', gen: m.gen, name }));
  }

  /** The wait a `reconnecting` / `backend_unavailable` state announces. */
  get delay(): number {
    const st = this.model.state as { retryAt: number };
    return st.retryAt - this.world.now;
  }
}

function deepFreeze<T>(o: T): T {
  if (o && typeof o === 'object') {
    for (const v of Object.values(o)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}

describe('one attempt', () => {
  it('runs health → codes (once) → credential → transport, and opens on connection_established', () => {
    const d = new Driver();
    d.send({ type: 'connect', botId: 'b1' });
    expect(d.model.state).toEqual({ kind: 'checking', attempt: 0 });
    expect(d.of('check_health')).toEqual([{ type: 'check_health', gen: d.model.gen }]);
    d.send((m) => ({ type: 'health', gen: m.gen, ok: true, network: false, status: 200, message: '' }));
    expect(d.fx.map((f) => f.type)).toEqual(['load_codes']);
    d.send((m) => ({ type: 'codes', gen: m.gen, loaded: true }));
    expect(d.of('get_credential')).toEqual([{ type: 'get_credential', gen: d.model.gen, botId: 'b1' }]);
    d.send((m) => ({ type: 'credential', gen: m.gen, credential: { kind: 'ticket', value: 'tkt' } }));
    expect(d.model.state).toEqual({ kind: 'connecting', attempt: 0 });
    expect(d.of('open_transport')).toEqual([
      {
        type: 'open_transport',
        gen: d.model.gen,
        botId: 'b1',
        auth: { kind: 'ticket', value: 'tkt' },
        afterSeq: null,
        transport: 'websocket',
      },
    ]);
    expect(d.timer('connect')?.ms).toBe(10_000);

    d.establish({ connection_id: 'conn-7', last_seq: 4, heartbeat_interval_ms: 20_000 });
    expect(d.model.state).toEqual({
      kind: 'open',
      connectionId: 'conn-7',
      since: d.world.now,
      heartbeatIntervalMs: 20_000,
      transport: 'websocket',
    });
    expect(d.model.lastSeq).toBe(4);
    expect(d.of('clear_timer')).toEqual([{ type: 'clear_timer', name: 'connect' }]);
    expect(d.timer('ping')).toMatchObject({ ms: 10_000, repeat: true });
    expect(d.timer('stable')?.ms).toBe(30_000);
    expect(d.timer('watchdog')?.ms).toBe(40_000);
    expect(d.of('flush_outbox')).toEqual([{ type: 'flush_outbox', gen: d.model.gen, botId: 'b1' }]);
    expect(d.of('deliver').map((f) => f.frame.type)).toEqual(['connection_established']);

    // The registry is fetched once per socket, not per attempt.
    d.close(1012);
    d.fire('retry');
    d.send((m) => ({ type: 'health', gen: m.gen, ok: true, network: false, status: 200, message: '' }));
    expect(d.fx.map((f) => f.type)).toEqual(['get_credential']);
  });

  it('leaves the model it was given untouched', () => {
    const d = new Driver();
    d.connect();
    d.establish();
    const before = deepFreeze(structuredClone(d.model));
    const frozen = deepFreeze(d.model);
    const r = step(frozen, { type: 'closed', gen: frozen.gen, code: 1012, reason: '', by: 'server' }, d.world, CONFIG);
    expect(frozen).toEqual(before);
    expect(r.model.state.kind).toBe('reconnecting');
    expect(r.model.gen).toBe(frozen.gen + 1);
  });

  it('goes offline instead of checking when the browser has no network', () => {
    const d = new Driver();
    d.world.online = false;
    d.send({ type: 'connect', botId: 'b1' });
    expect(d.model.state).toEqual({ kind: 'offline', lastClose: null });
    expect(d.of('check_health')).toEqual([]);
  });

  it('backs off without a transport while the health check fails, with status 0 when unreachable', () => {
    const d = new Driver();
    d.send({ type: 'connect', botId: 'b1' });
    const failures = [
      { network: true, status: 0, message: 'Failed to fetch', error: 'server unreachable (Failed to fetch)', wait: 499 },
      { network: false, status: 503, message: 'not ready', error: 'health check answered 503: not ready', wait: 999 },
    ];
    for (const [i, h] of failures.entries()) {
      if (i > 0) d.fire('retry');
      d.send((m) => ({ type: 'health', gen: m.gen, ok: false, network: h.network, status: h.status, message: h.message }));
      expect(d.model.state).toMatchObject({ kind: 'backend_unavailable', attempt: i + 1, status: h.status, error: h.error });
      expect(d.timer('retry')?.ms).toBe(h.wait);
    }
    expect(d.fx.some((f) => f.type === 'open_transport')).toBe(false);
  });

  it('ignores every answer of an abandoned attempt', () => {
    const d = new Driver();
    d.connect();
    const old = d.model.gen;
    d.send({ type: 'retry_now' });
    const now = d.model;
    for (const e of [
      { type: 'closed', gen: old, code: 4404, reason: 'late', by: 'server' },
      { type: 'timer', gen: old, name: 'connect' },
      { type: 'health', gen: old, ok: false, network: true, status: 0, message: 'x' },
      { type: 'frame', gen: old, frame: established() as unknown as ServerFrame },
      { type: 'reauth_result', gen: old, ok: false },
    ] as MachineEvent[]) {
      expect(d.send(e)).toEqual([]);
      expect(d.model).toEqual(now);
    }
    expect(d.model.state.kind).toBe('checking');
  });

  it('times out a transport that never says connection_established', () => {
    const d = new Driver();
    d.connect();
    d.fire('connect');
    expect(d.of('record').map((r) => r.event)).toEqual(['connect_timeout']);
    expect(d.of('teardown')[0]).toMatchObject({ code: 4000 });
    expect(d.model.state).toMatchObject({ kind: 'reconnecting', lastClose: { code: 4000, name: 'connect_timeout' } });
  });
});

describe('reconnect decisions', () => {
  it('backs off with full jitter up to the cap, and starts over after a stable connection', () => {
    const d = new Driver();
    d.connect();
    const delays: number[] = [];
    for (let i = 0; i < 8; i++) {
      d.establish();
      d.close(1012, 'restarting');
      expect(d.model.state).toMatchObject({ kind: 'reconnecting', attempt: i + 1, lastClose: { code: 1012 } });
      expect(d.timer('retry')?.ms).toBe(d.delay);
      delays.push(d.delay);
      d.fire('retry');
      expect(d.model.state).toEqual({ kind: 'checking', attempt: i + 1 });
      d.connect();
    }
    expect(delays).toEqual([499, 999, 1999, 3999, 7999, 15999, 29999, 29999]);
    d.establish();
    d.fire('stable');
    expect(d.model.attempt).toBe(0);
    d.close(1012);
    expect(d.delay).toBe(499);
  });

  it("comes back at a 1012's retry_after_ms hint, plus a little jitter", () => {
    const d = new Driver();
    d.connect();
    d.establish();
    d.close(1012, 'server restarting; reconnect with backoff; retry_after_ms=3000');
    expect(d.model.state).toMatchObject({ kind: 'reconnecting', attempt: 1, lastClose: { code: 1012 } });
    // The hint plus up to a tenth of it (at most 1 s): random() is 0.999999 here.
    expect(d.delay).toBe(3300);
    expect(d.timer('retry')?.ms).toBe(3300);
    // Without a hint (an older server), the backoff as before.
    d.fire('retry');
    d.connect();
    d.establish();
    d.close(1012, 'server restarting; reconnect with backoff');
    expect(d.delay).toBe(999);
  });

  /** An open connection closed by a restarting server. */
  const restarted = (): Driver => {
    const d = new Driver();
    d.connect();
    d.establish();
    d.close(1012, 'server restarting; reconnect with backoff; retry_after_ms=100');
    return d;
  };
  /** The retry is due and the health check finds the server down; the next wait. */
  const refusedAgain = (d: Driver): number => {
    d.fire('retry');
    d.send((m) => ({ type: 'health', gen: m.gen, ok: false, network: true, status: 0, message: 'Failed to fetch' }));
    expect(d.model.state.kind).toBe('backend_unavailable');
    return d.delay;
  };

  it('keeps retries short while the server restarts (60 s after a 1012), then backs off as before', () => {
    const d = restarted();
    const delays: number[] = [];
    const refused = () => delays.push(refusedAgain(d));
    for (let i = 0; i < 4; i++) refused();
    // A socket that drops before connection_established (the new process not yet listening).
    d.fire('retry');
    d.connect();
    d.close(1006);
    d.send((m) => ({ type: 'preflight', gen: m.gen, closeCode: null, reason: '' }));
    delays.push(d.delay);
    refused();
    // Full jitter under a 2 s ceiling: never the 4, 8, 16, 30 s a long outage gets.
    expect(delays).toEqual([999, 1999, 1999, 1999, 1999, 1999]);
    // 60 s after the 1012 the server is not restarting but down: the backoff grows as before.
    d.world = { ...d.world, now: d.world.now + 60_001 };
    refused();
    expect(delays.at(-1)).toBe(29_999);
  });

  it('ends the short retries once a connection gets through', () => {
    const d = restarted();
    for (let i = 0; i < 4; i++) refusedAgain(d);
    d.fire('retry');
    d.connect();
    d.establish();
    d.close(1006, '', 'client');
    // Full jitter at attempt 5 (the count goes on until a connection is stable): 16 s, not 2 s.
    expect(d.model.attempt).toBe(6);
    expect(d.delay).toBe(15_999);
  });

  it('closes the transport with 1000 for codes a browser may not send, and keeps 4xxx', () => {
    const d = new Driver();
    d.connect();
    d.close(1006, '', 'client');
    expect(d.of('teardown')[0]).toMatchObject({ code: 1000 });
    d.fire('retry');
    d.connect();
    d.close(1011, 'boom');
    expect(d.of('teardown')[0]).toMatchObject({ code: 1000 });
    d.fire('retry');
    d.connect();
    d.close(4409, 'slow');
    expect(d.of('teardown')[0]).toMatchObject({ code: 4409 });
  });

  it('honours the 1013 hint plus a little jitter', () => {
    const d = new Driver();
    d.world.random = () => 0.5;
    d.connect();
    d.close(1013, 'message bus unavailable; retry_after_ms=5000');
    expect(d.delay).toBe(5000 + Math.floor(0.5 * 501));
    d.fire('retry');
    d.connect();
    d.close(1013, 'no hint');
    expect(d.delay).toBe(Math.floor(0.5 * 1000)); // backoff, attempt 1
  });

  it('fails for good on a stop code, tearing down and rejecting what waits', () => {
    const d = new Driver();
    d.connect();
    d.close(4404, 'no bot with id b1');
    expect(d.model.state).toEqual({
      kind: 'failed',
      code: 4404,
      reason: 'no bot with id b1',
      advice: policy.verdict(4404).description,
    });
    expect(d.of('set_timer')).toEqual([]);
    expect(d.of('reject_pending')).toEqual([
      { type: 'reject_pending', code: 'connection_failed', message: 'the connection failed: no bot with id b1' },
    ]);
  });

  it('asks for a fresh token once after a 4401, then fails with "Session expired"', () => {
    const d = new Driver();
    d.connect();
    d.close(4401, 'token expired');
    expect(d.model.state).toMatchObject({ kind: 'reconnecting', lastClose: { code: 4401 } });
    expect(d.of('refresh_token')).toEqual([{ type: 'refresh_token', gen: d.model.gen }]);
    d.send((m) => ({ type: 'reauth_result', gen: m.gen, ok: true }));
    expect(d.model.state.kind).toBe('checking');
    d.connect();
    d.close(4401, 'still bad');
    expect(d.model.state).toMatchObject({ kind: 'failed', code: 4401, reason: 'Session expired, log in again (still bad)' });
    expect(d.of('refresh_token')).toEqual([]);
  });

  it('a connection_established gives the 4401 refresh back, and no refresh callback fails at once', () => {
    const d = new Driver();
    d.connect();
    d.close(4401, 'expired');
    d.send((m) => ({ type: 'reauth_result', gen: m.gen, ok: true }));
    d.connect();
    d.establish();
    d.close(4401, 'expired again');
    expect(d.of('refresh_token')).toHaveLength(1);

    const e = new Driver();
    e.world.canRefresh = false;
    e.connect();
    e.close(4401, 'expired');
    expect(e.model.state).toMatchObject({ kind: 'failed', code: 4401, reason: 'expired' });
    const f = new Driver();
    f.connect();
    f.close(4401, 'expired');
    f.send((m) => ({ type: 'reauth_result', gen: m.gen, ok: false }));
    expect(f.model.state).toMatchObject({ kind: 'failed', code: 4401, reason: 'Session expired, log in again' });
  });

  it('maps a refused credential to its close code without opening a transport', () => {
    const d = new Driver();
    d.send({ type: 'connect', botId: 'b1' });
    d.send((m) => ({ type: 'health', gen: m.gen, ok: true, network: false, status: 200, message: '' }));
    d.send((m) => ({ type: 'codes', gen: m.gen, loaded: false }));
    d.send((m) => ({ type: 'credential', gen: m.gen, credential: { close: { code: 4403, reason: 'not shared' } } }));
    expect(d.model.state).toMatchObject({ kind: 'failed', code: 4403 });
    expect(d.of('report_close')[0]).toMatchObject({ by: 'auth', info: { code: 4403 } });
    expect(d.model.codesLoaded).toBe(false);
  });

  it('asks the preflight after a server 1006 and follows a terminal verdict, else backs off', () => {
    const d = new Driver();
    d.connect('b1', 7);
    d.establish();
    d.close(1006);
    expect(d.model.state.kind).toBe('open'); // undecided until the preflight answers
    expect(d.of('preflight')).toEqual([{ type: 'preflight', gen: d.model.gen, botId: 'b1', afterSeq: 7 }]);
    d.send((m) => ({ type: 'preflight', gen: m.gen, closeCode: 4403, reason: 'not shared with you' }));
    expect(d.model.state).toMatchObject({ kind: 'failed', code: 4403, reason: 'not shared with you' });

    const e = new Driver();
    e.connect();
    e.close(1006);
    e.send((m) => ({ type: 'preflight', gen: m.gen, closeCode: 4429, reason: 'too many' })); // backoff: not an explanation
    expect(e.model.state).toMatchObject({ kind: 'reconnecting', lastClose: { code: 1006, name: 'abnormal_closure' } });

    const f = new Driver();
    f.connect();
    f.close(1006, '', 'client');
    expect(f.of('preflight')).toEqual([]);
    expect(f.model.state.kind).toBe('reconnecting');
  });

  it('gives up after maxServerErrors 1011s in a row; a stable connection resets the count', () => {
    const d = new Driver();
    d.config = { ...CONFIG, maxServerErrors: 3 };
    d.connect();
    for (const i of [1, 2]) {
      d.establish();
      d.close(1011, `internal error (error id e${i})`);
      expect(d.model.state.kind).toBe('reconnecting');
      d.fire('retry');
      d.connect();
    }
    d.establish();
    d.fire('stable');
    d.close(1011, 'internal error (error id e3)');
    expect(d.model.state.kind).toBe('reconnecting');
    for (const i of [4, 5]) {
      d.fire('retry');
      d.connect();
      d.close(1011, `internal error (error id e${i})`);
    }
    expect(d.model.state).toMatchObject({
      kind: 'failed',
      code: 1011,
      reason: 'the server failed 3 times in a row: internal error (error id e5)',
    });
    expect((d.model.state as { advice: string }).advice).toMatch(/Run Diagnose/);
  });

  it('retryNow starts at once with fresh counters', () => {
    const d = new Driver();
    d.connect();
    for (let i = 0; i < 4; i++) {
      d.close(1012);
      d.fire('retry');
      d.connect();
    }
    expect(d.model.attempt).toBe(4);
    d.send({ type: 'retry_now' });
    expect(d.of('teardown')[0]).toMatchObject({ code: 4004 });
    expect(d.model.state).toEqual({ kind: 'checking', attempt: 0 });
  });
});

describe('resume and dedupe', () => {
  it('resumes after the highest seq seen, from connect, established, messages and acks', () => {
    const d = new Driver();
    d.connect('b1', 2);
    expect(d.of('open_transport')[0].afterSeq).toBe(2);
    d.establish({ last_seq: 9 });
    expect(d.model.lastSeq).toBe(2); // the app's resume point wins over the server's end
    const delivered: number[] = [];
    for (const seq of [3, 3, 4, 3, 5, 5, 4]) {
      d.frame({ type: 'message', message: wireMessage(seq) });
      for (const f of d.of('deliver')) if (f.frame.type === 'message') delivered.push(f.frame.message.seq);
    }
    expect(delivered).toEqual([3, 4, 5]);
    d.frame({ type: 'message', message: wireMessage(4) });
    expect(d.of('record')).toEqual([{ type: 'record', event: 'duplicate_dropped', data: { seq: 4, last_seq: 5 } }]);
    d.frame({ type: 'ack', client_id: 'c1', duplicate: false, message: wireMessage(8, { role: 'user' }) });
    expect(d.model.lastSeq).toBe(8);
    d.frame({ type: 'ack', client_id: 'c0', duplicate: true, message: wireMessage(6, { role: 'user' }) });
    expect(d.model.lastSeq).toBe(8);
    d.close(1012);
    d.fire('retry');
    d.connect();
    expect(d.of('open_transport')[0].afterSeq).toBe(8);
  });

  it('takes the server last_seq on a first connection and forgets the seq when switching bots', () => {
    const d = new Driver();
    d.connect('b1');
    d.establish({ last_seq: 12 });
    expect(d.model.lastSeq).toBe(12);
    d.send({ type: 'connect', botId: 'b1' }); // same bot, open: nothing happens
    expect(d.fx).toEqual([]);
    d.connect('b2');
    expect(d.of('open_transport')[0].afterSeq).toBeNull();
  });

  it('starts over without after_seq once when the server no longer has the resume point', () => {
    const d = new Driver();
    d.connect('b1', 40);
    d.close(4400, "after_seq 40 is beyond the conversation's last seq 3");
    expect(d.model.lastSeq).toBeNull();
    expect(d.timer('retry')?.ms).toBe(0);
    expect(d.of('record').map((r) => r.event)).toEqual(['resume_reset']);
    d.fire('retry');
    d.connect();
    expect(d.of('open_transport')[0].afterSeq).toBeNull();
    d.establish({ last_seq: 3 });
    d.close(4400, 'after_seq 3 is beyond');
    expect(d.model.state.kind).toBe('reconnecting'); // established again: the reset is available again
    d.fire('retry');
    d.connect();
    d.close(4400, 'after_seq 3 is beyond');
    expect(d.model.state).toMatchObject({ kind: 'failed', code: 4400 });

    // Once per connection even if a seq arrives again before connection_established.
    const e = new Driver();
    e.connect('b1', 40);
    e.close(4400, 'after_seq 40 is beyond');
    e.fire('retry');
    e.connect();
    e.frame({ type: 'message', message: wireMessage(3) });
    e.close(4400, 'after_seq 3 is beyond');
    expect(e.model.state).toMatchObject({ kind: 'failed', code: 4400 });
  });
});

describe('liveness', () => {
  it('re-arms the watchdog on every frame while open, and a silent one ends the connection', () => {
    const d = new Driver();
    d.connect();
    d.frame({ type: 'pong', id: 1, server_time: 'x' });
    expect(d.timer('watchdog')).toBeUndefined(); // not open yet
    d.establish({ heartbeat_interval_ms: 1000 });
    d.world.now += 700;
    d.frame({ type: 'pong', id: 1, server_time: 'x' });
    expect(d.timer('watchdog')?.ms).toBe(2000);
    expect(d.model.lastFrameAt).toBe(d.world.now);
    d.send((m) => ({ type: 'frame', gen: m.gen, frame: null })); // unreadable, but the link is alive
    expect(d.timer('watchdog')?.ms).toBe(2000);
    d.fire('watchdog');
    expect(d.model.state).toMatchObject({
      kind: 'reconnecting',
      lastClose: { code: 4001, name: 'heartbeat_lost', reason: 'no frame from the server for 2000 ms' },
    });
    expect(d.of('teardown')[0]).toMatchObject({ code: 4001 });
    // The next attempt is not watched until it is open, although the last connection is known.
    d.fire('retry');
    d.connect();
    d.frame({ type: 'pong', id: 2, server_time: 'x' });
    expect(d.timer('watchdog')).toBeUndefined();
  });

  it('pings on the ping timer, at the configured period when given', () => {
    const d = new Driver();
    d.config = { ...CONFIG, pingIntervalMs: 1234 };
    d.connect();
    d.establish();
    expect(d.timer('ping')).toMatchObject({ ms: 1234, repeat: true });
    expect(d.fire('ping')).toEqual([{ type: 'send_ping' }]);
  });

  it('shown again: retries at once keeping the attempt, checks an open connection, replaces a frozen one', () => {
    const d = new Driver();
    d.connect();
    d.close(1012);
    d.fire('retry');
    d.connect();
    d.close(1012);
    expect(d.model.state).toMatchObject({ kind: 'reconnecting', attempt: 2 });
    d.send({ type: 'visible' });
    expect(d.model.state).toEqual({ kind: 'checking', attempt: 2 });

    d.connect();
    d.establish({ heartbeat_interval_ms: 20_000 });
    d.send({ type: 'visible' });
    expect(d.of('liveness_ping')).toEqual([{ type: 'liveness_ping', gen: d.model.gen, timeoutMs: 5000 }]);
    d.send((m) => ({ type: 'liveness_failed', gen: m.gen }));
    expect(d.model.state).toMatchObject({ kind: 'reconnecting', lastClose: { code: 4003 } });

    d.fire('retry');
    d.connect();
    d.establish({ heartbeat_interval_ms: 20_000 });
    d.world.now += 20_001;
    d.send({ type: 'visible' });
    expect(d.of('liveness_ping')).toEqual([]);
    expect(d.model.state).toMatchObject({
      kind: 'reconnecting',
      lastClose: { code: 4003, reason: 'nothing heard for 20001 ms while the tab was hidden' },
    });
  });

  it('offline closes and waits; online starts over from attempt 0', () => {
    const d = new Driver();
    d.connect();
    d.establish();
    d.send({ type: 'offline' });
    expect(d.of('teardown')[0]).toMatchObject({ code: 4002 });
    expect(d.model.state).toMatchObject({ kind: 'offline', lastClose: { code: 4002, name: 'offline' } });
    d.send({ type: 'offline' });
    expect(d.model.state.kind).toBe('offline');
    d.send({ type: 'online' });
    expect(d.model.state).toEqual({ kind: 'checking', attempt: 0 });

    const idle = new Driver();
    idle.send({ type: 'offline' });
    expect(idle.fx).toEqual([]);
  });
});

describe('outbox and app calls', () => {
  it('resends after a rate limit once per hint, only while open, and forgets the resend on teardown', () => {
    const d = new Driver();
    d.connect();
    d.establish();
    d.send({ type: 'resend_later', ms: 200 });
    expect(d.timer('resend')?.ms).toBe(200);
    expect(d.send({ type: 'resend_later', ms: 900 })).toEqual([]);
    expect(d.fire('resend')).toEqual([{ type: 'flush_outbox', gen: d.model.gen, botId: 'b1' }]);
    d.send({ type: 'resend_later', ms: 300 });
    d.close(1012);
    expect(d.model.resendArmed).toBe(false);
  });

  it('disconnect tears down, rejects what waits and goes idle; connect after failed starts again', () => {
    const d = new Driver();
    d.connect();
    d.send({ type: 'disconnect' });
    expect(d.fx.map((f) => f.type)).toEqual(['record', 'teardown', 'reject_pending', 'state']);
    expect(d.model).toMatchObject({ state: { kind: 'idle' }, botId: null });
    expect(d.send({ type: 'retry_now' })).toEqual([]);

    d.connect();
    d.close(4404);
    d.send({ type: 'connect', botId: 'b1' });
    expect(d.model.state.kind).toBe('checking');
  });
});

describe('WebSocketTransport', () => {
  it('builds the chat URL, reports events, and closes with a code a browser accepts', () => {
    FakeWebSocket.reset();
    const t = new WebSocketTransport(
      { apiUrl: 'http://x', wsUrl: 'ws://x', botId: 'b 1', auth: { kind: 'ticket', value: 'T' }, afterSeq: 5, attemptId: 'a1' },
      FakeWebSocket as unknown as typeof WebSocket,
    );
    expect(t.url).toBe('ws://x/api/ws/chat/b%201?ticket=T&after_seq=5&attempt_id=a1');
    expect(t.isOpen).toBe(false);
    const seen: string[] = [];
    t.open({
      open: () => seen.push('open'),
      message: (m) => seen.push(`message ${m}`),
      error: () => seen.push('error'),
      close: (code, reason) => seen.push(`close ${code} ${reason}`),
    });
    const ws = FakeWebSocket.last;
    ws.open();
    expect(t.isOpen).toBe(true);
    ws.receive('hi');
    ws.serverClose(1006);
    expect(seen).toEqual(['open', 'message hi', 'error', 'close 1006 ']);

    const u = new WebSocketTransport(
      { apiUrl: 'http://x', wsUrl: 'ws://x', botId: 'b', auth: { kind: 'token', value: 'T' }, afterSeq: null, attemptId: 'a2' },
      FakeWebSocket as unknown as typeof WebSocket,
    );
    expect(u.url).toBe('ws://x/api/ws/chat/b?token=T&attempt_id=a2');
    const heard: string[] = [];
    u.open({ open: () => heard.push('open'), message: () => heard.push('m'), error: () => heard.push('e'), close: () => heard.push('c') });
    const ws2 = FakeWebSocket.last;
    ws2.open();
    u.close(1011, 'x'.repeat(200));
    expect(ws2.closedByClient).toEqual({ code: 1000, reason: 'x'.repeat(60) });
    ws2.serverClose(1000);
    expect(heard).toEqual(['open']); // nothing after close()
  });
});

describe('transport: auto switches to SSE when the WebSocket cannot connect', () => {
  function auto(mode: MachineConfig['transport'] | 'unset' = 'auto'): Driver {
    const d = new Driver();
    d.config = mode === 'unset' ? CONFIG : { ...CONFIG, transport: mode };
    d.connect();
    return d;
  }
  const transportOf = (d: Driver) => d.of('open_transport')[0]?.transport;
  function retryAndConnect(d: Driver): void {
    d.fire('retry');
    d.send((m) => ({ type: 'health', gen: m.gen, ok: true, network: false, status: 200, message: '' }));
    d.send((m) => ({ type: 'credential', gen: m.gen, credential: { kind: 'ticket', value: 'tkt' } }));
  }

  it('switches at once after a connect timeout, resuming after the last seq', () => {
    const d = auto();
    expect(transportOf(d)).toBe('websocket');
    d.model.lastSeq = 7;
    d.fire('connect');
    expect(d.of('record').map((r) => r.event)).toEqual(['connect_timeout', 'transport_switch']);
    expect(d.model.state).toMatchObject({ kind: 'reconnecting', retryAt: d.world.now });
    retryAndConnect(d);
    expect(d.of('open_transport')[0]).toMatchObject({ transport: 'sse', afterSeq: 7 });
    d.establish({ last_seq: 9 });
    expect(d.model.state).toMatchObject({ kind: 'open', transport: 'sse' });
    expect(d.of('flush_outbox')).toHaveLength(1);
    // Sticky: a later drop of the SSE stream does not go back to the WebSocket.
    d.close(1012);
    retryAndConnect(d);
    expect(transportOf(d)).toBe('sse');
  });

  it('switches after the second 1006 before connection_established when the preflight has nothing to say', () => {
    const d = auto();
    d.close(1006);
    expect(d.of('preflight')).toHaveLength(1);
    d.send((m) => ({ type: 'preflight', gen: m.gen, closeCode: null, reason: '', ok: false }));
    expect(d.model.transport).toBe('websocket');
    retryAndConnect(d);
    expect(transportOf(d)).toBe('websocket');
    d.close(1006);
    expect(d.of('preflight')).toEqual([]);
    expect(d.of('record').find((r) => r.event === 'transport_switch')?.data).toMatchObject({ why: '1006_twice' });
    retryAndConnect(d);
    expect(transportOf(d)).toBe('sse');
  });

  it('switches when the preflight is ok while the socket failed, and follows a refusing preflight instead', () => {
    const d = auto();
    d.close(1006);
    d.send((m) => ({ type: 'preflight', gen: m.gen, closeCode: null, reason: '', ok: true }));
    expect(d.model.transport).toBe('sse');
    expect(d.model.state).toMatchObject({ kind: 'reconnecting' });

    const r = auto();
    r.close(1006);
    r.send((m) => ({ type: 'preflight', gen: m.gen, closeCode: 4404, reason: 'no such bot', ok: false }));
    expect(r.model.transport).toBe('websocket');
    expect(r.model.state).toMatchObject({ kind: 'failed', code: 4404 });
  });

  it('keeps the WebSocket for drops after connection_established, an established one resets the count, and fixed modes never switch', () => {
    const d = auto();
    d.establish();
    d.close(1006);
    d.send((m) => ({ type: 'preflight', gen: m.gen, closeCode: null, reason: '', ok: true }));
    expect(d.model.transport).toBe('websocket');

    const e = auto();
    e.close(1006);
    e.send((m) => ({ type: 'preflight', gen: m.gen, closeCode: null, reason: '', ok: false }));
    retryAndConnect(e);
    e.establish();
    e.close(1012);
    retryAndConnect(e);
    e.close(1006);
    expect(e.of('preflight')).toHaveLength(1);
    expect(e.model.transport).toBe('websocket');

    for (const mode of ['websocket', 'unset'] as const) {
      const w = auto(mode);
      w.fire('connect');
      expect(w.model.transport).toBe('websocket');
    }
    const s = auto('sse');
    expect(transportOf(s)).toBe('sse');
    // A server that closes with the client's own connect-timeout code is not a timeout.
    const c = auto();
    c.close(4000, 'odd server');
    expect(c.model.transport).toBe('websocket');
  });

  it('over SSE an ack does not move the resume point past messages still on the stream', () => {
    const d = auto('sse');
    d.establish({ last_seq: 4 });
    d.frame({ type: 'ack', client_id: 'c1', message: wireMessage(6, { role: 'user', client_id: 'c1' }), duplicate: false });
    expect(d.of('deliver')).toHaveLength(1);
    d.frame({ type: 'message', message: wireMessage(5) });
    expect(d.of('deliver')).toHaveLength(1);
    d.frame({ type: 'message', message: wireMessage(6, { role: 'user', client_id: 'c1' }) });
    expect(d.of('deliver')).toHaveLength(1);
    expect(d.model.lastSeq).toBe(6);
    d.frame({ type: 'message', message: wireMessage(6, { role: 'user', client_id: 'c1' }) });
    expect(d.of('deliver')).toHaveLength(0);
  });
});

describe('transport: auto tries the WebSocket again in the background after switching to SSE', () => {
  /** auto, switched to SSE by a connect timeout, open over SSE after seq 9. */
  function onSse(config: Partial<MachineConfig> = {}): Driver {
    const d = new Driver();
    d.config = { ...CONFIG, transport: 'auto', ...config };
    d.connect();
    d.fire('connect');
    d.fire('retry');
    d.send((m) => ({ type: 'health', gen: m.gen, ok: true, network: false, status: 200, message: '' }));
    d.send((m) => ({ type: 'credential', gen: m.gen, credential: { kind: 'ticket', value: 'tkt' } }));
    expect(d.of('open_transport')[0].transport).toBe('sse');
    d.establish({ last_seq: 9 });
    return d;
  }
  const probeResult = (d: Driver, ok: boolean) => d.send((m) => ({ type: 'ws_probe', gen: m.gen, ok }));

  it('probes after wsRetryMs (default 5 minutes), doubling up to the cap while the probe fails', () => {
    const d = onSse();
    expect(d.timer('ws_probe')?.ms).toBe(300_000);
    const waits: number[] = [];
    for (let i = 0; i < 6; i++) {
      d.fire('ws_probe');
      expect(d.of('probe_websocket')).toEqual([{ type: 'probe_websocket', gen: d.model.gen, botId: 'b1' }]);
      probeResult(d, false);
      waits.push(d.timer('ws_probe')!.ms);
      expect(d.model.state).toMatchObject({ kind: 'open', transport: 'sse' });
    }
    expect(waits).toEqual([600_000, 1_200_000, 2_400_000, 3_600_000, 3_600_000, 3_600_000]);
    // A reconnect over SSE keeps the grown interval.
    d.close(1012);
    d.fire('retry');
    d.send((m) => ({ type: 'health', gen: m.gen, ok: true, network: false, status: 200, message: '' }));
    d.send((m) => ({ type: 'credential', gen: m.gen, credential: { kind: 'ticket', value: 'tkt' } }));
    d.establish({ last_seq: 9 });
    expect(d.timer('ws_probe')?.ms).toBe(3_600_000);
  });

  it('switches back to the WebSocket when a probe gets through: resumes after the last seq and resends the outbox', () => {
    const d = onSse({ wsRetryMs: 60_000 });
    expect(d.timer('ws_probe')?.ms).toBe(60_000);
    d.frame({ type: 'message', message: wireMessage(10) });
    d.fire('ws_probe');
    probeResult(d, true);
    expect(d.of('record').find((r) => r.event === 'transport_switch')?.data).toEqual({ from: 'sse', to: 'websocket', why: 'probe_ok' });
    expect(d.of('teardown')).toHaveLength(1);
    expect(d.model.transport).toBe('websocket');
    expect(d.model.transportWhy).toBeNull();
    d.send((m) => ({ type: 'health', gen: m.gen, ok: true, network: false, status: 200, message: '' }));
    d.send((m) => ({ type: 'credential', gen: m.gen, credential: { kind: 'ticket', value: 'tkt2' } }));
    expect(d.of('open_transport')[0]).toMatchObject({ transport: 'websocket', afterSeq: 10 });
    d.establish({ last_seq: 10 });
    expect(d.model.state).toMatchObject({ kind: 'open', transport: 'websocket' });
    expect(d.of('flush_outbox')).toHaveLength(1);
    // On the WebSocket there is nothing to probe for.
    expect(d.timer('ws_probe')).toBeUndefined();
  });

  it('ignores a probe answer from a torn-down attempt, and never probes in fixed modes or on a WebSocket that works', () => {
    const d = onSse();
    d.fire('ws_probe');
    const stale = d.model.gen;
    d.close(1012);
    d.send({ type: 'ws_probe', gen: stale, ok: true });
    expect(d.model.transport).toBe('sse');
    expect(d.fx).toEqual([]);

    const s = new Driver();
    s.config = { ...CONFIG, transport: 'sse' };
    s.connect();
    s.establish();
    expect(s.timer('ws_probe')).toBeUndefined();

    const w = new Driver();
    w.config = { ...CONFIG, transport: 'auto' };
    w.connect();
    w.establish();
    expect(w.timer('ws_probe')).toBeUndefined();
  });
});
