// The status bar speaks plain words: every close code in the registry (the server's, from
// docs/protocol-examples.json, and the client's own) is checked against the table below.
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { describeState } from '../src/app/status';
import type { CloseInfo, ConnectionState } from '../packages/client/src/chat-socket';
import { CLIENT_CLOSE, ClosePolicy } from '../packages/client/src/policy';
import { decodeCodeRegistry } from '../packages/client/src/protocol';

const here = dirname(fileURLToPath(import.meta.url));
const examples = JSON.parse(readFileSync(resolve(here, '../../docs/protocol-examples.json'), 'utf8'));
const registry = decodeCodeRegistry(examples.codes);

/** What a person reads in the status bar after each close, 4 s before the next try. */
const RECONNECTING: Record<number, string> = {
  1000: 'The connection was closed — reconnecting in 4 s',
  1002: 'The app and the server misunderstood each other — reconnecting in 4 s',
  1005: 'Connection lost — reconnecting in 4 s',
  1006: 'Connection lost — reconnecting in 4 s',
  1007: 'The app and the server misunderstood each other — reconnecting in 4 s',
  1008: "This site isn't allowed to connect to the server — reconnecting in 4 s",
  1009: 'A message was too large for the server — reconnecting in 4 s',
  1011: 'The server ran into a problem — reconnecting in 4 s',
  1012: 'The server is restarting — reconnecting in 4 s',
  1013: 'The server is busy — reconnecting in 4 s',
  4000: 'The server took too long to answer — reconnecting in 4 s',
  4001: 'The server stopped answering — reconnecting in 4 s',
  4002: "You're offline — reconnecting in 4 s",
  4003: 'The connection stopped answering — reconnecting in 4 s',
  4004: 'Reconnecting in 4 s',
  4400: "The server couldn't accept the connection request — reconnecting in 4 s",
  4401: 'Your session has expired — reconnecting in 4 s',
  4403: "You don't have access to this bot — reconnecting in 4 s",
  4404: "This bot doesn't exist — reconnecting in 4 s",
  4408: 'The server stopped hearing from this tab — reconnecting in 4 s',
  4409: 'This tab fell behind the conversation — reconnecting in 4 s',
  4429: 'Too many tabs are open — reconnecting in 4 s',
};

/** And after a close that ends the connection for good. */
const FAILED: Record<number, string> = {
  1000: 'The connection was closed',
  1002: 'The app and the server misunderstood each other',
  1007: 'The app and the server misunderstood each other',
  1008: "This site isn't allowed to connect to the server",
  1011: 'The server ran into a problem',
  4400: "The server couldn't accept the connection request",
  4401: 'Your session has expired',
  4403: "You don't have access to this bot",
  4404: "This bot doesn't exist",
};

const SNAKE = /\b[a-z]+_[a-z_]+\b/;
const CODE = /\b[14]\d{3}\b/;

function close(code: number): CloseInfo {
  return { code, name: new ClosePolicy(registry.close_codes).verdict(code).name, reason: `reason for ${code}`, at: 0 };
}

