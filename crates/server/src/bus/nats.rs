//! The NATS bus, for several nodes: each conversation is a core NATS subject
//! (`natter.conv.<uuid>`), events are JSON. Core NATS (at most once, no persistence) is
//! enough because the bus only says "something new is there": the store holds every message
//! before it is announced, and a session fills any gap from it.
//!
//! Locally, a node subscribes to a conversation's subject once, with its first watcher, and
//! fans out through one broadcast channel per conversation (the same [`Subscription`] as
//! [`super::LocalBus`]); the NATS subscription goes with the last watcher. A node's own
//! events come back to it through NATS, so every node delivers by the one path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_trait::async_trait;
use futures_util::StreamExt;
use natter_proto::{ErrorCode, WireMessage};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use uuid::Uuid;

use super::{Bus, BusError, ConvEvent, Subscription};

/// The subject of a conversation's events.
pub fn subject(conversation_id: Uuid) -> String {
    format!("natter.conv.{conversation_id}")
}

/// How an event travels between nodes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    Message {
        message: WireMessage,
        /// Absent from nodes that predate it, and when traces are not exported.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
    },
    Delta {
        message_id: Uuid,
        in_reply_to: Uuid,
        offset: usize,
        delta: String,
    },
    BotError {
        code: String,
        message: String,
        in_reply_to: Uuid,
    },
    BotChanged,
    Cancel {
        message_id: Uuid,
    },
    ReplySync {
        message_id: Option<Uuid>,
    },
    Revoked {
        family_id: Uuid,
    },
    Heard {
        connection_id: Uuid,
        user_id: Uuid,
    },
}

impl From<&ConvEvent> for WireEvent {
    fn from(e: &ConvEvent) -> Self {
        match e.clone() {
            ConvEvent::Message(message, traceparent) => WireEvent::Message { message, traceparent },
            ConvEvent::Delta { message_id, in_reply_to, offset, delta } => {
                WireEvent::Delta { message_id, in_reply_to, offset, delta }
            }
            ConvEvent::BotError { code, message, in_reply_to } => {
                WireEvent::BotError { code: code.as_str().to_owned(), message, in_reply_to }
            }
            ConvEvent::BotChanged => WireEvent::BotChanged,
            ConvEvent::Cancel { message_id } => WireEvent::Cancel { message_id },
            ConvEvent::ReplySync { message_id } => WireEvent::ReplySync { message_id },
            ConvEvent::Revoked { family_id } => WireEvent::Revoked { family_id },
            ConvEvent::Heard { connection_id, user_id } => WireEvent::Heard { connection_id, user_id },
        }
    }
}

impl WireEvent {
    fn into_event(self) -> Option<ConvEvent> {
        Some(match self {
            WireEvent::Message { message, traceparent } => ConvEvent::Message(message, traceparent),
            WireEvent::Delta { message_id, in_reply_to, offset, delta } => {
                ConvEvent::Delta { message_id, in_reply_to, offset, delta }
            }
            WireEvent::BotError { code, message, in_reply_to } => {
                ConvEvent::BotError { code: ErrorCode::parse(&code)?, message, in_reply_to }
            }
            WireEvent::BotChanged => ConvEvent::BotChanged,
            WireEvent::Cancel { message_id } => ConvEvent::Cancel { message_id },
            WireEvent::ReplySync { message_id } => ConvEvent::ReplySync { message_id },
            WireEvent::Revoked { family_id } => ConvEvent::Revoked { family_id },
            WireEvent::Heard { connection_id, user_id } => ConvEvent::Heard { connection_id, user_id },
        })
    }
}

#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

/// How long a watched conversation may go without a message on the bus before its
/// subscribers resync from the store anyway: the bound on how long a message NATS dropped
/// without a disconnect (core NATS is at most once) can wait (issue 15).
pub const QUIET_RESYNC: Duration = Duration::from_secs(10);

