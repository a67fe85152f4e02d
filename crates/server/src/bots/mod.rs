//! Bot engines: what produces a bot's reply. An engine knows nothing of HTTP or WebSocket;
//! it gets the user's message and pushes the reply's text, piece by piece, into a sink.
//! [`Replier`] runs engines off the connection, stores the reply and publishes it on the bus,
//! so a reply completes even when the socket that asked for it is gone.

use std::sync::Arc;

use async_trait::async_trait;
use natter_proto::{ErrorCode, MessageRole, MessageStatus, WireMessage};
use serde_json::Value;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::bus::{Bus, ConvEvent};
use crate::domain::Invalid;
use crate::store::{NewMessage, Store};

mod echo;

/// A validated engine configuration, as stored in a bot's `engine` field.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineSpec {
    Echo,
}

pub const ENGINE_KINDS: &[&str] = &["echo"];

impl EngineSpec {
    /// Validates a bot's `engine` object. Errors name the field.
    pub fn parse(v: &Value) -> Result<EngineSpec, Invalid> {
        let bad = |m: String| Invalid { code: ErrorCode::InvalidBot, message: m };
        let obj = v.as_object().ok_or_else(|| bad("engine must be an object like {\"kind\": \"echo\"}".into()))?;
        let kind = match obj.get("kind") {
            Some(Value::String(k)) => k.as_str(),
            Some(_) => return Err(bad("engine.kind must be a string".into())),
            None => return Err(bad("engine.kind is missing".into())),
        };
        match kind {
            "echo" => {
                if let Some(extra) = obj.keys().find(|k| *k != "kind") {
                    return Err(bad(format!("engine.{extra}: the echo engine takes no settings")));
                }
                Ok(EngineSpec::Echo)
            }
            other => Err(bad(format!("engine.kind: unknown engine kind {other:?}; expected one of {}", ENGINE_KINDS.join(", ")))),
        }
    }

    /// The settings as stored.
    pub fn to_stored(&self) -> Value {
        match self {
            EngineSpec::Echo => serde_json::json!({"kind": "echo"}),
        }
    }

    /// The settings as the API shows them: secrets left out.
    pub fn public_view(stored: &Value) -> Value {
        let mut v = stored.clone();
        if let Some(obj) = v.as_object_mut() {
            for secret in ["api_key", "secret"] {
                if obj.remove(secret).is_some() {
                    obj.insert(format!("{secret}_set"), Value::Bool(true));
                }
            }
        }
        v
    }

    fn engine(&self) -> Arc<dyn BotEngine> {
        match self {
            EngineSpec::Echo => Arc::new(echo::Echo),
        }
    }
}

/// What an engine is asked to answer.
#[derive(Debug, Clone)]
pub struct ReplyRequest {
    pub bot_id: Uuid,
    pub message: WireMessage,
}

/// Where an engine pushes the reply's text as it is produced.
#[async_trait]
pub trait DeltaSink: Send {
    async fn delta(&mut self, text: &str);
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    /// `bot_error` or `bot_timeout`.
    pub code: ErrorCode,
    pub message: String,
}

#[async_trait]
pub trait BotEngine: Send + Sync {
    /// Produces the reply, pushing pieces into `sink`. Returns the whole reply text.
    async fn reply(&self, req: &ReplyRequest, sink: &mut dyn DeltaSink) -> Result<String, EngineError>;
}

/// Runs bot replies in the background, stores them and publishes them.
#[derive(Clone)]
pub struct Replier {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    tasks: TaskTracker,
}

struct BusSink {
    bus: Arc<dyn Bus>,
    conversation_id: Uuid,
    message_id: Uuid,
    in_reply_to: Uuid,
    text: String,
}

#[async_trait]
impl DeltaSink for BusSink {
    async fn delta(&mut self, text: &str) {
        self.text.push_str(text);
        let _ = self
            .bus
            .publish(
                self.conversation_id,
                ConvEvent::Delta { message_id: self.message_id, in_reply_to: self.in_reply_to, delta: text.to_owned() },
            )
            .await;
    }
}

impl Replier {
    pub fn new(store: Arc<dyn Store>, bus: Arc<dyn Bus>, tasks: TaskTracker) -> Self {
        Replier { store, bus, tasks }
    }

    /// Starts the bot's reply to `message`. Returns at once; the reply arrives on the bus.
    pub fn spawn_reply(&self, spec: &EngineSpec, bot_id: Uuid, message: WireMessage) {
        let engine = spec.engine();
        let this = self.clone();
        self.tasks.spawn(async move { this.run(engine, bot_id, message).await });
    }

    async fn run(&self, engine: Arc<dyn BotEngine>, bot_id: Uuid, message: WireMessage) {
        let conversation_id = message.conversation_id;
        let in_reply_to = message.id;
        let mut sink = BusSink { bus: self.bus.clone(), conversation_id, message_id: Uuid::new_v4(), in_reply_to, text: String::new() };
        let req = ReplyRequest { bot_id, message };
        let (content, status, failure) = match engine.reply(&req, &mut sink).await {
            Ok(text) => (text, MessageStatus::Complete, None),
            Err(e) => (sink.text.clone(), MessageStatus::Incomplete, Some(e)),
        };
        if let Some(e) = &failure {
            tracing::warn!(%bot_id, %conversation_id, code = e.code.as_str(), error = %e.message, "bot reply failed");
            let _ = self
                .bus
                .publish(conversation_id, ConvEvent::BotError { code: e.code, message: e.message.clone(), in_reply_to })
                .await;
            if content.is_empty() {
                return;
            }
        }
        let stored = self
            .store
            .append_message(NewMessage {
                conversation_id,
                role: MessageRole::Bot,
                content,
                client_id: None,
                in_reply_to: Some(in_reply_to),
                status,
            })
            .await;
        match stored {
            Ok(a) => {
                let _ = self.bus.publish(conversation_id, ConvEvent::Message(a.message)).await;
            }
            Err(e) => tracing::error!(%bot_id, %conversation_id, error = %e, "storing a bot reply failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn engine_specs_validate() {
        assert_eq!(EngineSpec::parse(&json!({"kind": "echo"})).unwrap(), EngineSpec::Echo);
        let e = EngineSpec::parse(&json!({"kind": "telepathy"})).unwrap_err();
        assert!(e.message.contains("telepathy") && e.message.contains("engine.kind"), "{}", e.message);
        assert!(EngineSpec::parse(&json!({})).unwrap_err().message.contains("engine.kind"));
        assert!(EngineSpec::parse(&json!("echo")).is_err());
        assert!(EngineSpec::parse(&json!({"kind": "echo", "x": 1})).unwrap_err().message.contains("engine.x"));
    }

    #[test]
    fn public_view_hides_secrets() {
        let v = EngineSpec::public_view(&json!({"kind": "openai", "api_key": "sk-123", "model": "m"}));
        assert_eq!(v, json!({"kind": "openai", "api_key_set": true, "model": "m"}));
    }
}
