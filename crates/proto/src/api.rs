//! Bodies of the REST API (`/api/...`). The OpenAPI document at `/api/openapi.json` is
//! generated from these types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::frames::{BotRef, UserRef, WireMessage};

/// Every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    pub fn new(code: crate::ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody { error: ErrorDetail { code: code.as_str().to_owned(), message: message.into() } }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// A stable snake_case code from `GET /api/ws/codes` (`error_codes`).
    pub code: String,
    /// A human sentence.
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    pub status: String,
    pub version: String,
    /// This process's id (random at start, also its lease id): tells which node or process
    /// answered, e.g. whether the new process of a hand-over restart is serving yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<Uuid>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Ready {
    /// `ok` or `unavailable`.
    pub status: String,
    /// What failed, when something did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    /// Always `bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

impl std::fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenPair { <redacted> }")
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RefreshRequest {
    pub refresh_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserView {
    pub id: Uuid,
    pub username: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    #[default]
    Private,
    Public,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Private => "private",
            Visibility::Public => "public",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "private" => Some(Visibility::Private),
            "public" => Some(Visibility::Public),
            _ => None,
        }
    }
}

/// A user's relation to a bot, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BotRole {
    /// Anyone, on a public bot: may chat.
    Public,
    /// A member who may chat.
    Chat,
    /// A member who may also edit the bot and manage members.
    Admin,
    /// The creator: everything, including delete.
    Owner,
}

impl BotRole {
    pub fn as_str(self) -> &'static str {
        match self {
            BotRole::Public => "public",
            BotRole::Chat => "chat",
            BotRole::Admin => "admin",
            BotRole::Owner => "owner",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "public" => Some(BotRole::Public),
            "chat" => Some(BotRole::Chat),
            "admin" => Some(BotRole::Admin),
            "owner" => Some(BotRole::Owner),
            _ => None,
        }
    }
}

/// A member's role, as `POST /api/bots/{id}/members` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    Chat,
    Admin,
}

impl From<MemberRole> for BotRole {
    fn from(r: MemberRole) -> BotRole {
        match r {
            MemberRole::Chat => BotRole::Chat,
            MemberRole::Admin => BotRole::Admin,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BotView {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub visibility: Visibility,
    /// The engine settings, with secrets (api keys, webhook secrets) left out — for the owner
    /// and the bot's admins. Anyone else (chat members, any user on a public bot) gets only
    /// `{"kind": "…"}`.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub engine: serde_json::Value,
    pub owner: UserRef,
    /// The caller's relation to this bot.
    pub my_role: BotRole,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateBot {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Defaults to `private`.
    #[serde(default)]
    pub visibility: Option<Visibility>,
    /// `{"kind": "echo"}` when left out.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub engine: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateBot {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub visibility: Option<Visibility>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub engine: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    pub username: String,
    pub role: MemberRole,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MemberView {
    pub user: UserRef,
    pub role: MemberRole,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessagesPage {
    /// In seq order.
    pub messages: Vec<WireMessage>,
    /// The conversation's last seq (0 when it has no messages yet).
    pub last_seq: i64,
    /// Whether more messages lie beyond this page in the direction asked for.
    pub has_more: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    pub bot_id: Uuid,
}

#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TicketResponse {
    pub ticket: String,
    /// Seconds until the ticket expires.
    pub expires_in: u64,
}

impl std::fmt::Debug for TicketResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketResponse { <redacted> }")
    }
}

/// `GET /api/ws/preflight/{bot_id}`: what the socket would do with these credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Preflight {
    pub ok: bool,
    pub close_code: Option<u16>,
    pub reason: Option<String>,
}

/// How a chat connection travels: a WebSocket, or Server-Sent Events down and HTTP POST up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    #[default]
    Websocket,
    Sse,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Websocket => "websocket",
            TransportKind::Sse => "sse",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "websocket" => Some(TransportKind::Websocket),
            "sse" => Some(TransportKind::Sse),
            _ => None,
        }
    }
}

/// Who ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ClosedBy {
    Client,
    Server,
    /// The connection broke without a close frame.
    Network,
}

impl ClosedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Server => "server",
            ClosedBy::Network => "network",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "client" => Some(ClosedBy::Client),
            "server" => Some(ClosedBy::Server),
            "network" => Some(ClosedBy::Network),
            _ => None,
        }
    }
}

/// One WebSocket attempt in the connection ledger (`GET /api/connections`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConnectionRecord {
    /// The client's `?attempt_id=`, or the connection id when it gave none.
    pub attempt_id: Uuid,
    pub connection_id: Uuid,
    /// Known when the credentials identified a user, even if the attempt was then refused.
    pub user_id: Option<Uuid>,
    pub bot_id: Option<Uuid>,
    pub remote_addr: Option<String>,
    pub user_agent: Option<String>,
    pub origin: Option<String>,
    /// The upgrade headers as the server received them (a proxy may have changed them).
    pub upgrade: Option<String>,
    pub connection: Option<String>,
    pub sec_websocket_version: Option<String>,
    pub forwarded_for: Option<String>,
    pub started_at: DateTime<Utc>,
    /// Whether `connection_established` was sent.
    pub established: bool,
    pub ended_at: Option<DateTime<Utc>>,
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
    pub closed_by: Option<ClosedBy>,
    pub msgs_in: u64,
    pub msgs_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The OpenTelemetry trace of the connection (32 hex digits) when the server exports
    /// traces (`--otlp-endpoint`): the client's, if its upgrade request sent a `traceparent`.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// The attempt's transport (rows from before issue 17 are `websocket`).
    #[serde(default)]
    pub transport: TransportKind,
}
