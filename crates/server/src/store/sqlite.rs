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
use natter_proto::api::{BotRole, ClosedBy, ConnectionRecord, MemberRole, Visibility};
use natter_proto::{MessageRole, MessageStatus, WireMessage};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The newest schema this binary knows: the highest version in `migrations/sqlite`. A database
/// at a higher one was written by a newer natter (`natter restore` refuses it).
pub fn schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

#[derive(Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    appender: mpsc::Sender<Append>,
}

/// A message waiting for the appender, and where its result goes.
type Append = (NewMessage, oneshot::Sender<StoreResult<Appended>>);

/// At most this many messages in one statement (well under SQLite's limits: they travel as
/// one JSON parameter).
const MAX_BATCH: usize = 512;
/// Messages waiting for the appender before `append_message` waits for room.
const APPEND_QUEUE: usize = 4 * MAX_BATCH;

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

/// Group commit: stores whatever is waiting, one batch at a time.
async fn run_appender(write: SqlitePool, mut queue: mpsc::Receiver<Append>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (messages, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        match append_batch(&write, messages).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                let e = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Backend(e.clone())));
                }
            }
        }
    }
}

/// One row of a batch, as the appender's statement reads it from its JSON parameter.
#[derive(serde::Serialize)]
struct BatchRow<'a> {
    id: String,
    conversation_id: String,
    role: &'static str,
    content: &'a str,
    client_id: Option<&'a str>,
    in_reply_to: Option<String>,
    status: &'static str,
    created_at: i64,
}

/// Stores a batch in one statement and says, for each message in order, what became of it.
///
/// Inside the statement, a message whose `client_id` is already stored, or appears earlier in
/// the batch, is not inserted, nor is a bot message in reply to a user message that already
/// has its outcome (not owed any more, and a reply stored or earlier in the batch); the others of a conversation take `last_seq + 1, + 2, …` in
/// batch order (a window function over the batch, computed before any row is inserted: the
/// statement reads `messages`, so SQLite materialises it first). The trigger of migration
/// 0005 advances `last_seq`. Seqs stay gap-free because every write goes through the one
/// write connection.
async fn append_batch(write: &SqlitePool, messages: Vec<NewMessage>) -> StoreResult<Vec<StoreResult<Appended>>> {
    let created_at = from_millis(millis(Utc::now()));
    let rows: Vec<BatchRow> = messages
        .iter()
        .map(|m| BatchRow {
            id: m.id.to_string(),
            conversation_id: m.conversation_id.to_string(),
            role: m.role.as_str(),
            content: &m.content,
            client_id: m.client_id.as_deref(),
            in_reply_to: m.in_reply_to.map(|u| u.to_string()),
            status: m.status.as_str(),
            created_at: millis(created_at),
        })
        .collect();
    let json = serde_json::to_string(&rows).map_err(|e| StoreError::Backend(format!("encoding a batch: {e}")))?;
    drop(rows);
    let inserted: Vec<(String, i64)> = sqlx::query_as(
        "WITH b AS ( \
             SELECT CAST(key AS INTEGER) AS ord, value ->> 'id' AS id, value ->> 'conversation_id' AS conv, \
                    value ->> 'role' AS role, value ->> 'content' AS content, value ->> 'client_id' AS client_id, \
                    value ->> 'in_reply_to' AS in_reply_to, value ->> 'status' AS status, \
                    value ->> 'created_at' AS created_at \
             FROM json_each(?1)), \
         d AS ( \
             SELECT b.*, ROW_NUMBER() OVER (PARTITION BY conv, client_id ORDER BY ord) AS nth, \
                    ROW_NUMBER() OVER (PARTITION BY role, in_reply_to ORDER BY ord) AS nth_reply FROM b), \
         k AS ( \
             SELECT * FROM d WHERE (client_id IS NULL OR (nth = 1 AND NOT EXISTS ( \
                 SELECT 1 FROM messages m WHERE m.conversation_id = d.conv AND m.client_id = d.client_id))) \
             AND (role <> 'bot' OR in_reply_to IS NULL OR (nth_reply = 1 AND ( \
                 EXISTS (SELECT 1 FROM owed_replies o WHERE o.message_id = d.in_reply_to) \
                 OR NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = d.conv \
                     AND m.in_reply_to = d.in_reply_to AND m.role = 'bot'))))) \
         INSERT INTO messages (id, conversation_id, seq, role, content, client_id, in_reply_to, status, created_at) \
         SELECT k.id, k.conv, c.last_seq + ROW_NUMBER() OVER (PARTITION BY k.conv ORDER BY k.ord), \
                k.role, k.content, k.client_id, k.in_reply_to, k.status, k.created_at \
         FROM k JOIN conversations c ON c.id = k.conv \
         ORDER BY k.ord \
         RETURNING id, seq",
    )
    .bind(json)
    .fetch_all(write)
    .await?;
    let mut seqs: std::collections::HashMap<String, i64> = inserted.into_iter().collect();
    let mut results = Vec::with_capacity(messages.len());
    for m in messages {
        let result = match seqs.remove(&m.id.to_string()) {
            Some(seq) => Ok(Appended {
                message: WireMessage {
                    id: m.id,
                    conversation_id: m.conversation_id,
                    seq,
                    role: m.role,
                    content: m.content,
                    created_at,
                    client_id: m.client_id,
                    in_reply_to: m.in_reply_to,
                    status: m.status,
                },
                duplicate: false,
            }),
            // Not inserted: its client_id is already stored (maybe by this very batch), it
            // replies to a message already answered, or the conversation does not exist.
            None => not_inserted(write, &m).await,
        };
        results.push(result);
    }
    Ok(results)
}

