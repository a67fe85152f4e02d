//! Bot engines: what produces a bot's reply. An engine knows nothing of HTTP servers or
//! WebSockets; it gets the user's message (and some history) and pushes the reply's text,
//! piece by piece, into a sink.
//!
//! [`Replier`] runs engines off the connection — a reply completes and is stored even when the
//! socket that asked for it is gone — announces deltas and the final message on the bus, keeps
//! what is generated so far for sockets that join mid-reply, and bounds the work per bot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use natter_proto::{ErrorCode, MessageRole, MessageStatus, WireMessage};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::bus::{Bus, ConvEvent};
use crate::cluster::{HeldWork, NodeLease};
use crate::metrics::{CodeLabel, Metrics};
use crate::store::{NewMessage, Store};
use tokio::time::Instant;

pub mod bounds;
mod echo;
pub mod egress;
mod openai;
pub mod rules;
pub mod spec;
pub mod webhook;

pub use spec::{EngineSpec, ENGINE_KINDS};

/// What an engine is asked to answer.
#[derive(Debug, Clone)]
pub struct ReplyRequest {
    pub bot_id: Uuid,
    pub bot_name: String,
    /// Earlier messages of the conversation, oldest first (as many as the engine asked for).
    pub history: Vec<WireMessage>,
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
    /// Produces the reply, pushing pieces into `sink` as they come. Returns the whole text.
    async fn reply(&self, req: &ReplyRequest, sink: &mut dyn DeltaSink) -> Result<String, EngineError>;

    /// Whether the reply comes in one step, with no waiting (echo, rules). Such replies are
    /// not leased in the store while in progress: there is no "in progress" to cut off.
    fn instant(&self) -> bool {
        false
    }
}

/// Bounds on bot work.
#[derive(Debug, Clone, Copy)]
pub struct ReplierLimits {
    /// Replies generated at once per bot.
    pub concurrency: usize,
    /// Replies waiting per bot beyond those; more get `bot_busy`.
    pub queue: usize,
    /// Longest reply, in characters: a reply is cut there and stored `incomplete`.
    pub max_reply_chars: usize,
}

/// A reply being generated.
struct Generation {
    conversation_id: Uuid,
    in_reply_to: Uuid,
    text: String,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Registry {
    generations: HashMap<Uuid, Generation>,
    /// Per bot: replies running or waiting, and the permits for running.
    load: HashMap<Uuid, (usize, Arc<Semaphore>)>,
}

/// A reply in progress, as a socket joining mid-reply needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InProgress {
    pub message_id: Uuid,
    pub in_reply_to: Uuid,
    pub text: String,
}

/// Runs bot replies in the background, stores them and publishes them.
#[derive(Clone)]
pub struct Replier {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    tasks: TaskTracker,
    /// The HTTP clients of `openai` and `webhook` engines, under the egress policy.
    egress: egress::Egress,
    limits: ReplierLimits,
    metrics: Arc<Metrics>,
    /// Plain mutex: held for map updates only, never across an await.
    registry: Arc<Mutex<Registry>>,
    /// On a server, replies in progress are leased in the store under this node.
    node: Option<NodeLease>,
    /// The replies it runs and queues, whose leases the node renews.
    work: HeldWork,
    /// Compiled rule sets, per bot (the `rules` engine).
    rules: rules::RulesCache,
}

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
fn first_token(metrics: &Metrics, received: Instant) {
    let elapsed = received.elapsed();
    metrics.first_token_seconds.observe(elapsed.as_secs_f64());
    let ms = elapsed.as_millis() as u64;
    tracing::Span::current().record("first_token_ms", ms);
    tracing::info!(target: crate::telemetry::TRACE, first_token_ms = ms, "first token");
}

