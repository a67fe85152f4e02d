//! What makes several identical nodes safe to run side by side: a node id, the leases it
//! holds in the store (connection slots, bot replies in progress) and renews while it lives,
//! a sweep that stores the replies of nodes that died as `incomplete`, and a watch on the
//! dependencies (store and bus) so that a node that lost one refuses and closes sockets with
//! 1013 instead of serving stale data, and takes them again when the dependency is back.
//!
//! One node on SQLite runs the same code: its leases make a reply cut off by a crash end as
//! `incomplete` when it restarts.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::bus::{Bus, BusError, LocalBus, NatsBus};
use crate::config::BusConfig;
use crate::store::{SlotClaim, Store, StoreResult};

/// The retry hint sent with 1013 while a dependency is down.
pub const DEPENDENCY_RETRY_MS: u64 = 2_000;

/// Events a subscriber may fall behind before it lags (and catches up from the store).
/// Small on purpose: a tokio broadcast channel allocates every slot up front (about 40 bytes
/// each), one channel per watched conversation, so 1024 slots cost ~40 KiB per idle socket
/// (docs/performance.md). Lagging is cheap and correct: the session refills from the store.
const BUS_CAPACITY: usize = 64;

/// How long NATS may be away before the node closes its sockets with 1013 (issue 15). A blip
/// shorter than this keeps them: on reconnect every subscriber resyncs from the store.
pub const BUS_BLIP_GRACE: Duration = Duration::from_secs(2);

/// Opens the bus the configuration names.
pub async fn open_bus(config: &BusConfig) -> Result<Arc<dyn Bus>, BusError> {
    Ok(match config {
        BusConfig::Local => Arc::new(LocalBus::new(BUS_CAPACITY)),
        BusConfig::Nats(url) => Arc::new(NatsBus::connect(url, BUS_CAPACITY).await?),
    })
}

/// Who holds a lease, and for how long one lasts without renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLease {
    pub node_id: Uuid,
    /// How long a lease outlives its node's last renewal: the longest a dead node's slots keep
    /// counting, and how long a reply cut off by a crash may stay open.
    pub lease: Duration,
}

impl NodeLease {
    /// How often leases are renewed and expired ones swept (a third of the lease).
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    pub fn until(&self) -> chrono::DateTime<Utc> {
        Utc::now() + chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::seconds(15))
    }
}

pub struct Cluster {
    node: NodeLease,
    store: Arc<dyn Store>,
    /// `Some(reason)` while a dependency is down.
    health: watch::Sender<Option<String>>,
    /// The slots of the sockets this node holds: the only ones it renews (issue 15).
    held: HeldSlots,
    /// The replies it runs and has queued: the only generations and owed replies it renews.
    work: HeldWork,
    /// Since when the bus has been seen down, while it is.
    bus_down_since: Mutex<Option<Instant>>,
}

/// Connection ids of this node's live [`Slot`]s. Plain mutex, never held across an await.
type HeldSlots = Arc<Mutex<HashSet<Uuid>>>;

/// The replies this node is running (reply ids) and the user messages whose reply it has
/// queued (their ids): the generations and owed replies it renews. Work it drops — a reply it
/// could not store during a store outage — is no longer renewed, so a sweep settles it
/// (issue 15). Counted, as one id may be held twice for a moment. Plain mutex, never held
/// across an await.
#[derive(Clone, Default)]
pub struct HeldWork(Arc<Mutex<std::collections::HashMap<Uuid, usize>>>);

impl HeldWork {
    /// Holds `id` (renews its lease) until the guard drops.
    pub fn hold(&self, id: Uuid) -> WorkGuard {
        *self.0.lock().unwrap().entry(id).or_default() += 1;
        WorkGuard { id, work: self.clone() }
    }

    fn ids(&self) -> Vec<Uuid> {
        self.0.lock().unwrap().keys().copied().collect()
    }
}

/// See [`HeldWork::hold`].
pub struct WorkGuard {
    id: Uuid,
    work: HeldWork,
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        let mut held = self.work.0.lock().unwrap();
        if let Some(n) = held.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.id);
            }
        }
    }
}

/// A socket's slot in the per-user count shared by every node. Released by
/// [`Cluster::release`]; if the session ends some other way, dropping releases it in the
/// background, and a slot never released expires with its node's lease.
/// Why a connection slot was not claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    /// The user has `max` connections open on the nodes together.
    Full,
    /// The store did not answer.
    Unavailable,
}

pub struct Slot {
    connection_id: Option<Uuid>,
    store: Arc<dyn Store>,
    held: HeldSlots,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(id) = self.connection_id.take() {
            self.held.lock().unwrap().remove(&id);
            let store = self.store.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = store.release_slot(id).await;
                });
            }
        }
    }
}

