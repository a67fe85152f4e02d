//! Group commit on a writer thread of its own: [`SqliteStore::append_message`](super::SqliteStore)
//! queues each message (and `append_answered` a message with its reply) for the appender, a
//! thread that owns a second write connection (on `rusqlite`) and stores everything waiting in
//! one transaction, statement by statement with cached prepared statements, then answers each.
//! A reply stored with its message costs little more than the message: the conversation's pages
//! (its row, its leaves of the two message indexes) are written once for both.
//!
//! Why a thread and not a task on sqlx: every sqlx statement is a hand-off to sqlx's own worker
//! thread and back, and one statement for a whole batch needs the batch as a JSON parameter and
//! window functions to number it — what the profile in docs/performance.md found the append
//! path spending its time on. Here a batch costs one hand-off each way, and each message a few
//! prepared statements run in place.
//!
//! The appender and the sqlx write pool are two writers of one file: SQLite's write lock
//! serialises them (each takes it before it reads anything it decides on: `BEGIN IMMEDIATE`
//! here, [`SqlStore::begin_write`](super::super::sql::SqlStore::begin_write) there), so a seq is
//! read and taken under the lock and stays gap-free whoever writes the message.

use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use natter_proto::{MessageRole, WireMessage};
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::super::rows::*;
use super::super::sql::SqlAppend;
use super::super::*;
use super::{SqliteStore, TUNING};

/// What the appender is asked: store a message, with its reply when there is one already
/// ([`Store::append_answered`]), and say what became of them; or stop.
#[allow(clippy::large_enum_variant)] // every job but the last is an `Append`: nothing to save by boxing
pub(super) enum Job {
    Append(NewMessage, Option<NewMessage>, oneshot::Sender<StoreResult<AppendedPair>>),
    /// Answer every message already queued, refuse the rest, close the connection, then say so.
    Close(oneshot::Sender<()>),
}

/// At most this many jobs (a message, or a message and its reply) in one transaction.
const MAX_BATCH: usize = 512;
/// Messages waiting for the appender before `append_message` waits for room.
pub(super) const APPEND_QUEUE: usize = 4 * MAX_BATCH;

/// How long the appender waits for the write lock the sqlx pool holds, as that pool does.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the appender's connection to the database file (already migrated) and starts its
/// thread. It stops on [`Job::Close`], or when the last clone of the store is dropped.
pub(super) fn start(path: &std::path::Path) -> StoreResult<mpsc::Sender<Job>> {
    let conn = rusqlite::Connection::open(path).map_err(backend)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(backend)?;
    // As the sqlx connections are opened (`SqliteStore::open`; journal_mode is the file's),
    // except:
    // - statement journals in memory: a statement with triggers inside a many-statement
    //   transaction journals the pages it changes, and on disk that was a quarter of the
    //   appender's time (a write() per page);
    // - no foreign-key checks: the appender inserts a message only through a SELECT of its
    //   conversation under the write lock, and the triggers' rows carry that conversation too;
    //   a check would be two more index probes per message and deletes are not its business.
    let tuning: String = TUNING.iter().map(|(name, value)| format!("PRAGMA {name} = {value}; ")).collect();
    conn.execute_batch(&format!(
        "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY; {tuning}"
    ))
    .map_err(backend)?;
    let (appender, queue) = mpsc::channel(APPEND_QUEUE);
    thread::Builder::new()
        .name("natter-sqlite-appender".into())
        .spawn(move || run(conn, queue))
        .map_err(|e| StoreError::Backend(format!("starting the appender: {e}")))?;
    Ok(appender)
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Group commit: takes whatever is waiting, up to [`MAX_BATCH`], and stores it in one
/// transaction; a message alone is a batch of one and waits for nothing.
fn run(mut conn: rusqlite::Connection, mut queue: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut closing = None;
    while let Some(job) = queue.blocking_recv() {
        let mut next = Some(job);
        while let Some(job) = next.take() {
            match job {
                Job::Append(m, answer, reply) => batch.push(((m, answer), reply)),
                Job::Close(done) => {
                    closing = Some(done);
                    break;
                }
            }
            if batch.len() < MAX_BATCH {
                next = queue.try_recv().ok();
            }
        }
        let (messages, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        // A panic fails its batch (the transaction rolls back as it unwinds), not the thread:
        // the messages after it are still stored.
        let stored = if messages.is_empty() {
            Ok(Vec::new())
        } else {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| append_batch(&mut conn, messages))) {
                Ok(stored) => stored.map_err(|e| e.to_string()),
                Err(_) => Err("the appender panicked storing this batch".to_owned()),
            }
        };
        match stored {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "storing a batch of messages failed");
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Backend(e.clone())));
                }
            }
        }
        if closing.is_some() {
            break;
        }
    }
    // Later sends fail ("the store is closed"); what was queued meanwhile is refused.
    queue.close();
    while let Ok(job) = queue.try_recv() {
        match job {
            Job::Append(_, _, reply) => {
                let _ = reply.send(Err(closed()));
            }
            Job::Close(done) => {
                let _ = done.send(());
            }
        }
    }
    drop(conn);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

fn closed() -> StoreError {
    StoreError::Backend("the store is closed".into())
}

