import { describe, expect, it } from 'vitest';
import { CLIENT_CLOSE, ClosePolicy, fullJitterDelay, parseRetryHint } from '../packages/client/src/policy';

describe('full-jitter backoff', () => {
  it('grows from base 500 ms and caps at 30 s', () => {
    const top = () => 0.999999;
    expect(fullJitterDelay(0, undefined, top)).toBe(499);
    expect(fullJitterDelay(1, undefined, top)).toBe(999);
    expect(fullJitterDelay(5, undefined, top)).toBe(15_999);
    expect(fullJitterDelay(6, undefined, top)).toBe(29_999);
    expect(fullJitterDelay(60, undefined, top)).toBe(29_999);
    expect(fullJitterDelay(3, undefined, () => 0)).toBe(0);
  });

  it('spreads delays over the whole window', () => {
    let seed = 42;
    const rnd = () => {
      seed = (seed * 16807) % 2147483647;
      return seed / 2147483647;
    };
    const d = Array.from({ length: 2000 }, () => fullJitterDelay(4, undefined, rnd)); // window 8 s
    expect(Math.min(...d)).toBeLessThan(400);
    expect(Math.max(...d)).toBeGreaterThan(7600);
    const mean = d.reduce((a, b) => a + b, 0) / d.length;
    expect(mean).toBeGreaterThan(3600);
    expect(mean).toBeLessThan(4400);
  });
});

describe('close policy', () => {
  const p = new ClosePolicy();
  it('follows the registry', () => {
    expect(p.verdict(4404)).toMatchObject({ retry: 'stop', name: 'bot_not_found' });
    expect(p.verdict(4401).retry).toBe('reauth_once');
    expect(p.verdict(1013).retry).toBe('after_hint');
    expect(p.verdict(1012).retry).toBe('backoff');
  });
  it('backs off on closes the server never sends', () => {
    expect(p.verdict(1006)).toMatchObject({ retry: 'backoff', name: 'abnormal_closure' });
    expect(p.verdict(CLIENT_CLOSE.CONNECT_TIMEOUT)).toMatchObject({ retry: 'backoff', name: 'connect_timeout' });
    expect(p.verdict(4999)).toMatchObject({ retry: 'backoff', name: 'unknown' });
  });
  it('takes a server registry over the built-in one', () => {
    const q = new ClosePolicy();
    q.loadRegistry({ close_codes: [{ code: 4404, name: 'gone', retry: 'backoff', description: 'x' }], error_codes: [] });
    expect(q.fromServer).toBe(true);
    expect(q.verdict(4404)).toMatchObject({ retry: 'backoff', name: 'gone' });
  });
  it('reads the 1013 hint', () => {
    expect(parseRetryHint('message bus unavailable; retry_after_ms=5000')).toBe(5000);
    expect(parseRetryHint('busy')).toBeNull();
  });
});