describe('status indicator text', () => {
  const now = 1_000_000;
  const everyCode = [...registry.close_codes.map((c) => c.code), 1005, 1006, ...Object.values(CLIENT_CLOSE)];

  it('has a row in the table for every close code in the registry', () => {
    for (const c of everyCode) expect(RECONNECTING, `close code ${c}`).toHaveProperty(String(c));
    for (const c of registry.close_codes.filter((c) => c.retry === 'stop'))
      expect(FAILED, `close code ${c.code}`).toHaveProperty(String(c.code));
  });

  it('says every close code in plain words, the code and its name one click away', () => {
    for (const code of everyCode) {
      const d = describeState({ kind: 'reconnecting', attempt: 3, retryAt: now + 3200, lastClose: close(code) }, now);
      expect(d.label, `close code ${code}`).toBe(RECONNECTING[code]);
      for (const shown of [d.label, d.detail ?? '']) {
        expect(shown, `close code ${code}`).not.toMatch(SNAKE);
        expect(shown, `close code ${code}`).not.toMatch(CODE);
      }
      expect(d.tech, `close code ${code}`).toContain(`${code} ${close(code).name}`);
      expect(d.tech).toContain(`reason for ${code}`);
      expect(d.tech).toContain('attempt 3');
    }
    for (const [code, words] of Object.entries(FAILED)) {
      const c = Number(code);
      const v = new ClosePolicy(registry.close_codes).verdict(c);
      const d = describeState({ kind: 'failed', code: c, reason: `token_expired: reason for ${c}`, advice: v.description }, now);
      expect(d.label, `close code ${c}`).toBe(words);
      expect(d.tone).toBe('bad');
      for (const shown of [d.label, d.detail ?? '']) {
        expect(shown, `close code ${c}`).not.toMatch(SNAKE);
        expect(shown, `close code ${c}`).not.toMatch(CODE);
      }
      expect(d.tech).toContain(`${c} ${v.name}`);
      expect(d.tech).toContain(v.description);
      expect(d.tech).toContain(`reason for ${c}`);
    }
  });

  it('names the other states', () => {
    expect(describeState({ kind: 'open', connectionId: 'c', since: now, heartbeatIntervalMs: 1 }, now)).toMatchObject({
      label: 'Connected',
      tone: 'ok',
    });
    expect(describeState({ kind: 'connecting', attempt: 0 }, now).label).toBe('Connecting…');
    expect(describeState({ kind: 'checking', attempt: 0 }, now).label).toBe('Connecting…');
    expect(describeState({ kind: 'offline', lastClose: null }, now).label).toBe("You're offline — waiting for the network");
    expect(describeState({ kind: 'idle' }, now).label).toBe('Not connected');
    expect(describeState({ kind: 'reconnecting', attempt: 1, retryAt: now - 1, lastClose: close(1006) }, now).label).toBe(
      'Connection lost — reconnecting…',
    );
    expect(describeState({ kind: 'reconnecting', attempt: 1, retryAt: now + 1500, lastClose: null }, now).label).toBe(
      'Reconnecting in 2 s',
    );
  });

  it("says Can't reach the server, never the browser's words", () => {
    const down: ConnectionState = {
      kind: 'backend_unavailable',
      attempt: 2,
      retryAt: now + 900,
      error: 'server unreachable (Failed to fetch)',
      status: 0,
    };
    const d = describeState(down, now);
    expect(d.label).toBe("Can't reach the server — retrying in 1 s");
    expect(`${d.label} ${d.detail ?? ''}`).not.toMatch(/fetch|NetworkError|ERR_/i);
    expect(d.tone).toBe('bad');
    expect(d.tech).toContain('Failed to fetch');
    expect(d.tech).toContain('attempt 2');
    const sick = describeState(
      { kind: 'backend_unavailable', attempt: 1, retryAt: now, error: 'health check answered 503: store: down', status: 503 },
      now,
    );
    expect(sick.label).toBe('The server is not ready — retrying…');
    expect(sick.tech).toContain('503');
  });

  it('while the tab is hidden, shows no error state: only a quiet reconnecting', () => {
    const down: ConnectionState = {
      kind: 'backend_unavailable',
      attempt: 4,
      retryAt: now + 9000,
      error: 'server unreachable (Failed to fetch)',
      status: 0,
    };
    const d = describeState(down, now, { hidden: true });
    expect(d.tone).toBe('warn');
    expect(d.label).toBe('Reconnecting…');
    const r = describeState({ kind: 'reconnecting', attempt: 4, retryAt: now + 9000, lastClose: close(1006) }, now, { hidden: true });
    expect(r).toMatchObject({ tone: 'warn', label: 'Reconnecting…' });
    // A failure that needs the person is still said.
    expect(describeState({ kind: 'failed', code: 4403, reason: 'x', advice: 'y' }, now, { hidden: true }).tone).toBe('bad');
  });
});