/// Stores a batch in one transaction and says, for each message in order, what became of it.
/// `Err` (and nothing stored) when SQLite fails; a message refused by the rules is an `Err` of
/// its own in the list.
fn append_batch(
    conn: &mut rusqlite::Connection,
    messages: Vec<(NewMessage, Option<NewMessage>)>,
) -> rusqlite::Result<Vec<StoreResult<AppendedPair>>> {
    let created_at = from_millis(millis(Utc::now()));
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(messages.len());
    for (m, answer) in messages {
        let message = match append_one(&tx, m, created_at)? {
            Ok(message) => message,
            Err(e) => {
                results.push(Err(e));
                continue;
            }
        };
        // The reply in the same transaction: the conversation's pages are written once for
        // both, and no crash leaves the message owed.
        let reply = match answer {
            Some(answer) if !message.duplicate => Some(append_one(&tx, answer, created_at)?),
            _ => None,
        };
        results.push(Ok(AppendedPair { message, reply }));
    }
    tx.commit()?;
    Ok(results)
}

/// One message, in the batch's transaction (later messages see it):
/// - a `client_id` already stored in the conversation returns that message (`duplicate`);
/// - a bot message in reply to a user message that already has its outcome (not owed any
///   more, and a bot reply stored) is refused: [`StoreError::AlreadyAnswered`];
/// - otherwise it takes the conversation's `last_seq + 1` (the triggers of migrations 0005 and
///   0006 advance `last_seq` and keep `owed_replies`); no conversation: [`StoreError::NotFound`].
fn append_one(
    tx: &rusqlite::Transaction<'_>,
    m: NewMessage,
    created_at: chrono::DateTime<Utc>,
) -> rusqlite::Result<StoreResult<Appended>> {
    let conv = m.conversation_id.hyphenated().to_string();
    if let Some(client_id) = &m.client_id {
        static STORED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!("SELECT {MSG_COLS} FROM messages WHERE conversation_id = ?1 AND client_id = ?2")
        });
        let mut stmt = tx.prepare_cached(&STORED)?;
        let stored = stmt.query_row(params![conv, client_id], |row| Ok(message_from_row(&Cols(row)))).optional()?;
        if let Some(stored) = stored {
            return Ok(stored.map(|message| Appended { message, duplicate: true }));
        }
    }
    let in_reply_to = m.in_reply_to.map(|id| id.hyphenated().to_string());
    if let (MessageRole::Bot, Some(in_reply_to)) = (m.role, &in_reply_to) {
        // Owed (the common case: one index probe), or else not answered yet: the second query
        // walks the conversation, so it runs only when the first finds nothing.
        let mut owed = tx.prepare_cached("SELECT 1 FROM owed_replies WHERE message_id = ?1")?;
        if !owed.exists([in_reply_to])? {
            let mut answered = tx.prepare_cached(
                "SELECT 1 FROM messages WHERE conversation_id = ?1 AND in_reply_to = ?2 AND role = 'bot'",
            )?;
            if answered.exists(params![conv, in_reply_to])? {
                return Ok(Err(StoreError::AlreadyAnswered));
            }
        }
    }
    let mut stmt = tx.prepare_cached(
        "INSERT INTO messages (id, conversation_id, seq, role, content, client_id, in_reply_to, status, created_at) \
         SELECT ?1, id, last_seq + 1, ?3, ?4, ?5, ?6, ?7, ?8 FROM conversations WHERE id = ?2 \
         RETURNING seq",
    )?;
    let seq: Option<i64> = stmt
        .query_row(
            params![
                m.id.hyphenated().to_string(),
                conv,
                m.role.as_str(),
                m.content,
                m.client_id,
                in_reply_to,
                m.status.as_str(),
                millis(created_at),
            ],
            |row| row.get(0),
        )
        .optional()?;
    let Some(seq) = seq else { return Ok(Err(StoreError::NotFound)) };
    Ok(Ok(Appended {
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
    }))
}

/// A row the appender read, as [`Columns`]: ids are text, as everywhere on SQLite.
struct Cols<'a, 'r>(&'a rusqlite::Row<'r>);

impl Columns for Cols<'_, '_> {
    fn id(&self, col: &str) -> StoreResult<Uuid> {
        parse_id(&self.text(col)?, col)
    }
    fn opt_id(&self, col: &str) -> StoreResult<Option<Uuid>> {
        self.opt_text(col)?.map(|s| parse_id(&s, col)).transpose()
    }
    fn flag(&self, col: &str) -> StoreResult<bool> {
        Ok(self.int(col)? != 0)
    }
    fn text(&self, col: &str) -> StoreResult<String> {
        self.0.get(col).map_err(backend)
    }
    fn opt_text(&self, col: &str) -> StoreResult<Option<String>> {
        self.0.get(col).map_err(backend)
    }
    fn int(&self, col: &str) -> StoreResult<i64> {
        self.0.get(col).map_err(backend)
    }
    fn opt_int(&self, col: &str) -> StoreResult<Option<i64>> {
        self.0.get(col).map_err(backend)
    }
    fn opt_int32(&self, col: &str) -> StoreResult<Option<i32>> {
        self.0.get(col).map_err(backend)
    }
}

impl SqliteStore {
    async fn append(&self, m: NewMessage, answer: Option<NewMessage>) -> StoreResult<AppendedPair> {
        let (reply, result) = oneshot::channel();
        self.appender.send(Job::Append(m, answer, reply)).await.map_err(|_| closed())?;
        result.await.map_err(|_| closed())?
    }
}

#[async_trait]
impl SqlAppend for SqliteStore {
    async fn append_message(&self, m: NewMessage) -> StoreResult<Appended> {
        Ok(self.append(m, None).await?.message)
    }

    async fn append_answered(&self, m: NewMessage, reply: NewMessage) -> StoreResult<AppendedPair> {
        self.append(m, Some(reply)).await
    }

    fn appending(&self) -> bool {
        !self.appender.is_closed()
    }

    async fn close_appender(&self) {
        let (done, stopped) = oneshot::channel();
        if self.appender.send(Job::Close(done)).await.is_ok() {
            let _ = stopped.await;
        }
    }
}
