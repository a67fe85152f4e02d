//! The SQLite store: one file in the data dir, WAL mode. All writes go through a pool of
//! one connection, so natter's own writers never fight over SQLite's single write lock
//! (and seq allocation is serialised without retry loops); reads use a separate pool.
//!
//! Messages are stored by group commit: [`append_message`](Store::append_message) queues the
//! message for one appender task, which takes every message waiting and stores them all with
//! one statement — one round trip to SQLite's worker thread and one WAL commit per batch
//! instead of per message. Under load a batch holds hundreds of messages; alone, a message
//! is a batch of one and waits for nothing.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use natter_proto::api::{BotRole, ConnectionRecord, MemberRole};
use natter_proto::WireMessage;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::rows::*;
use super::*;
use append::{run_appender, Append, APPEND_QUEUE};

mod append;
mod coordination;
mod ledger;
#[cfg(test)]
mod tests;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The newest schema this binary knows: the highest version in `migrations/sqlite`. A database
/// at a higher one was written by a newer natter (`natter restore` refuses it).
pub fn schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Ids are stored as text, flags as integers.
impl Dialect for sqlx::Sqlite {
    fn id(row: &SqliteRow, col: &str) -> StoreResult<Uuid> {
        parse_id(&row.try_get::<String, _>(col)?, col)
    }
    fn opt_id(row: &SqliteRow, col: &str) -> StoreResult<Option<Uuid>> {
        row.try_get::<Option<String>, _>(col)?.map(|s| parse_id(&s, col)).transpose()
    }
    fn flag(row: &SqliteRow, col: &str) -> StoreResult<bool> {
        Ok(row.try_get::<i64, _>(col)? != 0)
    }

