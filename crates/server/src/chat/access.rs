//! A node's memory of admission's answers, so a connect (and an SSE POST) does not ask the
//! store again who the user is, what the bot is, the user's role on it and their conversation
//! id — four store reads of the six a connect made (issue 19: 517 µs of server time per
//! connect on SQLite, most of it handing those reads to SQLite's thread and back). The user
//! part also serves every REST request's `AuthUser` ([`AccessCache::known_user`]), so an SSE
//! POST costs no store read to say who sent it.
//!
//! Only positive answers are kept (a refusal always asks the store), and only on a store no
//! other node shares (SQLite, `memory:`): every change that can take a grant away goes through
//! this node's REST API, which calls [`AccessCache::forget_bot`] after the store has the change
//! and before the bot's sockets are told. On PostgreSQL another node may make the change, so
//! the cache is off there. Entries also expire after [`TTL`], which bounds how long a change
//! made behind the server's back (`natter user`, a file edited by hand) goes unseen.
//!
//! A lookup that races a change cannot put the old answer back: [`AccessCache::epoch`] is read
//! before the store is asked, and an answer is kept only if no bot was forgotten meanwhile.
//!
//! Bounded: at most [`MAX_ENTRIES`] users and as many bots (grants per bot likewise); a full
//! map is emptied rather than grown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use natter_proto::api::{BotRole, UserRef};
use uuid::Uuid;

use crate::bots::EngineSpec;
use crate::store::{Store, StoreResult};

/// How long an answer is trusted without asking the store again.
pub const TTL: Duration = Duration::from_secs(10);
/// Users, bots, and grants per bot, each at most.
pub const MAX_ENTRIES: usize = 100_000;

/// What admission knows of a user's access to a bot.
#[derive(Clone)]
pub struct Grant {
    pub bot_name: String,
    pub engine: EngineSpec,
    pub role: BotRole,
    pub conversation_id: Uuid,
}

struct BotEntry {
    at: Instant,
    bot_name: String,
    engine: EngineSpec,
    /// By user: the role and the conversation.
    grants: HashMap<Uuid, (BotRole, Uuid)>,
}

/// See the module docs. [`AccessCache::off`] remembers nothing.
pub struct AccessCache {
    on: bool,
    epoch: AtomicU64,
    users: Mutex<HashMap<Uuid, (Instant, UserRef)>>,
    bots: Mutex<HashMap<Uuid, BotEntry>>,
}

/// A point in the cache's history, taken before asking the store.
#[derive(Clone, Copy)]
pub struct Epoch(u64);

impl AccessCache {
    pub fn new(on: bool) -> Self {
        AccessCache { on, epoch: AtomicU64::new(0), users: Mutex::default(), bots: Mutex::default() }
    }

    pub fn off() -> Self {
        Self::new(false)
    }

    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// The user a token or ticket names, if they still exist (admission, and every REST
    /// request's `AuthUser`): remembered, or read from the store and remembered.
    pub async fn known_user(&self, store: &dyn Store, user_id: Uuid) -> StoreResult<Option<UserRef>> {
        if let Some(user) = self.user(user_id) {
            return Ok(Some(user));
        }
        let seen = self.epoch();
        let user = store.user_by_id(user_id).await?.map(|u| UserRef { id: u.id, username: u.username });
        if let Some(user) = &user {
            self.keep_user(seen, user);
        }
        Ok(user)
    }

    fn user(&self, id: Uuid) -> Option<UserRef> {
        if !self.on {
            return None;
        }
        let users = self.users.lock().unwrap();
        users.get(&id).filter(|(at, _)| at.elapsed() < TTL).map(|(_, u)| u.clone())
    }

    fn keep_user(&self, seen: Epoch, user: &UserRef) {
        if !self.on {
            return;
        }
        let mut users = self.users.lock().unwrap();
        if self.epoch.load(Ordering::Acquire) != seen.0 {
            return;
        }
        if users.len() >= MAX_ENTRIES {
            users.clear();
        }
        users.insert(user.id, (Instant::now(), user.clone()));
    }

