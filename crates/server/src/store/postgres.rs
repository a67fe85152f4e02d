//! The PostgreSQL store, for several natter nodes sharing one database.
//!
//! Seq allocation takes the conversation's row lock (`UPDATE conversations SET last_seq =
//! last_seq + 1 … RETURNING`) inside the transaction that inserts the message, so writers on
//! different nodes are serialised per conversation and seqs stay gap-free and unique; the
//! `client_id` duplicate check runs after that lock, so two nodes racing with the same
//! `client_id` store it once. Ids are native UUIDs; times are Unix milliseconds, as on SQLite.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use natter_proto::api::{BotRole, ClosedBy, ConnectionRecord, MemberRole, Visibility};
use natter_proto::{MessageRole, MessageStatus, WireMessage};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects (`postgres://user@host:port/db`, any libpq-style URL sqlx accepts) and applies
    /// migrations. Several nodes may start at once: sqlx serialises migrations with an
    /// advisory lock.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let opts: PgConnectOptions = url.parse().map_err(|e| StoreError::Backend(format!("bad database url: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            // A database that went away must fail requests (and `/api/ready`) quickly rather
            // than queue them.
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await.map_err(|e| StoreError::Backend(format!("migrations failed: {e}")))?;
        Ok(PostgresStore { pool })
    }
}

fn user_from_row(row: &PgRow) -> StoreResult<User> {
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        password_hash: row.try_get("password_hash")?,
        is_admin: row.try_get("is_admin")?,
        created_at: from_millis(row.try_get("created_at")?),
    })
}

const BOT_COLS: &str = "b.id, b.owner_id, u.username AS owner_username, b.name, b.description, b.visibility, b.engine, b.created_at, b.updated_at";

fn bot_from_row(row: &PgRow) -> StoreResult<Bot> {
    let vis: String = row.try_get("visibility")?;
    let engine: String = row.try_get("engine")?;
    Ok(Bot {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        owner_username: row.try_get("owner_username")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        visibility: Visibility::parse(&vis).ok_or_else(|| StoreError::Backend(format!("bad visibility {vis}")))?,
        engine: serde_json::from_str(&engine).map_err(|e| StoreError::Backend(format!("bad engine json: {e}")))?,
        created_at: from_millis(row.try_get("created_at")?),
        updated_at: from_millis(row.try_get("updated_at")?),
    })
}

const MSG_COLS: &str = "id, conversation_id, seq, role, content, client_id, in_reply_to, status, created_at";

