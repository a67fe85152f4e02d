//! The connection ledger of [`MemoryStore`](super::MemoryStore): rows in the order they are read
//! (newest first, then by connection id), as SQLite's queries return them.

use std::cmp::Reverse;

use chrono::{DateTime, Utc};
use natter_proto::api::ConnectionRecord;
use uuid::Uuid;

use super::super::millis;
use super::super::rows::ms;
use super::Inner;

impl Inner {
    pub(super) fn record_connections(&mut self, rows: &[ConnectionRecord]) {
        for r in rows {
            let mut r = r.clone();
            r.started_at = ms(r.started_at);
            r.ended_at = r.ended_at.map(ms);
            let started = millis(r.started_at);
            // INSERT OR REPLACE on the connection id (in place when its key is unchanged, as
            // for the row that ends an attempt).
            let key = (Reverse(started), r.connection_id);
            match self.ledger_started.insert(r.connection_id, started) {
                Some(old) if old == started => {
                    if let Some(row) = self.ledger.get_mut(&key) {
                        **row = r;
                        continue;
                    }
                }
                Some(old) => {
                    self.ledger.remove(&(Reverse(old), r.connection_id));
                }
                None => {}
            }
            self.ledger.insert(key, Box::new(r));
        }
    }

    pub(super) fn connections(&self, user_id: Option<Uuid>, bot_id: Option<Uuid>, limit: u32) -> Vec<ConnectionRecord> {
        self.ledger
            .values()
            .filter(|r| user_id.is_none() || r.user_id == user_id)
            .filter(|r| bot_id.is_none() || r.bot_id == bot_id)
            .take(limit as usize)
            .map(|r| (**r).clone())
            .collect()
    }

    pub(super) fn connection(&self, attempt_id: Uuid, user_id: Option<Uuid>) -> Option<ConnectionRecord> {
        self.ledger
            .values()
            .filter(|r| user_id.is_none() || r.user_id == user_id)
            .find(|r| r.attempt_id == attempt_id || r.connection_id == attempt_id)
            .map(|r| (**r).clone())
    }

    /// By age first, then the oldest beyond `keep` of what is left. Returns how many went.
    pub(super) fn prune_connections(&mut self, older_than: DateTime<Utc>, keep: u64) -> u64 {
        let older_than = millis(older_than);
        let doomed: Vec<(Reverse<i64>, Uuid)> = self
            .ledger
            .keys()
            .enumerate()
            .filter(|&(i, (Reverse(started), _))| *started < older_than || i as u64 >= keep)
            .map(|(_, k)| *k)
            .collect();
        for key in &doomed {
            self.ledger.remove(key);
            self.ledger_started.remove(&key.1);
        }
        doomed.len() as u64
    }
}
