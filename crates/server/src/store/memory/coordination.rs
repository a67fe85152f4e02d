//! [`MemoryStore`]'s side of [`Coordination`]: on one node, under the store's one lock.

use std::collections::HashSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use natter_proto::{MessageRole, MessageStatus, WireMessage};
use uuid::Uuid;

use super::super::*;
use super::{foreign_key, unique, Generation, Inner, MemoryStore, Slot};

#[async_trait]
impl Coordination for MemoryStore {
    fn shared(&self) -> bool {
        false
    }

    async fn claim_slot(&self, slot: SlotClaim, max: usize, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut inner = self.lock()?;
        let inner = &mut *inner;
        let now = millis(now);
        let mine = inner.slots.get(&slot.user_id);
        let live = mine.map_or(0, |s| s.values().filter(|s| s.expires_at > now).count());
        if live >= max {
            return Ok(false);
        }
        // SQLite deletes the user's expired slots before inserting: a connection id is taken
        // unless it is one of those.
        if let Some(&owner) = inner.slot_users.get(&slot.connection_id) {
            let expired_mine = owner == slot.user_id
                && mine.and_then(|s| s.get(&slot.connection_id)).is_some_and(|s| s.expires_at <= now);
            if !expired_mine {
                return Err(unique("connection_slots.connection_id"));
            }
        }
        let mine = inner.slots.entry(slot.user_id).or_default();
        let slot_users = &mut inner.slot_users;
        mine.retain(|connection_id, s| {
            let keep = s.expires_at > now;
            if !keep {
                slot_users.remove(connection_id);
            }
            keep
        });
        mine.insert(slot.connection_id, Slot { node_id: slot.node_id, expires_at: millis(slot.expires_at) });
        slot_users.insert(slot.connection_id, slot.user_id);
        Ok(true)
    }

    async fn slots_in_use(&self, user_id: Uuid, now: DateTime<Utc>) -> StoreResult<usize> {
        let inner = self.lock()?;
        let now = millis(now);
        Ok(inner.slots.get(&user_id).map_or(0, |s| s.values().filter(|s| s.expires_at > now).count()))
    }

    async fn release_slot(&self, connection_id: Uuid) -> StoreResult<()> {
        let mut inner = self.lock()?;
        let Some(user_id) = inner.slot_users.remove(&connection_id) else { return Ok(()) };
        if let Some(mine) = inner.slots.get_mut(&user_id) {
            mine.remove(&connection_id);
            if mine.is_empty() {
                inner.slots.remove(&user_id);
            }
        }
        Ok(())
    }

    async fn renew_node(&self, node_id: Uuid, slots: &[Uuid], work: &[Uuid], until: DateTime<Utc>) -> StoreResult<()> {
        // Sets, not a scan of the slice per slot: 10 000 sockets would be 10^8 comparisons
        // under the store's one mutex.
        let held: HashSet<&Uuid> = slots.iter().collect();
        let work: HashSet<&Uuid> = work.iter().collect();
        let mut inner = self.lock()?;
        let inner = &mut *inner;
        let until = millis(until);
        let slot_users = &mut inner.slot_users;
        for mine in inner.slots.values_mut() {
            mine.retain(|connection_id, s| {
                if s.node_id != node_id {
                    return true;
                }
                if held.contains(connection_id) {
                    s.expires_at = until;
                }
                let keep = s.expires_at >= until;
                if !keep {
                    slot_users.remove(connection_id);
                }
                keep
            });
        }
        inner.slots.retain(|_, mine| !mine.is_empty());
        for (_, g) in inner.generations.iter_mut().filter(|(id, g)| g.node_id == node_id && work.contains(id)) {
            g.lease_until = until;
        }
        for (_, o) in inner.owed.iter_mut().filter(|(id, o)| o.node_id == Some(node_id) && work.contains(id)) {
            o.lease_until = Some(until);
        }
        Ok(())
    }

    async fn begin_generation(&self, g: &GenerationLease) -> StoreResult<()> {
        let mut inner = self.lock()?;
        if inner.generations.contains_key(&g.message_id) {
            return Err(unique("generations.message_id"));
        }
        if !inner.conversations.contains_key(&g.conversation_id) {
            return Err(foreign_key("generations.conversation_id"));
        }
        inner.generation_counter += 1;
        let order = inner.generation_counter;
        inner.generations.insert(
            g.message_id,
            Generation {
                conversation_id: g.conversation_id,
                in_reply_to: g.in_reply_to,
                node_id: g.node_id,
                text: String::new(),
                lease_until: millis(g.lease_until),
                order,
            },
        );
        Ok(())
    }

