//! Group commit: [`SqliteStore::append_message`](super::SqliteStore) queues each message for one
//! appender task, which stores everything waiting with one statement.

use async_trait::async_trait;
use chrono::Utc;
use natter_proto::{MessageRole, WireMessage};
use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use super::super::rows::*;
use super::super::sql::SqlAppend;
use super::super::*;
use super::SqliteStore;

/// A message waiting for the appender, and where its result goes.
pub(super) type Append = (NewMessage, oneshot::Sender<StoreResult<Appended>>);

/// At most this many messages in one statement (well under SQLite's limits: they travel as
/// one JSON parameter).
const MAX_BATCH: usize = 512;
/// Messages waiting for the appender before `append_message` waits for room.
pub(super) const APPEND_QUEUE: usize = 4 * MAX_BATCH;

/// Group commit: stores whatever is waiting, one batch at a time.
pub(super) async fn run_appender(write: SqlitePool, mut queue: mpsc::Receiver<Append>) {
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

#[async_trait]
impl SqlAppend for SqliteStore {
    async fn append_message(&self, m: NewMessage) -> StoreResult<Appended> {
        let (reply, result) = oneshot::channel();
        let closed = || StoreError::Backend("the store is closed".into());
        self.appender.send((m, reply)).await.map_err(|_| closed())?;
        result.await.map_err(|_| closed())?
    }
}
