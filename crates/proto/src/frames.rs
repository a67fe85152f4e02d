//! WebSocket frames of chat protocol v1 (`docs/protocol.md`). Every frame is a JSON text
//! frame with a `type` field.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codes::ErrorCode;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MessageRole {
    User,
    Bot,
}

impl MessageRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageRole::User => "user",
            MessageRole::Bot => "bot",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(MessageRole::User),
            "bot" => Some(MessageRole::Bot),
            _ => None,
        }
    }
}

/// Whether a stored message is whole. Bot replies can end early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    #[default]
    Complete,
    /// The engine failed part-way; the content is what was generated before.
    Incomplete,
    /// The user cancelled the generation.
    Cancelled,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Complete => "complete",
            MessageStatus::Incomplete => "incomplete",
            MessageStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "complete" => Some(MessageStatus::Complete),
            "incomplete" => Some(MessageStatus::Incomplete),
            "cancelled" => Some(MessageStatus::Cancelled),
            _ => None,
        }
    }
}

/// A stored message, as frames and `GET /api/bots/{id}/messages` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WireMessage {
    pub id: Uuid,
    pub conversation_id: Uuid,
    /// Position in the conversation: 1, 2, 3, … with no gaps.
    pub seq: i64,
    pub role: MessageRole,
    pub content: String,
    pub created_at: DateTime<Utc>,
    /// The sender's idempotency key (user messages only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The user message a bot reply answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<Uuid>,
    #[serde(default)]
    pub status: MessageStatus,
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// A chat message. `client_id` makes the send idempotent.
    Message { client_id: String, content: String },
    /// App-level ping (browsers cannot send WebSocket pings). `id` is echoed back.
    Ping {
        #[serde(default)]
        id: serde_json::Value,
    },
    /// Stop a bot reply that is being generated.
    Cancel { message_id: Uuid },
}

/// Why a client frame was refused. Sent back as an `error` frame; the socket stays up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
}

const CLIENT_TYPES: &[&str] = &["message", "ping", "cancel"];

impl ClientFrame {
    /// Parses a text frame, naming the field at fault when it is not a valid frame.
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| FrameError {
            code: ErrorCode::InvalidJson,
            message: format!("frame is not valid JSON: {e}"),
        })?;
        let Some(obj) = value.as_object() else {
            return Err(FrameError {
                code: ErrorCode::InvalidFrame,
                message: "a frame must be a JSON object with a \"type\" field".into(),
            });
        };
        match obj.get("type") {
            None => return Err(FrameError { code: ErrorCode::InvalidFrame, message: "missing field `type`".into() }),
            Some(serde_json::Value::String(t)) if !CLIENT_TYPES.contains(&t.as_str()) => {
                return Err(FrameError {
                    code: ErrorCode::UnknownType,
                    message: format!("unknown frame type {t:?}; expected one of {}", CLIENT_TYPES.join(", ")),
                })
            }
            Some(serde_json::Value::String(_)) => {}
            Some(_) => {
                return Err(FrameError {
                    code: ErrorCode::InvalidFrame,
                    message: "field `type` must be a string".into(),
                })
            }
        }
        check_fields(obj)?;
        let frame: ClientFrame = serde_json::from_value(value)
            .map_err(|e| FrameError { code: ErrorCode::InvalidFrame, message: e.to_string() })?;
        if let ClientFrame::Ping { id } = &frame {
            // The id is echoed in the pong: unbounded, a slow reader's queue of pongs held
            // 256 × 64 KiB (issue 14).
            let len = match id {
                serde_json::Value::String(s) => s.chars().count(),
                other => other.to_string().chars().count(),
            };
            if len > MAX_PING_ID_CHARS {
                return Err(FrameError {
                    code: ErrorCode::InvalidFrame,
                    message: format!("field `id` must be at most {MAX_PING_ID_CHARS} characters, got {len}"),
                });
            }
        }
        Ok(frame)
    }
}

/// The longest `ping` id: a string of this many characters, or any other JSON value whose
/// text is this long.
pub const MAX_PING_ID_CHARS: usize = 64;

/// The fields of each client frame type and what each must be.
const CLIENT_FIELDS: &[(&str, &[(&str, FieldKind)])] = &[
    ("message", &[("client_id", FieldKind::String), ("content", FieldKind::String)]),
    ("ping", &[("id", FieldKind::Any)]),
    ("cancel", &[("message_id", FieldKind::Uuid)]),
];

#[derive(Clone, Copy)]
enum FieldKind {
    String,
    Uuid,
    Any,
}

