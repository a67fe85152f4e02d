//! Replies worked out before the message they answer is stored: an instant engine (echo,
//! rules) needs nothing but the message's text, so its reply is ready when the message is, and
//! the store keeps both in one step ([`Store::append_answered`](crate::store::Store)). On
//! SQLite that is one transaction: the conversation's pages are written once per round trip
//! instead of twice (docs/performance.md), and no crash can leave the message owed its reply.

use async_trait::async_trait;
use natter_proto::{MessageRole, WireMessage};
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::generation::{first_token, outcome, reply_span};
use super::Replier;
use crate::bots::{DeltaSink, EngineError, EngineSpec, ReplyRequest};
use crate::bus::ConvEvent;
use crate::metrics::CodeLabel;
use crate::store::{Appended, NewMessage, StoreResult};

/// What is left to do for an instant engine's reply once it is stored
/// ([`Replier::answered`]).
pub struct InstantReply {
    bot_id: Uuid,
    conversation_id: Uuid,
    in_reply_to: Uuid,
    /// The engine's failure, said to the conversation once the reply is stored `incomplete`.
    error: Option<EngineError>,
    span: tracing::Span,
}

/// Instant engines answer in one piece: nothing is streamed.
struct NoDeltas;

#[async_trait]
impl DeltaSink for NoDeltas {
    async fn delta(&mut self, _text: &str) {}
}

impl Replier {
    /// The reply of an instant engine (echo, rules) to `message`, which is not stored yet (the
    /// engine sees it with seq 0), to be stored with it. None for any other engine, or when the
    /// engine cannot be prepared ([`Replier::reply`] then says why, once the message is stored).
    pub async fn answer_now(
        &self,
        spec: &EngineSpec,
        bot_id: Uuid,
        bot_name: &str,
        message: &NewMessage,
    ) -> Option<(NewMessage, InstantReply)> {
        if !matches!(spec, EngineSpec::Echo(_) | EngineSpec::Rules(_)) {
            return None;
        }
        let engine = self.engine(spec, bot_id).await.ok().filter(|e| e.instant())?;
        let span = reply_span(bot_id, message.id);
        let req = ReplyRequest {
            bot_id,
            bot_name: bot_name.to_owned(),
            history: Vec::new(),
            message: WireMessage {
                id: message.id,
                conversation_id: message.conversation_id,
                seq: 0,
                role: message.role,
                content: message.content.clone(),
                created_at: chrono::Utc::now(),
                client_id: message.client_id.clone(),
                in_reply_to: None,
                status: message.status,
            },
        };
        let ended = engine.reply(&req, &mut NoDeltas).instrument(span.clone()).await;
        let (content, status, error) = outcome(Some(ended), String::new(), self.limits.max_reply_chars);
        let reply = NewMessage {
            // Time-ordered, as every message id (`generation::run`).
            id: Uuid::now_v7(),
            conversation_id: message.conversation_id,
            role: MessageRole::Bot,
            content,
            client_id: None,
            in_reply_to: Some(message.id),
            status,
        };
        let rest =
            InstantReply { bot_id, conversation_id: message.conversation_id, in_reply_to: message.id, error, span };
        Some((reply, rest))
    }

    /// After the store kept the reply with its message: the engine's error if it failed, the
    /// time to first token, and the reply announced. A reply that could not be stored is owed,
    /// and settled like any owed reply.
    pub async fn answered(&self, reply: InstantReply, stored: StoreResult<Appended>, received: Instant) {
        let InstantReply { bot_id, conversation_id, in_reply_to, error, span } = reply;
        async {
            if let Some(e) = error {
                tracing::warn!(%bot_id, %conversation_id, code = e.code.as_str(), error = %crate::logsafe::Untrusted(&e.message), "bot reply failed");
                self.metrics.bot_errors.get_or_create(&CodeLabel { code: e.code.as_str() }).inc();
                let event = ConvEvent::BotError { code: e.code, message: e.message, in_reply_to };
                let _ = self.bus.publish(conversation_id, event).await;
            }
            first_token(&self.metrics, received);
            match stored {
                Ok(a) => {
                    tracing::Span::current().record("seq", a.message.seq).record("status", a.message.status.as_str());
                    let _ = crate::bus::announce(&*self.bus, conversation_id, a.message).await;
                }
                Err(e) => tracing::error!(%bot_id, %conversation_id, error = %e, "storing a bot reply failed"),
            }
        }
        .instrument(span)
        .await
    }
}
