//! The in-memory store (`--database-url memory:`): plain maps behind one mutex, no SQL, gone
//! on exit. For tests, demos and benchmarks of everything but the database.
//!
//! It mirrors [`SqliteStore`](super::SqliteStore) method by method — the same errors, orderings
//! and constraints (unique keys, foreign keys with their cascades, the ticket sweep, the refresh
//! token families) — and passes the same conformance suite. Every method does its work
//! synchronously under the one lock (never held across an await), so each is atomic like a
//! SQLite write transaction under the file's write lock. Times are kept in milliseconds, as
//! SQLite stores them, so values read back compare equal across implementations.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use natter_proto::api::{BotRole, ConnectionRecord, MemberRole};
use natter_proto::{MessageRole, WireMessage};
use uuid::Uuid;

use super::rows::{ms, role_of};
use super::*;

mod coordination;
mod ledger;
mod tokens;

/// The in-memory store. See the module documentation.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state, unless the store was closed (then every call fails, as a closed pool does).
    fn lock(&self) -> StoreResult<MutexGuard<'_, Inner>> {
        let inner = self.inner.lock().map_err(|_| StoreError::Backend("memory store poisoned by a panic".into()))?;
        if inner.closed {
            return Err(StoreError::Backend("the store is closed".into()));
        }
        Ok(inner)
    }
}

#[derive(Default)]
struct Inner {
    closed: bool,
    users: HashMap<Uuid, User>,
    user_by_name: HashMap<String, Uuid>,
    refresh_tokens: HashMap<String, RefreshRow>,
    /// family id → the hashes of its tokens.
    families: HashMap<Uuid, Vec<String>>,
    bots: HashMap<Uuid, Bot>,
    /// bot id → user id → role.
    members: HashMap<Uuid, HashMap<Uuid, MemberRole>>,
    conversations: HashMap<Uuid, Conv>,
    conversation_ids: HashMap<(Uuid, Uuid), Uuid>,
    /// bot id → its conversations, oldest first.
    conversations_by_bot: HashMap<Uuid, Vec<Uuid>>,
    /// Every stored message id (the primary key of SQLite's `messages`).
    message_ids: HashSet<Uuid>,
    tickets: HashMap<String, Ticket>,
    /// The connection ledger in the order it is read: newest first, then by connection id.
    /// Boxed: a B-tree insert shifts the values of its node, and a row is ~300 bytes.
    ledger: BTreeMap<(Reverse<i64>, Uuid), Box<ConnectionRecord>>,
    /// connection id → `started_at` (ms) of its ledger row, to find its key.
    ledger_started: HashMap<Uuid, i64>,
    /// user id → connection id → slot.
    slots: HashMap<Uuid, HashMap<Uuid, Slot>>,
    /// connection id → user id.
    slot_users: HashMap<Uuid, Uuid>,
    generations: HashMap<Uuid, Generation>,
    /// Insertion counter for `generations` (SQLite's rowid), which orders a sweep's ties.
    generation_counter: u64,
    /// User messages owed a reply (SQLite's `owed_replies`, kept by its triggers).
    owed: HashMap<Uuid, Owed>,
}

struct Owed {
    conversation_id: Uuid,
    created_at: i64,
    node_id: Option<Uuid>,
    lease_until: Option<i64>,
}

struct RefreshRow {
    user_id: Uuid,
    family_id: Uuid,
    expires_at: i64,
    used_at: Option<i64>,
    revoked_at: Option<i64>,
}

struct Conv {
    id: Uuid,
    user_id: Uuid,
    bot_id: Uuid,
    /// The message with seq `n` is at index `n - 1`: seqs are gap-free from 1, so `last_seq`
    /// is the length.
    messages: Vec<WireMessage>,
    /// client id → index in `messages`.
    by_client_id: HashMap<String, usize>,
}

impl Conv {
    fn last_seq(&self) -> i64 {
        self.messages.len() as i64
    }

