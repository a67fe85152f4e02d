//! Fan-out of conversation events to every connection that watches the conversation.
//!
//! All fan-out goes through [`Bus`], even on one node, so that a multi-node bus is a second
//! implementation and not a second code path. The bus carries notifications, not truth:
//! committed messages are in the store first, and a subscriber that misses events (lag,
//! reconnect) catches up from the store by seq.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use natter_proto::{ErrorCode, WireMessage};
use tokio::sync::{broadcast, watch, Notify};
use uuid::Uuid;

pub mod nats;
pub use nats::NatsBus;

/// Something that happened in a conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum ConvEvent {
    /// A message is committed to the store with this seq; with the W3C `traceparent` of the
    /// span that stored it, when traces are exported (each socket's delivery joins that trace,
    /// on every node).
    Message(WireMessage, Option<String>),
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
    /// A socket joined a conversation (`None`: every reply) or missed pieces of a reply
    /// generated on another node: the node generating it answers with a [`ConvEvent::Delta`]
    /// at offset 0 holding the whole text so far, which fills every socket's gap.
    ReplySync { message_id: Option<Uuid> },
    /// A login (refresh-token family) was ended: logout, or a refresh token used twice. On
    /// [`REVOCATIONS`], every node adds it to its revoked set; on a conversation, that
    /// conversation's sockets of this login close 4401.
    Revoked { family_id: Uuid },
    /// The client of a connection that does not hear it itself was heard: an SSE stream's
    /// client speaks by HTTP POST, perhaps to another node. That connection's idle timer
    /// restarts (if `user_id` is its user).
    Heard { connection_id: Uuid, user_id: Uuid },
}

/// Announces a stored message in an `announce` span (traces only), whose context travels with
/// it: each socket's delivery, on any node, joins the message's trace.
pub async fn announce(bus: &dyn Bus, conversation_id: Uuid, message: WireMessage) -> Result<(), BusError> {
    use tracing::Instrument;
    let span = tracing::info_span!(target: crate::telemetry::TRACE, "announce", seq = message.seq);
    let traceparent = span.in_scope(crate::telemetry::current_traceparent);
    bus.publish(conversation_id, ConvEvent::Message(message, traceparent)).instrument(span).await
}

/// Not a conversation: the topic every node subscribes to for [`ConvEvent::Revoked`]
/// (`natter.conv.00000000-0000-0000-0000-00000000a0a0` on NATS).
pub const REVOCATIONS: Uuid = Uuid::from_u128(0xa0a0);

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// A live subscription to one conversation's events.
pub struct Subscription {
    // Field order matters: `rx` must drop before `_guard` (see `TopicGuard::drop`).
    rx: Rx,
    _guard: Option<Box<dyn Send + Sync>>,
}

