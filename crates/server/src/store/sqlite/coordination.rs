//! SQLite's sweeps (see [`SqlCoordination`]): on one node, SQLite's write lock (taken at the start
//! of every write transaction, `BEGIN IMMEDIATE`) already serialises every claim and sweep, and
//! the appender's message writes with them.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use natter_proto::WireMessage;
use sqlx::Row;

use super::super::rows::*;
use super::super::sql::{OwedSweep, SqlCoordination, SqlStore};
use super::super::*;
use super::SqliteStore;

#[async_trait]
impl SqlCoordination for SqliteStore {
    /// One node: its own count of its sockets is the whole count.
    const SHARED: bool = false;

    async fn recover_generations(&self, now: DateTime<Utc>) -> StoreResult<Vec<WireMessage>> {
        let mut tx = self.begin_write().await?;
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

    async fn claim_owed(&self, sweep: OwedSweep) -> StoreResult<Vec<OwedMessage>> {
        let mut tx = self.begin_write().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE owed_replies SET node_id = ?1, lease_until = ?2 WHERE message_id IN ( \
                 SELECT o.message_id FROM owed_replies o \
                 WHERE (o.lease_until < ?3 OR (o.lease_until IS NULL AND o.created_at < ?4)) \
                   AND NOT EXISTS (SELECT 1 FROM generations g WHERE g.in_reply_to = o.message_id) \
                 ORDER BY o.created_at LIMIT ?5) \
             RETURNING message_id",
        )
        .bind(sweep.node_id.to_string())
        .bind(millis(sweep.until))
        .bind(millis(sweep.now))
        .bind(millis(sweep.unleased_before))
        .bind(sweep.limit as i64)
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
            owed.push(OwedMessage { message: message_from_row(&row)?, bot_id: row.id("bot_id")? });
        }
        tx.commit().await?;
        owed.sort_by_key(|o| (o.message.created_at, o.message.seq));
        Ok(owed)
    }
}
