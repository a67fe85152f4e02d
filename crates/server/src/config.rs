//! The server's resolved settings. The CLI fills this from flags, `NATTER_*` variables and
//! an optional TOML file; tests build it directly with [`Config::for_tests`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where messages and accounts live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// `<data-dir>/natter.db` (the default).
    SqliteFile(PathBuf),
    /// Everything in the server's memory (`MemoryStore`: plain maps, no SQL), lost on exit
    /// (`--database-url memory:`).
    Memory,
    /// A PostgreSQL database shared by every node (`--database-url postgres://…`).
    Postgres(String),
}

/// How nodes tell each other that something happened in a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BusConfig {
    /// In-process (the default): one node.
    #[default]
    Local,
    /// NATS at this URL (`--bus nats://…`): several nodes.
    Nats(String),
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest WebSocket frame (and message) accepted; larger ones close the socket with 1009.
    pub max_frame_bytes: usize,
    /// Longest message content, in characters.
    pub max_content_chars: usize,
    /// Open sockets per user; the next one closes with 4429.
    pub max_connections_per_user: usize,
    /// Open sockets on this server; the next one closes with 1013 and a retry hint.
    pub max_connections: usize,
    /// Token bucket per connection for `message` frames.
    pub messages_per_second: u32,
    pub message_burst: u32,
    /// Bot replies generated at once per bot.
    pub bot_concurrency: usize,
    /// Bot replies waiting per bot beyond those; more get a `bot_busy` error.
    pub bot_queue: usize,
    /// Frames waiting to be written to one socket; a client that lets it fill is closed
    /// with 4409 (slow consumer) and resumes with `after_seq`.
    pub outbound_queue: usize,
    /// Longest bot reply, in characters: a longer one is cut there and stored `incomplete`.
    pub max_reply_chars: usize,
    /// Token bucket per connection for every client frame (pings, cancels, messages, binary):
    /// a frame over it is not processed and gets a `rate_limited` error.
    pub frames_per_second: u32,
    pub frame_burst: u32,
    /// Token bucket per user for `message` frames, over all of the user's sockets (on every
    /// node: counted in the store when it is shared).
    pub user_messages_per_second: u32,
    pub user_message_burst: u32,
    /// How long a client has to send a whole request head (from the moment the server waits
    /// for one: on a new connection and between requests of a kept-alive one).
    pub http_header_timeout: Duration,
    /// An HTTP connection on which no byte moves either way for this long is closed (a
    /// stalled body, a client that stops reading its response). Not upgraded WebSockets.
    pub http_idle_timeout: Duration,
    /// HTTP connections open at once (upgraded WebSockets not counted); at the bound the
    /// server stops accepting until one closes (the kernel backlog holds the rest).
    pub max_http_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_content_chars: 16 * 1024,
            max_connections_per_user: 20,
            max_connections: 100_000,
            messages_per_second: 5,
            message_burst: 20,
            outbound_queue: 256,
            bot_concurrency: 4,
            bot_queue: 64,
            max_reply_chars: 64 * 1024,
            frames_per_second: 20,
            frame_burst: 40,
            user_messages_per_second: 10,
            user_message_burst: 30,
            http_header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            max_http_connections: 10_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    pub database: Database,
    /// Browser origins besides the server's own that may call the API and open sockets.
    pub allowed_origins: Vec<String>,
    pub heartbeat_interval: Duration,
    pub registration_open: bool,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    pub limits: Limits,
    /// Create the demo user and bot on start.
    pub demo: bool,
    /// Serve the web app from this directory instead of the copy built into the binary.
    pub web_dir: Option<PathBuf>,
    /// How long graceful shutdown may take before connections are dropped.
    pub shutdown_grace: Duration,
    pub bus: BusConfig,
    /// How long this node's leases (connection slots, replies in progress) outlive it.
    pub node_lease: Duration,
    /// How long and how many connection ledger rows are kept.
    pub ledger_retention: crate::ledger::Retention,
    /// Serve `/metrics` on this address only, instead of on the main one.
    pub metrics_bind: Option<SocketAddr>,
    /// Bind with `SO_REUSEPORT`, so a new process can listen on the same address before the old
    /// one stops: a restart without a moment where connects are refused (docs/operations.md).
    pub reuse_port: bool,
    /// Internal networks and hosts every bot may reach, besides public addresses; bots of
    /// site admins may reach internal ones anyway (`--bot-egress-allow`, bots::egress).
    pub bot_egress_allow: Vec<crate::bots::egress::EgressAllow>,
    /// Password hashes (argon2id, 19 MiB each) computed at once; more wait in a queue of
    /// `password_hash_queue`, and beyond that login and registration answer 503 `auth_busy`.
    pub password_hash_concurrency: usize,
    pub password_hash_queue: usize,
    /// Failed-login throttling per username and client address (`throttle.rs`).
    pub login_throttle: crate::throttle::ThrottleConfig,
    /// Export traces over OTLP/HTTP to this collector (`--otlp-endpoint`; `telemetry.rs`
    /// installs the exporter, the binary passes it there).
    pub otlp_endpoint: Option<String>,
    /// This node's id; random when `None` (tests). The binary picks it before the server
    /// starts, so that the traces' resource names the same node as `/api/health`.
    pub node_id: Option<uuid::Uuid>,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            database: Database::SqliteFile(data_dir.join("natter.db")),
            data_dir,
            allowed_origins: Vec::new(),
            heartbeat_interval: Duration::from_millis(25_000),
            registration_open: true,
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            limits: Limits::default(),
            demo: false,
            web_dir: None,
            shutdown_grace: Duration::from_secs(10),
            bus: BusConfig::Local,
            node_lease: Duration::from_secs(15),
            ledger_retention: Default::default(),
            metrics_bind: None,
            reuse_port: false,
            bot_egress_allow: Vec::new(),
            password_hash_concurrency: 2,
            password_hash_queue: 32,
            login_throttle: Default::default(),
            otlp_endpoint: None,
            node_id: None,
        }
    }

    /// Defaults for a test server: port 0 on loopback, data in `data_dir`.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        Config { bind: SocketAddr::from(([127, 0, 0, 1], 0)), ..Config::new(data_dir) }
    }
}