    fn summary(&self) -> Conversation {
        Conversation { id: self.id, user_id: self.user_id, bot_id: self.bot_id, last_seq: self.last_seq() }
    }
}

struct Ticket {
    user_id: Uuid,
    bot_id: Uuid,
    expires_at: i64,
}

struct Slot {
    node_id: Uuid,
    expires_at: i64,
}

struct Generation {
    conversation_id: Uuid,
    in_reply_to: Uuid,
    node_id: Uuid,
    text: String,
    lease_until: i64,
    order: u64,
}

fn foreign_key(what: &str) -> StoreError {
    StoreError::Backend(format!("FOREIGN KEY constraint failed ({what})"))
}

fn unique(what: &str) -> StoreError {
    StoreError::Backend(format!("UNIQUE constraint failed: {what}"))
}

impl Inner {
    fn role_of(&self, bot: &Bot, user_id: Uuid) -> Option<BotRole> {
        role_of(bot, user_id, self.members.get(&bot.id).and_then(|m| m.get(&user_id)).copied())
    }

    /// Whether `in_reply_to` already has its one outcome: not owed any more, and a bot message in
    /// reply to it is stored (messages from before owed replies were tracked are never owed).
    fn answered(conv: &Conv, owed: &HashMap<Uuid, Owed>, in_reply_to: Uuid) -> bool {
        !owed.contains_key(&in_reply_to)
            && conv.messages.iter().any(|m| m.role == MessageRole::Bot && m.in_reply_to == Some(in_reply_to))
    }

    /// [`Store::append_message`], under the lock.
    fn append(&mut self, m: NewMessage) -> StoreResult<Appended> {
        let Inner { conversations, message_ids, owed, .. } = self;
        let conv = conversations.get_mut(&m.conversation_id).ok_or(StoreError::NotFound)?;
        // The client_id conflict is SQLite's upsert target, checked before the other keys.
        if let Some(&i) = m.client_id.as_ref().and_then(|c| conv.by_client_id.get(c)) {
            return Ok(Appended { message: conv.messages[i].clone(), duplicate: true });
        }
        if message_ids.contains(&m.id) {
            return Err(unique("messages.id"));
        }
        if let (MessageRole::Bot, Some(asked)) = (m.role, m.in_reply_to) {
            if Inner::answered(conv, owed, asked) {
                return Err(StoreError::AlreadyAnswered);
            }
        }
        let message = Inner::push_message(conv, message_ids, owed, m);
        Ok(Appended { message, duplicate: false })
    }

    /// Takes the next seq of the conversation; the caller checked the id is free.
    fn push_message(
        conv: &mut Conv,
        message_ids: &mut HashSet<Uuid>,
        owed: &mut HashMap<Uuid, Owed>,
        m: NewMessage,
    ) -> WireMessage {
        let message = WireMessage {
            id: m.id,
            conversation_id: conv.id,
            seq: conv.last_seq() + 1,
            role: m.role,
            content: m.content,
            created_at: ms(Utc::now()),
            client_id: m.client_id,
            in_reply_to: m.in_reply_to,
            status: m.status,
        };
        if let Some(client_id) = &message.client_id {
            conv.by_client_id.insert(client_id.clone(), conv.messages.len());
        }
        message_ids.insert(message.id);
        if message.role == MessageRole::User {
            let row = Owed {
                conversation_id: conv.id,
                created_at: millis(message.created_at),
                node_id: None,
                lease_until: None,
            };
            owed.entry(message.id).or_insert(row);
        }
        if let Some(id) = message.in_reply_to {
            owed.remove(&id);
        }
        conv.messages.push(message.clone());
        message
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn ping(&self) -> StoreResult<()> {
        self.lock().map(drop)
    }

    async fn close(&self) {
        // Taking the lock waits for the call in flight; the data goes with the store.
        let mut inner = match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        };
        inner.closed = true;
    }

