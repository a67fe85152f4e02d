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
use natter_proto::api::{BotRole, ConnectionRecord, MemberRole};
use natter_proto::{MessageRole, WireMessage};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row};
use uuid::Uuid;

use super::rows::*;
use super::*;
use messages::{already_answered, insert_with_next_seq};

mod coordination;
mod ledger;
mod messages;
mod test_schema;

pub use test_schema::TestSchema;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Ids and flags have native types.
impl Dialect for Postgres {
    fn id(row: &PgRow, col: &str) -> StoreResult<Uuid> {
        Ok(row.try_get(col)?)
    }
    fn opt_id(row: &PgRow, col: &str) -> StoreResult<Option<Uuid>> {
        Ok(row.try_get(col)?)
    }
    fn flag(row: &PgRow, col: &str) -> StoreResult<bool> {
        Ok(row.try_get(col)?)
    }

    type Id = Uuid;
    fn id_param(id: Uuid) -> Uuid {
        id
    }
    type Flag = bool;
    fn flag_param(flag: bool) -> bool {
        flag
    }
    type Code = i32;
    fn code_param(code: u16) -> i32 {
        code.into()
    }
}

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
        let family_id = row.id("family_id")?;
        match token_verdict(row.opt_int("used_at")?, row.opt_int("revoked_at")?, row.int("expires_at")?, millis(now)) {
            TokenVerdict::Reused => {
                sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE family_id = $2")
                    .bind(millis(now))
                    .bind(family_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Ok(RefreshUse::Reused { family_id });
            }
            TokenVerdict::Dead => return Ok(RefreshUse::Invalid),
            TokenVerdict::Fresh => {}
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2")
            .bind(millis(now))
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(RefreshUse::Valid { user_id: row.id("user_id")?, family_id })
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
        let row = sqlx::query(&format!("SELECT {BOT_COLS} FROM {BOTS} WHERE b.id = $1"))
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
            "SELECT {BOT_COLS}, m.role AS member_role FROM {BOTS} \
             LEFT JOIN bot_members m ON m.bot_id = b.id AND m.user_id = $1 \
             WHERE b.owner_id = $1 OR m.user_id IS NOT NULL OR b.visibility = 'public' \
             ORDER BY b.created_at, b.id"
        );
        let rows = sqlx::query(&sql).bind(user_id).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let bot = bot_from_row(row)?;
                let member = row.opt_text("member_role")?;
                let role = role_of(&bot, user_id, member.as_deref().map(member_role)).unwrap_or(BotRole::Public);
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
        Ok(role_of(bot, user_id, member.as_deref().map(member_role)))
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
        rows.iter().map(member_from_row).collect()
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
        Ok(Conversation { id: row.id("id")?, user_id, bot_id, last_seq: row.try_get("last_seq")? })
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
        Ok(Some((row.id("user_id")?, row.id("bot_id")?)))
    }

    async fn peek_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>> {
        let row = sqlx::query("SELECT user_id, bot_id FROM ws_tickets WHERE ticket_hash = $1 AND expires_at > $2")
            .bind(ticket_hash)
            .bind(millis(now))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| Ok((row.id("user_id")?, row.id("bot_id")?))).transpose()
    }

    async fn record_connections(&self, rows: &[ConnectionRecord]) -> StoreResult<()> {
        self.write_ledger(rows).await
    }

    async fn connections(
        &self,
        user: Option<Uuid>,
        bot: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        self.ledger_rows(user, bot, limit).await
    }

    async fn connection(&self, attempt_id: Uuid, user_id: Option<Uuid>) -> StoreResult<Option<ConnectionRecord>> {
        self.ledger_row(attempt_id, user_id).await
    }

    async fn prune_connections(&self, older_than: DateTime<Utc>, keep: u64) -> StoreResult<u64> {
        self.prune_ledger(older_than, keep).await
    }
}
