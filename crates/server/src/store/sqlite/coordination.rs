//! SQLite's side of [`Coordination`]: on one node the single writer connection already
//! serialises every claim and sweep.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use natter_proto::WireMessage;
use sqlx::Row;
use uuid::Uuid;

use super::super::rows::*;
use super::super::*;
use super::SqliteStore;

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
            owed.push(OwedMessage { message: message_from_row(&row)?, bot_id: row.id("bot_id")? });
        }
        tx.commit().await?;
        owed.sort_by_key(|o| (o.message.created_at, o.message.seq));
        Ok(owed)
    }
}
