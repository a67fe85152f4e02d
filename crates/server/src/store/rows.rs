//! What the stores share, written once: the row → domain conversions of the two SQL stores and
//! the column lists their queries name, and the rules every store applies alike (a user's role
//! on a bot, a refresh token's verdict, times kept to the millisecond).
//!
//! The SQL stores differ in how a row holds an id (SQLite: text; PostgreSQL: `uuid`) and a flag
//! (SQLite: an integer; PostgreSQL: `boolean`). Each says how in its [`Dialect`] (`sql/`); the
//! conversions read rows through [`Columns`] and never see the difference.

use chrono::{DateTime, Utc};
use natter_proto::api::{BotRole, ClosedBy, ConnectionRecord, MemberRole, TransportKind, Visibility};
use natter_proto::{MessageRole, MessageStatus, WireMessage};
use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use super::sql::Dialect;
use super::{from_millis, millis, Bot, Member, StoreError, StoreResult, User};

/// A row of either SQL store, read by column name.
pub(super) trait Columns {
    fn id(&self, col: &str) -> StoreResult<Uuid>;
    fn opt_id(&self, col: &str) -> StoreResult<Option<Uuid>>;
    fn flag(&self, col: &str) -> StoreResult<bool>;
    fn text(&self, col: &str) -> StoreResult<String>;
    fn opt_text(&self, col: &str) -> StoreResult<Option<String>>;
    fn int(&self, col: &str) -> StoreResult<i64>;
    fn opt_int(&self, col: &str) -> StoreResult<Option<i64>>;
    /// A 32-bit column (PostgreSQL's `INTEGER`; any integer on SQLite).
    fn opt_int32(&self, col: &str) -> StoreResult<Option<i32>>;
    /// Milliseconds since the epoch, as every store keeps times.
    fn time(&self, col: &str) -> StoreResult<DateTime<Utc>> {
        Ok(from_millis(self.int(col)?))
    }
}

impl<R> Columns for R
where
    R: Row,
    R::Database: Dialect<Row = R>,
    for<'a> &'a str: ColumnIndex<R>,
    String: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    i64: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    i32: for<'r> Decode<'r, R::Database> + Type<R::Database>,
{
    fn id(&self, col: &str) -> StoreResult<Uuid> {
        R::Database::id(self, col)
    }
    fn opt_id(&self, col: &str) -> StoreResult<Option<Uuid>> {
        R::Database::opt_id(self, col)
    }
    fn flag(&self, col: &str) -> StoreResult<bool> {
        R::Database::flag(self, col)
    }
    fn text(&self, col: &str) -> StoreResult<String> {
        Ok(self.try_get(col)?)
    }
    fn opt_text(&self, col: &str) -> StoreResult<Option<String>> {
        Ok(self.try_get(col)?)
    }
    fn int(&self, col: &str) -> StoreResult<i64> {
        Ok(self.try_get(col)?)
    }
    fn opt_int(&self, col: &str) -> StoreResult<Option<i64>> {
        Ok(self.try_get(col)?)
    }
    fn opt_int32(&self, col: &str) -> StoreResult<Option<i32>> {
        Ok(self.try_get(col)?)
    }
}

/// A uuid stored as text (SQLite).
pub(super) fn parse_id(s: &str, col: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::Backend(format!("bad uuid in {col}: {e}")))
}

pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// A time as the stores keep it: truncated to the millisecond, so values read back compare
/// equal across implementations.
pub(super) fn ms(t: DateTime<Utc>) -> DateTime<Utc> {
    from_millis(millis(t))
}

pub(super) fn user_from_row(row: &impl Columns) -> StoreResult<User> {
    Ok(User {
        id: row.id("id")?,
        username: row.text("username")?,
        password_hash: row.text("password_hash")?,
        is_admin: row.flag("is_admin")?,
        created_at: row.time("created_at")?,
    })
}

/// A bot with its owner's name: select from [`BOTS`].
pub(super) const BOT_COLS: &str = "b.id, b.owner_id, u.username AS owner_username, b.name, b.description, b.visibility, b.engine, b.created_at, b.updated_at";
pub(super) const BOTS: &str = "bots b JOIN users u ON u.id = b.owner_id";

pub(super) fn bot_from_row(row: &impl Columns) -> StoreResult<Bot> {
    let vis = row.text("visibility")?;
    let engine = row.text("engine")?;
    Ok(Bot {
        id: row.id("id")?,
        owner_id: row.id("owner_id")?,
        owner_username: row.text("owner_username")?,
        name: row.text("name")?,
        description: row.text("description")?,
        visibility: Visibility::parse(&vis).ok_or_else(|| StoreError::Backend(format!("bad visibility {vis}")))?,
        engine: serde_json::from_str(&engine).map_err(|e| StoreError::Backend(format!("bad engine json: {e}")))?,
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
    })
}

pub(super) const MSG_COLS: &str = "id, conversation_id, seq, role, content, client_id, in_reply_to, status, created_at";

