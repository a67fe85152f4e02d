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
use tokio::sync::broadcast;
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
    Message { message: WireMessage },
    Delta { message_id: Uuid, in_reply_to: Uuid, offset: usize, delta: String },
    BotError { code: String, message: String, in_reply_to: Uuid },
    BotChanged,
    Cancel { message_id: Uuid },
    Revoked { family_id: Uuid },
}

impl From<&ConvEvent> for WireEvent {
    fn from(e: &ConvEvent) -> Self {
        match e.clone() {
            ConvEvent::Message(message) => WireEvent::Message { message },
            ConvEvent::Delta { message_id, in_reply_to, offset, delta } => {
                WireEvent::Delta { message_id, in_reply_to, offset, delta }
            }
            ConvEvent::BotError { code, message, in_reply_to } => {
                WireEvent::BotError { code: code.as_str().to_owned(), message, in_reply_to }
            }
            ConvEvent::BotChanged => WireEvent::BotChanged,
            ConvEvent::Cancel { message_id } => WireEvent::Cancel { message_id },
            ConvEvent::Revoked { family_id } => WireEvent::Revoked { family_id },
        }
    }
}

impl WireEvent {
    fn into_event(self) -> Option<ConvEvent> {
        Some(match self {
            WireEvent::Message { message } => ConvEvent::Message(message),
            WireEvent::Delta { message_id, in_reply_to, offset, delta } => {
                ConvEvent::Delta { message_id, in_reply_to, offset, delta }
            }
            WireEvent::BotError { code, message, in_reply_to } => {
                ConvEvent::BotError { code: ErrorCode::parse(&code)?, message, in_reply_to }
            }
            WireEvent::BotChanged => ConvEvent::BotChanged,
            WireEvent::Cancel { message_id } => ConvEvent::Cancel { message_id },
            WireEvent::Revoked { family_id } => ConvEvent::Revoked { family_id },
        })
    }
}

#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    /// Plain mutex: held for map lookups only, never across an await.
    topics: Mutex<HashMap<Uuid, Topic>>,
    capacity: usize,
}

struct Topic {
    tx: broadcast::Sender<Arc<ConvEvent>>,
    /// Reads the NATS subscription into `tx`; aborting it drops (unsubscribes) it.
    pump: tokio::task::JoinHandle<()>,
}

impl NatsBus {
    /// Connects to `url` (`nats://host:4222`, several comma-separated for a cluster). Fails if
    /// NATS does not answer within 5 s; after that, lost connections are retried forever,
    /// and [`Bus::health`] says whether the bus is connected meanwhile.
    pub async fn connect(url: &str, capacity: usize) -> Result<NatsBus, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("natter")
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(Duration::from_secs(10))
            .max_reconnects(None)
            // Quick retries: a node refuses sockets while NATS is away, so coming back fast matters.
            .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 100).min(2_000)))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("bus: connected to NATS"),
                    async_nats::Event::Disconnected => tracing::warn!("bus: lost the connection to NATS; reconnecting"),
                    other => tracing::debug!(event = %other, "bus: NATS event"),
                }
            })
            .connect(url)
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot connect to NATS at {url}: {e}")))?;
        Ok(NatsBus { inner: Arc::new(Inner { client, topics: Mutex::new(HashMap::new()), capacity }) })
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
        let existing = self.inner.topics.lock().unwrap().get(&conversation_id).map(|t| t.tx.subscribe());
        let rx = match existing {
            Some(rx) => rx,
            None => {
                let mut nats = self
                    .inner
                    .client
                    .subscribe(subject(conversation_id))
                    .await
                    .map_err(|e| BusError::Unavailable(format!("NATS subscribe failed: {e}")))?;
                // A flush only writes to the socket; a round trip proves the server has our
                // interest: it handles one connection's operations in order, so once a request
                // to a subject nobody serves comes back "no responders", our SUB is in place and
                // whatever any node publishes from here on reaches us (the session reads the
                // store only after this).
                let probe = format!("natter.sync.{}", Uuid::new_v4().simple());
                match tokio::time::timeout(Duration::from_secs(5), self.inner.client.request(probe, Default::default()))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {}
                    Ok(Err(e)) => return Err(BusError::Unavailable(format!("NATS round trip failed: {e}"))),
                    Err(_) => return Err(BusError::Unavailable("NATS did not answer in 5 s".into())),
                }
                let mut topics = self.inner.topics.lock().unwrap();
                if let Some(t) = topics.get(&conversation_id) {
                    // Another watcher subscribed meanwhile; ours (dropped here) is redundant.
                    t.tx.subscribe()
                } else {
                    let (tx, rx) = broadcast::channel(self.inner.capacity);
                    let sender = tx.clone();
                    let pump = tokio::spawn(async move {
                        while let Some(msg) = nats.next().await {
                            match serde_json::from_slice::<WireEvent>(&msg.payload).ok().and_then(WireEvent::into_event)
                            {
                                Some(event) => {
                                    let _ = sender.send(Arc::new(event));
                                }
                                None => tracing::warn!(subject = %msg.subject, "bus: undecodable event ignored"),
                            }
                        }
                    });
                    topics.insert(conversation_id, Topic { tx, pump });
                    rx
                }
            }
        };
        let guard = TopicGuard { inner: self.inner.clone(), conversation_id };
        Ok(Subscription::new(rx, Some(Box::new(guard))))
    }

    fn health(&self) -> Result<(), BusError> {
        match self.inner.client.connection_state() {
            State::Connected => Ok(()),
            State::Disconnected | State::Pending => Err(BusError::Unavailable("not connected to NATS".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NATS server for tests, or None after a loud SKIPPED line.
    pub(crate) fn test_url(test: &str) -> Option<String> {
        match std::env::var("NATTER_TEST_NATS_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                eprintln!("SKIPPED: {test} needs NATS: NATTER_TEST_NATS_URL not set");
                None
            }
        }
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

    #[tokio::test]
    async fn an_unreachable_server_fails_fast() {
        // Nothing listens on port 1.
        let started = std::time::Instant::now();
        assert!(NatsBus::connect("nats://127.0.0.1:1", 8).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