async fn not_inserted(write: &SqlitePool, m: &NewMessage) -> StoreResult<Appended> {
    let Some(client_id) = &m.client_id else {
        let conversation: Option<String> = sqlx::query_scalar("SELECT id FROM conversations WHERE id = ?")
            .bind(m.conversation_id.to_string())
            .fetch_optional(write)
            .await?;
        return Err(match (conversation, m.role, m.in_reply_to) {
            (Some(_), MessageRole::Bot, Some(_)) => StoreError::AlreadyAnswered,
            _ => StoreError::NotFound,
        });
    };
    let row = sqlx::query(&format!("SELECT {MSG_COLS} FROM messages WHERE conversation_id = ? AND client_id = ?"))
        .bind(m.conversation_id.to_string())
        .bind(client_id)
        .fetch_optional(write)
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(Appended { message: message_from_row(&row)?, duplicate: true })
}

fn uuid_col(row: &SqliteRow, col: &str) -> StoreResult<Uuid> {
    let s: String = row.try_get(col)?;
    Uuid::parse_str(&s).map_err(|e| StoreError::Backend(format!("bad uuid in {col}: {e}")))
}

fn opt_uuid_col(row: &SqliteRow, col: &str) -> StoreResult<Option<Uuid>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| Uuid::parse_str(&s).map_err(|e| StoreError::Backend(format!("bad uuid in {col}: {e}")))).transpose()
}

fn user_from_row(row: &SqliteRow) -> StoreResult<User> {
    Ok(User {
        id: uuid_col(row, "id")?,
        username: row.try_get("username")?,
        password_hash: row.try_get("password_hash")?,
        is_admin: row.try_get::<i64, _>("is_admin")? != 0,
        created_at: from_millis(row.try_get("created_at")?),
    })
}

const BOT_COLS: &str = "b.id, b.owner_id, u.username AS owner_username, b.name, b.description, b.visibility, b.engine, b.created_at, b.updated_at";

