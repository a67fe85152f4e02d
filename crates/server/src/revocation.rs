//! Ended logins: logout (and refresh-token reuse) revokes a refresh-token family, and the
//! access tokens of that login — which carry its id as `sid` — stop working at once, on
//! every node, and its sockets close with 4401.
//!
//! Each node keeps the revoked family ids in memory, each for as long as an access token
//! issued before the revocation can live (the access-token TTL plus the verification
//! leeway), so the set holds at most the logouts of one TTL. It is filled from the store at
//! start (`Store::revoked_families`) and kept current by [`ConvEvent::Revoked`] on the
//! [`REVOCATIONS`] topic, which every node subscribes to before it serves. On that event a
//! node also announces it on each conversation where it has a socket of that login; those
//! sessions close themselves. What a node misses while its bus or store is down it reads
//! from the store when both are back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use crate::bus::{ConvEvent, Received, Subscription, REVOCATIONS};
use crate::state::AppState;

/// Beyond the TTL: the token check's leeway (5 s) and clock skew between nodes.
const SLACK: Duration = Duration::from_secs(60);

/// The revoked logins this node knows of.
pub struct Revocations {
    keep: Duration,
    /// Plain mutex: a lookup or an insert, never held across an await.
    set: Mutex<Set>,
}

struct Set {
    until: HashMap<Uuid, Instant>,
    last_purge: Instant,
}

impl Revocations {
    pub fn new(access_token_ttl: Duration) -> Self {
        Revocations {
            keep: access_token_ttl + SLACK,
            set: Mutex::new(Set { until: HashMap::new(), last_purge: Instant::now() }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Set> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, family: Uuid) {
        let now = Instant::now();
        let mut set = self.lock();
        set.until.insert(family, now + self.keep);
        // Expired ids go at most once a minute (amortised: a scan per minute).
        if now.duration_since(set.last_purge) > Duration::from_secs(60) {
            set.until.retain(|_, until| *until > now);
            set.last_purge = now;
        }
    }

    pub fn is_revoked(&self, family: Uuid) -> bool {
        self.lock().until.get(&family).is_some_and(|until| *until > Instant::now())
    }

    pub fn len(&self) -> usize {
        self.lock().until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Ends a login: in this node's set at once, then announced to every node (this one
/// included: its sockets are closed by the same path as everyone's).
pub async fn revoke(state: &AppState, family: Uuid) {
    state.revocations.insert(family);
    if let Err(e) = state.bus.publish(REVOCATIONS, ConvEvent::Revoked { family_id: family }).await {
        // Other nodes learn it when they next start; the login's tokens expire within the TTL.
        tracing::warn!(error = %e, %family, "could not announce a revoked login to the other nodes");
    }
}

/// Subscribes to [`REVOCATIONS`] (before the node serves, so nothing announced after start
/// is missed) and loads what the store already holds.
pub async fn subscribe(state: &AppState) -> Option<Subscription> {
    let sub = match state.bus.subscribe(REVOCATIONS).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to revoked logins; retrying in the background");
            None
        }
    };
    load(state).await;
    sub
}

async fn load(state: &AppState) {
    let since = chrono::Utc::now() - chrono::Duration::from_std(state.revocations.keep).unwrap_or_default();
    match state.store.revoked_families(since).await {
        Ok(families) => families.into_iter().for_each(|f| state.revocations.insert(f)),
        Err(e) => tracing::warn!(error = %e, "cannot read revoked logins from the store"),
    }
}

/// The node's watch: keeps the set current and closes this node's sockets of revoked logins.
pub async fn watch(state: AppState, mut sub: Option<Subscription>) {
    let shutdown = state.shutdown.clone();
    // Announcements made while the bus or the store was down are missed: read the store again
    // when they are back.
    let mut health = state.cluster.health();
    loop {
        let Some(s) = sub.as_mut() else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            sub = state.bus.subscribe(REVOCATIONS).await.ok();
            if sub.is_some() {
                load(&state).await;
            }
            continue;
        };
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            Ok(()) = health.changed() => {
                if health.borrow_and_update().is_none() {
                    load(&state).await;
                }
                continue;
            }
            r = s.recv() => r,
        };
        match received {
            Received::Event(e) => {
                if let ConvEvent::Revoked { family_id } = &*e {
                    state.revocations.insert(*family_id);
                    for conv in state.hub.conversations_of_login(*family_id) {
                        let _ = state.bus.publish(conv, ConvEvent::Revoked { family_id: *family_id }).await;
                    }
                }
            }
            Received::Lagged(_) => load(&state).await,
            Received::Closed => sub = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn revoked_logins_are_kept_for_the_token_ttl() {
        let r = Revocations::new(Duration::from_secs(900));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        r.insert(a);
        assert!(r.is_revoked(a) && !r.is_revoked(b));
        tokio::time::advance(Duration::from_secs(900 + 59)).await;
        assert!(r.is_revoked(a), "a token issued just before still lives");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!r.is_revoked(a), "every token of that login has expired");
        r.insert(b);
        assert_eq!(r.len(), 1, "expired ids are purged");
    }
}