impl Cluster {
    /// Starts the node's background work (renewals, sweeps, dependency checks). It runs until
    /// `stop` and then until `tasks` are done: replies finishing during a graceful shutdown
    /// keep their leases.
    pub fn start(
        node_id: Uuid,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        lease: Duration,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Arc<Cluster> {
        let node = NodeLease { node_id, lease };
        let cluster = Arc::new(Cluster {
            node,
            store: store.clone(),
            health: watch::channel(None).0,
            held: HeldSlots::default(),
            work: HeldWork::default(),
            bus_down_since: Mutex::new(None),
        });
        tracing::info!(node_id = %node.node_id, lease_ms = lease.as_millis() as u64, "node started");
        let this = cluster.clone();
        tokio::spawn(async move {
            let check_every = (lease / 4).min(Duration::from_secs(1));
            let mut check = tokio::time::interval(check_every);
            let mut renew = tokio::time::interval(node.renew_every());
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = async { stop.cancelled().await; tasks.wait().await } => break,
                    // Not once stopping: the store closes after the sockets, while this loop
                    // may wait out the grace for the tasks left.
                    _ = check.tick(), if !stop.is_cancelled() => this.check(&*bus).await,
                    _ = renew.tick() => this.renew_and_sweep(&*bus).await,
                }
            }
        });
        cluster
    }

    pub fn node(&self) -> NodeLease {
        self.node
    }

    /// Why the node cannot serve sockets right now, if it cannot.
    pub fn unavailable(&self) -> Option<String> {
        self.health.borrow().clone()
    }

    /// The dependency state as it changes (`Some(reason)` while one is down).
    pub fn health(&self) -> watch::Receiver<Option<String>> {
        self.health.subscribe()
    }

    /// Resolves (with what is down) when a dependency goes down.
    pub async fn lost(&self) -> String {
        let mut rx = self.health.subscribe();
        let reason = match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone(),
            Err(_) => None,
        };
        let Some(reason) = reason else { return std::future::pending().await };
        reason
    }

    async fn check(&self, bus: &dyn Bus) {
        // Short reasons: they end up in close frames (123 bytes at most), with a retry hint.
        let problem = match tokio::time::timeout(Duration::from_secs(2), self.store.ping()).await {
            Ok(Ok(())) => self.bus_problem(bus),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "dependency check: database");
                Some("database unavailable".to_owned())
            }
            Err(_) => Some("database unavailable".to_owned()),
        };
        self.health.send_if_modified(|current| {
            if *current == problem {
                return false;
            }
            match &problem {
                Some(p) => tracing::warn!(problem = %p, "dependency lost: refusing and closing sockets with 1013"),
                None => tracing::info!("dependencies back: accepting sockets again"),
            }
            *current = problem.clone();
            true
        });
    }

    /// The bus's problem, once it has lasted [`BUS_BLIP_GRACE`].
    fn bus_problem(&self, bus: &dyn Bus) -> Option<String> {
        let mut since = self.bus_down_since.lock().unwrap();
        match bus.health() {
            Ok(()) => {
                *since = None;
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "dependency check: bus");
                let since = *since.get_or_insert_with(Instant::now);
                (since.elapsed() >= BUS_BLIP_GRACE).then(|| "message bus unavailable".to_owned())
            }
        }
    }

    /// Renews the leases of what this node still holds: the replies it runs or has queued, and
    /// the slots of its sockets; its other slots (sockets closed while the store was away) are
    /// deleted, and its other replies left to the sweep. `until` is taken before the held sets
    /// are read: a slot claimed meanwhile expires after it.
    async fn renew_held(&self) -> StoreResult<()> {
        let until = self.node.until();
        let held: Vec<Uuid> = self.held.lock().unwrap().iter().copied().collect();
        self.store.renew_node(self.node.node_id, &held, &self.work.ids(), until).await
    }

    /// The replies this node holds, for the [`crate::bots::Replier`] to register its work in.
    pub fn work(&self) -> HeldWork {
        self.work.clone()
    }

    async fn renew_and_sweep(&self, bus: &dyn Bus) {
        if let Err(e) = self.renew_held().await {
            tracing::warn!(error = %e, "renewing this node's leases failed");
            return;
        }
        match self.store.recover_generations(Utc::now()).await {
            Ok(recovered) => {
                for m in recovered {
                    tracing::warn!(message_id = %m.id, conversation_id = %m.conversation_id, "a reply cut off by a node that died is stored as incomplete");
                    let conversation_id = m.conversation_id;
                    let _ = crate::bus::announce(bus, conversation_id, m).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "sweeping expired replies failed"),
        }
    }

    /// Whether the per-user count lives in the store, shared by every node. On one node (a
    /// store no other node reaches) the hub's own count is the whole count, and the store is
    /// neither written at connect and close nor read at admission.
    fn counts_in_store(&self) -> bool {
        self.store.shared()
    }

    /// The user's sockets on every node, or `None` on one node (then the hub's count is it).
    pub async fn slots_in_use(&self, user_id: Uuid) -> StoreResult<Option<usize>> {
        if !self.counts_in_store() {
            return Ok(None);
        }
        self.store.slots_in_use(user_id, Utc::now()).await.map(Some)
    }

    /// Counts one message of the user in the window every node shares, and says how long to
    /// wait if that makes more than the budget. The window is `burst / rate` seconds (at least
    /// one) and holds `rate` × its length messages: the same sustained rate and burst as the
    /// hub's bucket on one node (twice the burst at most, across a window's edge). `None` on
    /// one node (the hub's budget is the whole budget) and when the store cannot count (the
    /// message's own write will fail and say so).
    pub async fn user_message_over(&self, user_id: Uuid, rate: u32, burst: u32) -> Option<std::time::Duration> {
        if !self.counts_in_store() {
            return None;
        }
        let rate = u64::from(rate.max(1));
        let window_ms = (u64::from(burst) * 1000 / rate).max(1000);
        match self.store.count_user_message(user_id, window_ms).await {
            Ok((count, _)) if count <= rate * window_ms / 1000 => None,
            Ok((_, left_ms)) => Some(std::time::Duration::from_millis(left_ms)),
            Err(e) => {
                tracing::warn!(error = %e, "counting a user's messages failed");
                None
            }
        }
    }

    /// Takes one of the user's `max` slots across every node, or says how to close.
    pub async fn claim_slot(&self, connection_id: Uuid, user_id: Uuid, max: usize) -> Result<Slot, ClaimError> {
        if !self.counts_in_store() {
            // One node: the hub's count, already taken, is the whole count.
            return Ok(Slot { connection_id: None, store: self.store.clone(), held: self.held.clone() });
        }
        // Held before it is claimed (and its expiry taken after): a renewal running meanwhile
        // renews it or leaves it alone, never deletes it.
        let slot = Slot { connection_id: Some(connection_id), store: self.store.clone(), held: self.held.clone() };
        self.held.lock().unwrap().insert(connection_id);
        let claim = SlotClaim { connection_id, user_id, node_id: self.node.node_id, expires_at: self.node.until() };
        match self.store.claim_slot(claim, max, Utc::now()).await {
            Ok(true) => Ok(slot),
            Ok(false) => {
                // Nothing was written: nothing to release.
                let mut slot = slot;
                slot.connection_id = None;
                self.held.lock().unwrap().remove(&connection_id);
                Err(ClaimError::Full)
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming a connection slot failed");
                Err(ClaimError::Unavailable)
            }
        }
    }

    /// Frees a slot now (so the user's next socket, on any node, may take it).
    pub async fn release(&self, mut slot: Slot) {
        if let Some(id) = slot.connection_id.take() {
            self.held.lock().unwrap().remove(&id);
            if let Err(e) = self.store.release_slot(id).await {
                tracing::warn!(error = %e, "releasing a connection slot failed; it expires with the lease");
            }
        }
    }
}

