//! The connection ledger on PostgreSQL.

use chrono::{DateTime, Utc};
use natter_proto::api::ConnectionRecord;
use uuid::Uuid;

use super::super::rows::*;
use super::super::*;
use super::PostgresStore;

impl PostgresStore {
    pub(super) async fn write_ledger(&self, rows: &[ConnectionRecord]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let sql = format!(
                "INSERT INTO connections ({LEDGER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                 $15, $16, $17, $18, $19, $20, $21, $22) ON CONFLICT (connection_id) DO UPDATE SET {LEDGER_UPDATE}"
            );
        for r in rows {
            bind_ledger(sqlx::query(&sql), r).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn ledger_rows(
        &self,
        user_id: Option<Uuid>,
        bot_id: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {LEDGER_COLS} FROM connections WHERE ($1::uuid IS NULL OR user_id = $1) AND ($2::uuid IS NULL OR bot_id = $2) \
             ORDER BY started_at DESC, connection_id LIMIT $3"
        ))
        .bind(user_id)
        .bind(bot_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ledger_from_row).collect()
    }

    pub(super) async fn ledger_row(
        &self,
        attempt_id: Uuid,
        user_id: Option<Uuid>,
    ) -> StoreResult<Option<ConnectionRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {LEDGER_COLS} FROM connections WHERE (attempt_id = $1 OR connection_id = $1) \
             AND ($2::uuid IS NULL OR user_id = $2) ORDER BY started_at DESC LIMIT 1"
        ))
        .bind(attempt_id)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(ledger_from_row).transpose()
    }

    pub(super) async fn prune_ledger(&self, older_than: DateTime<Utc>, keep: u64) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let old = sqlx::query("DELETE FROM connections WHERE started_at < $1")
            .bind(millis(older_than))
            .execute(&mut *tx)
            .await?;
        let over = sqlx::query(
            "DELETE FROM connections WHERE connection_id IN \
             (SELECT connection_id FROM connections ORDER BY started_at DESC, connection_id OFFSET $1)",
        )
        .bind(keep as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(old.rows_affected() + over.rows_affected())
    }
}

const LEDGER_UPDATE: &str = "attempt_id = excluded.attempt_id, user_id = excluded.user_id, bot_id = excluded.bot_id, \
    remote_addr = excluded.remote_addr, user_agent = excluded.user_agent, origin = excluded.origin, upgrade = excluded.upgrade, \
    connection_hdr = excluded.connection_hdr, ws_version = excluded.ws_version, forwarded_for = excluded.forwarded_for, \
    started_at = excluded.started_at, established = excluded.established, ended_at = excluded.ended_at, \
    close_code = excluded.close_code, close_reason = excluded.close_reason, closed_by = excluded.closed_by, \
    msgs_in = excluded.msgs_in, msgs_out = excluded.msgs_out, bytes_in = excluded.bytes_in, bytes_out = excluded.bytes_out, \
    trace_id = excluded.trace_id";
