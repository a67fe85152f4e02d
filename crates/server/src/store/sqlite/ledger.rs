//! The connection ledger on SQLite.

use chrono::{DateTime, Utc};
use natter_proto::api::ConnectionRecord;
use uuid::Uuid;

use super::super::rows::*;
use super::super::*;
use super::SqliteStore;

impl SqliteStore {
    pub(super) async fn write_ledger(&self, rows: &[ConnectionRecord]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.write.begin().await?;
        let sql = format!("INSERT OR REPLACE INTO connections ({LEDGER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
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

    pub(super) async fn ledger_row(
        &self,
        attempt_id: Uuid,
        user_id: Option<Uuid>,
    ) -> StoreResult<Option<ConnectionRecord>> {
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

    pub(super) async fn prune_ledger(&self, older_than: DateTime<Utc>, keep: u64) -> StoreResult<u64> {
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
