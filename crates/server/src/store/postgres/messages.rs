//! Storing a message on PostgreSQL ([`SqlAppend`]), under its conversation's row lock: shared by
//! `append_message` and the sweep of replies whose node died.

use async_trait::async_trait;
use chrono::Utc;
use natter_proto::{MessageRole, WireMessage};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::super::rows::{message_from_row, MSG_COLS};
use super::super::sql::SqlAppend;
use super::super::{from_millis, millis, Appended, AppendedPair, NewMessage, StoreError, StoreResult};
use super::PostgresStore;

/// Whether `in_reply_to` already has its one outcome: it is not owed a reply any more and a bot
/// message in reply to it is stored (a message stored before owed replies were tracked is never
/// owed; for it the stored replies decide). Call with the conversation's row locked.
pub(super) async fn already_answered(
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

/// Takes the conversation's next seq and inserts the message, inside `tx`. The `UPDATE` holds
/// the conversation's row lock until the transaction ends.
pub(super) async fn insert_with_next_seq(
    tx: &mut Transaction<'_, Postgres>,
    m: NewMessage,
) -> StoreResult<WireMessage> {
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
impl SqlAppend for PostgresStore {
    async fn append_message(&self, m: NewMessage) -> StoreResult<Appended> {
        let mut tx = self.pool.begin().await?;
        let appended = append_in(&mut tx, m).await?;
        tx.commit().await?;
        Ok(appended)
    }

    /// Both in one transaction, under one hold of the conversation's lock.
    async fn append_answered(&self, m: NewMessage, reply: NewMessage) -> StoreResult<AppendedPair> {
        let mut tx = self.pool.begin().await?;
        let message = append_in(&mut tx, m).await?;
        if message.duplicate {
            return Ok(AppendedPair { message, reply: None });
        }
        let reply = match append_in(&mut tx, reply).await {
            // Refused by the rules, before any statement failed: the message is stored alone.
            Err(e @ (StoreError::AlreadyAnswered | StoreError::NotFound)) => Err(e),
            // A failed statement ends the transaction: nothing is stored.
            Err(e) => return Err(e),
            Ok(r) => Ok(r),
        };
        tx.commit().await?;
        Ok(AppendedPair { message, reply: Some(reply) })
    }
}

/// Stores a message inside `tx`: takes the conversation's lock first (by locking its row), then
/// looks for the `client_id` (a writer on another node with the same `client_id` has committed
/// by then), refuses a second outcome for a user message, and inserts with the next seq.
async fn append_in(tx: &mut Transaction<'_, Postgres>, m: NewMessage) -> StoreResult<Appended> {
    let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM conversations WHERE id = $1 FOR UPDATE")
        .bind(m.conversation_id)
        .fetch_optional(&mut **tx)
        .await?;
    if exists.is_none() {
        return Err(StoreError::NotFound);
    }
    if let Some(client_id) = &m.client_id {
        let row =
            sqlx::query(&format!("SELECT {MSG_COLS} FROM messages WHERE conversation_id = $1 AND client_id = $2"))
                .bind(m.conversation_id)
                .bind(client_id)
                .fetch_optional(&mut **tx)
                .await?;
        if let Some(row) = row {
            return Ok(Appended { message: message_from_row(&row)?, duplicate: true });
        }
    }
    // One outcome per user message, whichever node finishes last.
    if let (MessageRole::Bot, Some(asked)) = (m.role, m.in_reply_to) {
        if already_answered(tx, m.conversation_id, asked).await? {
            return Err(StoreError::AlreadyAnswered);
        }
    }
    let message = insert_with_next_seq(tx, m).await?;
    Ok(Appended { message, duplicate: false })
}
