//! The registry of live chat connections: who is connected to what, and how many sockets
//! each user has open. Plain synchronous data behind a mutex that is never held across an
//! await; nothing else holds connection state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

#[derive(Default)]
struct Inner {
    /// Connection id → user id (32 bytes an entry: one per socket).
    conns: HashMap<Uuid, Uuid>,
    per_user: HashMap<Uuid, usize>,
    /// Login (refresh-token family) → its sockets here: (connection id, conversation id), so
    /// that a revoked login's sockets can be told on their conversations (issue 14).
    logins: HashMap<Uuid, Vec<(Uuid, Uuid)>>,
}

#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
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

    pub fn user_count(&self, user_id: Uuid) -> usize {
        self.inner.lock().unwrap().per_user.get(&user_id).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

#[cfg(test)]
mod tests {
    use super::*;

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