struct Inner {
    client: async_nats::Client,
    /// Plain mutex: held for map lookups only, never across an await.
    topics: Mutex<HashMap<Uuid, Topic>>,
    capacity: usize,
    quiet_resync: Duration,
}

struct Topic {
    tx: broadcast::Sender<Arc<ConvEvent>>,
    /// Bumped after a reconnect and after [`QUIET_RESYNC`] without a message: every
    /// subscriber then catches up from the store.
    resync: Arc<watch::Sender<u64>>,
    /// Reads the NATS subscription into `tx`; aborting it drops (unsubscribes) it.
    pump: tokio::task::JoinHandle<()>,
}

impl NatsBus {
    /// Connects to `url` (`nats://host:4222`, several comma-separated for a cluster). Fails if
    /// NATS does not answer within 5 s; after that, lost connections are retried forever,
    /// and [`Bus::health`] says whether the bus is connected meanwhile.
    pub async fn connect(url: &str, capacity: usize) -> Result<NatsBus, BusError> {
        Self::connect_with(url, capacity, QUIET_RESYNC).await
    }

    /// Like [`NatsBus::connect`], with the quiet-conversation resync period.
    pub async fn connect_with(url: &str, capacity: usize, quiet_resync: Duration) -> Result<NatsBus, BusError> {
        // `true` when connected, `false` when the connection is lost.
        let (connection, mut connections) = mpsc::unbounded_channel::<bool>();
        let client = async_nats::ConnectOptions::new()
            .name("natter")
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(Duration::from_secs(10))
            .max_reconnects(None)
            // Quick retries: a node refuses sockets while NATS is away, so coming back fast matters.
            .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 100).min(2_000)))
            .event_callback(move |event| {
                let connection = connection.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("bus: connected to NATS");
                            let _ = connection.send(true);
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("bus: lost the connection to NATS; reconnecting");
                            let _ = connection.send(false);
                        }
                        other => tracing::debug!(event = %other, "bus: NATS event"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot connect to NATS at {url}: {e}")))?;
        let inner = Arc::new(Inner { client, topics: Mutex::new(HashMap::new()), capacity, quiet_resync });
        // Events published while the connection was away are lost (core NATS): once the
        // subscriptions are back in place, every subscriber catches up from the store.
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut was_lost = false;
            while let Some(connected) = connections.recv().await {
                if !connected {
                    was_lost = true;
                    continue;
                }
                if !std::mem::take(&mut was_lost) {
                    continue; // the first connection: nothing was missed
                }
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = round_trip(&inner.client).await {
                    tracing::debug!(error = %e, "bus: no round trip after a reconnect; the next one resyncs");
                    was_lost = true;
                    continue;
                }
                let topics: Vec<_> = inner.topics.lock().unwrap().values().map(|t| t.resync.clone()).collect();
                if !topics.is_empty() {
                    tracing::info!(
                        conversations = topics.len(),
                        "bus: reconnected; watching sockets catch up from the store"
                    );
                }
                for resync in topics {
                    resync.send_modify(|n| *n += 1);
                }
            }
        });
        Ok(NatsBus { inner })
    }

    /// Conversations with at least one local subscriber.
    pub fn topic_count(&self) -> usize {
        self.inner.topics.lock().unwrap().len()
    }
}

struct TopicGuard {
    inner: Arc<Inner>,
    conversation_id: Uuid,
}

