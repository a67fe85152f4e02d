//! Refresh tokens of [`MemoryStore`](super::MemoryStore), by hash and by family.

use uuid::Uuid;

use super::super::rows::{token_verdict, TokenVerdict};
use super::super::{millis, NewRefreshToken, RefreshUse, StoreResult};
use super::{foreign_key, unique, Inner, RefreshRow};

impl Inner {
    pub(super) fn insert_refresh_token(&mut self, t: NewRefreshToken) -> StoreResult<()> {
        if self.refresh_tokens.contains_key(&t.token_hash) {
            return Err(unique("refresh_tokens.token_hash"));
        }
        if !self.users.contains_key(&t.user_id) {
            return Err(foreign_key("refresh_tokens.user_id"));
        }
        self.families.entry(t.family_id).or_default().push(t.token_hash.clone());
        let row = RefreshRow {
            user_id: t.user_id,
            family_id: t.family_id,
            expires_at: millis(t.expires_at),
            used_at: None,
            revoked_at: None,
        };
        self.refresh_tokens.insert(t.token_hash, row);
        Ok(())
    }

    /// `now` in milliseconds.
    pub(super) fn use_refresh_token(&mut self, token_hash: &str, now: i64) -> RefreshUse {
        let Some(row) = self.refresh_tokens.get_mut(token_hash) else { return RefreshUse::Invalid };
        match token_verdict(row.used_at, row.revoked_at, row.expires_at, now) {
            TokenVerdict::Reused => {
                let family_id = row.family_id;
                self.revoke_family(family_id, now);
                RefreshUse::Reused { family_id }
            }
            TokenVerdict::Dead => RefreshUse::Invalid,
            TokenVerdict::Fresh => {
                row.used_at = Some(now);
                RefreshUse::Valid { user_id: row.user_id, family_id: row.family_id }
            }
        }
    }

    /// Families with a token revoked at or after `since` (milliseconds), each once.
    pub(super) fn revoked_families(&self, since: i64) -> Vec<Uuid> {
        let mut families: Vec<Uuid> = self
            .refresh_tokens
            .values()
            .filter(|r| r.revoked_at.is_some_and(|t| t >= since))
            .map(|r| r.family_id)
            .collect();
        families.sort_unstable();
        families.dedup();
        families
    }

    pub(super) fn revoke_family(&mut self, family_id: Uuid, now: i64) {
        for hash in self.families.get(&family_id).into_iter().flatten() {
            if let Some(row) = self.refresh_tokens.get_mut(hash) {
                row.revoked_at.get_or_insert(now);
            }
        }
    }
}
