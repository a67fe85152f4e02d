//! One reply, from the engine's first delta to the stored message: the [`Sink`] that announces
//! deltas (and cuts a reply at its bound), the lease and checkpoints that let another node
//! settle it if this one dies, cancels and text-so-far requests from other nodes, and the
//! stored outcome (complete, incomplete or cancelled).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use natter_proto::{ErrorCode, MessageRole, MessageStatus, WireMessage};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::{Generation, Replier};
use crate::bots::{BotEngine, DeltaSink, EngineError, ReplyRequest};
use crate::bus::ConvEvent;
use crate::cluster::WorkGuard;
use crate::metrics::{CodeLabel, Metrics};
use crate::store::NewMessage;

struct Sink {
    replier: Replier,
    conversation_id: Uuid,
    message_id: Uuid,
    in_reply_to: Uuid,
    /// When the user's message arrived; taken at the first token.
    received: Option<Instant>,
    /// Characters of the reply so far, and the bound; `cut` fires when a delta reached it.
    chars: usize,
    max_chars: usize,
    cut: CancellationToken,
}

/// The reply's first text: the time-to-first-token metric, and (traces only) an event and the
/// `first_token_ms` of the current `reply` span.
pub(super) fn first_token(metrics: &Metrics, received: Instant) {
    let elapsed = received.elapsed();
    metrics.first_token_seconds.observe(elapsed.as_secs_f64());
    let ms = elapsed.as_millis() as u64;
    tracing::Span::current().record("first_token_ms", ms);
    tracing::info!(target: crate::telemetry::TRACE, first_token_ms = ms, "first token");
}

/// The span of one reply (traces only): its first token and outcome are recorded on it.
pub(super) fn reply_span(bot_id: Uuid, in_reply_to: Uuid) -> tracing::Span {
    tracing::info_span!(
        target: crate::telemetry::TRACE,
        "reply",
        %bot_id,
        %in_reply_to,
        first_token_ms = tracing::field::Empty,
        seq = tracing::field::Empty,
        status = tracing::field::Empty
    )
}

/// The first `max` characters of `text`, when it has more.
fn cut_at(text: &str, max: usize) -> Option<&str> {
    text.char_indices().nth(max).map(|(i, _)| &text[..i])
}

#[async_trait]
impl DeltaSink for Sink {
    async fn delta(&mut self, text: &str) {
        let clean = crate::domain::replace_nul(text);
        let text = clean.as_ref();
        if self.cut.is_cancelled() {
            return;
        }
        let text = match cut_at(text, self.max_chars - self.chars) {
            Some(head) => {
                self.cut.cancel();
                head
            }
            None => text,
        };
        self.chars += text.chars().count();
        if text.is_empty() {
            return;
        }
        if let Some(received) = self.received.take() {
            first_token(&self.replier.metrics, received);
        }
        let offset = {
            let mut reg = self.replier.registry.lock().unwrap();
            match reg.generations.get_mut(&self.message_id) {
                Some(g) => {
                    let offset = g.text.len();
                    g.text.push_str(text);
                    offset
                }
                None => return,
            }
        };
        let event = ConvEvent::Delta {
            message_id: self.message_id,
            in_reply_to: self.in_reply_to,
            offset,
            delta: text.to_owned(),
        };
        if let Err(e) = self.replier.bus.publish(self.conversation_id, event).await {
            tracing::debug!(error = %e, "publishing a delta failed");
        }
    }
}

/// How a reply ended: the engine's text or error, or `None` when it was cancelled.
type Ended = Option<Result<String, EngineError>>;

/// What is stored of a reply that ended so, given the text announced so far and the bound.
pub(super) fn outcome(ended: Ended, so_far: String, max: usize) -> (String, MessageStatus, Option<EngineError>) {
    match ended {
        // A reply that came in one piece longer than the bound is cut like a streamed one.
        Some(Ok(text)) => match cut_at(&text, max) {
            Some(head) => {
                (crate::domain::replace_nul(head).into_owned(), MessageStatus::Incomplete, Some(too_long(max)))
            }
            None => (crate::domain::replace_nul(&text).into_owned(), MessageStatus::Complete, None),
        },
        Some(Err(e)) => (so_far, MessageStatus::Incomplete, Some(e)),
        None => (so_far, MessageStatus::Cancelled, None),
    }
}

fn too_long(max: usize) -> EngineError {
    EngineError { code: ErrorCode::BotError, message: format!("the reply was cut at {max} characters") }
}

