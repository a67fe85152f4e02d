/**
 * Wire types of natter chat protocol v1, mirrored from `crates/proto` (frames.rs, codes.rs,
 * api.rs). They are not trusted blindly: `decodeServerFrame` checks every field, and a test
 * runs every example in `docs/protocol-examples.json` (generated from the Rust types) through
 * it, so a Rust change that breaks this client fails the web tests.
 */

export const PROTOCOL_VERSION = 1;

export type MessageRole = 'user' | 'bot';
export type MessageStatus = 'complete' | 'incomplete' | 'cancelled';

/** A stored message, as frames and `GET /api/bots/{id}/messages` show it. */
export interface WireMessage {
  id: string;
  conversation_id: string;
  /** Position in the conversation: 1, 2, 3, … with no gaps. */
  seq: number;
  role: MessageRole;
  content: string;
  created_at: string;
  client_id?: string;
  in_reply_to?: string;
  status: MessageStatus;
}

export interface Limits {
  max_frame_bytes: number;
  max_content_chars: number;
  max_connections_per_user: number;
  messages_per_second: number;
  message_burst: number;
}

export interface UserRef {
  id: string;
  username: string;
}
export interface BotRef {
  id: string;
  name: string;
}

export interface ConnectionEstablishedFrame {
  type: 'connection_established';
  connection_id: string;
  protocol_version: number;
  user: UserRef;
  bot: BotRef;
  conversation_id: string;
  last_seq: number;
  heartbeat_interval_ms: number;
  server_time: string;
  limits: Limits;
}
export interface AckFrame {
  type: 'ack';
  client_id: string;
  message: WireMessage;
  duplicate: boolean;
}
export interface MessageFrame {
  type: 'message';
  message: WireMessage;
}
export interface MessageDeltaFrame {
  type: 'message_delta';
  message_id: string;
  in_reply_to: string;
  delta: string;
}
export interface PongFrame {
  type: 'pong';
  id: unknown;
  server_time: string;
}
export interface ErrorFrame {
  type: 'error';
  code: string;
  message: string;
  client_id?: string;
  in_reply_to?: string;
  retry_after_ms?: number;
}

export type ServerFrame = ConnectionEstablishedFrame | AckFrame | MessageFrame | MessageDeltaFrame | PongFrame | ErrorFrame;

export type ClientFrame =
  | { type: 'message'; client_id: string; content: string }
  | { type: 'ping'; id: unknown }
  | { type: 'cancel'; message_id: string };

export type RetryPolicy = 'stop' | 'reauth_once' | 'backoff' | 'after_hint';
export const RETRY_POLICIES: readonly RetryPolicy[] = ['stop', 'reauth_once', 'backoff', 'after_hint'];

export interface CloseCodeInfo {
  code: number;
  name: string;
  retry: RetryPolicy;
  description: string;
}
export interface ErrorCodeInfo {
  code: string;
  description: string;
}
/** The body of `GET /api/ws/codes`. */
export interface CodeRegistry {
  close_codes: CloseCodeInfo[];
  error_codes: ErrorCodeInfo[];
}

/** The REST error body: `{"error": {"code", "message"}}`. */
export interface ApiErrorBody {
  error: { code: string; message: string };
}

export interface TokenPair {
  access_token: string;
  refresh_token: string;
  token_type: string;
  expires_in: number;
}
export interface UserView {
  id: string;
  username: string;
  is_admin: boolean;
  created_at: string;
}
export type Visibility = 'private' | 'public';
export type BotRole = 'public' | 'chat' | 'admin' | 'owner';
export type MemberRole = 'chat' | 'admin';
export interface BotView {
  id: string;
  name: string;
  description: string;
  visibility: Visibility;
  /** Settings without secrets for the owner and admins (`my_role`); only `{kind}` for others. */
  engine: Record<string, unknown>;
  owner: UserRef;
  my_role: BotRole;
  created_at: string;
  updated_at: string;
}
export interface MemberView {
  user: UserRef;
  role: MemberRole;
}
export interface MessagesPage {
  messages: WireMessage[];
  last_seq: number;
  has_more: boolean;
}
export interface TicketResponse {
  ticket: string;
  expires_in: number;
}
export interface Preflight {
  ok: boolean;
  close_code: number | null;
  reason: string | null;
}

/** Thrown by the decoder; `path` names the field at fault. */
export class ProtocolError extends Error {
  constructor(
    message: string,
    readonly path: string,
  ) {
    super(`${path}: ${message}`);
    this.name = 'ProtocolError';
  }
}

type Obj = Record<string, unknown>;

function obj(v: unknown, path: string): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ProtocolError('expected an object', path);
  return v as Obj;
}
function str(o: Obj, k: string, path: string): string {
  const v = o[k];
  if (typeof v !== 'string') throw new ProtocolError('expected a string', `${path}.${k}`);
  return v;
}
function optStr(o: Obj, k: string, path: string): string | undefined {
  return o[k] === undefined || o[k] === null ? undefined : str(o, k, path);
}
function int(o: Obj, k: string, path: string): number {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isInteger(v)) throw new ProtocolError('expected an integer', `${path}.${k}`);
  return v;
}
function bool(o: Obj, k: string, path: string): boolean {
  const v = o[k];
  if (typeof v !== 'boolean') throw new ProtocolError('expected a boolean', `${path}.${k}`);
  return v;
}
function oneOf<T extends string>(o: Obj, k: string, allowed: readonly T[], path: string): T {
  const v = str(o, k, path);
  if (!(allowed as readonly string[]).includes(v)) {
    throw new ProtocolError(`expected one of ${allowed.join(', ')}, got ${JSON.stringify(v)}`, `${path}.${k}`);
  }
  return v as T;
}