fn message_from_row(row: &PgRow) -> StoreResult<WireMessage> {
    let role: String = row.try_get("role")?;
    let status: String = row.try_get("status")?;
    Ok(WireMessage {
        id: row.try_get("id")?,
        conversation_id: row.try_get("conversation_id")?,
        seq: row.try_get("seq")?,
        role: MessageRole::parse(&role).ok_or_else(|| StoreError::Backend(format!("bad role {role}")))?,
        content: row.try_get("content")?,
        created_at: from_millis(row.try_get("created_at")?),
        client_id: row.try_get("client_id")?,
        in_reply_to: row.try_get("in_reply_to")?,
        status: MessageStatus::parse(&status).ok_or_else(|| StoreError::Backend(format!("bad status {status}")))?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Takes the conversation's next seq and inserts the message, inside `tx`. The `UPDATE` holds
/// the conversation's row lock until the transaction ends.
/// Whether `in_reply_to` already has its one outcome: it is not owed a reply any more and a bot
/// message in reply to it is stored (a message stored before owed replies were tracked is never
/// owed; for it the stored replies decide). Call with the conversation's row locked.
async fn already_answered(
    tx: &mut Transaction<'_, Postgres>,
    conversation_id: Uuid,
    in_reply_to: Uuid,
) -> StoreResult<bool> {
    Ok(sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM owed_replies WHERE message_id = $2) \
           AND EXISTS (SELECT 1 FROM messages WHERE conversation_id = $1 AND in_reply_to = $2 AND role = 'bot')",
    )
    .bind(conversation_id)
    .bind(in_reply_to)
    .fetch_one(&mut **tx)
    .await?)
}

async fn insert_with_next_seq(tx: &mut Transaction<'_, Postgres>, m: NewMessage) -> StoreResult<WireMessage> {
    let seq: i64 =
        sqlx::query_scalar("UPDATE conversations SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq")
            .bind(m.conversation_id)
            .fetch_optional(&mut **tx)
            .await?
            .ok_or(StoreError::NotFound)?;
    let message = WireMessage {
        id: m.id,
        conversation_id: m.conversation_id,
        seq,
        role: m.role,
        content: m.content,
        created_at: from_millis(millis(Utc::now())),
        client_id: m.client_id,
        in_reply_to: m.in_reply_to,
        status: m.status,
    };
    sqlx::query(&format!("INSERT INTO messages ({MSG_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"))
        .bind(message.id)
        .bind(message.conversation_id)
        .bind(seq)
        .bind(message.role.as_str())
        .bind(&message.content)
        .bind(&message.client_id)
        .bind(message.in_reply_to)
        .bind(message.status.as_str())
        .bind(millis(message.created_at))
        .execute(&mut **tx)
        .await?;
    Ok(message)
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn create_user(&self, user: NewUser) -> StoreResult<User> {
        let id = Uuid::new_v4();
        let now = millis(Utc::now());
        let res = sqlx::query(
            "INSERT INTO users (id, username, password_hash, is_admin, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(&user.username)
        .bind(&user.password_hash)
        .bind(user.is_admin)
        .bind(now)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(User {
                id,
                username: user.username,
                password_hash: user.password_hash,
                is_admin: user.is_admin,
                created_at: from_millis(now),
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::UsernameTaken),
            Err(e) => Err(e.into()),
        }
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        let row =
            sqlx::query("SELECT * FROM users WHERE username = $1").bind(username).fetch_optional(&self.pool).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>> {
        let row = sqlx::query("SELECT * FROM users WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn set_admin(&self, username: &str, is_admin: bool) -> StoreResult<()> {
        let res = sqlx::query("UPDATE users SET is_admin = $1 WHERE username = $2")
            .bind(is_admin)
            .bind(username)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn insert_refresh_token(&self, t: NewRefreshToken) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&t.token_hash)
        .bind(t.user_id)
        .bind(t.family_id)
        .bind(millis(Utc::now()))
        .bind(millis(t.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn use_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<RefreshUse> {
        let mut tx = self.pool.begin().await?;
        // FOR UPDATE: two nodes presenting the same token at once see it one after the other.
        let row = sqlx::query(
            "SELECT user_id, family_id, expires_at, used_at, revoked_at FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
        )
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(RefreshUse::Invalid) };
        let family_id: Uuid = row.try_get("family_id")?;
        let used: Option<i64> = row.try_get("used_at")?;
        let revoked: Option<i64> = row.try_get("revoked_at")?;
        let expires: i64 = row.try_get("expires_at")?;
        if used.is_some() {
            sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE family_id = $2")
                .bind(millis(now))
                .bind(family_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RefreshUse::Reused { family_id });
        }
        if revoked.is_some() || expires <= millis(now) {
            return Ok(RefreshUse::Invalid);
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2")
            .bind(millis(now))
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(RefreshUse::Valid { user_id: row.try_get("user_id")?, family_id })
    }

    async fn revoke_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<Uuid>> {
        let family: Option<Uuid> = sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(family_id) = family {
            sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE family_id = $2")
                .bind(millis(now))
                .bind(family_id)
                .execute(&self.pool)
                .await?;
        }
        Ok(family)
    }

    async fn revoked_families(&self, since: DateTime<Utc>) -> StoreResult<Vec<Uuid>> {
        Ok(sqlx::query_scalar("SELECT DISTINCT family_id FROM refresh_tokens WHERE revoked_at >= $1")
            .bind(millis(since))
            .fetch_all(&self.pool)
            .await?)
    }

    async fn create_bot(&self, bot: NewBot) -> StoreResult<Bot> {
        let id = Uuid::new_v4();
        let now = millis(Utc::now());
        sqlx::query(
            "INSERT INTO bots (id, owner_id, name, description, visibility, engine, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id)
        .bind(bot.owner_id)
        .bind(&bot.name)
        .bind(&bot.description)
        .bind(bot.visibility.as_str())
        .bind(bot.engine.to_string())
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.bot(id).await?.ok_or(StoreError::NotFound)
    }

    async fn bot(&self, id: Uuid) -> StoreResult<Option<Bot>> {
        let row =
            sqlx::query(&format!("SELECT {BOT_COLS} FROM bots b JOIN users u ON u.id = b.owner_id WHERE b.id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(bot_from_row).transpose()
    }

    async fn update_bot(&self, id: Uuid, c: BotChanges) -> StoreResult<Bot> {
        let res = sqlx::query(
            "UPDATE bots SET name = COALESCE($1, name), description = COALESCE($2, description), \
             visibility = COALESCE($3, visibility), engine = COALESCE($4, engine), updated_at = $5 WHERE id = $6",
        )
        .bind(c.name)
        .bind(c.description)
        .bind(c.visibility.map(|v| v.as_str()))
        .bind(c.engine.map(|e| e.to_string()))
        .bind(millis(Utc::now()))
        .bind(id)
        .execute(&self.pool)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        self.bot(id).await?.ok_or(StoreError::NotFound)
    }

    async fn delete_bot(&self, id: Uuid) -> StoreResult<()> {
        let res = sqlx::query("DELETE FROM bots WHERE id = $1").bind(id).execute(&self.pool).await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn bots_for_user(&self, user_id: Uuid) -> StoreResult<Vec<(Bot, BotRole)>> {
        let sql = format!(
            "SELECT {BOT_COLS}, m.role AS member_role FROM bots b JOIN users u ON u.id = b.owner_id \
             LEFT JOIN bot_members m ON m.bot_id = b.id AND m.user_id = $1 \
             WHERE b.owner_id = $1 OR m.user_id IS NOT NULL OR b.visibility = 'public' \
             ORDER BY b.created_at, b.id"
        );
        let rows = sqlx::query(&sql).bind(user_id).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let bot = bot_from_row(row)?;
                let member: Option<String> = row.try_get("member_role")?;
                let role = super::sqlite::role_of(&bot, user_id, member.as_deref()).unwrap_or(BotRole::Public);
                Ok((bot, role))
            })
            .collect()
    }

    async fn bot_role(&self, bot: &Bot, user_id: Uuid) -> StoreResult<Option<BotRole>> {
        if bot.owner_id == user_id {
            return Ok(Some(BotRole::Owner));
        }
        let member: Option<String> =
            sqlx::query_scalar("SELECT role FROM bot_members WHERE bot_id = $1 AND user_id = $2")
                .bind(bot.id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(super::sqlite::role_of(bot, user_id, member.as_deref()))
    }

    async fn upsert_member(&self, bot_id: Uuid, user_id: Uuid, role: MemberRole) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO bot_members (bot_id, user_id, role, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (bot_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(bot_id)
        .bind(user_id)
        .bind(BotRole::from(role).as_str())
        .bind(millis(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn remove_member(&self, bot_id: Uuid, user_id: Uuid) -> StoreResult<bool> {
        let res = sqlx::query("DELETE FROM bot_members WHERE bot_id = $1 AND user_id = $2")
            .bind(bot_id)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() > 0)
    }

    async fn members(&self, bot_id: Uuid) -> StoreResult<Vec<Member>> {
        let rows = sqlx::query(
            "SELECT m.user_id, u.username, m.role FROM bot_members m JOIN users u ON u.id = m.user_id \
             WHERE m.bot_id = $1 ORDER BY u.username",
        )
        .bind(bot_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let role: String = row.try_get("role")?;
                Ok(Member {
                    user_id: row.try_get("user_id")?,
                    username: row.try_get("username")?,
                    role: if role == "admin" { MemberRole::Admin } else { MemberRole::Chat },
                })
            })
            .collect()
    }

    async fn conversations_of_bot(&self, bot_id: Uuid) -> StoreResult<Vec<Uuid>> {
        Ok(sqlx::query_scalar("SELECT id FROM conversations WHERE bot_id = $1")
            .bind(bot_id)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn conversation(&self, user_id: Uuid, bot_id: Uuid) -> StoreResult<Conversation> {
        sqlx::query(
            "INSERT INTO conversations (id, user_id, bot_id, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_id, bot_id) DO NOTHING",
        )
        .bind(Uuid::new_v4())
        .bind(user_id)
        .bind(bot_id)
        .bind(millis(Utc::now()))
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT id, last_seq FROM conversations WHERE user_id = $1 AND bot_id = $2")
            .bind(user_id)
            .bind(bot_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Conversation { id: row.try_get("id")?, user_id, bot_id, last_seq: row.try_get("last_seq")? })
    }

    async fn append_message(&self, m: NewMessage) -> StoreResult<Appended> {
        let mut tx = self.pool.begin().await?;
        // Take the conversation's lock first (by locking its row), then look for the
        // client_id: a writer on another node with the same client_id has committed by then.
        let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM conversations WHERE id = $1 FOR UPDATE")
            .bind(m.conversation_id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        if let Some(client_id) = &m.client_id {
            let row =
                sqlx::query(&format!("SELECT {MSG_COLS} FROM messages WHERE conversation_id = $1 AND client_id = $2"))
                    .bind(m.conversation_id)
                    .bind(client_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(row) = row {
                return Ok(Appended { message: message_from_row(&row)?, duplicate: true });
            }
        }
        // One outcome per user message, whichever node finishes last.
        if let (MessageRole::Bot, Some(asked)) = (m.role, m.in_reply_to) {
            if already_answered(&mut tx, m.conversation_id, asked).await? {
                return Err(StoreError::AlreadyAnswered);
            }
        }
        let message = insert_with_next_seq(&mut tx, m).await?;
        tx.commit().await?;
        Ok(Appended { message, duplicate: false })
    }

    async fn messages_after(&self, conversation_id: Uuid, after_seq: i64, limit: u32) -> StoreResult<Vec<WireMessage>> {
        let rows = sqlx::query(&format!(
            "SELECT {MSG_COLS} FROM messages WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(conversation_id)
        .bind(after_seq)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn messages_before(
        &self,
        conversation_id: Uuid,
        before_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<WireMessage>> {
        let rows = sqlx::query(&format!(
            "SELECT {MSG_COLS} FROM messages WHERE conversation_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
        ))
        .bind(conversation_id)
        .bind(before_seq)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut msgs = rows.iter().map(message_from_row).collect::<StoreResult<Vec<_>>>()?;
        msgs.reverse();
        Ok(msgs)
    }

    async fn create_ticket(
        &self,
        ticket_hash: &str,
        user_id: Uuid,
        bot_id: Uuid,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM ws_tickets WHERE expires_at <= $1").bind(millis(Utc::now())).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO ws_tickets (ticket_hash, user_id, bot_id, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(ticket_hash)
            .bind(user_id)
            .bind(bot_id)
            .bind(millis(expires_at))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn consume_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>> {
        let row = sqlx::query("DELETE FROM ws_tickets WHERE ticket_hash = $1 RETURNING user_id, bot_id, expires_at")
            .bind(ticket_hash)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let expires: i64 = row.try_get("expires_at")?;
        if expires <= millis(now) {
            return Ok(None);
        }
        Ok(Some((row.try_get("user_id")?, row.try_get("bot_id")?)))
    }

    async fn peek_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>> {
        let row = sqlx::query("SELECT user_id, bot_id FROM ws_tickets WHERE ticket_hash = $1 AND expires_at > $2")
            .bind(ticket_hash)
            .bind(millis(now))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| Ok((row.try_get("user_id")?, row.try_get("bot_id")?))).transpose()
    }

    async fn record_connections(&self, rows: &[ConnectionRecord]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for r in rows {
            sqlx::query(&format!(
                "INSERT INTO connections ({LEDGER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                 $15, $16, $17, $18, $19, $20, $21, $22) ON CONFLICT (connection_id) DO UPDATE SET {LEDGER_UPDATE}"
            ))
            .bind(r.connection_id)
            .bind(r.attempt_id)
            .bind(r.user_id)
            .bind(r.bot_id)
            .bind(&r.remote_addr)
            .bind(&r.user_agent)
            .bind(&r.origin)
            .bind(&r.upgrade)
            .bind(&r.connection)
            .bind(&r.sec_websocket_version)
            .bind(&r.forwarded_for)
            .bind(millis(r.started_at))
            .bind(r.established)
            .bind(r.ended_at.map(millis))
            .bind(r.close_code.map(i32::from))
            .bind(&r.close_reason)
            .bind(r.closed_by.map(|c| c.as_str()))
            .bind(r.msgs_in as i64)
            .bind(r.msgs_out as i64)
            .bind(r.bytes_in as i64)
            .bind(r.bytes_out as i64)
            .bind(&r.trace_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn connections(
        &self,
        user_id: Option<Uuid>,
        bot_id: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {LEDGER_COLS} FROM connections WHERE ($1::uuid IS NULL OR user_id = $1) AND ($2::uuid IS NULL OR bot_id = $2) \
             ORDER BY started_at DESC, connection_id LIMIT $3"
        ))
        .bind(user_id)
        .bind(bot_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ledger_from_row).collect()
    }

    async fn connection(&self, attempt_id: Uuid, user_id: Option<Uuid>) -> StoreResult<Option<ConnectionRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {LEDGER_COLS} FROM connections WHERE (attempt_id = $1 OR connection_id = $1) \
             AND ($2::uuid IS NULL OR user_id = $2) ORDER BY started_at DESC LIMIT 1"
        ))
        .bind(attempt_id)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(ledger_from_row).transpose()
    }

    async fn prune_connections(&self, older_than: DateTime<Utc>, keep: u64) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let old = sqlx::query("DELETE FROM connections WHERE started_at < $1")
            .bind(millis(older_than))
            .execute(&mut *tx)
            .await?;
        let over = sqlx::query(
            "DELETE FROM connections WHERE connection_id IN \
             (SELECT connection_id FROM connections ORDER BY started_at DESC, connection_id OFFSET $1)",
        )
        .bind(keep as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(old.rows_affected() + over.rows_affected())
    }
}

const LEDGER_COLS: &str = "connection_id, attempt_id, user_id, bot_id, remote_addr, user_agent, origin, upgrade, connection_hdr, \
    ws_version, forwarded_for, started_at, established, ended_at, close_code, close_reason, closed_by, msgs_in, msgs_out, bytes_in, bytes_out, \
    trace_id";

const LEDGER_UPDATE: &str = "attempt_id = excluded.attempt_id, user_id = excluded.user_id, bot_id = excluded.bot_id, \
    remote_addr = excluded.remote_addr, user_agent = excluded.user_agent, origin = excluded.origin, upgrade = excluded.upgrade, \
    connection_hdr = excluded.connection_hdr, ws_version = excluded.ws_version, forwarded_for = excluded.forwarded_for, \
    started_at = excluded.started_at, established = excluded.established, ended_at = excluded.ended_at, \
    close_code = excluded.close_code, close_reason = excluded.close_reason, closed_by = excluded.closed_by, \
    msgs_in = excluded.msgs_in, msgs_out = excluded.msgs_out, bytes_in = excluded.bytes_in, bytes_out = excluded.bytes_out, \
    trace_id = excluded.trace_id";

fn ledger_from_row(row: &PgRow) -> StoreResult<ConnectionRecord> {
    let closed_by: Option<String> = row.try_get("closed_by")?;
    let code: Option<i32> = row.try_get("close_code")?;
    let ended: Option<i64> = row.try_get("ended_at")?;
    Ok(ConnectionRecord {
        attempt_id: row.try_get("attempt_id")?,
        connection_id: row.try_get("connection_id")?,
        user_id: row.try_get("user_id")?,
        bot_id: row.try_get("bot_id")?,
        remote_addr: row.try_get("remote_addr")?,
        user_agent: row.try_get("user_agent")?,
        origin: row.try_get("origin")?,
        upgrade: row.try_get("upgrade")?,
        connection: row.try_get("connection_hdr")?,
        sec_websocket_version: row.try_get("ws_version")?,
        forwarded_for: row.try_get("forwarded_for")?,
        started_at: from_millis(row.try_get("started_at")?),
        established: row.try_get("established")?,
        ended_at: ended.map(from_millis),
        close_code: code.map(|c| c as u16),
        close_reason: row.try_get("close_reason")?,
        closed_by: closed_by.as_deref().and_then(ClosedBy::parse),
        msgs_in: row.try_get::<i64, _>("msgs_in")? as u64,
        msgs_out: row.try_get::<i64, _>("msgs_out")? as u64,
        bytes_in: row.try_get::<i64, _>("bytes_in")? as u64,
        bytes_out: row.try_get::<i64, _>("bytes_out")? as u64,
        trace_id: row.try_get("trace_id")?,
    })
}

#[async_trait]
impl Coordination for PostgresStore {
    fn shared(&self) -> bool {
        true
    }

    async fn count_user_message(&self, user_id: Uuid, window_ms: u64) -> StoreResult<(u64, u64)> {
        // One row per user, its window moved on by whichever node counts first in a new
        // window; the database's clock, so nodes with skewed clocks share windows.
        let (count, ms): (i32, i64) = sqlx::query_as(
            "WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms) \
             INSERT INTO user_message_windows AS w (user_id, window_start, count) \
             SELECT $1, ms / $2, 1 FROM now \
             ON CONFLICT (user_id) DO UPDATE SET \
               count = CASE WHEN w.window_start = EXCLUDED.window_start THEN w.count + 1 ELSE 1 END, \
               window_start = EXCLUDED.window_start \
             RETURNING count, (SELECT ms FROM now)",
        )
        .bind(user_id)
        .bind(window_ms as i64)
        .fetch_one(&self.pool)
        .await?;
        let window_ms = window_ms as i64;
        Ok((count as u64, (window_ms - ms.rem_euclid(window_ms)) as u64))
    }

    async fn claim_slot(&self, slot: SlotClaim, max: usize, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        // One user's claims are serialised by a transaction-scoped advisory lock on the user,
        // so count-then-insert cannot overshoot when two nodes admit at once.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))")
            .bind(slot.user_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM connection_slots WHERE user_id = $1 AND expires_at <= $2")
            .bind(slot.user_id)
            .bind(millis(now))
            .execute(&mut *tx)
            .await?;
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM connection_slots WHERE user_id = $1")
            .bind(slot.user_id)
            .fetch_one(&mut *tx)
            .await?;
        if count as usize >= max {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO connection_slots (connection_id, user_id, node_id, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(slot.connection_id)
        .bind(slot.user_id)
        .bind(slot.node_id)
        .bind(millis(slot.expires_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn slots_in_use(&self, user_id: Uuid, now: DateTime<Utc>) -> StoreResult<usize> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM connection_slots WHERE user_id = $1 AND expires_at > $2")
            .bind(user_id)
            .bind(millis(now))
            .fetch_one(&self.pool)
            .await?;
        Ok(n as usize)
    }

    async fn release_slot(&self, connection_id: Uuid) -> StoreResult<()> {
        sqlx::query("DELETE FROM connection_slots WHERE connection_id = $1")
            .bind(connection_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn renew_node(&self, node_id: Uuid, slots: &[Uuid], work: &[Uuid], until: DateTime<Utc>) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE connection_slots SET expires_at = $2 WHERE node_id = $1 AND connection_id = ANY($3)")
            .bind(node_id)
            .bind(millis(until))
            .bind(slots)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM connection_slots WHERE node_id = $1 AND expires_at < $2")
            .bind(node_id)
            .bind(millis(until))
            .execute(&mut *tx)
            .await?;
        for q in [
            "UPDATE generations SET lease_until = $2 WHERE node_id = $1 AND message_id = ANY($3)",
            "UPDATE owed_replies SET lease_until = $2 WHERE node_id = $1 AND message_id = ANY($3)",
        ] {
            sqlx::query(q).bind(node_id).bind(millis(until)).bind(work).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn begin_generation(&self, g: &GenerationLease) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO generations (message_id, conversation_id, in_reply_to, node_id, text, lease_until) \
             VALUES ($1, $2, $3, $4, '', $5)",
        )
        .bind(g.message_id)
        .bind(g.conversation_id)
        .bind(g.in_reply_to)
        .bind(g.node_id)
        .bind(millis(g.lease_until))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn checkpoint_generation(&self, message_id: Uuid, text: &str) -> StoreResult<()> {
        sqlx::query("UPDATE generations SET text = $2 WHERE message_id = $1")
            .bind(message_id)
            .bind(text)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn generation_in_progress(&self, conversation_id: Uuid, message_id: Uuid) -> StoreResult<bool> {
        let found: Option<Uuid> =
            sqlx::query_scalar("SELECT message_id FROM generations WHERE message_id = $1 AND conversation_id = $2")
                .bind(message_id)
                .bind(conversation_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }

    async fn end_generation(&self, message_id: Uuid) -> StoreResult<()> {
        sqlx::query("DELETE FROM generations WHERE message_id = $1").bind(message_id).execute(&self.pool).await?;
        Ok(())
    }

    async fn recover_generations(&self, now: DateTime<Utc>) -> StoreResult<Vec<WireMessage>> {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED: nodes sweeping at the same time share the work instead of waiting.
        let rows = sqlx::query(
            "SELECT message_id, conversation_id, in_reply_to, text FROM generations \
             WHERE lease_until <= $1 ORDER BY lease_until LIMIT 100 FOR UPDATE SKIP LOCKED",
        )
        .bind(millis(now))
        .fetch_all(&mut *tx)
        .await?;
        let mut recovered = Vec::new();
        let mut due = Vec::with_capacity(rows.len());
        for row in rows {
            let ids: (Uuid, Uuid, Uuid) =
                (row.try_get("conversation_id")?, row.try_get("message_id")?, row.try_get("in_reply_to")?);
            due.push((ids, row.try_get::<String, _>("text")?));
        }
        // Conversation rows are locked in one order by every sweeper: no deadlock.
        due.sort_by_key(|(ids, _)| *ids);
        for ((conversation_id, message_id, in_reply_to), text) in due {
            sqlx::query("DELETE FROM generations WHERE message_id = $1").bind(message_id).execute(&mut *tx).await?;
            // The node may have stored the reply and died before forgetting its lease.
            let stored: Option<Uuid> = sqlx::query_scalar("SELECT id FROM messages WHERE id = $1")
                .bind(message_id)
                .fetch_optional(&mut *tx)
                .await?;
            if stored.is_some() {
                continue;
            }
            let locked: Option<Uuid> = sqlx::query_scalar("SELECT id FROM conversations WHERE id = $1 FOR UPDATE")
                .bind(conversation_id)
                .fetch_optional(&mut *tx)
                .await?;
            // Gone with its conversation, or answered by another reply meanwhile.
            if locked.is_none() || already_answered(&mut tx, conversation_id, in_reply_to).await? {
                continue;
            }
            let msg = NewMessage {
                id: message_id,
                conversation_id,
                role: MessageRole::Bot,
                content: text,
                client_id: None,
                in_reply_to: Some(in_reply_to),
                status: MessageStatus::Incomplete,
            };
            match insert_with_next_seq(&mut tx, msg).await {
                Ok(m) => recovered.push(m),
                // The conversation is gone: nothing to mark.
                Err(StoreError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        tx.commit().await?;
        Ok(recovered)
    }

    async fn lease_owed(&self, message_id: Uuid, node_id: Uuid, until: DateTime<Utc>) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE owed_replies SET node_id = $1, lease_until = $2 \
             WHERE message_id = $3 AND (node_id IS NULL OR node_id = $1)",
        )
        .bind(node_id)
        .bind(millis(until))
        .bind(message_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim_owed(
        &self,
        node_id: Uuid,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
        unleased_before: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<OwedMessage>> {
        // SKIP LOCKED: a row another node's sweep is taking is left to it.
        let rows = sqlx::query(&format!(
            "WITH taken AS ( \
                 UPDATE owed_replies SET node_id = $1, lease_until = $2 WHERE message_id IN ( \
                     SELECT o.message_id FROM owed_replies o \
                     WHERE (o.lease_until < $3 OR (o.lease_until IS NULL AND o.created_at < $4)) \
                       AND NOT EXISTS (SELECT 1 FROM generations g WHERE g.in_reply_to = o.message_id) \
                     ORDER BY o.created_at LIMIT $5 FOR UPDATE SKIP LOCKED) \
                 RETURNING message_id) \
             SELECT m.{}, c.bot_id FROM taken t JOIN messages m ON m.id = t.message_id \
             JOIN conversations c ON c.id = m.conversation_id ORDER BY m.created_at, m.seq",
            MSG_COLS.replace(", ", ", m.")
        ))
        .bind(node_id)
        .bind(millis(until))
        .bind(millis(now))
        .bind(millis(unleased_before))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok(OwedMessage { message: message_from_row(row)?, bot_id: row.try_get("bot_id")? }))
            .collect()
    }
}

/// A PostgreSQL schema of its own, for one test: created empty, dropped on drop. Tests that
/// share a database (nextest runs them in parallel) each get one, so they never collide.
pub struct TestSchema {
    base_url: String,
    name: String,
    /// The URL that selects this schema (`options[search_path]=…`, and names its connections
    /// after it: `application_name=…`), for a store or a
    /// `natter serve --database-url`.
    pub url: String,
}

impl TestSchema {
    /// A fresh schema in the database at `NATTER_TEST_DATABASE_URL`; when that is not set,
    /// prints a loud SKIPPED line naming `test` and returns None (in CI: fails, see
    /// [`crate::testenv`]).
    pub async fn from_env(test: &str) -> Option<TestSchema> {
        let url = crate::testenv::service_url("NATTER_TEST_DATABASE_URL", test, "PostgreSQL")?;
        Some(TestSchema::create(&url).await.expect("a schema in NATTER_TEST_DATABASE_URL"))
    }

    /// Creates `natter_test_<uuid>` in the database at `base_url`.
    pub async fn create(base_url: &str) -> StoreResult<TestSchema> {
        let name = format!("natter_test_{}", Uuid::new_v4().simple());
        let mut conn: sqlx::PgConnection = sqlx::Connection::connect(base_url).await?;
        sqlx::query(&format!("CREATE SCHEMA {name}")).execute(&mut conn).await?;
        sqlx::Connection::close(conn).await?;
        let sep = if base_url.contains('?') { '&' } else { '?' };
        Ok(TestSchema {
            url: format!("{base_url}{sep}options[search_path]={name}&application_name={name}"),
            base_url: base_url.to_owned(),
            name,
        })
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (url, name) = (self.base_url.clone(), self.name.clone());
        // On a thread with a runtime of its own: the test's runtime may be the one being
        // dropped. The test's own connections (named after the schema) are ended first, so
        // that a transaction they left open cannot make the DROP wait.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await else { return };
                let _ =
                    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1")
                        .bind(&name)
                        .execute(&mut conn)
                        .await;
                let _ = sqlx::query("SET lock_timeout = '10s'").execute(&mut conn).await;
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).execute(&mut conn).await;
            })
        })
        .join();
    }
}