/// Names the field at fault for every shape serde would refuse without naming it (its type
/// errors say "invalid type: integer `5`, expected a string" and no more): a missing or
/// unknown field, or a field of the wrong JSON type.
fn check_fields(obj: &serde_json::Map<String, serde_json::Value>) -> Result<(), FrameError> {
    let bad = |message: String| FrameError { code: ErrorCode::InvalidFrame, message };
    let t = obj.get("type").and_then(|t| t.as_str()).unwrap_or_default();
    let Some((_, fields)) = CLIENT_FIELDS.iter().find(|(name, _)| *name == t) else { return Ok(()) };
    for (field, kind) in fields.iter() {
        let v = match (obj.get(*field), kind) {
            (None, FieldKind::Any) => continue,
            (None, _) => return Err(bad(format!("missing field `{field}`"))),
            (Some(v), _) => v,
        };
        match kind {
            FieldKind::String if !v.is_string() => {
                return Err(bad(format!("field `{field}` must be a string, got {}", json_kind(v))))
            }
            FieldKind::Uuid if v.as_str().is_none_or(|s| Uuid::parse_str(s).is_err()) => {
                return Err(bad(format!("field `{field}` must be a UUID string")))
            }
            _ => {}
        }
    }
    if let Some(unknown) = obj.keys().find(|k| *k != "type" && !fields.iter().any(|(f, _)| f == k)) {
        let expected: Vec<&str> = fields.iter().map(|(f, _)| *f).collect();
        let shown: String = unknown.chars().take(64).collect();
        return Err(bad(format!("unknown field `{shown}` in a {t} frame; expected {}", expected.join(", "))));
    }
    Ok(())
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Limits of this connection, reported in `connection_established`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_content_chars: usize,
    pub max_connections_per_user: usize,
    pub messages_per_second: u32,
    pub message_burst: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserRef {
    pub id: Uuid,
    pub username: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BotRef {
    pub id: Uuid,
    pub name: String,
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame of every accepted connection.
    ConnectionEstablished {
        connection_id: Uuid,
        protocol_version: u32,
        user: UserRef,
        bot: BotRef,
        conversation_id: Uuid,
        last_seq: i64,
        heartbeat_interval_ms: u64,
        server_time: DateTime<Utc>,
        limits: Limits,
    },
    /// The client's message is stored. Sent again, identical, for a resent `client_id`.
    Ack {
        client_id: String,
        message: WireMessage,
        /// True when this `client_id` was already stored and nothing new happened.
        duplicate: bool,
    },
    /// A stored message of the conversation (a bot reply, another tab's message, a replay).
    Message { message: WireMessage },
    /// A piece of a bot reply being generated. The final `message` frame with the same id
    /// carries the whole content.
    MessageDelta { message_id: Uuid, in_reply_to: Uuid, delta: String },
    /// Answer to a client `ping`.
    Pong { id: serde_json::Value, server_time: DateTime<Utc> },
    /// Something the client sent could not be done; the connection stays up.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_reply_to: Option<Uuid>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl ServerFrame {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error { code, message: message.into(), client_id: None, in_reply_to: None, retry_after_ms: None }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

// ErrorCode is deserialized by Rust clients (tests, doctor, bench).
impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ErrorCode::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown error code {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_client_frame() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"message","client_id":"a1","content":"hi"}"#).unwrap(),
            ClientFrame::Message { client_id: "a1".into(), content: "hi".into() }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ping","id":7}"#).unwrap(),
            ClientFrame::Ping { id: serde_json::json!(7) }
        );
        assert!(matches!(
            ClientFrame::parse(r#"{"type":"cancel","message_id":"6f1c1b8e-5c1a-4d0b-9a0e-2f7f0d4c1a11"}"#),
            Ok(ClientFrame::Cancel { .. })
        ));
    }

    #[test]
    fn names_the_fault() {
        let e = ClientFrame::parse("{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        let e = ClientFrame::parse(r#"{"type":"shout"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownType);
        assert!(e.message.contains("shout"));
        let e = ClientFrame::parse(r#"{"type":"message","content":"x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidFrame);
        assert!(e.message.contains("client_id"), "{}", e.message);
        let e = ClientFrame::parse(r#"{"type":"message","client_id":5,"content":"x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidFrame);
        assert_eq!(e.message, "field `client_id` must be a string, got a number");
        let e = ClientFrame::parse(r#"{"type":"cancel","message_id":"nope"}"#).unwrap_err();
        assert_eq!(e.message, "field `message_id` must be a UUID string");
        let e = ClientFrame::parse(r#"{"type":"ping","id":1,"extra":true}"#).unwrap_err();
        assert_eq!(e.message, "unknown field `extra` in a ping frame; expected id");
        let e = ClientFrame::parse(r#"{"client_id":"a"}"#).unwrap_err();
        assert!(e.message.contains("type"));
        let e = ClientFrame::parse("[1]").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidFrame);
    }

    #[test]
    fn ping_ids_are_bounded() {
        let ok = format!(r#"{{"type":"ping","id":"{}"}}"#, "é".repeat(MAX_PING_ID_CHARS));
        assert!(ClientFrame::parse(&ok).is_ok());
        for long in [
            format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(MAX_PING_ID_CHARS + 1)),
            format!(r#"{{"type":"ping","id":[{}1]}}"#, "1,".repeat(40)),
            format!(r#"{{"type":"ping","id":{{"a":"{}"}}}}"#, "x".repeat(70)),
        ] {
            let e = ClientFrame::parse(&long).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidFrame);
            assert!(e.message.contains("field `id`") && e.message.contains("64"), "{}", e.message);
        }
        assert!(ClientFrame::parse(r#"{"type":"ping"}"#).is_ok(), "the id is optional");
    }

    #[test]
    fn server_frames_are_tagged() {
        let f = ServerFrame::error(ErrorCode::RateLimited, "slow down");
        let v: serde_json::Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "rate_limited");
        assert!(v.get("client_id").is_none());
        let back: ServerFrame = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);
    }
}

/// One example of every frame, client and server, as JSON. `docs/protocol-examples.json` is
/// this list; a test keeps the file in step, and the TypeScript client's tests decode it.
pub fn examples() -> serde_json::Value {
    use chrono::TimeZone;
    let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
    let conv = Uuid::from_u128(0x0c0c);
    let user_msg = WireMessage {
        id: Uuid::from_u128(0x1111),
        conversation_id: conv,
        seq: 7,
        role: MessageRole::User,
        content: "hello".into(),
        created_at: t,
        client_id: Some("c-42".into()),
        in_reply_to: None,
        status: MessageStatus::Complete,
    };
    let bot_msg = WireMessage {
        id: Uuid::from_u128(0x2222),
        seq: 8,
        role: MessageRole::Bot,
        client_id: None,
        in_reply_to: Some(user_msg.id),
        ..user_msg.clone()
    };
    let client = [
        ClientFrame::Message { client_id: "c-42".into(), content: "hello".into() },
        ClientFrame::Ping { id: serde_json::json!(1) },
        ClientFrame::Cancel { message_id: bot_msg.id },
    ];
    let server = [
        ServerFrame::ConnectionEstablished {
            connection_id: Uuid::from_u128(0xc0),
            protocol_version: crate::PROTOCOL_VERSION,
            user: UserRef { id: Uuid::from_u128(0xa), username: "alice".into() },
            bot: BotRef { id: Uuid::from_u128(0xb), name: "Echo".into() },
            conversation_id: conv,
            last_seq: 6,
            heartbeat_interval_ms: 25_000,
            server_time: t,
            limits: Limits {
                max_frame_bytes: 65_536,
                max_content_chars: 16_384,
                max_connections_per_user: 20,
                messages_per_second: 5,
                message_burst: 20,
            },
        },
        ServerFrame::Ack { client_id: "c-42".into(), message: user_msg.clone(), duplicate: false },
        ServerFrame::MessageDelta { message_id: bot_msg.id, in_reply_to: user_msg.id, delta: "hel".into() },
        ServerFrame::Message { message: bot_msg },
        ServerFrame::Pong { id: serde_json::json!(1), server_time: t },
        ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "too many messages; wait 180 ms before sending again".into(),
            client_id: Some("c-43".into()),
            in_reply_to: None,
            retry_after_ms: Some(180),
        },
    ];
    serde_json::json!({
        "protocol_version": crate::PROTOCOL_VERSION,
        "client": client.iter().map(|f| serde_json::to_value(f).unwrap()).collect::<Vec<_>>(),
        "server": server.iter().map(|f| serde_json::to_value(f).unwrap()).collect::<Vec<_>>(),
        "codes": serde_json::to_value(crate::codes::CodeRegistry::build()).unwrap(),
    })
}

#[cfg(test)]
mod examples_file {
    /// `docs/protocol-examples.json` must equal [`super::examples`]. Run with
    /// `NATTER_BLESS=1` to rewrite it after a protocol change.
    #[test]
    fn examples_file_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol-examples.json");
        let want = serde_json::to_string_pretty(&super::examples()).unwrap() + "\n";
        if std::env::var_os("NATTER_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(have == want, "docs/protocol-examples.json is stale: run NATTER_BLESS=1 cargo test -p natter-proto");
    }

    #[test]
    fn every_example_round_trips() {
        let ex = super::examples();
        for f in ex["client"].as_array().unwrap() {
            let parsed = super::ClientFrame::parse(&f.to_string()).unwrap();
            assert_eq!(serde_json::to_value(parsed).unwrap(), *f);
        }
        for f in ex["server"].as_array().unwrap() {
            let parsed: super::ServerFrame = serde_json::from_value(f.clone()).unwrap();
            assert_eq!(serde_json::to_value(parsed).unwrap(), *f);
        }
    }
}