    async fn checkpoint_generation(&self, message_id: Uuid, text: &str) -> StoreResult<()> {
        let mut inner = self.lock()?;
        if let Some(g) = inner.generations.get_mut(&message_id) {
            text.clone_into(&mut g.text);
        }
        Ok(())
    }

    async fn generation_in_progress(&self, conversation_id: Uuid, message_id: Uuid) -> StoreResult<bool> {
        let inner = self.lock()?;
        Ok(inner.generations.get(&message_id).is_some_and(|g| g.conversation_id == conversation_id))
    }

    async fn end_generation(&self, message_id: Uuid) -> StoreResult<()> {
        self.lock()?.generations.remove(&message_id);
        Ok(())
    }

    async fn recover_generations(&self, now: DateTime<Utc>) -> StoreResult<Vec<WireMessage>> {
        let mut inner = self.lock()?;
        let Inner { generations, conversations, message_ids, owed, .. } = &mut *inner;
        let now = millis(now);
        // In the order SQLite's index on lease_until yields them: by lease, then insertion.
        let mut due: Vec<(i64, u64, Uuid)> = generations
            .iter()
            .filter(|(_, g)| g.lease_until <= now)
            .map(|(id, g)| (g.lease_until, g.order, *id))
            .collect();
        due.sort_unstable();
        let mut recovered = Vec::new();
        for (_, _, id) in due {
            let Some(g) = generations.remove(&id) else { continue };
            // The node may have stored the reply and died before forgetting its lease.
            if message_ids.contains(&id) {
                continue;
            }
            let Some(conv) = conversations.get_mut(&g.conversation_id) else { continue };
            if Inner::answered(conv, owed, g.in_reply_to) {
                continue;
            }
            let m = NewMessage {
                id,
                conversation_id: g.conversation_id,
                role: MessageRole::Bot,
                content: g.text,
                client_id: None,
                in_reply_to: Some(g.in_reply_to),
                status: MessageStatus::Incomplete,
            };
            recovered.push(Inner::push_message(conv, message_ids, owed, m));
        }
        Ok(recovered)
    }

    async fn lease_owed(&self, message_id: Uuid, node_id: Uuid, until: DateTime<Utc>) -> StoreResult<bool> {
        let mut inner = self.lock()?;
        match inner.owed.get_mut(&message_id) {
            Some(o) if o.node_id.is_none() || o.node_id == Some(node_id) => {
                o.node_id = Some(node_id);
                o.lease_until = Some(millis(until));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn claim_owed(
        &self,
        node_id: Uuid,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
        unleased_before: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<OwedMessage>> {
        let mut inner = self.lock()?;
        let Inner { owed, generations, conversations, .. } = &mut *inner;
        let (now, unleased_before) = (millis(now), millis(unleased_before));
        let generating: HashSet<Uuid> = generations.values().map(|g| g.in_reply_to).collect();
        let mut due: Vec<(i64, Uuid)> = owed
            .iter()
            .filter(|(id, o)| {
                let free = match o.lease_until {
                    Some(l) => l < now,
                    None => o.created_at < unleased_before,
                };
                free && !generating.contains(id)
            })
            .map(|(id, o)| (o.created_at, *id))
            .collect();
        due.sort_unstable();
        due.truncate(limit as usize);
        let mut taken = Vec::with_capacity(due.len());
        for (_, id) in due {
            let Some(o) = owed.get_mut(&id) else { continue };
            let Some(conv) = conversations.get(&o.conversation_id) else { continue };
            let Some(message) = conv.messages.iter().find(|m| m.id == id) else { continue };
            o.node_id = Some(node_id);
            o.lease_until = Some(millis(until));
            taken.push(OwedMessage { message: message.clone(), bot_id: conv.bot_id });
        }
        taken.sort_by_key(|o| (o.message.created_at, o.message.seq));
        Ok(taken)
    }
}

// Its tests: every case of `store::conformance`, run on every store.
