//! The registry of live chat connections: who is connected to what, and how many sockets
//! each user has open. Plain synchronous data behind a mutex that is never held across an
//! await; nothing else holds connection state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use uuid::Uuid;

#[derive(Default)]
struct Inner {
    /// Connection id → user id (32 bytes an entry: one per socket).
    conns: HashMap<Uuid, Uuid>,
    per_user: HashMap<Uuid, usize>,
    /// Login (refresh-token family) → its sockets here: (connection id, conversation id), so
    /// that a revoked login's sockets can be told on their conversations (issue 14).
    logins: HashMap<Uuid, Vec<(Uuid, Uuid)>>,
    /// Each user's message budget on this node, over all of their sockets. Kept after the
    /// last socket closes until it has refilled (a reconnect gets no fresh burst), pruned
    /// when there are many more buckets than connected users.
    budgets: HashMap<Uuid, TokenBucket>,
    /// When `budgets` was last pruned: at most once a second, so a crowd of buckets that
    /// have not refilled yet is not scanned on every message.
    pruned: Option<Instant>,
}

#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
    /// How many sockets were open when the node began shutting down: taken by the first
    /// session to close for it, while every socket is still registered.
    open_at_shutdown: std::sync::OnceLock<usize>,
}

/// Which limit a registration hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    User,
    Server,
}

/// Holds a connection's place in the hub; dropping it removes the connection.
pub struct HubGuard {
    hub: Arc<Hub>,
    connection_id: Uuid,
    family: Option<Uuid>,
}

impl Drop for HubGuard {
    fn drop(&mut self) {
        let mut inner = self.hub.inner.lock().unwrap();
        if let Some(family) = self.family {
            if let Some(socks) = inner.logins.get_mut(&family) {
                socks.retain(|(c, _)| *c != self.connection_id);
                if socks.is_empty() {
                    inner.logins.remove(&family);
                }
            }
        }
        if let Some(user_id) = inner.conns.remove(&self.connection_id) {
            if let Some(n) = inner.per_user.get_mut(&user_id) {
                *n -= 1;
                if *n == 0 {
                    inner.per_user.remove(&user_id);
                }
            }
        }
    }
}

impl Hub {
    /// Registers a connection unless the user already has `max_per_user` open or the
    /// server has `max_total`. `login`: the socket's (refresh-token family, conversation),
    /// when its token names its login.
    pub fn try_register(
        self: &Arc<Self>,
        connection_id: Uuid,
        user_id: Uuid,
        login: Option<(Uuid, Uuid)>,
        max_per_user: usize,
        max_total: usize,
    ) -> Result<HubGuard, Full> {
        let mut inner = self.inner.lock().unwrap();
        if inner.conns.len() >= max_total {
            return Err(Full::Server);
        }
        let count = inner.per_user.get(&user_id).copied().unwrap_or(0);
        if count >= max_per_user {
            return Err(Full::User);
        }
        inner.per_user.insert(user_id, count + 1);
        inner.conns.insert(connection_id, user_id);
        if let Some((family, conversation_id)) = login {
            inner.logins.entry(family).or_default().push((connection_id, conversation_id));
        }
        Ok(HubGuard { hub: self.clone(), connection_id, family: login.map(|(f, _)| f) })
    }

    /// The conversations this node has sockets of this login on.
    pub fn conversations_of_login(&self, family: Uuid) -> Vec<Uuid> {
        let inner = self.inner.lock().unwrap();
        let mut convs: Vec<Uuid> = inner.logins.get(&family).into_iter().flatten().map(|(_, conv)| *conv).collect();
        convs.sort_unstable();
        convs.dedup();
        convs
    }

    /// Takes one message from the user's budget on this node (`rate`/s, `burst`), or says how
    /// long until there is one.
    pub fn take_user_message(&self, user_id: Uuid, rate: u32, burst: u32) -> Result<(), Duration> {
        let mut inner = self.inner.lock().unwrap();
        let due = inner.pruned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if due && inner.budgets.len() > 2 * inner.per_user.len() + 1024 {
            let Inner { budgets, per_user, pruned, .. } = &mut *inner;
            budgets.retain(|user, b| per_user.contains_key(user) || !b.is_full());
            *pruned = Some(Instant::now());
        }
        inner.budgets.entry(user_id).or_insert_with(|| TokenBucket::new(rate, burst)).take()
    }