/// Settles the user messages owed a reply (acked, but their reply was never stored: the node
/// died between the ack and the reply, or while the reply waited in its queue). Once now, then
/// every third of the lease until `stop`, alongside the lease sweep.
///
/// At start, on a store no other process serves (SQLite or memory without `--reuse-port`),
/// every lease in the store is a dead process's: whatever is owed is settled before the first
/// socket is served. Otherwise (`others_may_serve`: a shared store, or a hand-over restart
/// where the old process still answers), a message is taken over once its node's lease ran out, or — never leased, answered
/// inline by an instant engine — once it is older than a lease.
pub async fn settle_owed(
    replier: crate::bots::Replier,
    others_may_serve: bool,
    node: NodeLease,
    stop: CancellationToken,
) {
    let lease = chrono::Duration::from_std(node.lease).unwrap_or(chrono::Duration::seconds(15));
    if !others_may_serve {
        let after_any_lease = Utc::now() + lease;
        let n = replier.settle_owed(after_any_lease, after_any_lease).await;
        if n > 0 {
            tracing::warn!(count = n, "answered messages that a crash left without a reply");
        }
    }
    tokio::spawn(async move {
        let mut every = tokio::time::interval(node.renew_every());
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = every.tick() => {
                    let now = Utc::now();
                    replier.settle_owed(now, now - lease).await;
                }
            }
        }
    });
}