pub(super) fn message_from_row(row: &impl Columns) -> StoreResult<WireMessage> {
    let role = row.text("role")?;
    let status = row.text("status")?;
    Ok(WireMessage {
        id: row.id("id")?,
        conversation_id: row.id("conversation_id")?,
        seq: row.int("seq")?,
        role: MessageRole::parse(&role).ok_or_else(|| StoreError::Backend(format!("bad role {role}")))?,
        content: row.text("content")?,
        created_at: row.time("created_at")?,
        client_id: row.opt_text("client_id")?,
        in_reply_to: row.opt_id("in_reply_to")?,
        status: MessageStatus::parse(&status).ok_or_else(|| StoreError::Backend(format!("bad status {status}")))?,
    })
}

/// A member with their name: `user_id`, `username`, `role`.
pub(super) fn member_from_row(row: &impl Columns) -> StoreResult<Member> {
    Ok(Member { user_id: row.id("user_id")?, username: row.text("username")?, role: member_role(&row.text("role")?) })
}

pub(super) const LEDGER_COLS: &str = "connection_id, attempt_id, user_id, bot_id, remote_addr, user_agent, origin, upgrade, connection_hdr, \
    ws_version, forwarded_for, started_at, established, ended_at, close_code, close_reason, closed_by, msgs_in, msgs_out, bytes_in, bytes_out, \
    trace_id, transport";

/// A parameter for each of [`LEDGER_COLS`], in order.
pub(super) const LEDGER_PARAMS: &str =
    "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23";

/// Replaces every column of [`LEDGER_COLS`] but the key, in an upsert.
pub(super) const LEDGER_UPDATE: &str = "attempt_id = excluded.attempt_id, user_id = excluded.user_id, bot_id = excluded.bot_id, \
    remote_addr = excluded.remote_addr, user_agent = excluded.user_agent, origin = excluded.origin, upgrade = excluded.upgrade, \
    connection_hdr = excluded.connection_hdr, ws_version = excluded.ws_version, forwarded_for = excluded.forwarded_for, \
    started_at = excluded.started_at, established = excluded.established, ended_at = excluded.ended_at, \
    close_code = excluded.close_code, close_reason = excluded.close_reason, closed_by = excluded.closed_by, \
    msgs_in = excluded.msgs_in, msgs_out = excluded.msgs_out, bytes_in = excluded.bytes_in, bytes_out = excluded.bytes_out, \
    trace_id = excluded.trace_id, transport = excluded.transport";

pub(super) fn ledger_from_row(row: &impl Columns) -> StoreResult<ConnectionRecord> {
    let count = |col| row.int(col).map(|n| n as u64);
    Ok(ConnectionRecord {
        attempt_id: row.id("attempt_id")?,
        connection_id: row.id("connection_id")?,
        user_id: row.opt_id("user_id")?,
        bot_id: row.opt_id("bot_id")?,
        remote_addr: row.opt_text("remote_addr")?,
        user_agent: row.opt_text("user_agent")?,
        origin: row.opt_text("origin")?,
        upgrade: row.opt_text("upgrade")?,
        connection: row.opt_text("connection_hdr")?,
        sec_websocket_version: row.opt_text("ws_version")?,
        forwarded_for: row.opt_text("forwarded_for")?,
        started_at: row.time("started_at")?,
        established: row.flag("established")?,
        ended_at: row.opt_int("ended_at")?.map(from_millis),
        close_code: row.opt_int32("close_code")?.map(|c| c as u16),
        close_reason: row.opt_text("close_reason")?,
        closed_by: row.opt_text("closed_by")?.as_deref().and_then(ClosedBy::parse),
        msgs_in: count("msgs_in")?,
        msgs_out: count("msgs_out")?,
        bytes_in: count("bytes_in")?,
        bytes_out: count("bytes_out")?,
        trace_id: row.opt_text("trace_id")?,
        transport: TransportKind::parse(&row.text("transport")?).unwrap_or_default(),
    })
}

/// A member's role as the SQL stores keep it (`BotRole::as_str` of it): anything but `admin`
/// is `chat`.
pub(super) fn member_role(stored: &str) -> MemberRole {
    if stored == "admin" {
        MemberRole::Admin
    } else {
        MemberRole::Chat
    }
}

/// The role a user has on a bot, from ownership, membership and visibility.
pub(super) fn role_of(bot: &Bot, user_id: Uuid, member: Option<MemberRole>) -> Option<BotRole> {
    if bot.owner_id == user_id {
        return Some(BotRole::Owner);
    }
    match member {
        Some(role) => Some(BotRole::from(role)),
        None if bot.visibility == Visibility::Public => Some(BotRole::Public),
        None => None,
    }
}

/// What presenting a refresh token does, from its row (times in milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenVerdict {
    /// Used before: revoke its whole family.
    Reused,
    /// Revoked or expired.
    Dead,
    /// Mark it used.
    Fresh,
}

pub(super) fn token_verdict(used_at: Option<i64>, revoked_at: Option<i64>, expires_at: i64, now: i64) -> TokenVerdict {
    if used_at.is_some() {
        TokenVerdict::Reused
    } else if revoked_at.is_some() || expires_at <= now {
        TokenVerdict::Dead
    } else {
        TokenVerdict::Fresh
    }
}