    pub fn user_count(&self, user_id: Uuid) -> usize {
        self.inner.lock().unwrap().per_user.get(&user_id).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sockets open when shutdown began: the count at the first call, whatever has closed
    /// since. Every 1012 spreads its reconnect over the window for that count, so a socket that
    /// closes late in a drain of thousands is not given a narrower window than the first.
    pub fn open_at_shutdown(&self) -> usize {
        *self.open_at_shutdown.get_or_init(|| self.len())
    }

    /// Panics if the per-user counts disagree with the connection table.
    pub fn check_invariants(&self) {
        let inner = self.inner.lock().unwrap();
        let mut counted: HashMap<Uuid, usize> = HashMap::new();
        for user_id in inner.conns.values() {
            *counted.entry(*user_id).or_default() += 1;
        }
        assert_eq!(counted, inner.per_user, "per-user counts match the connection table");
        for (family, socks) in &inner.logins {
            assert!(!socks.is_empty(), "login {family} has no sockets but an entry");
            assert!(socks.iter().all(|(c, _)| inner.conns.contains_key(c)), "login {family} lists a closed socket");
        }
    }
}

/// Tokens refilled at `rate` per second up to `burst`.
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        TokenBucket { tokens: burst as f64, rate: rate as f64, burst: burst as f64, last: Instant::now() }
    }

    /// Whether it has refilled to its burst by now.
    fn is_full(&self) -> bool {
        self.tokens + self.last.elapsed().as_secs_f64() * self.rate >= self.burst
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_burst_then_rate() {
        let mut b = TokenBucket::new(5, 3);
        for _ in 0..3 {
            assert!(b.take().is_ok());
        }
        let wait = b.take().unwrap_err();
        assert!(wait <= Duration::from_millis(200) && wait > Duration::from_millis(150), "{wait:?}");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(b.take().is_ok());
        assert!(b.take().is_err());
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..3 {
            assert!(b.take().is_ok(), "refills up to the burst, no more");
        }
        assert!(b.take().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_users_budget_is_shared_by_their_sockets_and_outlives_them() {
        let hub = Arc::new(Hub::default());
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = hub.try_register(Uuid::new_v4(), alice, None, 5, 10).unwrap();
        let b = hub.try_register(Uuid::new_v4(), alice, None, 5, 10).unwrap();
        for _ in 0..3 {
            assert!(hub.take_user_message(alice, 1, 3).is_ok());
        }
        assert!(hub.take_user_message(alice, 1, 3).is_err(), "one budget for both sockets");
        assert!(hub.take_user_message(bob, 1, 3).is_ok(), "each user has their own");
        drop((a, b));
        let _again = hub.try_register(Uuid::new_v4(), alice, None, 5, 10).unwrap();
        assert!(hub.take_user_message(alice, 1, 3).is_err(), "reconnecting gives no fresh burst");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(hub.take_user_message(alice, 1, 3).is_ok());
    }

    #[test]
    fn counts_and_limits_per_user() {
        let hub = Arc::new(Hub::default());
        let (u1, u2) = (Uuid::new_v4(), Uuid::new_v4());
        let a = hub.try_register(Uuid::new_v4(), u1, None, 2, 3).unwrap();
        let b = hub.try_register(Uuid::new_v4(), u1, None, 2, 3).unwrap();
        assert_eq!(hub.try_register(Uuid::new_v4(), u1, None, 2, 3).err(), Some(Full::User), "third is over the limit");
        let c = hub.try_register(Uuid::new_v4(), u2, None, 2, 3).unwrap();
        assert_eq!(hub.try_register(Uuid::new_v4(), Uuid::new_v4(), None, 2, 3).err(), Some(Full::Server));
        hub.check_invariants();
        assert_eq!(hub.user_count(u1), 2);
        drop(a);
        assert_eq!(hub.user_count(u1), 1);
        assert!(hub.try_register(Uuid::new_v4(), u1, None, 2, 3).is_ok(), "a slot was freed (and freed again on drop)");
        drop((b, c));
        hub.check_invariants();
        assert!(hub.is_empty());
        assert_eq!(hub.user_count(u1), 0);
    }

    #[test]
    fn the_open_count_at_shutdown_is_taken_once() {
        let hub = Arc::new(Hub::default());
        let mut open: Vec<HubGuard> =
            (0..5).map(|_| hub.try_register(Uuid::new_v4(), Uuid::new_v4(), None, 9, 9).unwrap()).collect();
        assert_eq!(hub.open_at_shutdown(), 5);
        open.truncate(1);
        assert_eq!(hub.len(), 1);
        assert_eq!(hub.open_at_shutdown(), 5, "the sockets closed since do not shrink it");
    }

    #[test]
    fn sockets_are_found_by_login() {
        let hub = Arc::new(Hub::default());
        let (u, fam, other, c1, c2) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let a = hub.try_register(Uuid::new_v4(), u, Some((fam, c1)), 9, 9).unwrap();
        let b = hub.try_register(Uuid::new_v4(), u, Some((fam, c1)), 9, 9).unwrap();
        let c = hub.try_register(Uuid::new_v4(), u, Some((fam, c2)), 9, 9).unwrap();
        let _d = hub.try_register(Uuid::new_v4(), u, Some((other, c2)), 9, 9).unwrap();
        let mut both = vec![c1, c2];
        both.sort();
        assert_eq!(hub.conversations_of_login(fam), both);
        hub.check_invariants();
        drop((a, c));
        assert_eq!(hub.conversations_of_login(fam), vec![c1]);
        drop(b);
        assert!(hub.conversations_of_login(fam).is_empty());
        hub.check_invariants();
    }
}