enum Rx {
    Broadcast(broadcast::Receiver<Arc<ConvEvent>>),
    Local(LocalReceiver),
    /// Events, and a counter bumped whenever the subscriber may have missed some without a lag
    /// showing (the NATS connection came back, or the conversation was quiet for a while).
    Resync(broadcast::Receiver<Arc<ConvEvent>>, watch::Receiver<u64>),
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
        Subscription { rx: Rx::Broadcast(rx), _guard: guard }
    }

    /// Like [`Subscription::new`]; each bump of `resync` is received as `Lagged(0)`.
    pub fn with_resync(
        rx: broadcast::Receiver<Arc<ConvEvent>>,
        resync: watch::Receiver<u64>,
        guard: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        Subscription { rx: Rx::Resync(rx, resync), _guard: guard }
    }

    /// Cancel safe: an event is taken only by the call that returns it.
    pub async fn recv(&mut self) -> Received {
        fn received(r: Result<Arc<ConvEvent>, broadcast::error::RecvError>) -> Received {
            match r {
                Ok(e) => Received::Event(e),
                Err(broadcast::error::RecvError::Lagged(n)) => Received::Lagged(n),
                Err(broadcast::error::RecvError::Closed) => Received::Closed,
            }
        }
        match &mut self.rx {
            Rx::Broadcast(rx) => received(rx.recv().await),
            Rx::Local(rx) => rx.recv().await,
            Rx::Resync(rx, resync) => tokio::select! {
                biased;
                changed = resync.changed() => match changed {
                    Ok(()) => Received::Lagged(0),
                    Err(_) => Received::Closed,
                },
                r = rx.recv() => received(r),
            },
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
    /// Whether other nodes publish and subscribe here too (replies may be generated elsewhere).
    fn shared(&self) -> bool {
        false
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
    topics: Mutex<HashMap<Uuid, Arc<Topic>>>,
    capacity: usize,
}

/// One watched conversation: a broadcast queue that holds only the events some subscriber has
/// yet to read. tokio's broadcast channel allocates every slot up front (64 slots, 2 KiB per
/// conversation, which is one per socket in practice); an idle conversation here holds no
/// events and no buffer.
struct Topic {
    /// Plain mutex: never held across an await.
    queue: Mutex<Queue>,
    /// Woken on every publish; a receiver registers before it looks, so none is missed.
    published: Notify,
}

struct Queue {
    /// Events not yet read by every subscriber, oldest first, each with how many subscribers
    /// have yet to read it. At most `capacity`: publishing to a full queue drops the oldest,
    /// and who had not read it lags.
    events: VecDeque<(Arc<ConvEvent>, usize)>,
    /// The position of `events[0]`; positions count every event published to the topic.
    first: u64,
    receivers: usize,
    capacity: usize,
}

impl Queue {
    fn end(&self) -> u64 {
        self.first + self.events.len() as u64
    }

    /// Drops the events every subscriber has read.
    fn pop_read(&mut self) {
        while self.events.front().is_some_and(|(_, unread)| *unread == 0) {
            self.events.pop_front();
            self.first += 1;
        }
        if self.events.is_empty() && self.events.capacity() > 16 {
            self.events.shrink_to_fit();
        }
    }
}

impl Topic {
    fn new(capacity: usize) -> Self {
        Topic {
            queue: Mutex::new(Queue { events: VecDeque::new(), first: 0, receivers: 0, capacity: capacity.max(1) }),
            published: Notify::new(),
        }
    }

    fn receiver_count(&self) -> usize {
        self.queue.lock().unwrap().receivers
    }

    fn subscribe(self: &Arc<Self>) -> LocalReceiver {
        let mut q = self.queue.lock().unwrap();
        q.receivers += 1;
        LocalReceiver { topic: self.clone(), pos: q.end() }
    }

    fn send(&self, event: ConvEvent) {
        {
            let mut q = self.queue.lock().unwrap();
            if q.receivers == 0 {
                return; // nobody is watching
            }
            if q.events.len() == q.capacity {
                q.events.pop_front();
                q.first += 1;
            }
            let receivers = q.receivers;
            q.events.push_back((Arc::new(event), receivers));
        }
        self.published.notify_waiters();
    }
}

/// A [`LocalBus`] subscriber: its position in its topic.
struct LocalReceiver {
    topic: Arc<Topic>,
    /// The position of the next event to read.
    pos: u64,
}

impl LocalReceiver {
    async fn recv(&mut self) -> Received {
        let LocalReceiver { topic, pos } = self;
        loop {
            let published = topic.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            if let Some(r) = Self::try_recv(topic, pos) {
                return r;
            }
            published.await;
        }
    }

    fn try_recv(topic: &Topic, pos: &mut u64) -> Option<Received> {
        let mut q = topic.queue.lock().unwrap();
        if *pos < q.first {
            let missed = q.first - *pos;
            *pos = q.first;
            return Some(Received::Lagged(missed));
        }
        let i = (*pos - q.first) as usize;
        let (event, unread) = q.events.get_mut(i)?;
        let event = event.clone();
        *unread -= 1;
        *pos += 1;
        q.pop_read();
        Some(Received::Event(event))
    }
}

impl Drop for LocalReceiver {
    fn drop(&mut self) {
        let mut q = self.topic.queue.lock().unwrap();
        q.receivers -= 1;
        let from = self.pos.max(q.first);
        let first = q.first;
        for (_, unread) in q.events.iter_mut().skip((from - first) as usize) {
            *unread -= 1;
        }
        q.pop_read();
    }
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
        if topics.get(&self.conversation_id).is_some_and(|topic| topic.receiver_count() == 0) {
            topics.remove(&self.conversation_id);
        }
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn publish(&self, conversation_id: Uuid, event: ConvEvent) -> Result<(), BusError> {
        let topic = self.inner.topics.lock().unwrap().get(&conversation_id).cloned();
        if let Some(topic) = topic {
            topic.send(event);
        }
        Ok(())
    }

    async fn subscribe(&self, conversation_id: Uuid) -> Result<Subscription, BusError> {
        let rx = {
            let mut topics = self.inner.topics.lock().unwrap();
            topics.entry(conversation_id).or_insert_with(|| Arc::new(Topic::new(self.inner.capacity))).subscribe()
        };
        let guard = TopicGuard { inner: self.inner.clone(), conversation_id };
        Ok(Subscription { rx: Rx::Local(rx), _guard: Some(Box::new(guard)) })
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
        for i in 6..10 {
            match sub.recv().await {
                Received::Event(e) => assert!(matches!(&*e, ConvEvent::Delta { delta, .. } if *delta == i.to_string())),
                _ => panic!("expected event {i} after the lag"),
            }
        }
    }

    fn queued(bus: &LocalBus, conv: Uuid) -> (usize, usize) {
        let topics = bus.inner.topics.lock().unwrap();
        let q = topics[&conv].queue.lock().unwrap();
        (q.events.len(), q.events.capacity())
    }

    /// Memory per idle socket (issue 10): a watched conversation holds only what some
    /// subscriber has yet to read, and no buffer while idle.
    #[tokio::test]
    async fn a_topic_holds_only_unread_events() {
        let bus = LocalBus::new(64);
        let conv = Uuid::new_v4();
        let mut a = bus.subscribe(conv).await.unwrap();
        let b = bus.subscribe(conv).await.unwrap();
        assert_eq!(queued(&bus, conv), (0, 0), "nothing allocated for an idle conversation");
        for _ in 0..3 {
            bus.publish(conv, ConvEvent::BotChanged).await.unwrap();
        }
        for _ in 0..3 {
            assert!(matches!(a.recv().await, Received::Event(_)));
        }
        assert_eq!(queued(&bus, conv).0, 3, "b has not read them");
        let mut late = bus.subscribe(conv).await.unwrap();
        drop(b);
        assert_eq!(queued(&bus, conv).0, 0, "read by everyone still subscribed");
        bus.publish(conv, ConvEvent::Cancel { message_id: Uuid::nil() }).await.unwrap();
        assert!(
            matches!(late.recv().await, Received::Event(e) if matches!(*e, ConvEvent::Cancel { .. })),
            "a subscriber gets what is published after it subscribed"
        );
        assert_eq!(queued(&bus, conv).0, 1, "a has not read it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_subscriber_is_woken() {
        let bus = LocalBus::new(4);
        let conv = Uuid::new_v4();
        let mut sub = bus.subscribe(conv).await.unwrap();
        let waiting = tokio::spawn(async move { matches!(sub.recv().await, Received::Event(_)) });
        // Paused time: this ends (at once) when every task waits, the subscriber in `recv`.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        bus.publish(conv, ConvEvent::BotChanged).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("woken").unwrap();
        assert!(got);
    }
}
