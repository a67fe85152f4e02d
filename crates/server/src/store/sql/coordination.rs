//! [`Coordination`] for both SQL stores: slots and leases, with the backend's sweeps.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use natter_proto::WireMessage;
use sqlx::{Encode, Type};
use uuid::Uuid;

use super::super::rows::Columns;
use super::super::*;
use super::{in_tx, Dialect, RowsAffected, SqlStore};

/// What a SQL store does its own way in [`Coordination`].
#[async_trait]
pub(in super::super) trait SqlCoordination: SqlStore {
    /// [`Coordination::shared`].
    const SHARED: bool;
    /// [`Coordination::count_user_message`]: only shared stores count.
    async fn count_user_message(&self, user_id: Uuid, window_ms: u64) -> StoreResult<(u64, u64)> {
        let _ = (user_id, window_ms);
        Ok((0, 0))
    }
    /// [`Coordination::recover_generations`].
    async fn recover_generations(&self, now: DateTime<Utc>) -> StoreResult<Vec<WireMessage>>;
    /// [`Coordination::claim_owed`].
    async fn claim_owed(&self, sweep: OwedSweep) -> StoreResult<Vec<OwedMessage>>;
}

/// The arguments of [`Coordination::claim_owed`].
#[derive(Debug, Clone, Copy)]
pub(in super::super) struct OwedSweep {
    pub node_id: Uuid,
    pub until: DateTime<Utc>,
    pub now: DateTime<Utc>,
    pub unleased_before: DateTime<Utc>,
    pub limit: u32,
}

#[async_trait]
impl<S> Coordination for S
where
    S: SqlCoordination,
    for<'q> &'q str: Encode<'q, S::Db> + Type<S::Db>,
    for<'q> i64: Encode<'q, S::Db> + Type<S::Db>,
{
    fn shared(&self) -> bool {
        S::SHARED
    }

    async fn claim_slot(&self, slot: SlotClaim, max: usize, now: DateTime<Utc>) -> StoreResult<bool> {
        let user = || S::Db::id_param(slot.user_id);
        let mut tx = self.begin_write().await?;
        if let Some(lock) = S::Db::LOCK_USER {
            sqlx::query(lock).bind(user()).execute(in_tx(&mut tx)).await?;
        }
        sqlx::query("DELETE FROM connection_slots WHERE user_id = $1 AND expires_at <= $2")
            .bind(user())
            .bind(millis(now))
            .execute(in_tx(&mut tx))
            .await?;
        let count = sqlx::query("SELECT count(*) AS n FROM connection_slots WHERE user_id = $1")
            .bind(user())
            .fetch_one(in_tx(&mut tx))
            .await?
            .int("n")?;
        if count as usize >= max {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO connection_slots (connection_id, user_id, node_id, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(S::Db::id_param(slot.connection_id))
        .bind(user())
        .bind(S::Db::id_param(slot.node_id))
        .bind(millis(slot.expires_at))
        .execute(in_tx(&mut tx))
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn slots_in_use(&self, user_id: Uuid, now: DateTime<Utc>) -> StoreResult<usize> {
        let n = sqlx::query("SELECT count(*) AS n FROM connection_slots WHERE user_id = $1 AND expires_at > $2")
            .bind(S::Db::id_param(user_id))
            .bind(millis(now))
            .fetch_one(self.reader())
            .await?
            .int("n")?;
        Ok(n as usize)
    }

    async fn release_slot(&self, connection_id: Uuid) -> StoreResult<()> {
        sqlx::query("DELETE FROM connection_slots WHERE connection_id = $1")
            .bind(S::Db::id_param(connection_id))
            .execute(self.writer())
            .await?;
        Ok(())
    }

    async fn renew_node(&self, node_id: Uuid, slots: &[Uuid], work: &[Uuid], until: DateTime<Utc>) -> StoreResult<()> {
        let in_list = S::Db::in_ids("$3");
        let mut tx = self.begin_write().await?;
        sqlx::query(&format!(
            "UPDATE connection_slots SET expires_at = $2 WHERE node_id = $1 AND connection_id {in_list}"
        ))
        .bind(S::Db::id_param(node_id))
        .bind(millis(until))
        .bind(S::Db::ids_param(slots))
        .execute(in_tx(&mut tx))
        .await?;
        sqlx::query("DELETE FROM connection_slots WHERE node_id = $1 AND expires_at < $2")
            .bind(S::Db::id_param(node_id))
            .bind(millis(until))
            .execute(in_tx(&mut tx))
            .await?;
        for table in ["generations", "owed_replies"] {
            sqlx::query(&format!("UPDATE {table} SET lease_until = $2 WHERE node_id = $1 AND message_id {in_list}"))
                .bind(S::Db::id_param(node_id))
                .bind(millis(until))
                .bind(S::Db::ids_param(work))
                .execute(in_tx(&mut tx))
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn count_user_message(&self, user_id: Uuid, window_ms: u64) -> StoreResult<(u64, u64)> {
        SqlCoordination::count_user_message(self, user_id, window_ms).await
    }

    async fn begin_generation(&self, g: &GenerationLease) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO generations (message_id, conversation_id, in_reply_to, node_id, text, lease_until) \
             VALUES ($1, $2, $3, $4, '', $5)",
        )
        .bind(S::Db::id_param(g.message_id))
        .bind(S::Db::id_param(g.conversation_id))
        .bind(S::Db::id_param(g.in_reply_to))
        .bind(S::Db::id_param(g.node_id))
        .bind(millis(g.lease_until))
        .execute(self.writer())
        .await?;
        Ok(())
    }

    async fn checkpoint_generation(&self, message_id: Uuid, text: &str) -> StoreResult<()> {
        sqlx::query("UPDATE generations SET text = $2 WHERE message_id = $1")
            .bind(S::Db::id_param(message_id))
            .bind(text)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    async fn generation_in_progress(&self, conversation_id: Uuid, message_id: Uuid) -> StoreResult<bool> {
        let found = sqlx::query("SELECT message_id FROM generations WHERE message_id = $1 AND conversation_id = $2")
            .bind(S::Db::id_param(message_id))
            .bind(S::Db::id_param(conversation_id))
            .fetch_optional(self.reader())
            .await?;
        Ok(found.is_some())
    }

    async fn end_generation(&self, message_id: Uuid) -> StoreResult<()> {
        sqlx::query("DELETE FROM generations WHERE message_id = $1")
            .bind(S::Db::id_param(message_id))
            .execute(self.writer())
            .await?;
        Ok(())
    }

    async fn recover_generations(&self, now: DateTime<Utc>) -> StoreResult<Vec<WireMessage>> {
        SqlCoordination::recover_generations(self, now).await
    }

    async fn lease_owed(&self, message_id: Uuid, node_id: Uuid, until: DateTime<Utc>) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE owed_replies SET node_id = $1, lease_until = $2 \
             WHERE message_id = $3 AND (node_id IS NULL OR node_id = $1)",
        )
        .bind(S::Db::id_param(node_id))
        .bind(millis(until))
        .bind(S::Db::id_param(message_id))
        .execute(self.writer())
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
        SqlCoordination::claim_owed(self, OwedSweep { node_id, until, now, unleased_before, limit }).await
    }
}