impl Replier {
    /// Records a reply in progress; false when there is no node to lease it or the store failed.
    async fn lease(&self, message_id: Uuid, conversation_id: Uuid, in_reply_to: Uuid) -> bool {
        let Some(node) = self.node else { return false };
        let lease = crate::store::GenerationLease {
            message_id,
            conversation_id,
            in_reply_to,
            node_id: node.node_id,
            lease_until: node.until(),
        };
        match self.store.begin_generation(&lease).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%message_id, error = %e, "leasing a reply failed; a crash would leave it unmarked");
                false
            }
        }
    }

    /// Saves the text so far every third of the lease, for as long as the reply runs.
    async fn checkpoints(&self, message_id: Uuid, leased: bool) {
        let Some(node) = self.node.filter(|_| leased) else { return std::future::pending().await };
        let mut saved = 0;
        let mut every = tokio::time::interval(node.renew_every().min(Duration::from_secs(1)));
        loop {
            every.tick().await;
            let text = self.text_so_far(message_id).unwrap_or_default();
            if text.len() != saved {
                if let Err(e) = self.store.checkpoint_generation(message_id, &text).await {
                    tracing::debug!(%message_id, error = %e, "checkpointing a reply failed");
                } else {
                    saved = text.len();
                }
            }
        }
    }

    /// The conversation's messages before `message` the engine asked for (none on a failure).
    async fn history(&self, context: u32, bot_id: Uuid, message: &WireMessage) -> Vec<WireMessage> {
        if context == 0 {
            return Vec::new();
        }
        self.store.messages_before(message.conversation_id, message.seq, context).await.unwrap_or_else(|e| {
            tracing::warn!(%bot_id, error = %e, "reading history for the bot failed; answering without it");
            Vec::new()
        })
    }

    /// Generates, stores and announces one reply; its callers run it in a [`reply_span`].
    pub(super) async fn run(
        &self,
        engine: Arc<dyn BotEngine>,
        context: u32,
        bot_id: Uuid,
        bot_name: String,
        message: WireMessage,
        received: Instant,
    ) {
        let conversation_id = message.conversation_id;
        let in_reply_to = message.id;
        // Time-ordered (v7): the messages' id index grows at its right edge instead of taking a
        // random page per insert (store::sqlite's group commit writes every page it touches).
        let message_id = Uuid::now_v7();
        let history = self.history(context, bot_id, &message).await;
        let cancel = CancellationToken::new();
        self.registry.lock().unwrap().generations.insert(
            message_id,
            Generation { conversation_id, in_reply_to, text: String::new(), cancel: cancel.clone() },
        );
        let req = ReplyRequest { bot_id, bot_name, history, message };
        let cut = CancellationToken::new();
        let mut sink = Sink {
            replier: self.clone(),
            conversation_id,
            message_id,
            in_reply_to,
            received: Some(received),
            chars: 0,
            max_chars: self.limits.max_reply_chars,
            cut: cut.clone(),
        };
        // Held (its lease renewed) until the reply is stored or given up; then the sweep stores
        // it `incomplete`.
        let (ended, running) = self.generate(&*engine, &req, &mut sink, message_id, cancel).await;
        let so_far = self.text_so_far(message_id).unwrap_or_default();
        if ended.is_none() {
            tracing::info!(%bot_id, %conversation_id, %message_id, "bot reply cancelled");
        }
        let (content, status, error) = outcome(ended, so_far, self.limits.max_reply_chars);
        if let Some(e) = error {
            tracing::warn!(%bot_id, %conversation_id, code = e.code.as_str(), error = %crate::logsafe::Untrusted(&e.message), "bot reply failed");
            self.metrics.bot_errors.get_or_create(&CodeLabel { code: e.code.as_str() }).inc();
            let event = ConvEvent::BotError { code: e.code, message: e.message, in_reply_to };
            let _ = self.bus.publish(conversation_id, event).await;
        }
        if let Some(received) = sink.received.take() {
            // No delta came: the whole reply is the first token.
            first_token(&self.metrics, received);
        }
        let reply = NewMessage {
            id: message_id,
            conversation_id,
            role: MessageRole::Bot,
            content,
            client_id: None,
            in_reply_to: Some(in_reply_to),
            status,
        };
        self.store_reply(reply, bot_id, running.is_some()).await;
        self.registry.lock().unwrap().generations.remove(&message_id);
        drop(running);
    }

    /// Runs the engine until it ends, the reply is cancelled (here or from another node) or cut
    /// at its bound; meanwhile leases and checkpoints it when it may outlive this node. Returns
    /// how it ended and, when it was leased, the hold on it that keeps its lease renewed.
    async fn generate(
        &self,
        engine: &dyn BotEngine,
        req: &ReplyRequest,
        sink: &mut Sink,
        message_id: Uuid,
        cancel: CancellationToken,
    ) -> (Ended, Option<WorkGuard>) {
        let (conversation_id, in_reply_to) = (sink.conversation_id, sink.in_reply_to);
        // Subscribed before the lease is visible: a socket on another node that finds the lease
        // and cancels, or asks for the text so far, is heard.
        // An instant engine (echo, rules) answers in one step: there is no reply in progress
        // to lease, checkpoint or cancel from another node, and two store writes are saved.
        let instant = engine.instant();
        let remote_cancel = match self.node {
            Some(_) if !instant => self.bus.subscribe(conversation_id).await.ok(),
            _ => None,
        };
        let leased = !instant && self.lease(message_id, conversation_id, in_reply_to).await;
        let running = leased.then(|| self.work.hold(message_id));
        let cut = sink.cut.clone();
        let max = sink.max_chars;
        let ended = tokio::select! {
            r = engine.reply(req, sink) => Some(r),
            _ = cancel.cancelled() => None,
            // The engine is dropped here: a provider still streaming is cut off.
            _ = cut.cancelled() => Some(Err(too_long(max))),
            () = requests_from_elsewhere(remote_cancel, self, conversation_id, in_reply_to, message_id) => None,
            () = self.checkpoints(message_id, leased) => unreachable!("checkpoints run until the reply ends"),
        };
        (ended, running)
    }

    /// Stores the reply whatever its outcome, even a failure before any text (empty and
    /// `incomplete`): the user message is owed exactly one outcome, and the client sees the
    /// reply end. Then announces it.
    async fn store_reply(&self, reply: NewMessage, bot_id: Uuid, leased: bool) {
        let (message_id, conversation_id, in_reply_to) = (reply.id, reply.conversation_id, reply.in_reply_to);
        let store_span = tracing::info_span!(target: crate::telemetry::TRACE, "store", seq = tracing::field::Empty);
        let stored = self.store.append_message(reply).instrument(store_span.clone()).await;
        match stored {
            Ok(a) => {
                store_span.record("seq", a.message.seq);
                tracing::Span::current().record("seq", a.message.seq).record("status", a.message.status.as_str());
                // Forgotten before it is announced: a socket that sees the final message and
                // cancels then hears that nothing is in progress, from any node.
                if leased {
                    // If this fails the lease expires and the sweep finds the reply stored.
                    let _ = self.store.end_generation(message_id).await;
                }
                let _ = crate::bus::announce(&*self.bus, conversation_id, a.message).await;
            }
            Err(crate::store::StoreError::AlreadyAnswered) => {
                // This node stalled past its lease and another answered meanwhile.
                let in_reply_to = in_reply_to.unwrap_or_default();
                tracing::warn!(%bot_id, %conversation_id, %in_reply_to, "reply dropped: the message was answered elsewhere");
                if leased {
                    let _ = self.store.end_generation(message_id).await;
                }
            }
            Err(e) => tracing::error!(%bot_id, %conversation_id, error = %e, "storing a bot reply failed"),
        }
    }
}

