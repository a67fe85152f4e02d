//! Fan-out of conversation events to every connection that watches the conversation.
//!
//! All fan-out goes through [`Bus`], even on one node, so that a multi-node bus is a second
//! implementation and not a second code path. The bus carries notifications, not truth:
//! committed messages are in the store first, and a subscriber that misses events (lag,
//! reconnect) catches up from the store by seq.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use natter_proto::{ErrorCode, WireMessage};
use tokio::sync::broadcast;
use uuid::Uuid;

pub mod nats;
pub use nats::NatsBus;

/// Something that happened in a conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum ConvEvent {
    /// A message is committed to the store with this seq.
    Message(WireMessage),
    /// A piece of a bot reply in progress (not stored; the final `Message` carries it all).
    /// `offset` is where `delta` starts in the reply's text (bytes), so a subscriber that
    /// joined mid-reply or lagged can tell what it already has.
    Delta { message_id: Uuid, in_reply_to: Uuid, offset: usize, delta: String },
    /// A bot reply failed; `in_reply_to` is the user message.
    BotError { code: ErrorCode, message: String, in_reply_to: Uuid },
    /// The conversation's bot was edited, deleted, or its members or visibility changed:
    /// every socket re-checks its access (closing 4403/4404 when it is gone) and reloads
    /// the bot's engine.
    BotChanged,
    /// A socket asked to stop a reply that another node is generating; that node stops it.
    Cancel { message_id: Uuid },
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// A live subscription to one conversation's events.
pub struct Subscription {
    // Field order matters: `rx` must drop before `_guard` (see `TopicGuard::drop`).
    rx: broadcast::Receiver<Arc<ConvEvent>>,
    _guard: Option<Box<dyn Send + Sync>>,
}

/// What a subscriber receives.
pub enum Received {
    Event(Arc<ConvEvent>),
    /// Events were dropped because this subscriber fell behind; resync from the store.
    Lagged(u64),
    /// The bus is gone (shutdown).
    Closed,
}

impl Subscription {
    pub fn new(rx: broadcast::Receiver<Arc<ConvEvent>>, guard: Option<Box<dyn Send + Sync>>) -> Self {
        Subscription { rx, _guard: guard }
    }

    pub async fn recv(&mut self) -> Received {
        match self.rx.recv().await {
            Ok(e) => Received::Event(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Received::Lagged(n),
            Err(broadcast::error::RecvError::Closed) => Received::Closed,
        }
    }
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    async fn publish(&self, conversation_id: Uuid, event: ConvEvent) -> Result<(), BusError>;
    async fn subscribe(&self, conversation_id: Uuid) -> Result<Subscription, BusError>;
    /// Whether the bus can deliver right now, without waiting (for `/api/ready` and the
    /// dependency watch). The in-process bus always can.
    fn health(&self) -> Result<(), BusError> {
        Ok(())
    }
}

/// The in-process bus: one broadcast channel per watched conversation, created on first
/// subscribe and removed with its last subscriber.
#[derive(Clone)]
pub struct LocalBus {
    inner: Arc<LocalInner>,
}

struct LocalInner {
    /// Plain mutex: held only for map lookups, never across an await.
    topics: Mutex<HashMap<Uuid, broadcast::Sender<Arc<ConvEvent>>>>,
    capacity: usize,
}

impl LocalBus {
    /// `capacity` is how many events a subscriber may fall behind before it lags.
    pub fn new(capacity: usize) -> Self {
        LocalBus { inner: Arc::new(LocalInner { topics: Mutex::new(HashMap::new()), capacity }) }
    }

    /// Conversations with at least one subscriber.
    pub fn topic_count(&self) -> usize {
        self.inner.topics.lock().unwrap().len()
    }
}

struct TopicGuard {
    inner: Arc<LocalInner>,
    conversation_id: Uuid,
}

impl Drop for TopicGuard {
    fn drop(&mut self) {
        let mut topics = self.inner.topics.lock().unwrap();
        // `Subscription` drops its receiver before its guard (field order), so the last
        // subscriber leaving leaves zero receivers.
        if topics.get(&self.conversation_id).is_some_and(|tx| tx.receiver_count() == 0) {
            topics.remove(&self.conversation_id);
        }
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn publish(&self, conversation_id: Uuid, event: ConvEvent) -> Result<(), BusError> {
        let tx = self.inner.topics.lock().unwrap().get(&conversation_id).cloned();
        if let Some(tx) = tx {
            // No receivers is fine: nobody is watching.
            let _ = tx.send(Arc::new(event));
        }
        Ok(())
    }

    async fn subscribe(&self, conversation_id: Uuid) -> Result<Subscription, BusError> {
        let rx = {
            let mut topics = self.inner.topics.lock().unwrap();
            topics.entry(conversation_id).or_insert_with(|| broadcast::channel(self.inner.capacity).0).subscribe()
        };
        let guard = TopicGuard { inner: self.inner.clone(), conversation_id };
        Ok(Subscription::new(rx, Some(Box::new(guard))))
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The tests every [`Bus`] implementation must pass.
    use super::*;
    use std::time::Duration;

    fn delta(s: &str) -> ConvEvent {
        ConvEvent::Delta { message_id: Uuid::nil(), in_reply_to: Uuid::nil(), offset: 0, delta: s.into() }
    }

    async fn next(sub: &mut Subscription) -> ConvEvent {
        match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.expect("event in time") {
            Received::Event(e) => (*e).clone(),
            _ => panic!("expected an event"),
        }
    }

    pub async fn run_all(bus: Arc<dyn Bus>) {
        let conv = Uuid::new_v4();
        let other = Uuid::new_v4();
        let mut a = bus.subscribe(conv).await.unwrap();
        let mut b = bus.subscribe(conv).await.unwrap();
        let mut c = bus.subscribe(other).await.unwrap();
        for i in 0..10 {
            bus.publish(conv, delta(&i.to_string())).await.unwrap();
        }
        bus.publish(other, delta("other")).await.unwrap();
        for i in 0..10 {
            assert_eq!(next(&mut a).await, delta(&i.to_string()), "in order");
            assert_eq!(next(&mut b).await, delta(&i.to_string()));
        }
        assert_eq!(next(&mut c).await, delta("other"), "topics are separate");
        // Nothing more for `a`.
        assert!(tokio::time::timeout(Duration::from_millis(100), a.recv()).await.is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_bus_conformance() {
        conformance::run_all(Arc::new(LocalBus::new(64))).await;
    }

    #[tokio::test]
    async fn topics_are_removed_with_their_last_subscriber() {
        let bus = LocalBus::new(8);
        let conv = Uuid::new_v4();
        let a = bus.subscribe(conv).await.unwrap();
        let b = bus.subscribe(conv).await.unwrap();
        assert_eq!(bus.topic_count(), 1);
        drop(a);
        assert_eq!(bus.topic_count(), 1);
        drop(b);
        assert_eq!(bus.topic_count(), 0);
    }

    #[tokio::test]
    async fn a_slow_subscriber_lags_instead_of_growing() {
        let bus = LocalBus::new(4);
        let conv = Uuid::new_v4();
        let mut sub = bus.subscribe(conv).await.unwrap();
        for i in 0..10 {
            bus.publish(
                conv,
                ConvEvent::Delta { message_id: Uuid::nil(), in_reply_to: Uuid::nil(), offset: 0, delta: i.to_string() },
            )
            .await
            .unwrap();
        }
        assert!(matches!(sub.recv().await, Received::Lagged(6)));
    }
}
