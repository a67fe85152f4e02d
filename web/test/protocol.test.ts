// The TypeScript wire types against the Rust ones: docs/protocol-examples.json is generated
// from crates/proto, so a change there that this client does not follow fails here.
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { DEFAULT_CLOSE_CODES } from '../packages/client/src/policy';
import {
  decodeCodeRegistry,
  decodeServerFrame,
  encodeClientFrame,
  parseServerFrame,
  PROTOCOL_VERSION,
  ProtocolError,
  RETRY_POLICIES,
} from '../packages/client/src/protocol';

const here = dirname(fileURLToPath(import.meta.url));
const examples = JSON.parse(readFileSync(resolve(here, '../../docs/protocol-examples.json'), 'utf8'));

describe('docs/protocol-examples.json', () => {
  it('speaks the same protocol version', () => {
    expect(examples.protocol_version).toBe(PROTOCOL_VERSION);
  });

  it('decodes every server frame, losing no field', () => {
    const types = new Set<string>();
    for (const frame of examples.server) {
      const decoded = decodeServerFrame(frame);
      types.add(decoded.type);
      // Round trip: what the decoder keeps is exactly what the server sent.
      expect(JSON.parse(JSON.stringify(decoded))).toEqual(frame);
    }
    // Every frame type the client handles has an example (and vice versa).
    expect([...types].sort()).toEqual(['ack', 'connection_established', 'error', 'message', 'message_delta', 'pong']);
  });

  it('encodes client frames as the server expects them', () => {
    for (const frame of examples.client) {
      expect(JSON.parse(encodeClientFrame(frame))).toEqual(frame);
    }
    expect(examples.client.map((f: { type: string }) => f.type).sort()).toEqual(['cancel', 'message', 'ping']);
  });

  it('reads the code registry, and the built-in copy matches it', () => {
    const reg = decodeCodeRegistry(examples.codes);
    expect(reg.close_codes.length).toBeGreaterThan(5);
    for (const c of reg.close_codes) expect(RETRY_POLICIES).toContain(c.retry);
    const server = Object.fromEntries(reg.close_codes.map((c) => [c.code, c.retry]));
    const builtin = Object.fromEntries(DEFAULT_CLOSE_CODES.map((c) => [c.code, c.retry]));
    expect(builtin).toEqual(server);
    // The codes the issue names, with the policies it names.
    expect(server[4401]).toBe('reauth_once');
    for (const c of [4400, 4403, 4404, 1008]) expect(server[c]).toBe('stop');
    for (const c of [1011, 1012, 4408]) expect(server[c]).toBe('backoff');
    expect(server[1013]).toBe('after_hint');
    // Error codes the client acts on exist in the registry.
    const errors = reg.error_codes.map((e) => e.code);
    for (const c of [
      'rate_limited',
      'bot_busy',
      'token_expired',
      'invalid_token',
      'missing_token',
      'refresh_token_reused',
      'content_too_long',
    ]) {
      expect(errors).toContain(c);
    }
  });
});

describe('decoder', () => {
  it('names the field at fault', () => {
    const ack = examples.server.find((f: { type: string }) => f.type === 'ack');
    const bad = { ...ack, message: { ...ack.message, seq: 'seven' } };
    expect(() => decodeServerFrame(bad)).toThrow(ProtocolError);
    expect(() => decodeServerFrame(bad)).toThrow(/ack\.message\.seq/);
    expect(() => decodeServerFrame({ type: 'message', message: { ...ack.message, role: 'wizard' } })).toThrow(/role/);
    expect(() => parseServerFrame('{nope')).toThrow(/JSON/);
    expect(() => decodeServerFrame({ type: 'telepathy' })).toThrow(/unknown frame type/);
    expect(() => decodeServerFrame([1])).toThrow(/object/);
  });
});