/// Serves the other nodes' requests about this reply until one cancels it
/// (`ConvEvent::Cancel`, then this resolves): a [`ConvEvent::ReplySync`] is answered with the
/// text so far, as one delta at offset 0, so a socket that joined mid-reply on another node
/// (or missed deltas) has all of it. Never resolves without a subscription.
async fn requests_from_elsewhere(
    sub: Option<crate::bus::Subscription>,
    replier: &Replier,
    conversation_id: Uuid,
    in_reply_to: Uuid,
    message_id: Uuid,
) {
    let Some(mut sub) = sub else { return std::future::pending().await };
    loop {
        let e = match sub.recv().await {
            crate::bus::Received::Event(e) => e,
            crate::bus::Received::Lagged(_) => continue,
            crate::bus::Received::Closed => return std::future::pending().await,
        };
        match &*e {
            ConvEvent::Cancel { message_id: m } if *m == message_id => return,
            ConvEvent::ReplySync { message_id: m } if m.is_none_or(|m| m == message_id) => {
                let delta = replier.text_so_far(message_id).unwrap_or_default();
                if !delta.is_empty() {
                    let event = ConvEvent::Delta { message_id, in_reply_to, offset: 0, delta };
                    let _ = replier.bus.publish(conversation_id, event).await;
                }
            }
            _ => {}
        }
    }
}