    async fn create_user(&self, user: NewUser) -> StoreResult<User> {
        let mut inner = self.lock()?;
        if inner.user_by_name.contains_key(&user.username) {
            return Err(StoreError::UsernameTaken);
        }
        let user = User {
            id: Uuid::new_v4(),
            username: user.username,
            password_hash: user.password_hash,
            is_admin: user.is_admin,
            created_at: ms(Utc::now()),
        };
        inner.user_by_name.insert(user.username.clone(), user.id);
        inner.users.insert(user.id, user.clone());
        Ok(user)
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        let inner = self.lock()?;
        Ok(inner.user_by_name.get(username).and_then(|id| inner.users.get(id)).cloned())
    }

    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>> {
        Ok(self.lock()?.users.get(&id).cloned())
    }

    async fn set_admin(&self, username: &str, is_admin: bool) -> StoreResult<()> {
        let mut inner = self.lock()?;
        let id = *inner.user_by_name.get(username).ok_or(StoreError::NotFound)?;
        inner.users.get_mut(&id).ok_or(StoreError::NotFound)?.is_admin = is_admin;
        Ok(())
    }

    async fn insert_refresh_token(&self, t: NewRefreshToken) -> StoreResult<()> {
        self.lock()?.insert_refresh_token(t)
    }

    async fn use_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<RefreshUse> {
        Ok(self.lock()?.use_refresh_token(token_hash, millis(now)))
    }

    async fn revoke_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<Uuid>> {
        let mut inner = self.lock()?;
        let family = inner.refresh_tokens.get(token_hash).map(|r| r.family_id);
        if let Some(family_id) = family {
            inner.revoke_family(family_id, millis(now));
        }
        Ok(family)
    }

    async fn revoked_families(&self, since: DateTime<Utc>) -> StoreResult<Vec<Uuid>> {
        Ok(self.lock()?.revoked_families(millis(since)))
    }

    async fn create_bot(&self, bot: NewBot) -> StoreResult<Bot> {
        let mut inner = self.lock()?;
        let owner = inner.users.get(&bot.owner_id).ok_or_else(|| foreign_key("bots.owner_id"))?;
        let now = ms(Utc::now());
        let bot = Bot {
            id: Uuid::new_v4(),
            owner_id: bot.owner_id,
            owner_username: owner.username.clone(),
            name: bot.name,
            description: bot.description,
            visibility: bot.visibility,
            engine: bot.engine,
            created_at: now,
            updated_at: now,
        };
        inner.bots.insert(bot.id, bot.clone());
        Ok(bot)
    }

    async fn bot(&self, id: Uuid) -> StoreResult<Option<Bot>> {
        Ok(self.lock()?.bots.get(&id).cloned())
    }

    async fn update_bot(&self, id: Uuid, c: BotChanges) -> StoreResult<Bot> {
        let mut inner = self.lock()?;
        let bot = inner.bots.get_mut(&id).ok_or(StoreError::NotFound)?;
        if let Some(name) = c.name {
            bot.name = name;
        }
        if let Some(description) = c.description {
            bot.description = description;
        }
        if let Some(visibility) = c.visibility {
            bot.visibility = visibility;
        }
        if let Some(engine) = c.engine {
            bot.engine = engine;
        }
        bot.updated_at = ms(Utc::now());
        Ok(bot.clone())
    }

    async fn delete_bot(&self, id: Uuid) -> StoreResult<()> {
        let mut inner = self.lock()?;
        let inner = &mut *inner;
        if inner.bots.remove(&id).is_none() {
            return Err(StoreError::NotFound);
        }
        // What SQLite's ON DELETE CASCADE removes with the bot: its members and conversations,
        // and with those their messages and replies in progress. Tickets name the bot without
        // a foreign key, so they stay (as they do in SQLite).
        inner.members.remove(&id);
        let convs = inner.conversations_by_bot.remove(&id).unwrap_or_default();
        for conv_id in &convs {
            if let Some(conv) = inner.conversations.remove(conv_id) {
                inner.conversation_ids.remove(&(conv.user_id, conv.bot_id));
                for m in &conv.messages {
                    inner.message_ids.remove(&m.id);
                }
            }
        }
        if !convs.is_empty() {
            let convs: HashSet<Uuid> = convs.into_iter().collect();
            inner.generations.retain(|_, g| !convs.contains(&g.conversation_id));
            inner.owed.retain(|_, o| !convs.contains(&o.conversation_id));
        }
        Ok(())
    }

