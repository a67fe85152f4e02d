import { describe, expect, it } from 'vitest';
import { Outbox, OutboxFullError } from '../packages/client/src/outbox';
import { FlightRecorder } from '../packages/client/src/recorder';
import { redact } from '../packages/client/src/log';
import { MapStorage } from './fakes';

describe('flight recorder', () => {
  it('keeps the last N events, oldest first', () => {
    const r = new FlightRecorder(200);
    for (let i = 0; i < 450; i++) r.record('e', { i }, i);
    const ev = r.events();
    expect(ev).toHaveLength(200);
    expect(ev[0].i).toBe(250);
    expect(ev[199].i).toBe(449);
    expect(r.recorded).toBe(450);
    const json = JSON.parse(r.toJSON({ bot_id: 'b' }));
    expect(json.events).toHaveLength(200);
    expect(json.bot_id).toBe('b');
    expect(json.capacity).toBe(200);
  });
});

describe('outbox', () => {
  it('persists, bounds and removes', () => {
    const s = new MapStorage();
    const o = new Outbox(s, 'k', 2);
    o.add({ client_id: 'a', bot_id: 'b1', content: 'one' });
    o.add({ client_id: 'b', bot_id: 'b2', content: 'two' });
    expect(() => o.add({ client_id: 'c', bot_id: 'b1', content: 'three' })).toThrow(OutboxFullError);
    // A reload reads the same entries back.
    const again = new Outbox(s, 'k', 2);
    expect(again.all().map((e) => e.client_id)).toEqual(['a', 'b']);
    expect(again.forBot('b1').map((e) => e.content)).toEqual(['one']);
    again.markSent('a');
    expect(new Outbox(s, 'k').forBot('b1')[0].sends).toBe(1);
    expect(again.remove('a')?.content).toBe('one');
    expect(again.remove('a')).toBeUndefined();
    again.remove('b');
    expect(s.map.has('k')).toBe(false);
  });
  it('survives garbage in storage', () => {
    const s = new MapStorage();
    s.setItem('k', '{not json');
    expect(new Outbox(s, 'k').size).toBe(0);
    s.setItem('k', JSON.stringify([{ client_id: 1 }, { client_id: 'x', bot_id: 'b', content: 'ok' }]));
    expect(new Outbox(s, 'k').all().map((e) => e.client_id)).toEqual(['x']);
  });
});

describe('redact', () => {
  it('removes tokens, tickets and JWTs', () => {
    const jwt = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZw';
    const s = redact(`ws://h/api/ws/chat/b?ticket=SECRET1&after_seq=3 token=x?token=SECRET2 Bearer SECRET3 ${jwt}`);
    expect(s).not.toMatch(/SECRET|eyJzdWIi/);
    expect(s).toContain('after_seq=3');
  });
});