fn bot_from_row(row: &SqliteRow) -> StoreResult<Bot> {
    let vis: String = row.try_get("visibility")?;
    let engine: String = row.try_get("engine")?;
    Ok(Bot {
        id: uuid_col(row, "id")?,
        owner_id: uuid_col(row, "owner_id")?,
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

fn message_from_row(row: &SqliteRow) -> StoreResult<WireMessage> {
    let role: String = row.try_get("role")?;
    let status: String = row.try_get("status")?;
    Ok(WireMessage {
        id: uuid_col(row, "id")?,
        conversation_id: uuid_col(row, "conversation_id")?,
        seq: row.try_get("seq")?,
        role: MessageRole::parse(&role).ok_or_else(|| StoreError::Backend(format!("bad role {role}")))?,
        content: row.try_get("content")?,
        created_at: from_millis(row.try_get("created_at")?),
        client_id: row.try_get("client_id")?,
        in_reply_to: opt_uuid_col(row, "in_reply_to")?,
        status: MessageStatus::parse(&status).ok_or_else(|| StoreError::Backend(format!("bad status {status}")))?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
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
        let family_id = uuid_col(&row, "family_id")?;
        let used: Option<i64> = row.try_get("used_at")?;
        let revoked: Option<i64> = row.try_get("revoked_at")?;
        let expires: i64 = row.try_get("expires_at")?;
        if used.is_some() {
            sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE family_id = ?")
                .bind(millis(now))
                .bind(family_id.to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RefreshUse::Reused { family_id });
        }
        if revoked.is_some() || expires <= millis(now) {
            return Ok(RefreshUse::Invalid);
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ?")
            .bind(millis(now))
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(RefreshUse::Valid { user_id: uuid_col(&row, "user_id")?, family_id })
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
        row.as_ref().map(|r| uuid_col(r, "family_id")).transpose()
    }

    async fn revoked_families(&self, since: DateTime<Utc>) -> StoreResult<Vec<Uuid>> {
        let rows = sqlx::query("SELECT DISTINCT family_id FROM refresh_tokens WHERE revoked_at >= ?")
            .bind(millis(since))
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(|r| uuid_col(r, "family_id")).collect()
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
            "SELECT {BOT_COLS}, m.role AS member_role FROM bots b JOIN users u ON u.id = b.owner_id \
             LEFT JOIN bot_members m ON m.bot_id = b.id AND m.user_id = ?1 \
             WHERE b.owner_id = ?1 OR m.user_id IS NOT NULL OR b.visibility = 'public' \
             ORDER BY b.created_at, b.id"
        );
        let rows = sqlx::query(&sql).bind(user_id.to_string()).fetch_all(&self.read).await?;
        rows.iter()
            .map(|row| {
                let bot = bot_from_row(row)?;
                let member: Option<String> = row.try_get("member_role")?;
                let role = role_of(&bot, user_id, member.as_deref()).unwrap_or(BotRole::Public);
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
        Ok(role_of(bot, user_id, member.as_deref()))
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
        rows.iter()
            .map(|row| {
                let role: String = row.try_get("role")?;
                Ok(Member {
                    user_id: uuid_col(row, "user_id")?,
                    username: row.try_get("username")?,
                    role: if role == "admin" { MemberRole::Admin } else { MemberRole::Chat },
                })
            })
            .collect()
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
            return Ok(Conversation { id: uuid_col(&row, "id")?, user_id, bot_id, last_seq: row.try_get("last_seq")? });
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
        Ok(Conversation { id: uuid_col(&row, "id")?, user_id, bot_id, last_seq: row.try_get("last_seq")? })
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
        Ok(Some((uuid_col(&row, "user_id")?, uuid_col(&row, "bot_id")?)))
    }

    async fn peek_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>> {
        let row = sqlx::query("SELECT user_id, bot_id FROM ws_tickets WHERE ticket_hash = ? AND expires_at > ?")
            .bind(ticket_hash)
            .bind(millis(now))
            .fetch_optional(&self.read)
            .await?;
        row.map(|row| Ok((uuid_col(&row, "user_id")?, uuid_col(&row, "bot_id")?))).transpose()
    }

    async fn record_connections(&self, rows: &[ConnectionRecord]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.write.begin().await?;
        for r in rows {
            sqlx::query(&format!("INSERT OR REPLACE INTO connections ({LEDGER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"))
                .bind(r.connection_id.to_string())
                .bind(r.attempt_id.to_string())
                .bind(r.user_id.map(|u| u.to_string()))
                .bind(r.bot_id.map(|u| u.to_string()))
                .bind(&r.remote_addr)
                .bind(&r.user_agent)
                .bind(&r.origin)
                .bind(&r.upgrade)
                .bind(&r.connection)
                .bind(&r.sec_websocket_version)
                .bind(&r.forwarded_for)
                .bind(millis(r.started_at))
                .bind(r.established as i64)
                .bind(r.ended_at.map(millis))
                .bind(r.close_code.map(i64::from))
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
            "SELECT {LEDGER_COLS} FROM connections WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR bot_id = ?2) \
             ORDER BY started_at DESC, connection_id LIMIT ?3"
        ))
        .bind(user_id.map(|u| u.to_string()))
        .bind(bot_id.map(|u| u.to_string()))
        .bind(limit as i64)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(ledger_from_row).collect()
    }

    async fn connection(&self, attempt_id: Uuid, user_id: Option<Uuid>) -> StoreResult<Option<ConnectionRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {LEDGER_COLS} FROM connections WHERE (attempt_id = ?1 OR connection_id = ?1) \
             AND (?2 IS NULL OR user_id = ?2) ORDER BY started_at DESC LIMIT 1"
        ))
        .bind(attempt_id.to_string())
        .bind(user_id.map(|u| u.to_string()))
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(ledger_from_row).transpose()
    }

    async fn prune_connections(&self, older_than: DateTime<Utc>, keep: u64) -> StoreResult<u64> {
        let mut tx = self.write.begin().await?;
        let old = sqlx::query("DELETE FROM connections WHERE started_at < ?")
            .bind(millis(older_than))
            .execute(&mut *tx)
            .await?;
        let over = sqlx::query(
            "DELETE FROM connections WHERE connection_id IN \
             (SELECT connection_id FROM connections ORDER BY started_at DESC, connection_id LIMIT -1 OFFSET ?)",
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

fn ledger_from_row(row: &SqliteRow) -> StoreResult<ConnectionRecord> {
    let closed_by: Option<String> = row.try_get("closed_by")?;
    let code: Option<i64> = row.try_get("close_code")?;
    let ended: Option<i64> = row.try_get("ended_at")?;
    Ok(ConnectionRecord {
        attempt_id: uuid_col(row, "attempt_id")?,
        connection_id: uuid_col(row, "connection_id")?,
        user_id: opt_uuid_col(row, "user_id")?,
        bot_id: opt_uuid_col(row, "bot_id")?,
        remote_addr: row.try_get("remote_addr")?,
        user_agent: row.try_get("user_agent")?,
        origin: row.try_get("origin")?,
        upgrade: row.try_get("upgrade")?,
        connection: row.try_get("connection_hdr")?,
        sec_websocket_version: row.try_get("ws_version")?,
        forwarded_for: row.try_get("forwarded_for")?,
        started_at: from_millis(row.try_get("started_at")?),
        established: row.try_get::<i64, _>("established")? != 0,
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

impl SqliteStore {
    async fn bot_in(&self, pool: &SqlitePool, id: Uuid) -> StoreResult<Option<Bot>> {
        let row =
            sqlx::query(&format!("SELECT {BOT_COLS} FROM bots b JOIN users u ON u.id = b.owner_id WHERE b.id = ?"))
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?;
        row.as_ref().map(bot_from_row).transpose()
    }
}

/// The role a user has on a bot, from ownership, membership and visibility.
pub(super) fn role_of(bot: &Bot, user_id: Uuid, member_role: Option<&str>) -> Option<BotRole> {
    if bot.owner_id == user_id {
        return Some(BotRole::Owner);
    }
    match member_role {
        Some("admin") => Some(BotRole::Admin),
        Some(_) => Some(BotRole::Chat),
        None if bot.visibility == Visibility::Public => Some(BotRole::Public),
        None => None,
    }
}

/// On SQLite the single writer connection already serialises every claim and sweep.
#[async_trait]
impl Coordination for SqliteStore {
    fn shared(&self) -> bool {
        false
    }

    async fn claim_slot(&self, slot: SlotClaim, max: usize, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.write.begin().await?;
        sqlx::query("DELETE FROM connection_slots WHERE user_id = ? AND expires_at <= ?")
            .bind(slot.user_id.to_string())
            .bind(millis(now))
            .execute(&mut *tx)
            .await?;
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM connection_slots WHERE user_id = ?")
            .bind(slot.user_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        if count as usize >= max {
            return Ok(false);
        }
        sqlx::query("INSERT INTO connection_slots (connection_id, user_id, node_id, expires_at) VALUES (?, ?, ?, ?)")
            .bind(slot.connection_id.to_string())
            .bind(slot.user_id.to_string())
            .bind(slot.node_id.to_string())
            .bind(millis(slot.expires_at))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn slots_in_use(&self, user_id: Uuid, now: DateTime<Utc>) -> StoreResult<usize> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM connection_slots WHERE user_id = ? AND expires_at > ?")
            .bind(user_id.to_string())
            .bind(millis(now))
            .fetch_one(&self.read)
            .await?;
        Ok(n as usize)
    }

    async fn release_slot(&self, connection_id: Uuid) -> StoreResult<()> {
        sqlx::query("DELETE FROM connection_slots WHERE connection_id = ?")
            .bind(connection_id.to_string())
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn renew_node(&self, node_id: Uuid, slots: &[Uuid], work: &[Uuid], until: DateTime<Utc>) -> StoreResult<()> {
        let ids = |ids: &[Uuid]| {
            serde_json::to_string(&ids.iter().map(Uuid::to_string).collect::<Vec<_>>()).expect("ids serialize")
        };
        let mut tx = self.write.begin().await?;
        sqlx::query(
            "UPDATE connection_slots SET expires_at = ? WHERE node_id = ? \
             AND connection_id IN (SELECT value FROM json_each(?))",
        )
        .bind(millis(until))
        .bind(node_id.to_string())
        .bind(ids(slots))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM connection_slots WHERE expires_at < ? AND node_id = ?")
            .bind(millis(until))
            .bind(node_id.to_string())
            .execute(&mut *tx)
            .await?;
        for q in [
            "UPDATE generations SET lease_until = ? WHERE node_id = ? AND message_id IN (SELECT value FROM json_each(?))",
            "UPDATE owed_replies SET lease_until = ? WHERE node_id = ? AND message_id IN (SELECT value FROM json_each(?))",
        ] {
            sqlx::query(q).bind(millis(until)).bind(node_id.to_string()).bind(ids(work)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn begin_generation(&self, g: &GenerationLease) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO generations (message_id, conversation_id, in_reply_to, node_id, text, lease_until) \
             VALUES (?, ?, ?, ?, '', ?)",
        )
        .bind(g.message_id.to_string())
        .bind(g.conversation_id.to_string())
        .bind(g.in_reply_to.to_string())
        .bind(g.node_id.to_string())
        .bind(millis(g.lease_until))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn checkpoint_generation(&self, message_id: Uuid, text: &str) -> StoreResult<()> {
        sqlx::query("UPDATE generations SET text = ? WHERE message_id = ?")
            .bind(text)
            .bind(message_id.to_string())
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn generation_in_progress(&self, conversation_id: Uuid, message_id: Uuid) -> StoreResult<bool> {
        let found: Option<String> =
            sqlx::query_scalar("SELECT message_id FROM generations WHERE message_id = ? AND conversation_id = ?")
                .bind(message_id.to_string())
                .bind(conversation_id.to_string())
                .fetch_optional(&self.read)
                .await?;
        Ok(found.is_some())
    }

    async fn end_generation(&self, message_id: Uuid) -> StoreResult<()> {
        sqlx::query("DELETE FROM generations WHERE message_id = ?")
            .bind(message_id.to_string())
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn recover_generations(&self, now: DateTime<Utc>) -> StoreResult<Vec<WireMessage>> {
        let mut tx = self.write.begin().await?;
        let rows = sqlx::query(
            "DELETE FROM generations WHERE lease_until <= ? RETURNING message_id, conversation_id, in_reply_to, text",
        )
        .bind(millis(now))
        .fetch_all(&mut *tx)
        .await?;
        let mut recovered = Vec::new();
        for row in rows {
            let id: String = row.try_get("message_id")?;
            let conv: String = row.try_get("conversation_id")?;
            // The node may have stored the reply and died before forgetting its lease.
            let stored: Option<String> =
                sqlx::query_scalar("SELECT id FROM messages WHERE id = ?").bind(&id).fetch_optional(&mut *tx).await?;
            if stored.is_some() {
                continue;
            }
            let in_reply_to: String = row.try_get("in_reply_to")?;
            // Answered by another reply meanwhile (its node stalled past the lease, then finished).
            let answered: bool = sqlx::query_scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM owed_replies WHERE message_id = ?2) \
                   AND EXISTS (SELECT 1 FROM messages WHERE conversation_id = ?1 AND in_reply_to = ?2 AND role = 'bot')",
            )
            .bind(&conv)
            .bind(&in_reply_to)
            .fetch_one(&mut *tx)
            .await?;
            if answered {
                continue;
            }
            let Some(seq) = sqlx::query_scalar::<_, i64>(
                "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
            )
            .bind(&conv)
            .fetch_optional(&mut *tx)
            .await?
            else {
                continue;
            };
            let created = millis(Utc::now());
            let text: String = row.try_get("text")?;
            sqlx::query(&format!(
                "INSERT INTO messages ({MSG_COLS}) VALUES (?, ?, ?, 'bot', ?, NULL, ?, 'incomplete', ?)"
            ))
            .bind(&id)
            .bind(&conv)
            .bind(seq)
            .bind(&text)
            .bind(&in_reply_to)
            .bind(created)
            .execute(&mut *tx)
            .await?;
            let row = sqlx::query(&format!("SELECT {MSG_COLS} FROM messages WHERE id = ?"))
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?;
            recovered.push(message_from_row(&row)?);
        }
        tx.commit().await?;
        Ok(recovered)
    }

    async fn lease_owed(&self, message_id: Uuid, node_id: Uuid, until: DateTime<Utc>) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE owed_replies SET node_id = ?1, lease_until = ?2 \
             WHERE message_id = ?3 AND (node_id IS NULL OR node_id = ?1)",
        )
        .bind(node_id.to_string())
        .bind(millis(until))
        .bind(message_id.to_string())
        .execute(&self.write)
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
        let mut tx = self.write.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE owed_replies SET node_id = ?1, lease_until = ?2 WHERE message_id IN ( \
                 SELECT o.message_id FROM owed_replies o \
                 WHERE (o.lease_until < ?3 OR (o.lease_until IS NULL AND o.created_at < ?4)) \
                   AND NOT EXISTS (SELECT 1 FROM generations g WHERE g.in_reply_to = o.message_id) \
                 ORDER BY o.created_at LIMIT ?5) \
             RETURNING message_id",
        )
        .bind(node_id.to_string())
        .bind(millis(until))
        .bind(millis(now))
        .bind(millis(unleased_before))
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut owed = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(&format!(
                "SELECT m.{}, c.bot_id FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE m.id = ?",
                MSG_COLS.replace(", ", ", m.")
            ))
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
            owed.push(OwedMessage { message: message_from_row(&row)?, bot_id: uuid_col(&row, "bot_id")? });
        }
        tx.commit().await?;
        owed.sort_by_key(|o| (o.message.created_at, o.message.seq));
        Ok(owed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case in one run on a file (the per-case tests, `store::conformance::cases`, use an
    /// in-memory database).
    #[tokio::test]
    async fn conformance_on_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("natter.db")).await.unwrap();
        super::super::conformance::run_all(std::sync::Arc::new(store)).await;
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.db");
        let store = SqliteStore::open(&path).await.unwrap();
        store
            .create_user(NewUser { username: "keep".into(), password_hash: "h".into(), is_admin: false })
            .await
            .unwrap();
        drop(store);
        let again = SqliteStore::open(&path).await.unwrap();
        assert!(again.user_by_username("keep").await.unwrap().is_some());
    }
}