    async fn bots_for_user(&self, user_id: Uuid) -> StoreResult<Vec<(Bot, BotRole)>> {
        let inner = self.lock()?;
        let mut bots: Vec<(Bot, BotRole)> =
            inner.bots.values().filter_map(|bot| inner.role_of(bot, user_id).map(|role| (bot.clone(), role))).collect();
        // `ORDER BY b.created_at, b.id`: the text of UUIDs sorts as their bytes do.
        bots.sort_by_key(|(b, _)| (b.created_at, b.id));
        Ok(bots)
    }

    async fn bot_role(&self, bot: &Bot, user_id: Uuid) -> StoreResult<Option<BotRole>> {
        // Like SQLite, the owner is known without asking the store (even a closed one).
        if bot.owner_id == user_id {
            return Ok(Some(BotRole::Owner));
        }
        Ok(self.lock()?.role_of(bot, user_id))
    }

    async fn upsert_member(&self, bot_id: Uuid, user_id: Uuid, role: MemberRole) -> StoreResult<()> {
        let mut inner = self.lock()?;
        if !inner.bots.contains_key(&bot_id) {
            return Err(foreign_key("bot_members.bot_id"));
        }
        if !inner.users.contains_key(&user_id) {
            return Err(foreign_key("bot_members.user_id"));
        }
        inner.members.entry(bot_id).or_default().insert(user_id, role);
        Ok(())
    }

    async fn remove_member(&self, bot_id: Uuid, user_id: Uuid) -> StoreResult<bool> {
        let mut inner = self.lock()?;
        let Some(members) = inner.members.get_mut(&bot_id) else { return Ok(false) };
        let removed = members.remove(&user_id).is_some();
        if members.is_empty() {
            inner.members.remove(&bot_id);
        }
        Ok(removed)
    }

    async fn members(&self, bot_id: Uuid) -> StoreResult<Vec<Member>> {
        let inner = self.lock()?;
        let Some(members) = inner.members.get(&bot_id) else { return Ok(Vec::new()) };
        let mut out: Vec<Member> = members
            .iter()
            .filter_map(|(user_id, role)| {
                let user = inner.users.get(user_id)?;
                Some(Member { user_id: *user_id, username: user.username.clone(), role: *role })
            })
            .collect();
        out.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(out)
    }

    async fn conversations_of_bot(&self, bot_id: Uuid) -> StoreResult<Vec<Uuid>> {
        Ok(self.lock()?.conversations_by_bot.get(&bot_id).cloned().unwrap_or_default())
    }

    async fn conversation(&self, user_id: Uuid, bot_id: Uuid) -> StoreResult<Conversation> {
        let mut inner = self.lock()?;
        if let Some(conv) = inner.conversation_ids.get(&(user_id, bot_id)).and_then(|id| inner.conversations.get(id)) {
            return Ok(conv.summary());
        }
        if !inner.users.contains_key(&user_id) {
            return Err(foreign_key("conversations.user_id"));
        }
        if !inner.bots.contains_key(&bot_id) {
            return Err(foreign_key("conversations.bot_id"));
        }
        let conv = Conv { id: Uuid::new_v4(), user_id, bot_id, messages: Vec::new(), by_client_id: HashMap::new() };
        let summary = conv.summary();
        inner.conversation_ids.insert((user_id, bot_id), conv.id);
        inner.conversations_by_bot.entry(bot_id).or_default().push(conv.id);
        inner.conversations.insert(conv.id, conv);
        Ok(summary)
    }

