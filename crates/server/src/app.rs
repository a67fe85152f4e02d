//! Building and running the server: open the store, bind, serve until told to stop, then
//! shut down in order (stop accepting, close sockets with 1012, finish replies in flight).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{self, TokenKeys};
use crate::bots::{EngineSpec, Replier, ReplierLimits};
use crate::bus::{Bus, BusError};
use crate::chat::hub::Hub;
use crate::cluster::Cluster;
use crate::config::{Config, Database};
use crate::domain::{Password, Username};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::passwords::PasswordPool;
use crate::revocation::Revocations;
use crate::state::{AppState, Inner};
use crate::store::{MemoryStore, NewBot, PostgresStore, SqliteStore, Store, StoreError};
use crate::throttle::LoginThrottle;

/// Why the server could not start. Each message is one line naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot read or create the signing secret in {path}: {source}")]
    Secret { path: PathBuf, source: std::io::Error },
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot connect to the message bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Demo(String),
    #[error("{0}")]
    Locked(#[from] crate::backup::BackupError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

pub struct Server {
    listener: TcpListener,
    state: AppState,
}

impl Server {
    /// Opens the store and binds `config.bind`.
    pub async fn build(config: Config) -> Result<Server, StartError> {
        let listener =
            bind(config.bind, config.reuse_port).map_err(|source| StartError::Bind { addr: config.bind, source })?;
        Self::with_listener(config, listener).await
    }

    /// Like [`Server::build`] with a listener the caller bound.
    pub async fn with_listener(config: Config, listener: TcpListener) -> Result<Server, StartError> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| StartError::DataDir { path: config.data_dir.clone(), source })?;
        let secret = auth::load_or_create_secret(&config.data_dir)
            .map_err(|source| StartError::Secret { path: config.data_dir.clone(), source })?;
        let db_lock = match &config.database {
            Database::SqliteFile(path) => Some(crate::backup::DbLock::shared(path)?),
            _ => None,
        };
        let store = open_store(&config).await?;
        let bus: Arc<dyn Bus> = crate::cluster::open_bus(&config.bus).await?;
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let cluster = Cluster::start(
            config.node_id.unwrap_or_else(uuid::Uuid::new_v4),
            store.clone(),
            bus.clone(),
            config.node_lease,
            shutdown.clone(),
            tasks.clone(),
        );
        let metrics = Arc::new(Metrics::default());
        let ledger = Ledger::spawn(store.clone(), config.ledger_retention, metrics.ledger_anonymous_skipped.clone());
        // Another process may change grants on a shared store, or on this SQLite file during a
        // hand-over restart (`--reuse-port`): then admission always asks the store.
        let access = crate::chat::AccessCache::new(!store.shared() && !config.reuse_port);
        let state = AppState::new(Inner {
            access,
            keys: TokenKeys::new(&secret, config.access_token_ttl),
            replier: Replier::new(
                store.clone(),
                bus.clone(),
                tasks.clone(),
                ReplierLimits {
                    concurrency: config.limits.bot_concurrency,
                    queue: config.limits.bot_queue,
                    max_reply_chars: config.limits.max_reply_chars,
                },
                metrics.clone(),
            )
            .with_node(cluster.node(), cluster.work())
            .with_egress(crate::bots::egress::Policy::new(config.bot_egress_allow.clone())),
            metrics,
            ledger,
            hub: Arc::new(Hub::default()),
            shutdown,
            cluster: cluster.clone(),
            tasks,
            store,
            bus,
            passwords: PasswordPool::new(config.password_hash_concurrency, config.password_hash_queue),
            throttle: LoginThrottle::new(config.login_throttle.clone()),
            revocations: Revocations::new(config.access_token_ttl),
            db_lock,
            config,
        });
        // With --reuse-port the previous process may still be answering on the same SQLite file
        // (a hand-over restart): its replies in progress are not ours to settle at once, so the
        // start-up sweep waits for the lease rule like a cluster does.
        let others_may_serve = state.store.shared() || state.config.reuse_port;
        let node = state.cluster.node();
        crate::cluster::settle_owed(state.replier.clone(), others_may_serve, node, state.shutdown.clone()).await;
        let revoked = crate::revocation::subscribe(&state).await;
        tokio::spawn(crate::revocation::watch(state.clone(), revoked));
        if state.config.demo {
            seed_demo(&state).await?;
        }
        Ok(Server { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then closes every socket with 1012 and waits (up to
    /// the configured grace) for sockets and bot replies to finish.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let state = self.state.clone();
        let app = crate::http::router(state.clone()).fallback_service(crate::web::service(&state.config));
        let stop = state.shutdown.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
        let transport = crate::serve::Transport::from_limits(&state.config.limits);
        if let Some(addr) = state.config.metrics_bind {
            let listener = TcpListener::bind(addr).await?;
            let metrics = crate::http::metrics_router(state.clone());
            tokio::spawn(crate::serve::serve(listener, metrics, transport, state.shutdown.clone()));
        }
        // Waits for open HTTP connections at shutdown; upgraded sockets are ours (below).
        let http = tokio::spawn(crate::serve::serve(self.listener, app, transport, state.shutdown.clone()));
        state.shutdown.cancelled().await;
        tracing::info!(open_sockets = state.hub.len(), "shutting down");
        let started = std::time::Instant::now();
        state.tasks.close();
        let grace = state.config.shutdown_grace;
        if tokio::time::timeout(grace, state.tasks.wait()).await.is_err() {
            tracing::warn!(open_sockets = state.hub.len(), "shutdown grace period over; dropping what is left");
        }
        let sockets_ms = started.elapsed().as_millis() as u64;
        // The sockets' last ledger rows are queued; write them before exiting.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), state.ledger.flush()).await;
        let ledger_ms = started.elapsed().as_millis() as u64 - sockets_ms;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), http).await;
        // Last, the store: SQLite's appender finishes its batch and, when this is the last
        // process on the file (not during a `--reuse-port` hand-over), the WAL is checkpointed
        // into the database file, so the file alone holds everything once the process is gone. A
        // reply task still running past the grace fails to store its reply; the next start
        // settles it (every acked message still ends with one outcome).
        let closing = std::time::Instant::now();
        if tokio::time::timeout(STORE_CLOSE_TIMEOUT, state.store.close()).await.is_err() {
            tracing::warn!("closing the store took too long; exiting without it");
        }
        let store_ms = closing.elapsed().as_millis() as u64;
        tracing::info!(sockets_ms, ledger_ms, store_ms, total_ms = started.elapsed().as_millis() as u64, "shut down");
        Ok(())
    }
}

