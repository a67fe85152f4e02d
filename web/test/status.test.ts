import { describe, expect, it } from 'vitest';
import { describeState } from '../src/app/status';

describe('status indicator text', () => {
  const now = 1_000_000;
  it('names every state as the seed does', () => {
    expect(describeState({ kind: 'open', connectionId: 'c', since: now, heartbeatIntervalMs: 1 }, now)).toMatchObject({ label: 'Connected', tone: 'ok' });
    expect(describeState({ kind: 'connecting', attempt: 0 }, now).label).toBe('Connecting…');
    expect(describeState({ kind: 'checking', attempt: 0 }, now).label).toBe('Connecting…');
    expect(describeState({ kind: 'offline', lastClose: null }, now).label).toBe('Offline');
    expect(describeState({ kind: 'idle' }, now).label).toBe('Not connected');
  });
  it('counts down a reconnect and says which attempt', () => {
    const d = describeState({ kind: 'reconnecting', attempt: 3, retryAt: now + 4200, lastClose: { code: 1012, name: 'server_restarting', reason: 'restarting', at: now } }, now);
    expect(d.label).toBe('Reconnecting in 5 s (attempt 3)');
    expect(d.detail).toBe('1012 server_restarting: restarting');
    expect(describeState({ kind: 'reconnecting', attempt: 1, retryAt: now - 1, lastClose: null }, now).label).toBe('Reconnecting… (attempt 1)');
  });
  it('explains failures and an unavailable server', () => {
    expect(describeState({ kind: 'failed', code: 4404, reason: 'no bot with id x', advice: 'Check the bot id.' }, now)).toMatchObject({ label: 'Failed: no bot with id x', detail: 'Check the bot id.', tone: 'bad' });
    const d = describeState({ kind: 'backend_unavailable', attempt: 2, retryAt: now + 900, error: 'server unreachable' }, now);
    expect(d.label).toBe('Server unavailable');
    expect(d.detail).toBe('server unreachable — retrying in 1 s (attempt 2)');
  });
});