    async fn append_message(&self, m: NewMessage) -> StoreResult<Appended> {
        self.lock()?.append(m)
    }

    /// Both under one lock: no reader sees the message without its reply.
    async fn append_answered(&self, m: NewMessage, reply: NewMessage) -> StoreResult<AppendedPair> {
        let mut inner = self.lock()?;
        let message = inner.append(m)?;
        let reply = (!message.duplicate).then(|| inner.append(reply));
        Ok(AppendedPair { message, reply })
    }

    async fn messages_after(&self, conversation_id: Uuid, after_seq: i64, limit: u32) -> StoreResult<Vec<WireMessage>> {
        let inner = self.lock()?;
        let Some(conv) = inner.conversations.get(&conversation_id) else { return Ok(Vec::new()) };
        let len = conv.messages.len();
        // seq > after_seq is index >= after_seq.
        let start = after_seq.clamp(0, len as i64) as usize;
        let end = start.saturating_add(limit as usize).min(len);
        Ok(conv.messages[start..end].to_vec())
    }

    async fn messages_before(
        &self,
        conversation_id: Uuid,
        before_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<WireMessage>> {
        let inner = self.lock()?;
        let Some(conv) = inner.conversations.get(&conversation_id) else { return Ok(Vec::new()) };
        let len = conv.messages.len();
        // seq < before_seq is index < before_seq - 1.
        let end = before_seq.saturating_sub(1).clamp(0, len as i64) as usize;
        let start = end.saturating_sub(limit as usize);
        Ok(conv.messages[start..end].to_vec())
    }

    async fn create_ticket(
        &self,
        ticket_hash: &str,
        user_id: Uuid,
        bot_id: Uuid,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut inner = self.lock()?;
        // Expired tickets are swept as new ones are made (by the clock, as SQLite does), so
        // an expired ticket with the same hash is no conflict.
        let now = millis(Utc::now());
        if inner.tickets.get(ticket_hash).is_some_and(|t| t.expires_at > now) {
            return Err(unique("ws_tickets.ticket_hash"));
        }
        if !inner.users.contains_key(&user_id) {
            return Err(foreign_key("ws_tickets.user_id"));
        }
        inner.tickets.retain(|_, t| t.expires_at > now);
        inner.tickets.insert(ticket_hash.to_owned(), Ticket { user_id, bot_id, expires_at: millis(expires_at) });
        Ok(())
    }

    async fn consume_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>> {
        let mut inner = self.lock()?;
        // Deleted whether or not it expired.
        let Some(t) = inner.tickets.remove(ticket_hash) else { return Ok(None) };
        if t.expires_at <= millis(now) {
            return Ok(None);
        }
        Ok(Some((t.user_id, t.bot_id)))
    }

    async fn peek_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>> {
        let inner = self.lock()?;
        Ok(inner.tickets.get(ticket_hash).filter(|t| t.expires_at > millis(now)).map(|t| (t.user_id, t.bot_id)))
    }

    async fn record_connections(&self, rows: &[ConnectionRecord]) -> StoreResult<()> {
        // Like SQLite: nothing to write asks nothing of the store (even a closed one).
        if !rows.is_empty() {
            self.lock()?.record_connections(rows);
        }
        Ok(())
    }

    async fn connections(
        &self,
        user: Option<Uuid>,
        bot: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        Ok(self.lock()?.connections(user, bot, limit))
    }

    async fn connection(&self, attempt_id: Uuid, user_id: Option<Uuid>) -> StoreResult<Option<ConnectionRecord>> {
        Ok(self.lock()?.connection(attempt_id, user_id))
    }

    async fn prune_connections(&self, older_than: DateTime<Utc>, keep: u64) -> StoreResult<u64> {
        Ok(self.lock()?.prune_connections(older_than, keep))
    }
}
