//! PostgreSQL's sweeps and rate window (see [`SqlCoordination`]), shared by every node: sweeps
//! share the work with `SKIP LOCKED`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use natter_proto::{MessageRole, MessageStatus, WireMessage};
use sqlx::Row;
use uuid::Uuid;

use super::super::rows::*;
use super::super::sql::{OwedSweep, SqlCoordination};
use super::super::*;
use super::messages::{already_answered, insert_with_next_seq};
use super::PostgresStore;

#[async_trait]
impl SqlCoordination for PostgresStore {
    /// Every node shares the database.
    const SHARED: bool = true;

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

    async fn claim_owed(&self, sweep: OwedSweep) -> StoreResult<Vec<OwedMessage>> {
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
        .bind(sweep.node_id)
        .bind(millis(sweep.until))
        .bind(millis(sweep.now))
        .bind(millis(sweep.unleased_before))
        .bind(sweep.limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok(OwedMessage { message: message_from_row(row)?, bot_id: row.id("bot_id")? })).collect()
    }
}