    pub fn grant(&self, bot_id: Uuid, user_id: Uuid) -> Option<Grant> {
        if !self.on {
            return None;
        }
        let bots = self.bots.lock().unwrap();
        let bot = bots.get(&bot_id).filter(|b| b.at.elapsed() < TTL)?;
        let (role, conversation_id) = *bot.grants.get(&user_id)?;
        Some(Grant { bot_name: bot.bot_name.clone(), engine: bot.engine.clone(), role, conversation_id })
    }

    /// Keeps a grant the store gave, unless a bot was forgotten since `seen`.
    pub fn keep_grant(&self, seen: Epoch, bot_id: Uuid, user_id: Uuid, grant: &Grant) {
        if !self.on {
            return;
        }
        let mut bots = self.bots.lock().unwrap();
        if self.epoch.load(Ordering::Acquire) != seen.0 {
            return;
        }
        let fresh = |b: &BotEntry| b.at.elapsed() < TTL;
        if !bots.get(&bot_id).is_some_and(fresh) {
            if bots.len() >= MAX_ENTRIES {
                bots.clear();
            }
            let entry = BotEntry {
                at: Instant::now(),
                bot_name: grant.bot_name.clone(),
                engine: grant.engine.clone(),
                grants: HashMap::new(),
            };
            bots.insert(bot_id, entry);
        }
        let entry = bots.get_mut(&bot_id).expect("inserted above");
        if entry.grants.len() >= MAX_ENTRIES {
            entry.grants.clear();
        }
        entry.grants.insert(user_id, (grant.role, grant.conversation_id));
    }

    /// The bot changed (its settings, visibility or members) or is gone: ask the store next
    /// time. Call it after the store has the change.
    pub fn forget_bot(&self, bot_id: Uuid) {
        // Under the lock: a `keep_grant` holding it checked the epoch before this bump, and
        // its entry is removed here; one that takes it after sees the new epoch.
        let mut bots = self.bots.lock().unwrap();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        bots.remove(&bot_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(name: &str) -> Grant {
        Grant {
            bot_name: name.into(),
            engine: EngineSpec::load(&serde_json::json!({"kind": "echo"})).unwrap(),
            role: BotRole::Chat,
            conversation_id: Uuid::new_v4(),
        }
    }

    #[test]
    fn a_grant_is_kept_until_its_bot_is_forgotten() {
        let cache = AccessCache::new(true);
        let (bot, user) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(cache.grant(bot, user).is_none());
        cache.keep_grant(cache.epoch(), bot, user, &grant("b"));
        assert_eq!(cache.grant(bot, user).unwrap().bot_name, "b");
        assert!(cache.grant(bot, Uuid::new_v4()).is_none(), "another user's grant is not this one's");
        cache.forget_bot(bot);
        assert!(cache.grant(bot, user).is_none());
    }

    #[test]
    fn an_answer_read_before_a_change_is_not_kept() {
        let cache = AccessCache::new(true);
        let (bot, user) = (Uuid::new_v4(), Uuid::new_v4());
        let seen = cache.epoch();
        // The store answered, then the bot changed before the answer was kept.
        cache.forget_bot(bot);
        cache.keep_grant(seen, bot, user, &grant("old"));
        assert!(cache.grant(bot, user).is_none());
        let u = UserRef { id: user, username: "alice".into() };
        cache.keep_user(seen, &u);
        assert!(cache.user(user).is_none());
        cache.keep_user(cache.epoch(), &u);
        assert_eq!(cache.user(user).unwrap().username, "alice");
    }

    #[test]
    fn off_remembers_nothing() {
        let cache = AccessCache::off();
        let (bot, user) = (Uuid::new_v4(), Uuid::new_v4());
        cache.keep_grant(cache.epoch(), bot, user, &grant("b"));
        cache.keep_user(cache.epoch(), &UserRef { id: user, username: "alice".into() });
        assert!(cache.grant(bot, user).is_none());
        assert!(cache.user(user).is_none());
    }
}
