//! [`Replier`]: runs bot replies off the connection, bounds the work per bot, keeps the text of
//! replies in progress, and settles the replies owed to messages no live node is on. How one
//! reply is generated, stored and announced is `generation.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use natter_proto::{ErrorCode, MessageRole, MessageStatus, WireMessage};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use super::{echo, egress, openai, rules, webhook, BotEngine, EngineError, EngineSpec};
use crate::bus::{Bus, ConvEvent};
use crate::cluster::{HeldWork, NodeLease};
use crate::metrics::{CodeLabel, Metrics};
use crate::store::{NewMessage, Store};

mod generation;
mod instant;

pub use instant::InstantReply;

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
    pub async fn reply(
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
            let span = generation::reply_span(bot_id, message.id);
            self.run(engine, spec.context_messages(), bot_id, bot_name.to_owned(), message, received)
                .instrument(span)
                .await;
            return;
        }
        let Some(permits) = self.admit(bot_id, &message).await else { return };
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
                let span = generation::reply_span(bot_id, message.id);
                this.run(engine, context, bot_id, bot_name, message, received).instrument(span).await;
                drop(permit);
                drop(owed);
                this.unload(bot_id);
            }
            // The message's span (when traces are exported), on this node's task.
            .in_current_span(),
        );
    }

    /// One more reply of the bot running or waiting: the permits to run it under, or `None`
    /// when the bot already has its fill — then the `bot_busy` error is announced and the
    /// message's empty outcome stored.
    async fn admit(&self, bot_id: Uuid, message: &WireMessage) -> Option<Arc<Semaphore>> {
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
        if permits.is_none() {
            tracing::warn!(%bot_id, "bot busy: reply refused");
            self.metrics.bot_errors.get_or_create(&CodeLabel { code: ErrorCode::BotBusy.as_str() }).inc();
            let event = ConvEvent::BotError {
                code: ErrorCode::BotBusy,
                message: "the bot has too many replies in progress; try again shortly".into(),
                in_reply_to: message.id,
            };
            let _ = self.bus.publish(message.conversation_id, event).await;
            self.store_empty_outcome(message.conversation_id, message.id).await;
        }
        permits
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
                self.settle_one(o).await;
            }
            settled += n;
            if n < PAGE as usize {
                return settled;
            }
        }
    }

    /// Answers one owed message taken over by [`Replier::settle_owed`].
    async fn settle_one(&self, o: crate::store::OwedMessage) {
        let (conversation_id, message_id) = (o.message.conversation_id, o.message.id);
        tracing::warn!(%message_id, %conversation_id, "an acked message was owed its reply: answering it now");
        let bot = match self.store.bot(o.bot_id).await {
            Ok(Some(bot)) => bot,
            Ok(None) => return, // deleted with its conversations
            Err(e) => {
                tracing::warn!(error = %e, "reading an owed reply's bot failed");
                return;
            }
        };
        match EngineSpec::load(&bot.engine) {
            Ok(spec) => self.reply(&spec, bot.id, &bot.name, o.message, Instant::now()).await,
            Err(e) => {
                tracing::warn!(bot_id = %bot.id, error = %e.message, "an owed reply's bot has unreadable settings");
                self.store_empty_outcome(conversation_id, message_id).await;
            }
        }
    }
}