impl Drop for TopicGuard {
    fn drop(&mut self) {
        let mut topics = self.inner.topics.lock().unwrap();
        // `Subscription` drops its receiver before its guard, so the last one leaves zero.
        if topics.get(&self.conversation_id).is_some_and(|t| t.tx.receiver_count() == 0) {
            if let Some(t) = topics.remove(&self.conversation_id) {
                t.pump.abort();
            }
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, conversation_id: Uuid, event: ConvEvent) -> Result<(), BusError> {
        self.health()?;
        let payload = serde_json::to_vec(&WireEvent::from(&event)).expect("events serialize");
        self.inner
            .client
            .publish(subject(conversation_id), payload.into())
            .await
            .map_err(|e| BusError::Unavailable(format!("NATS publish failed: {e}")))
    }

    async fn subscribe(&self, conversation_id: Uuid) -> Result<Subscription, BusError> {
        let existing =
            self.inner.topics.lock().unwrap().get(&conversation_id).map(|t| (t.tx.subscribe(), t.resync.subscribe()));
        let (rx, resync) = match existing {
            Some(rx) => rx,
            None => {
                let mut nats = self
                    .inner
                    .client
                    .subscribe(subject(conversation_id))
                    .await
                    .map_err(|e| BusError::Unavailable(format!("NATS subscribe failed: {e}")))?;
                // The session reads the store only after this.
                round_trip(&self.inner.client).await?;
                let mut topics = self.inner.topics.lock().unwrap();
                if let Some(t) = topics.get(&conversation_id) {
                    // Another watcher subscribed meanwhile; ours (dropped here) is redundant.
                    (t.tx.subscribe(), t.resync.subscribe())
                } else {
                    let (tx, rx) = broadcast::channel(self.inner.capacity);
                    let resync = Arc::new(watch::channel(0u64).0);
                    let (sender, quiet_resync, bump) = (tx.clone(), self.inner.quiet_resync, resync.clone());
                    let pump = tokio::spawn(async move {
                        let quiet = tokio::time::sleep(quiet_resync);
                        tokio::pin!(quiet);
                        loop {
                            let msg = tokio::select! {
                                msg = nats.next() => match msg {
                                    Some(msg) => msg,
                                    None => break,
                                },
                                _ = &mut quiet => {
                                    bump.send_modify(|n| *n += 1);
                                    quiet.as_mut().reset(tokio::time::Instant::now() + quiet_resync);
                                    continue;
                                }
                            };
                            match serde_json::from_slice::<WireEvent>(&msg.payload).ok().and_then(WireEvent::into_event)
                            {
                                Some(event) => {
                                    if matches!(event, ConvEvent::Message(..)) {
                                        quiet.as_mut().reset(tokio::time::Instant::now() + quiet_resync);
                                    }
                                    let _ = sender.send(Arc::new(event));
                                }
                                None => tracing::warn!(subject = %msg.subject, "bus: undecodable event ignored"),
                            }
                        }
                    });
                    let subscribed = (rx, resync.subscribe());
                    topics.insert(conversation_id, Topic { tx, resync, pump });
                    subscribed
                }
            }
        };
        let guard = TopicGuard { inner: self.inner.clone(), conversation_id };
        Ok(Subscription::with_resync(rx, resync, Some(Box::new(guard))))
    }

    fn health(&self) -> Result<(), BusError> {
        match self.inner.client.connection_state() {
            State::Connected => Ok(()),
            State::Disconnected | State::Pending => Err(BusError::Unavailable("not connected to NATS".into())),
        }
    }

    fn shared(&self) -> bool {
        true
    }
}

/// A flush only writes to the socket; a round trip proves the server has our interest: it
/// handles one connection's operations in order, so once a request to a subject nobody serves
/// comes back "no responders", our SUBs are in place and whatever any node publishes from here
/// on reaches us.
async fn round_trip(client: &async_nats::Client) -> Result<(), BusError> {
    let probe = format!("natter.sync.{}", Uuid::new_v4().simple());
    match tokio::time::timeout(Duration::from_secs(5), client.request(probe, Default::default())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => Ok(()),
        Ok(Err(e)) => Err(BusError::Unavailable(format!("NATS round trip failed: {e}"))),
        Err(_) => Err(BusError::Unavailable("NATS did not answer in 5 s".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NATS server for tests, or None after a loud SKIPPED line (a failure in CI).
    pub(crate) fn test_url(test: &str) -> Option<String> {
        crate::testenv::service_url("NATTER_TEST_NATS_URL", test, "NATS")
    }

    #[tokio::test]
    async fn nats_bus_conformance() {
        let Some(url) = test_url("bus::nats::tests::nats_bus_conformance") else { return };
        let bus = NatsBus::connect(&url, 64).await.unwrap();
        bus.health().unwrap();
        crate::bus::conformance::run_all(Arc::new(bus)).await;
    }

    #[tokio::test]
    async fn events_cross_nodes_and_topics_go_with_their_last_subscriber() {
        let Some(url) = test_url("bus::nats::tests::events_cross_nodes_and_topics_go_with_their_last_subscriber")
        else {
            return;
        };
        let (a, b) = (NatsBus::connect(&url, 64).await.unwrap(), NatsBus::connect(&url, 64).await.unwrap());
        let conv = Uuid::new_v4();
        let mut on_b = b.subscribe(conv).await.unwrap();
        let second = b.subscribe(conv).await.unwrap();
        assert_eq!(b.topic_count(), 1, "one NATS subscription per conversation");
        let events = [
            ConvEvent::BotError { code: ErrorCode::BotBusy, message: "busy".into(), in_reply_to: Uuid::new_v4() },
            ConvEvent::Delta {
                message_id: Uuid::new_v4(), in_reply_to: Uuid::new_v4(), offset: 3, delta: "é!".into()
            },
            ConvEvent::Cancel { message_id: Uuid::new_v4() },
            ConvEvent::BotChanged,
        ];
        for e in &events {
            a.publish(conv, e.clone()).await.unwrap();
        }
        for e in &events {
            match tokio::time::timeout(Duration::from_secs(5), on_b.recv()).await.unwrap() {
                crate::bus::Received::Event(got) => assert_eq!(&*got, e),
                _ => panic!("expected an event"),
            }
        }
        drop((on_b, second));
        assert_eq!(b.topic_count(), 0);
    }

    /// Issue 15: a quiet conversation's subscribers resync from the store every quiet period, so
    /// a message NATS dropped without a disconnect waits at most that long.
    #[tokio::test]
    async fn a_quiet_conversation_resyncs_periodically() {
        let Some(url) = test_url("bus::nats::tests::a_quiet_conversation_resyncs_periodically") else { return };
        let bus = NatsBus::connect_with(&url, 64, Duration::from_millis(300)).await.unwrap();
        let conv = Uuid::new_v4();
        let mut sub = bus.subscribe(conv).await.unwrap();
        let started = tokio::time::Instant::now();
        for _ in 0..2 {
            let got = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.expect("a resync in time");
            assert!(matches!(got, crate::bus::Received::Lagged(0)), "a resync, not an event");
        }
        assert!(started.elapsed() >= Duration::from_millis(600), "once per quiet period, not more");
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_fast() {
        // Nothing listens on port 1.
        let started = std::time::Instant::now();
        assert!(NatsBus::connect("nats://127.0.0.1:1", 8).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_message_carries_its_traceparent_and_old_events_still_decode() {
        let message: WireMessage = serde_json::from_value(serde_json::json!({
            "id": Uuid::nil(), "conversation_id": Uuid::nil(), "seq": 3, "role": "user",
            "content": "hi", "created_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned();
        let event = ConvEvent::Message(message.clone(), Some(tp.clone()));
        let json = serde_json::to_value(WireEvent::from(&event)).unwrap();
        assert_eq!(json["traceparent"], tp.as_str());
        let back: WireEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back.into_event(), Some(event));
        // What a node without traces (or an older node) sends: no field at all.
        let plain = serde_json::to_value(WireEvent::from(&ConvEvent::Message(message.clone(), None))).unwrap();
        assert!(plain.get("traceparent").is_none(), "{plain}");
        let old = serde_json::json!({"type": "message", "message": serde_json::to_value(&message).unwrap()});
        let back: WireEvent = serde_json::from_value(old).unwrap();
        assert_eq!(back.into_event(), Some(ConvEvent::Message(message, None)));
    }
}