export function decodeWireMessage(v: unknown, path = 'message'): WireMessage {
  const o = obj(v, path);
  const m: WireMessage = {
    id: str(o, 'id', path),
    conversation_id: str(o, 'conversation_id', path),
    seq: int(o, 'seq', path),
    role: oneOf(o, 'role', ['user', 'bot'] as const, path),
    content: str(o, 'content', path),
    created_at: str(o, 'created_at', path),
    status: o.status === undefined ? 'complete' : oneOf(o, 'status', ['complete', 'incomplete', 'cancelled'] as const, path),
  };
  const cid = optStr(o, 'client_id', path);
  if (cid !== undefined) m.client_id = cid;
  const irt = optStr(o, 'in_reply_to', path);
  if (irt !== undefined) m.in_reply_to = irt;
  return m;
}

function decodeRef(v: unknown, path: string, nameKey: 'username' | 'name'): Obj {
  const o = obj(v, path);
  str(o, 'id', path);
  str(o, nameKey, path);
  return o;
}

/**
 * Checks a parsed server frame field by field and returns it typed. Unknown frame types
 * throw: the caller logs and ignores them, so a newer server does not break an older client.
 */
export function decodeServerFrame(v: unknown): ServerFrame {
  const o = obj(v, 'frame');
  const type = str(o, 'type', 'frame');
  const p = type;
  switch (type) {
    case 'connection_established': {
      const limits = obj(o.limits, `${p}.limits`);
      for (const k of ['max_frame_bytes', 'max_content_chars', 'max_connections_per_user', 'messages_per_second', 'message_burst']) {
        int(limits, k, `${p}.limits`);
      }
      return {
        type,
        connection_id: str(o, 'connection_id', p),
        protocol_version: int(o, 'protocol_version', p),
        user: decodeRef(o.user, `${p}.user`, 'username') as unknown as UserRef,
        bot: decodeRef(o.bot, `${p}.bot`, 'name') as unknown as BotRef,
        conversation_id: str(o, 'conversation_id', p),
        last_seq: int(o, 'last_seq', p),
        heartbeat_interval_ms: int(o, 'heartbeat_interval_ms', p),
        server_time: str(o, 'server_time', p),
        limits: limits as unknown as Limits,
      };
    }
    case 'ack':
      return {
        type,
        client_id: str(o, 'client_id', p),
        message: decodeWireMessage(o.message, `${p}.message`),
        duplicate: bool(o, 'duplicate', p),
      };
    case 'message':
      return { type, message: decodeWireMessage(o.message, `${p}.message`) };
    case 'message_delta':
      return {
        type,
        message_id: str(o, 'message_id', p),
        in_reply_to: str(o, 'in_reply_to', p),
        delta: str(o, 'delta', p),
      };
    case 'pong':
      if (!('id' in o)) throw new ProtocolError('missing', `${p}.id`);
      return { type, id: o.id, server_time: str(o, 'server_time', p) };
    case 'error': {
      const f: ErrorFrame = { type, code: str(o, 'code', p), message: str(o, 'message', p) };
      const cid = optStr(o, 'client_id', p);
      if (cid !== undefined) f.client_id = cid;
      const irt = optStr(o, 'in_reply_to', p);
      if (irt !== undefined) f.in_reply_to = irt;
      if (o.retry_after_ms !== undefined && o.retry_after_ms !== null) f.retry_after_ms = int(o, 'retry_after_ms', p);
      return f;
    }
    default:
      throw new ProtocolError(`unknown frame type ${JSON.stringify(type)}`, 'frame.type');
  }
}

/** Parses a text frame from the socket. */
export function parseServerFrame(text: string): ServerFrame {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw new ProtocolError('not valid JSON', 'frame');
  }
  return decodeServerFrame(v);
}

export function decodeCodeRegistry(v: unknown): CodeRegistry {
  const o = obj(v, 'codes');
  if (!Array.isArray(o.close_codes) || !Array.isArray(o.error_codes)) {
    throw new ProtocolError('expected close_codes and error_codes arrays', 'codes');
  }
  const close_codes = o.close_codes.map((c, i) => {
    const p = `codes.close_codes[${i}]`;
    const r = obj(c, p);
    return {
      code: int(r, 'code', p),
      name: str(r, 'name', p),
      retry: oneOf(r, 'retry', RETRY_POLICIES, p),
      description: str(r, 'description', p),
    };
  });
  const error_codes = o.error_codes.map((c, i) => {
    const p = `codes.error_codes[${i}]`;
    const r = obj(c, p);
    return { code: str(r, 'code', p), description: str(r, 'description', p) };
  });
  return { close_codes, error_codes };
}

/** Encodes a client frame. */
export function encodeClientFrame(f: ClientFrame): string {
  return JSON.stringify(f);
}
