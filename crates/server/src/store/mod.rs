//! Persistent state behind one trait, [`Store`]. SQLite is the default implementation,
//! PostgreSQL serves several nodes, and [`MemoryStore`] keeps everything in the process
//! (`--database-url memory:`); every implementation passes the same conformance suite
//! (`store::conformance`).
//!
//! The store knows nothing of HTTP, WebSocket or JWT: it takes and returns plain data.
//!
//! What the stores share is written once in `rows` (row → domain conversions, column lists,
//! the role and refresh-token rules). The two SQL stores share one implementation of `Store` and
//! `Coordination` in `sql/`, generic over the sqlx backend; each SQL store's folder holds only
//! what it does its own way. `memory/` is the store without SQL.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use natter_proto::api::{BotRole, ConnectionRecord, MemberRole, Visibility};
use natter_proto::{MessageRole, MessageStatus, WireMessage};
use uuid::Uuid;

mod coordination;
pub mod memory;
pub mod postgres;
mod rows;
mod sql;
pub mod sqlite;

#[cfg(test)]
pub(crate) mod conformance;

pub use coordination::{Coordination, GenerationLease, OwedMessage, SlotClaim};
pub use memory::MemoryStore;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// What can go wrong in a store. Constraint violations that the API turns into 4xx
/// have their own variants; the rest is `Backend` (a 500 or 503 at the edge).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("username already taken")]
    UsernameTaken,
    #[error("not found")]
    NotFound,
    /// A bot message in reply to a user message that already has its one outcome (a node that
    /// stalled past its lease finished a reply another node had given): not stored.
    #[error("the message already has its reply")]
    AlreadyAnswered,
    #[error("store backend error: {0}")]
    Backend(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            other => StoreError::Backend(other.to_string()),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub username: String,
    pub password_hash: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: String,
    pub password_hash: String,
    pub is_admin: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bot {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub owner_username: String,
    pub name: String,
    pub description: String,
    pub visibility: Visibility,
    /// The engine settings as validated JSON (secrets included: never send this as is).
    pub engine: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewBot {
    pub owner_id: Uuid,
    pub name: String,
    pub description: String,
    pub visibility: Visibility,
    pub engine: serde_json::Value,
}

#[derive(Debug, Clone, Default)]
pub struct BotChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub visibility: Option<Visibility>,
    pub engine: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: Uuid,
    pub username: String,
    pub role: MemberRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conversation {
    pub id: Uuid,
    pub user_id: Uuid,
    pub bot_id: Uuid,
    pub last_seq: i64,
}

#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The message's id, chosen by the writer (a streamed bot reply is announced under its
    /// id before it is stored).
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub role: MessageRole,
    pub content: String,
    /// Idempotency key: a second append with the same key returns the first message.
    pub client_id: Option<String>,
    pub in_reply_to: Option<Uuid>,
    pub status: MessageStatus,
}

/// The result of [`Store::append_message`].
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    pub message: WireMessage,
    /// True when the `client_id` was already stored: nothing was written.
    pub duplicate: bool,
}

/// The result of [`Store::append_answered`]: the user's message, and what became of its reply
/// (None when the message was a duplicate: nothing was written).
#[derive(Debug)]
pub struct AppendedPair {
    pub message: Appended,
    pub reply: Option<StoreResult<Appended>>,
}

/// A refresh token's row, keyed by the hash of the token.
#[derive(Debug, Clone)]
pub struct NewRefreshToken {
    pub token_hash: String,
    pub user_id: Uuid,
    pub family_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshUse {
    /// Valid and now used: issue the next token of `family_id`.
    Valid { user_id: Uuid, family_id: Uuid },
    /// Already used before: the whole family has now been revoked.
    Reused { family_id: Uuid },
    /// Unknown, expired or revoked.
    Invalid,
}

/// The persistent state of natter.
#[async_trait]
pub trait Store: Coordination + Send + Sync + 'static {
    /// Cheap round trip, for `/api/ready`.
    async fn ping(&self) -> StoreResult<()>;
    /// Closes the store: waits for work in flight, then every later call fails (and `ping`
    /// with it, so `/api/ready` answers 503). For shutdown.
    async fn close(&self);

    async fn create_user(&self, user: NewUser) -> StoreResult<User>;
    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>>;
    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>>;
    async fn set_admin(&self, username: &str, is_admin: bool) -> StoreResult<()>;