/// How long a stopping server waits for its store to close (a WAL checkpoint of up to 64 MiB).
const STORE_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Pending connections the kernel holds for us (it caps this at `net.core.somaxconn`): a
/// reconnect storm after a restart arrives all at once.
const BACKLOG: u32 = 4096;

/// Binds the listening socket. With `reuse_port`, several processes may listen on `addr` at once
/// (each must set it) and the kernel spreads new connections over them: the new process of a
/// hand-over restart listens before the old one stops accepting.
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Opens (and migrates) the store the configuration names. Also used by admin commands.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    Ok(match &config.database {
        Database::SqliteFile(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|source| StartError::DataDir { path: dir.to_path_buf(), source })?;
            }
            Arc::new(SqliteStore::open(path).await?)
        }
        Database::Memory => Arc::new(MemoryStore::new()),
        Database::Postgres(url) => Arc::new(PostgresStore::connect(url).await?),
    })
}

pub const DEMO_USER: &str = "demo";
pub const DEMO_PASSWORD: &str = "demo-password";

/// Creates the demo user and its echo bot, if missing.
async fn seed_demo(state: &AppState) -> Result<(), StartError> {
    let err = |e: String| StartError::Demo(format!("cannot create demo data: {e}"));
    let user = match state.store.user_by_username(DEMO_USER).await? {
        Some(u) => u,
        None => crate::accounts::create_user(
            &state.passwords,
            &*state.store,
            Username::parse(DEMO_USER).expect("valid"),
            Password::parse(DEMO_PASSWORD).expect("valid"),
            false,
        )
        .await
        .map_err(|e| err(e.to_string()))?,
    };
    let bots = state.store.bots_for_user(user.id).await?;
    if !bots.iter().any(|(b, _)| b.owner_id == user.id && b.name == "Echo") {
        state
            .store
            .create_bot(NewBot {
                owner_id: user.id,
                name: "Echo".into(),
                description: "Replies with what you say.".into(),
                visibility: natter_proto::api::Visibility::Private,
                engine: EngineSpec::Echo(Default::default()).to_stored(),
            })
            .await?;
    }
    Ok(())
}