    type Id = String;
    fn id_param(id: Uuid) -> String {
        id.to_string()
    }
    type Flag = i64;
    fn flag_param(flag: bool) -> i64 {
        flag as i64
    }
    type Code = i64;
    fn code_param(code: u16) -> i64 {
        code.into()
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    appender: mpsc::Sender<Append>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file and applies migrations.
    pub async fn open(path: &std::path::Path) -> StoreResult<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true)
            // Hot pages stay in SQLite's own cache (64 MiB per connection, not the default
            // 2 MiB) and the rest are mapped, not copied in with a read() per page: the message
            // indexes are walked on every append.
            .pragma("cache_size", "-65536")
            .pragma("mmap_size", "268435456")
            // Checkpoint (copy the WAL into the database file, with an fsync) every 64 MiB of
            // WAL instead of every 4 MiB: a page rewritten by many batches is copied once.
            .pragma("wal_autocheckpoint", "16384");
        let write = SqlitePoolOptions::new().max_connections(1).connect_with(opts.clone()).await?;
        MIGRATOR.run(&write).await.map_err(|e| StoreError::Backend(format!("migrations failed: {e}")))?;
        let read = SqlitePoolOptions::new().max_connections(4).connect_with(opts.read_only(true)).await?;
        Ok(Self::with_pools(write, read))
    }

    /// A private in-memory SQLite database, gone on exit: for tests that want SQLite's exact
    /// behaviour without a file (`--database-url memory:` is [`MemoryStore`](super::MemoryStore)).
    pub async fn memory() -> StoreResult<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|e| StoreError::Backend(e.to_string()))?
            .foreign_keys(true);
        // One connection that never expires: each new in-memory connection would be an
        // empty database.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await.map_err(|e| StoreError::Backend(format!("migrations failed: {e}")))?;
        Ok(Self::with_pools(pool.clone(), pool))
    }

    /// Starts the appender task; it ends when the last clone of the store is dropped.
    fn with_pools(write: SqlitePool, read: SqlitePool) -> Self {
        let (appender, queue) = mpsc::channel(APPEND_QUEUE);
        tokio::spawn(run_appender(write.clone(), queue));
        SqliteStore { write, read, appender }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    async fn close(&self) {
        // Closing the writer last lets SQLite checkpoint the WAL into the main file.
        self.read.close().await;
        self.write.close().await;
    }

    async fn create_user(&self, user: NewUser) -> StoreResult<User> {
        let id = Uuid::new_v4();
        let now = Utc::now();
        let res =
            sqlx::query("INSERT INTO users (id, username, password_hash, is_admin, created_at) VALUES (?, ?, ?, ?, ?)")
                .bind(id.to_string())
                .bind(&user.username)
                .bind(&user.password_hash)
                .bind(user.is_admin as i64)
                .bind(millis(now))
                .execute(&self.write)
                .await;
        match res {
            Ok(_) => Ok(User {
                id,
                username: user.username,
                password_hash: user.password_hash,
                is_admin: user.is_admin,
                created_at: from_millis(millis(now)),
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::UsernameTaken),
            Err(e) => Err(e.into()),
        }
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        let row =
            sqlx::query("SELECT * FROM users WHERE username = ?").bind(username).fetch_optional(&self.read).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>> {
        let row =
            sqlx::query("SELECT * FROM users WHERE id = ?").bind(id.to_string()).fetch_optional(&self.read).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn set_admin(&self, username: &str, is_admin: bool) -> StoreResult<()> {
        let res = sqlx::query("UPDATE users SET is_admin = ? WHERE username = ?")
            .bind(is_admin as i64)
            .bind(username)
            .execute(&self.write)
            .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn insert_refresh_token(&self, t: NewRefreshToken) -> StoreResult<()> {
        sqlx::query("INSERT INTO refresh_tokens (token_hash, user_id, family_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&t.token_hash)
            .bind(t.user_id.to_string())
            .bind(t.family_id.to_string())
            .bind(millis(Utc::now()))
            .bind(millis(t.expires_at))
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn use_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<RefreshUse> {
        let mut tx = self.write.begin().await?;
        let row = sqlx::query(
            "SELECT user_id, family_id, expires_at, used_at, revoked_at FROM refresh_tokens WHERE token_hash = ?",
        )
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(RefreshUse::Invalid) };
        let family_id = row.id("family_id")?;
        match token_verdict(row.opt_int("used_at")?, row.opt_int("revoked_at")?, row.int("expires_at")?, millis(now)) {
            TokenVerdict::Reused => {
                sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE family_id = ?")
                    .bind(millis(now))
                    .bind(family_id.to_string())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Ok(RefreshUse::Reused { family_id });
            }
            TokenVerdict::Dead => return Ok(RefreshUse::Invalid),
            TokenVerdict::Fresh => {}
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ?")
            .bind(millis(now))
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(RefreshUse::Valid { user_id: row.id("user_id")?, family_id })
    }

    async fn revoke_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<Uuid>> {
        let row = sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?) \
             WHERE family_id = (SELECT family_id FROM refresh_tokens WHERE token_hash = ?) RETURNING family_id",
        )
        .bind(millis(now))
        .bind(token_hash)
        .fetch_optional(&self.write)
        .await?;
        row.as_ref().map(|r| r.id("family_id")).transpose()
    }

    async fn revoked_families(&self, since: DateTime<Utc>) -> StoreResult<Vec<Uuid>> {
        let rows = sqlx::query("SELECT DISTINCT family_id FROM refresh_tokens WHERE revoked_at >= ?")
            .bind(millis(since))
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(|r| r.id("family_id")).collect()
    }

    async fn create_bot(&self, bot: NewBot) -> StoreResult<Bot> {
        let id = Uuid::new_v4();
        let now = millis(Utc::now());
        sqlx::query("INSERT INTO bots (id, owner_id, name, description, visibility, engine, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(id.to_string())
            .bind(bot.owner_id.to_string())
            .bind(&bot.name)
            .bind(&bot.description)
            .bind(bot.visibility.as_str())
            .bind(bot.engine.to_string())
            .bind(now)
            .bind(now)
            .execute(&self.write)
            .await?;
        self.bot_in(&self.write, id).await?.ok_or(StoreError::NotFound)
    }

    async fn bot(&self, id: Uuid) -> StoreResult<Option<Bot>> {
        self.bot_in(&self.read, id).await
    }

    async fn update_bot(&self, id: Uuid, c: BotChanges) -> StoreResult<Bot> {
        let res = sqlx::query(
            "UPDATE bots SET name = COALESCE(?, name), description = COALESCE(?, description), \
             visibility = COALESCE(?, visibility), engine = COALESCE(?, engine), updated_at = ? WHERE id = ?",
        )
        .bind(c.name)
        .bind(c.description)
        .bind(c.visibility.map(|v| v.as_str()))
        .bind(c.engine.map(|e| e.to_string()))
        .bind(millis(Utc::now()))
        .bind(id.to_string())
        .execute(&self.write)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        self.bot_in(&self.write, id).await?.ok_or(StoreError::NotFound)
    }

    async fn delete_bot(&self, id: Uuid) -> StoreResult<()> {
        let res = sqlx::query("DELETE FROM bots WHERE id = ?").bind(id.to_string()).execute(&self.write).await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn bots_for_user(&self, user_id: Uuid) -> StoreResult<Vec<(Bot, BotRole)>> {
        let sql = format!(
            "SELECT {BOT_COLS}, m.role AS member_role FROM {BOTS} \
             LEFT JOIN bot_members m ON m.bot_id = b.id AND m.user_id = ?1 \
             WHERE b.owner_id = ?1 OR m.user_id IS NOT NULL OR b.visibility = 'public' \
             ORDER BY b.created_at, b.id"
        );
        let rows = sqlx::query(&sql).bind(user_id.to_string()).fetch_all(&self.read).await?;
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
            sqlx::query_scalar("SELECT role FROM bot_members WHERE bot_id = ? AND user_id = ?")
                .bind(bot.id.to_string())
                .bind(user_id.to_string())
                .fetch_optional(&self.read)
                .await?;
        Ok(role_of(bot, user_id, member.as_deref().map(member_role)))
    }

    async fn upsert_member(&self, bot_id: Uuid, user_id: Uuid, role: MemberRole) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO bot_members (bot_id, user_id, role, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (bot_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(bot_id.to_string())
        .bind(user_id.to_string())
        .bind(BotRole::from(role).as_str())
        .bind(millis(Utc::now()))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn remove_member(&self, bot_id: Uuid, user_id: Uuid) -> StoreResult<bool> {
        let res = sqlx::query("DELETE FROM bot_members WHERE bot_id = ? AND user_id = ?")
            .bind(bot_id.to_string())
            .bind(user_id.to_string())
            .execute(&self.write)
            .await?;
        Ok(res.rows_affected() > 0)
    }

    async fn members(&self, bot_id: Uuid) -> StoreResult<Vec<Member>> {
        let rows = sqlx::query(
            "SELECT m.user_id, u.username, m.role FROM bot_members m JOIN users u ON u.id = m.user_id \
             WHERE m.bot_id = ? ORDER BY u.username",
        )
        .bind(bot_id.to_string())
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(member_from_row).collect()
    }

    async fn conversations_of_bot(&self, bot_id: Uuid) -> StoreResult<Vec<Uuid>> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM conversations WHERE bot_id = ?")
            .bind(bot_id.to_string())
            .fetch_all(&self.read)
            .await?;
        ids.iter()
            .map(|s| Uuid::parse_str(s).map_err(|e| StoreError::Backend(format!("bad conversation id: {e}"))))
            .collect()
    }

    async fn conversation(&self, user_id: Uuid, bot_id: Uuid) -> StoreResult<Conversation> {
        let existing = sqlx::query("SELECT id, last_seq FROM conversations WHERE user_id = ? AND bot_id = ?")
            .bind(user_id.to_string())
            .bind(bot_id.to_string())
            .fetch_optional(&self.read)
            .await?;
        if let Some(row) = existing {
            return Ok(Conversation { id: row.id("id")?, user_id, bot_id, last_seq: row.try_get("last_seq")? });
        }
        sqlx::query("INSERT INTO conversations (id, user_id, bot_id, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (user_id, bot_id) DO NOTHING")
            .bind(Uuid::new_v4().to_string())
            .bind(user_id.to_string())
            .bind(bot_id.to_string())
            .bind(millis(Utc::now()))
            .execute(&self.write)
            .await?;
        let row = sqlx::query("SELECT id, last_seq FROM conversations WHERE user_id = ? AND bot_id = ?")
            .bind(user_id.to_string())
            .bind(bot_id.to_string())
            .fetch_one(&self.write)
            .await?;
        Ok(Conversation { id: row.id("id")?, user_id, bot_id, last_seq: row.try_get("last_seq")? })
    }

    async fn append_message(&self, m: NewMessage) -> StoreResult<Appended> {
        let (reply, result) = oneshot::channel();
        let closed = || StoreError::Backend("the store is closed".into());
        self.appender.send((m, reply)).await.map_err(|_| closed())?;
        result.await.map_err(|_| closed())?
    }

    async fn messages_after(&self, conversation_id: Uuid, after_seq: i64, limit: u32) -> StoreResult<Vec<WireMessage>> {
        let rows = sqlx::query(&format!(
            "SELECT {MSG_COLS} FROM messages WHERE conversation_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        ))
        .bind(conversation_id.to_string())
        .bind(after_seq)
        .bind(limit as i64)
        .fetch_all(&self.read)
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
            "SELECT {MSG_COLS} FROM messages WHERE conversation_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?"
        ))
        .bind(conversation_id.to_string())
        .bind(before_seq)
        .bind(limit as i64)
        .fetch_all(&self.read)
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
        let mut tx = self.write.begin().await?;
        // Expired tickets are swept as new ones are made, so the table stays small.
        sqlx::query("DELETE FROM ws_tickets WHERE expires_at <= ?").bind(millis(Utc::now())).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO ws_tickets (ticket_hash, user_id, bot_id, expires_at) VALUES (?, ?, ?, ?)")
            .bind(ticket_hash)
            .bind(user_id.to_string())
            .bind(bot_id.to_string())
            .bind(millis(expires_at))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn consume_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>> {
        let row = sqlx::query("DELETE FROM ws_tickets WHERE ticket_hash = ? RETURNING user_id, bot_id, expires_at")
            .bind(ticket_hash)
            .fetch_optional(&self.write)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let expires: i64 = row.try_get("expires_at")?;
        if expires <= millis(now) {
            return Ok(None);
        }
        Ok(Some((row.id("user_id")?, row.id("bot_id")?)))
    }

    async fn peek_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>> {
        let row = sqlx::query("SELECT user_id, bot_id FROM ws_tickets WHERE ticket_hash = ? AND expires_at > ?")
            .bind(ticket_hash)
            .bind(millis(now))
            .fetch_optional(&self.read)
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

impl SqliteStore {
    async fn bot_in(&self, pool: &SqlitePool, id: Uuid) -> StoreResult<Option<Bot>> {
        let row = sqlx::query(&format!("SELECT {BOT_COLS} FROM {BOTS} WHERE b.id = ?"))
            .bind(id.to_string())
            .fetch_optional(pool)
            .await?;
        row.as_ref().map(bot_from_row).transpose()
    }
}