/// The span of one reply (traces only): its first token and outcome are recorded on it.
fn reply_span(bot_id: Uuid, in_reply_to: Uuid) -> tracing::Span {
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

impl Replier {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        tasks: TaskTracker,
        limits: ReplierLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let egress = egress::Egress::new(egress::Policy::default(), store.clone());
        Replier {
            store,
            bus,
            tasks,
            egress,
            limits,
            metrics,
            registry: Arc::default(),
            node: None,
            work: HeldWork::default(),
            rules: Default::default(),
        }
    }

    /// Engines connect under this egress policy (the default allows no internal address
    /// for bots of non-admins).
    pub fn with_egress(mut self, policy: egress::Policy) -> Self {
        self.egress = egress::Egress::new(policy, self.store.clone());
        self
    }

    pub fn egress(&self) -> &egress::Egress {
        &self.egress
    }

    /// Leases replies in progress in the store under `node` and checkpoints their text, so a
    /// reply cut off when this node dies is stored as `incomplete` by another node (or by this
    /// one, restarted).
    /// `work` is where the replies it runs and queues are registered, so that the node renews
    /// their leases while it holds them (and only then).
    pub fn with_node(mut self, node: NodeLease, work: HeldWork) -> Self {
        self.node = Some(node);
        self.work = work;
        self
    }

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

    async fn engine(&self, spec: &EngineSpec, bot_id: Uuid) -> Result<Arc<dyn BotEngine>, EngineError> {
        Ok(match spec {
            EngineSpec::Echo(_) => Arc::new(echo::Echo),
            EngineSpec::Rules(r) => Arc::new(rules::Rules { compiled: self.rules.get(bot_id, r).await? }),
            EngineSpec::Openai(o) => Arc::new(openai::OpenAi { spec: o.clone(), http: self.egress.clone() }),
            EngineSpec::Webhook(w) => Arc::new(webhook::Webhook { spec: w.clone(), http: self.egress.clone() }),
        })
    }

    /// Replies being generated in a conversation, with the text so far.
    pub fn in_progress(&self, conversation_id: Uuid) -> Vec<InProgress> {
        let reg = self.registry.lock().unwrap();
        reg.generations
            .iter()
            .filter(|(_, g)| g.conversation_id == conversation_id)
            .map(|(id, g)| InProgress { message_id: *id, in_reply_to: g.in_reply_to, text: g.text.clone() })
            .collect()
    }

    /// The text generated so far of one reply, if it is still in progress.
    pub fn text_so_far(&self, message_id: Uuid) -> Option<String> {
        self.registry.lock().unwrap().generations.get(&message_id).map(|g| g.text.clone())
    }

    /// Stops a reply of this conversation. False if no such reply is in progress.
    pub fn cancel(&self, conversation_id: Uuid, message_id: Uuid) -> bool {
        let reg = self.registry.lock().unwrap();
        match reg.generations.get(&message_id) {
            Some(g) if g.conversation_id == conversation_id => {
                g.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// The bot's reply to `message`. An instant engine (echo, rules) answers here: the reply is
    /// stored and published when this returns. Any other engine runs as a task of its own and
    /// this returns at once; its reply arrives on the bus — or a `bot_busy` error, when the bot
    /// already has its fill of replies running and waiting.
    /// `received` is when the user's message arrived, for the time-to-first-token metric.
    pub async fn spawn_reply(
        &self,
        spec: &EngineSpec,
        bot_id: Uuid,
        bot_name: &str,
        message: WireMessage,
        received: Instant,
    ) {
        let conversation_id = message.conversation_id;
        let engine = match self.engine(spec, bot_id).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%bot_id, error = %e.message, "preparing the bot's engine failed");
                let event = ConvEvent::BotError { code: e.code, message: e.message, in_reply_to: message.id };
                let _ = self.bus.publish(conversation_id, event).await;
                self.store_empty_outcome(conversation_id, message.id).await;
                return;
            }
        };
        if engine.instant() {
            // An instant engine (echo, rules) answers in one step, with no IO: the socket's own
            // task stores and announces the reply, saving a task and a wakeup per message.
            let span = reply_span(bot_id, message.id);
            self.run(engine, spec.context_messages(), bot_id, bot_name.to_owned(), message, received)
                .instrument(span)
                .await;
            return;
        }
        let permits = {
            let mut reg = self.registry.lock().unwrap();
            let (count, sem) =
                reg.load.entry(bot_id).or_insert_with(|| (0, Arc::new(Semaphore::new(self.limits.concurrency))));
            if *count >= self.limits.concurrency + self.limits.queue {
                None
            } else {
                *count += 1;
                Some(sem.clone())
            }
        };
        let Some(permits) = permits else {
            tracing::warn!(%bot_id, "bot busy: reply refused");
            self.metrics.bot_errors.get_or_create(&CodeLabel { code: ErrorCode::BotBusy.as_str() }).inc();
            let event = ConvEvent::BotError {
                code: ErrorCode::BotBusy,
                message: "the bot has too many replies in progress; try again shortly".into(),
                in_reply_to: message.id,
            };
            let _ = self.bus.publish(conversation_id, event).await;
            self.store_empty_outcome(conversation_id, message.id).await;
            return;
        };
        // Queued work is owed like running work: leased under this node from now on, so if the
        // node dies before the reply is stored, another node (or this one, restarted) settles it.
        let mut owed = None;
        if let Some(node) = self.node {
            match self.store.lease_owed(message.id, node.node_id, node.until()).await {
                Ok(true) => owed = Some(self.work.hold(message.id)),
                Ok(false) => {
                    tracing::info!(message_id = %message.id, "reply already settled or taken by another node");
                    self.unload(bot_id);
                    return;
                }
                Err(e) => tracing::warn!(message_id = %message.id, error = %e, "leasing an owed reply failed"),
            }
        }
        let context = spec.context_messages();
        let this = self.clone();
        let bot_name = bot_name.to_owned();
        self.tasks.spawn(
            async move {
                let queued = tracing::info_span!(target: crate::telemetry::TRACE, "queued");
                let permit = permits.acquire_owned().instrument(queued).await;
                let span = reply_span(bot_id, message.id);
                this.run(engine, context, bot_id, bot_name, message, received).instrument(span).await;
                drop(permit);
                drop(owed);
                this.unload(bot_id);
            }
            // The message's span (when traces are exported), on this node's task.
            .in_current_span(),
        );
    }

    /// One reply of the bot fewer running or waiting.
    fn unload(&self, bot_id: Uuid) {
        let mut reg = self.registry.lock().unwrap();
        if let Some((count, _)) = reg.load.get_mut(&bot_id) {
            *count -= 1;
            if *count == 0 {
                reg.load.remove(&bot_id);
            }
        }
    }

    /// Stores an empty `incomplete` reply: the outcome of a reply that failed before any text
    /// (the error frame already went out), so the user message is not owed a reply any more.
    async fn store_empty_outcome(&self, conversation_id: Uuid, in_reply_to: Uuid) {
        let stored = self
            .store
            .append_message(NewMessage {
                id: Uuid::now_v7(),
                conversation_id,
                role: MessageRole::Bot,
                content: String::new(),
                client_id: None,
                in_reply_to: Some(in_reply_to),
                status: MessageStatus::Incomplete,
            })
            .await;
        match stored {
            Ok(a) => {
                let _ = crate::bus::announce(&*self.bus, conversation_id, a.message).await;
            }
            Err(crate::store::StoreError::AlreadyAnswered) => {}
            Err(e) => tracing::error!(%conversation_id, error = %e, "storing a failed reply's outcome failed"),
        }
    }

    /// Settles the user messages owed a reply that no live node is on (their node died, or
    /// the process was killed and restarted): takes them over under this node's lease and
    /// answers them as if just sent — an instant engine answers at once, a streaming engine
    /// runs the reply again from the start (replies cut off mid-stream are not owed: the
    /// generation sweep stored them `incomplete`). `unleased_before`: how old a message never
    /// leased (answered inline by an instant engine) must be to be taken over. Returns how
    /// many were taken.
    pub async fn settle_owed(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        unleased_before: chrono::DateTime<chrono::Utc>,
    ) -> usize {
        const PAGE: u32 = 100;
        let Some(node) = self.node else { return 0 };
        let mut settled = 0;
        loop {
            let owed = match self.store.claim_owed(node.node_id, node.until(), now, unleased_before, PAGE).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, "looking for owed replies failed");
                    return settled;
                }
            };
            let n = owed.len();
            for o in owed {
                let (conversation_id, message_id) = (o.message.conversation_id, o.message.id);
                tracing::warn!(%message_id, %conversation_id, "an acked message was owed its reply: answering it now");
                let bot = match self.store.bot(o.bot_id).await {
                    Ok(Some(bot)) => bot,
                    Ok(None) => continue, // deleted with its conversations
                    Err(e) => {
                        tracing::warn!(error = %e, "reading an owed reply's bot failed");
                        continue;
                    }
                };
                match EngineSpec::load(&bot.engine) {
                    Ok(spec) => self.spawn_reply(&spec, bot.id, &bot.name, o.message, Instant::now()).await,
                    Err(e) => {
                        tracing::warn!(bot_id = %bot.id, error = %e.message, "an owed reply's bot has unreadable settings");
                        self.store_empty_outcome(conversation_id, message_id).await;
                    }
                }
            }
            settled += n;
            if n < PAGE as usize {
                return settled;
            }
        }
    }

    /// Generates, stores and announces one reply; its callers run it in a [`reply_span`].
    async fn run(
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
        let history = if context > 0 {
            self.store.messages_before(conversation_id, message.seq, context).await.unwrap_or_else(|e| {
                tracing::warn!(%bot_id, error = %e, "reading history for the bot failed; answering without it");
                Vec::new()
            })
        } else {
            Vec::new()
        };
        let cancel = CancellationToken::new();
        self.registry.lock().unwrap().generations.insert(
            message_id,
            Generation { conversation_id, in_reply_to, text: String::new(), cancel: cancel.clone() },
        );
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
        // Renewed until the reply is stored or given up (then the sweep stores it `incomplete`).
        let _running = leased.then(|| self.work.hold(message_id));
        let req = ReplyRequest { bot_id, bot_name, history, message };
        let max = self.limits.max_reply_chars;
        let cut = CancellationToken::new();
        let mut sink = Sink {
            replier: self.clone(),
            conversation_id,
            message_id,
            in_reply_to,
            received: Some(received),
            chars: 0,
            max_chars: max,
            cut: cut.clone(),
        };
        let too_long =
            || EngineError { code: ErrorCode::BotError, message: format!("the reply was cut at {max} characters") };
        let outcome = tokio::select! {
            r = engine.reply(&req, &mut sink) => Some(r),
            _ = cancel.cancelled() => None,
            // The engine is dropped here: a provider still streaming is cut off.
            _ = cut.cancelled() => Some(Err(too_long())),
            () = requests_from_elsewhere(remote_cancel, self, conversation_id, in_reply_to, message_id) => None,
            () = self.checkpoints(message_id, leased) => unreachable!("checkpoints run until the reply ends"),
        };
        let so_far = self.text_so_far(message_id).unwrap_or_default();
        let (content, status, error) = match outcome {
            // A reply that came in one piece longer than the bound is cut like a streamed one.
            Some(Ok(text)) => match cut_at(&text, max) {
                Some(head) => {
                    (crate::domain::replace_nul(head).into_owned(), MessageStatus::Incomplete, Some(too_long()))
                }
                None => (crate::domain::replace_nul(&text).into_owned(), MessageStatus::Complete, None),
            },
            Some(Err(e)) => (so_far, MessageStatus::Incomplete, Some(e)),
            None => {
                tracing::info!(%bot_id, %conversation_id, %message_id, "bot reply cancelled");
                (so_far, MessageStatus::Cancelled, None)
            }
        };
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
        // Stored whatever the outcome, even a failure before any text (empty and `incomplete`):
        // the user message is owed exactly one outcome, and the client sees the reply end.
        {
            let store_span = tracing::info_span!(target: crate::telemetry::TRACE, "store", seq = tracing::field::Empty);
            let stored = self
                .store
                .append_message(NewMessage {
                    id: message_id,
                    conversation_id,
                    role: MessageRole::Bot,
                    content,
                    client_id: None,
                    in_reply_to: Some(in_reply_to),
                    status,
                })
                .instrument(store_span.clone())
                .await;
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
                    tracing::warn!(%bot_id, %conversation_id, %in_reply_to, "reply dropped: the message was answered elsewhere");
                    if leased {
                        let _ = self.store.end_generation(message_id).await;
                    }
                }
                Err(e) => tracing::error!(%bot_id, %conversation_id, error = %e, "storing a bot reply failed"),
            }
        }
        self.registry.lock().unwrap().generations.remove(&message_id);
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
