//! The shared state of one server ([`AppState`]): what every part reads, built by
//! [`crate::app::Server`]. A bottom module: it names the parts and imports none of the
//! modules that serve requests (`http/`, `ws/`, `chat/`'s session), so none of them loops
//! back through `app`.

use std::ops::Deref;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::TokenKeys;
use crate::bots::Replier;
use crate::bus::Bus;
use crate::chat::hub::Hub;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::passwords::PasswordPool;
use crate::revocation::Revocations;
use crate::store::Store;
use crate::throttle::LoginThrottle;

/// Shared state of one server. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub keys: TokenKeys,
    pub hub: Arc<Hub>,
    pub replier: Replier,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Sockets and bot replies; shutdown waits for them.
    pub tasks: TaskTracker,
    /// This node's leases, sweeps and dependency watch (see `cluster.rs`).
    pub cluster: Arc<Cluster>,
    pub metrics: Arc<Metrics>,
    pub ledger: Ledger,
    /// Every password hash runs here: a few threads, a bounded queue (`passwords.rs`).
    pub passwords: PasswordPool,
    pub throttle: LoginThrottle,
    /// Logins ended by logout or refresh-token reuse, refused at once (`revocation.rs`).
    pub revocations: Revocations,
    /// Admission's answers (user, bot, role, conversation), on one node only (`chat/access.rs`).
    pub access: crate::chat::AccessCache,
    /// On SQLite, the database's lock held shared while this server lives, so that
    /// `natter restore` refuses to swap the file under it (`backup.rs`).
    pub db_lock: Option<crate::backup::DbLock>,
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        AppState(Arc::new(inner))
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