    async fn insert_refresh_token(&self, token: NewRefreshToken) -> StoreResult<()>;
    /// Marks the token used, atomically. A second use revokes its whole family.
    async fn use_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<RefreshUse>;
    /// Revokes the token's family (logout) and returns it. Unknown tokens are ignored (None).
    async fn revoke_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<Uuid>>;
    /// Families with a token revoked at or after `since`: the logins whose access tokens
    /// (which live at most the access-token TTL) must still be refused. Read at start.
    async fn revoked_families(&self, since: DateTime<Utc>) -> StoreResult<Vec<Uuid>>;

    async fn create_bot(&self, bot: NewBot) -> StoreResult<Bot>;
    async fn bot(&self, id: Uuid) -> StoreResult<Option<Bot>>;
    async fn update_bot(&self, id: Uuid, changes: BotChanges) -> StoreResult<Bot>;
    async fn delete_bot(&self, id: Uuid) -> StoreResult<()>;
    /// Bots the user owns, is a member of, or that are public; with the user's role.
    async fn bots_for_user(&self, user_id: Uuid) -> StoreResult<Vec<(Bot, BotRole)>>;
    /// The user's role on the bot: owner, member role, `Public` for a public bot, or None.
    async fn bot_role(&self, bot: &Bot, user_id: Uuid) -> StoreResult<Option<BotRole>>;

    async fn upsert_member(&self, bot_id: Uuid, user_id: Uuid, role: MemberRole) -> StoreResult<()>;
    /// Returns false when the user was not a member.
    async fn remove_member(&self, bot_id: Uuid, user_id: Uuid) -> StoreResult<bool>;
    async fn members(&self, bot_id: Uuid) -> StoreResult<Vec<Member>>;

    async fn conversation(&self, user_id: Uuid, bot_id: Uuid) -> StoreResult<Conversation>;
    /// The ids of every conversation with this bot (to tell their sockets the bot changed).
    async fn conversations_of_bot(&self, bot_id: Uuid) -> StoreResult<Vec<Uuid>>;
    /// Stores a message with the next seq of its conversation, or returns the stored one
    /// when its `client_id` is already there.
    async fn append_message(&self, msg: NewMessage) -> StoreResult<Appended>;
    /// Stores a user message and, unless it is a duplicate (its reply was stored or owed
    /// before), `reply`, worked out beforehand (an instant engine's). SQLite stores both in one
    /// transaction, PostgreSQL too (under one hold of the conversation's lock), `memory:` under
    /// one lock.
    async fn append_answered(&self, msg: NewMessage, reply: NewMessage) -> StoreResult<AppendedPair>;
    /// Messages with seq > `after_seq`, oldest first, at most `limit`.
    async fn messages_after(&self, conversation_id: Uuid, after_seq: i64, limit: u32) -> StoreResult<Vec<WireMessage>>;
    /// Messages with seq < `before_seq`, the newest `limit` of them, oldest first.
    async fn messages_before(
        &self,
        conversation_id: Uuid,
        before_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<WireMessage>>;

    async fn create_ticket(
        &self,
        ticket_hash: &str,
        user_id: Uuid,
        bot_id: Uuid,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// Consumes a ticket: it works once, before it expires. Returns (user, bot).
    async fn consume_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>>;
    /// Looks a ticket up without consuming it (for the preflight check).
    async fn peek_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>>;

    /// Writes connection ledger rows, replacing rows with the same `connection_id`.
    async fn record_connections(&self, rows: &[ConnectionRecord]) -> StoreResult<()>;
    /// The newest ledger rows, newest first: of one user (or everyone's with `None`), of one
    /// bot if given.
    async fn connections(
        &self,
        user_id: Option<Uuid>,
        bot_id: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<ConnectionRecord>>;
    /// The newest ledger row with this attempt id (or connection id): of this user's rows, or
    /// of everyone's with `None`. Anyone may pass any attempt id, so a lookup scoped to its
    /// user cannot be shadowed by someone else's later row.
    async fn connection(&self, attempt_id: Uuid, user_id: Option<Uuid>) -> StoreResult<Option<ConnectionRecord>>;
    /// Deletes rows started before `older_than`, and the oldest beyond `keep` rows. Returns
    /// how many were deleted.
    async fn prune_connections(&self, older_than: DateTime<Utc>, keep: u64) -> StoreResult<u64>;
}

pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default()
}
