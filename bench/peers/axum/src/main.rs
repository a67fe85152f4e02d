//! The natter chat workload on bare axum + tokio-tungstenite (axum's `ws` feature), 4 KiB read
//! and write buffers per socket: the "hardware's edge" reference for natter's `memory:` store.
//!
//! GET /api/ws/chat/{bot_id}?token=... : a JWT (HS256, shared secret in BENCH_JWT_SECRET) is
//! checked on connect exactly as bench/peers/node/server.js checks it (signature; `exp` and
//! `nbf` only when present, no leeway; no claim required), then `connection_established`; each
//! `message` gets an `ack` and the echoed bot reply as a `message` frame (the two written with
//! one flush), with per-connection sequence numbers kept in memory. No storage, no
//! idempotency, no resume: that is what natter does on top.
//!
//! Run: cargo build --release && BENCH_JWT_SECRET=... PORT=8103 target/release/natter-bench-peer-axum

use std::borrow::Cow;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use chrono::{SecondsFormat, Utc};
use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use uuid::Uuid;

/// tungstenite's read buffer and write-buffer target per socket.
const BUFFER_BYTES: usize = 4 * 1024;

#[derive(Clone)]
struct Auth {
    key: DecodingKey,
    validation: Validation,
}

impl Auth {
    /// `jwt.verify(token, SECRET, { algorithms: ['HS256'] })` of the `jsonwebtoken` npm package.
    fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        // Node rejects when now >= exp; the crate rejects when exp - this < now.
        validation.reject_tokens_expiring_in_less_than = 1;
        Self { key: DecodingKey::from_secret(secret.as_bytes()), validation }
    }
}

/// The claims the peer echoes in `connection_established` (as given, absent when absent).
#[derive(Deserialize, Serialize)]
struct User {
    #[serde(rename(serialize = "id"), skip_serializing_if = "Option::is_none")]
    sub: Option<Value>,
    #[serde(rename(serialize = "username"), skip_serializing_if = "Option::is_none")]
    name: Option<Value>,
}

#[derive(Deserialize)]
struct TokenQuery {
    #[serde(default)]
    token: String,
}

/// An incoming frame; `content` and `client_id` are echoed as they came (a JSON `null`
/// included, as Node does).
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    content: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    client_id: Option<&'a RawValue>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    id: Uuid,
    conversation_id: Uuid,
    seq: u64,
    role: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a RawValue>,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_reply_to: Option<Uuid>,
    status: &'static str,
}

impl<'a> ChatMessage<'a> {
    fn new(conversation_id: Uuid, seq: u64, role: &'static str, content: Option<&'a RawValue>) -> Self {
        let id = Uuid::new_v4();
        Self {
            id,
            conversation_id,
            seq,
            role,
            content,
            created_at: now(),
            client_id: None,
            in_reply_to: None,
            status: "complete",
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Out<'a> {
    ConnectionEstablished {
        connection_id: Uuid,
        protocol_version: u32,
        user: &'a User,
        bot: Bot<'a>,
        conversation_id: Uuid,
        last_seq: u64,
        heartbeat_interval_ms: u64,
        server_time: String,
    },
    Ack {
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a RawValue>,
        duplicate: bool,
        message: &'a ChatMessage<'a>,
    },
    Message {
        message: &'a ChatMessage<'a>,
    },
}

#[derive(Serialize)]
struct Bot<'a> {
    id: &'a str,
    name: &'static str,
}

impl Out<'_> {
    fn frame(&self) -> Message {
        Message::Text(serde_json::to_string(self).expect("serialising to a string cannot fail").into())
    }
}

/// `new Date().toISOString()`.
fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

async fn health() -> Response {
    ([(CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#).into_response()
}

async fn chat(
    State(auth): State<Auth>,
    Path(bot_id): Path<String>,
    Query(query): Query<TokenQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let user = jsonwebtoken::decode::<User>(&query.token, &auth.key, &auth.validation).map(|t| t.claims);
    ws.read_buffer_size(BUFFER_BYTES).write_buffer_size(BUFFER_BYTES).on_upgrade(move |socket| async move {
        match user {
            Ok(user) => session(socket, bot_id, user).await,
            Err(_) => refuse(socket).await,
        }
    })
}

/// `ws.close(4401, 'invalid token')`: the close frame, then the client's close, within Node
/// ws's 30 s closing timeout.
async fn refuse(mut socket: WebSocket) {
    let close = CloseFrame { code: 4401, reason: "invalid token".into() };
    if socket.send(Message::Close(Some(close))).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(30), async { while let Some(Ok(_)) = socket.recv().await {} })
            .await;
    }
}

async fn session(mut socket: WebSocket, bot_id: String, user: User) {
    let conversation_id = Uuid::new_v4();
    let mut seq = 0;
    let hello = Out::ConnectionEstablished {
        connection_id: Uuid::new_v4(),
        protocol_version: 1,
        user: &user,
        bot: Bot { id: &bot_id, name: "Echo" },
        conversation_id,
        last_seq: seq,
        heartbeat_interval_ms: 25_000,
        server_time: now(),
    };
    if socket.send(hello.frame()).await.is_err() {
        return;
    }
    while let Some(Ok(frame)) = socket.recv().await {
        let parsed = match &frame {
            Message::Text(t) => serde_json::from_str::<Incoming>(t.as_str()),
            Message::Binary(b) => serde_json::from_slice::<Incoming>(b),
            _ => continue,
        };
        let Ok(f) = parsed else { continue };
        if f.kind.as_deref() != Some("message") {
            continue;
        }
        seq += 1;
        let user_msg =
            ChatMessage { client_id: f.client_id, ..ChatMessage::new(conversation_id, seq, "user", f.content) };
        let ack = Out::Ack { client_id: f.client_id, duplicate: false, message: &user_msg }.frame();
        seq += 1;
        let bot_msg =
            ChatMessage { in_reply_to: Some(user_msg.id), ..ChatMessage::new(conversation_id, seq, "bot", f.content) };
        let reply = Out::Message { message: &bot_msg }.frame();
        // Both frames in the write buffer, then one flush.
        if socket.feed(ack).await.is_err() || socket.send(reply).await.is_err() {
            return;
        }
    }
}

#[tokio::main]
async fn main() {
    let secret = std::env::var("BENCH_JWT_SECRET").unwrap_or_else(|_| "bench-secret".into());
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8103);
    let app = Router::new()
        .route("/api/health", get(health))
        .route("/api/ws/chat/{bot_id}", get(chat))
        .with_state(Auth::new(&secret));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("binding the port");
    // Node's http server sets TCP_NODELAY on every socket, as natter does.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await.expect("serving");
}
