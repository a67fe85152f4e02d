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
use crate::bots::{echo, rules, BotEngine, DeltaSink, EngineSpec, ReplyRequest};
use crate::store::{Appended, NewMessage, StoreError, StoreResult};

/// What is left to do for an instant engine's reply once it is stored
/// ([`Replier::answered`]).
pub struct InstantReply {
    bot_id: Uuid,
    in_reply_to: Uuid,
    conversation_id: Uuid,
}

/// Instant engines answer in one piece: nothing is streamed.
struct NoDeltas;

#[async_trait]
impl DeltaSink for NoDeltas {
    async fn delta(&mut self, _text: &str) {}
}

impl Replier {
    /// The reply of an instant engine to `message`, which is not stored yet (the engine sees it
    /// with seq 0), to be stored with it: echo, and rules already compiled (compiling is for the
    /// path after the store, which keeps the result). None for any other engine, or when the
    /// engine fails ([`Replier::reply`] then answers once the message is stored, its error frame
    /// before its incomplete reply, as docs/protocol.md says).
    pub async fn answer_now(
        &self,
        spec: &EngineSpec,
        bot_id: Uuid,
        bot_name: &str,
        message: &NewMessage,
    ) -> Option<(NewMessage, InstantReply)> {
        // On the stack: nothing allocated per message for the engine.
        let rules;
        let engine: &dyn BotEngine = match spec {
            EngineSpec::Echo(_) => &echo::Echo,
            EngineSpec::Rules(r) => {
                rules = rules::Rules { compiled: self.rules.cached(bot_id, r)? };
                &rules
            }
            EngineSpec::Openai(_) | EngineSpec::Webhook(_) => return None,
        };
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
        let ended = engine.reply(&req, &mut NoDeltas).await;
        let (content, status, error) = outcome(Some(ended), String::new(), self.limits.max_reply_chars);
        if error.is_some() {
            // The error frame goes out before the incomplete reply (docs/protocol.md), so that
            // reply is not stored yet: `Replier::reply` answers again once the message is.
            return None;
        }
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
        let rest = InstantReply { bot_id, in_reply_to: message.id, conversation_id: message.conversation_id };
        Some((reply, rest))
    }

    /// After the store kept the reply with its message: the time to first token, and the reply
    /// announced. A reply that could not be stored is owed, and settled like any owed reply.
    pub async fn answered(&self, reply: InstantReply, stored: StoreResult<Appended>, received: Instant) {
        let InstantReply { bot_id, in_reply_to, conversation_id } = reply;
        // In the message's span: the reply's span says when it was stored and announced.
        async {
            first_token(&self.metrics, received);
            match stored {
                Ok(a) => {
                    tracing::Span::current().record("seq", a.message.seq).record("status", a.message.status.as_str());
                    let _ = crate::bus::announce(&*self.bus, conversation_id, a.message).await;
                }
                // Only PostgreSQL stores the two apart: another node answered meanwhile.
                Err(StoreError::AlreadyAnswered) => {
                    tracing::warn!(%bot_id, %conversation_id, "reply dropped: the message was answered elsewhere")
                }
                Err(e) => tracing::error!(%bot_id, %conversation_id, error = %e, "storing a bot reply failed"),
            }
        }
        .instrument(reply_span(bot_id, in_reply_to))
        .await
    }
}
