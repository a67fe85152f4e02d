//! The server's resolved settings. The CLI fills this from flags, `NATTER_*` variables and
//! an optional TOML file; tests build it directly with [`Config::for_tests`]. Either way
//! [`Config::validate`] is the one place that says which values the server runs with:
//! `natter serve` calls it to report a bad setting, and the server calls it again as it
//! starts, so a `Config` built in code gets the same checks.
//!
//! A new setting: a field here with its default in [`Config::new`] (and its rule in
//! [`Config::validate`], if it has one), then its flag in the CLI's `ServeArgs` and the line
//! of `ServeArgs::resolve` that copies it here.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

impl Database {
    /// The database a `--database-url` names: `sqlite` (or nothing) for `<data-dir>/natter.db`,
    /// `sqlite://PATH`, `memory:`, or a PostgreSQL URL.
    pub fn from_url(url: &str, data_dir: &Path) -> Result<Database, ConfigError> {
        Ok(match url {
            "" | "sqlite" => Database::SqliteFile(data_dir.join("natter.db")),
            "memory:" => Database::Memory,
            _ if url.starts_with("sqlite://") => Database::SqliteFile(PathBuf::from(&url["sqlite://".len()..])),
            _ if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Database::Postgres(url.to_owned())
            }
            _ => {
                return Err(ConfigError::new(
                    "database-url",
                    format!(
                        "unsupported value {url:?}; use \"sqlite\", \"sqlite://PATH\", \"memory:\" or \"postgres://…\""
                    ),
                ))
            }
        })
    }
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

impl BusConfig {
    /// The bus a `--bus` names: `local` (or nothing), or a NATS URL.
    pub fn from_url(url: &str) -> Result<BusConfig, ConfigError> {
        match url {
            "" | "local" => Ok(BusConfig::Local),
            _ if url.starts_with("nats://") || url.starts_with("tls://") => Ok(BusConfig::Nats(url.to_owned())),
            _ => Err(ConfigError::new(
                "bus",
                format!("unsupported value {url:?}; use \"local\" or \"nats://HOST:PORT\""),
            )),
        }
    }
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

/// A setting the server cannot run with: one line naming the setting as `natter serve` spells
/// it (its flag; `_` for `-` in the TOML file) and what is wrong with the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(setting: &'static str, problem: impl Into<String>) -> ConfigError {
        ConfigError { setting, problem: problem.into() }
    }
}

fn positive(setting: &'static str, v: u128) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::new(setting, "must be greater than 0"));
    }
    Ok(())
}

fn in_range<T: PartialOrd + Display + Copy>(setting: &'static str, v: T, lo: T, hi: T) -> Result<(), ConfigError> {
    if !(lo..=hi).contains(&v) {
        return Err(ConfigError::new(setting, format!("{v} is out of range ({lo} to {hi})")));
    }
    Ok(())
}

/// A duration given in milliseconds, within `lo..=hi` of them.
fn millis_in_range(setting: &'static str, d: Duration, lo: u128, hi: u128) -> Result<(), ConfigError> {
    in_range(setting, d.as_millis(), lo, hi)
}

/// `scheme://host[:port]`, with no path (a trailing `/` is tolerated).
fn is_origin(o: &str) -> bool {
    (o.starts_with("http://") || o.starts_with("https://")) && o.trim_end_matches('/').matches('/').count() == 2
}

impl Limits {
    /// Every rule on the limits, in the order `natter serve --help` lists them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_frame_bytes < 1024 {
            let v = self.max_frame_bytes;
            return Err(ConfigError::new("max-frame-bytes", format!("{v} is too small (at least 1024)")));
        }
        positive("max-content-chars", self.max_content_chars as u128)?;
        positive("max-connections-per-user", self.max_connections_per_user as u128)?;
        positive("max-connections", self.max_connections as u128)?;
        positive("messages-per-second", self.messages_per_second.into())?;
        positive("message-burst", self.message_burst.into())?;
        positive("outbound-queue", self.outbound_queue as u128)?;
        positive("bot-concurrency", self.bot_concurrency as u128)?;
        in_range("max-reply-chars", self.max_reply_chars, 1, 16 * 1024 * 1024)?;
        positive("frames-per-second", self.frames_per_second.into())?;
        positive("frame-burst", self.frame_burst.into())?;
        positive("user-messages-per-second", self.user_messages_per_second.into())?;
        positive("user-message-burst", self.user_message_burst.into())?;
        millis_in_range("http-header-timeout-ms", self.http_header_timeout, 100, 600_000)?;
        millis_in_range("http-idle-timeout-ms", self.http_idle_timeout, 100, 3_600_000)?;
        positive("max-http-connections", self.max_http_connections as u128)
    }
}

impl Config {
    /// Whether the server can run with these settings: the first bad one, named as the CLI
    /// spells it. `natter serve` reports it; the server refuses to start with it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        millis_in_range("node-lease-ms", self.node_lease, 300, 600_000)?;
        if let Some(o) = self.allowed_origins.iter().find(|o| !is_origin(o)) {
            return Err(ConfigError::new(
                "allowed-origin",
                format!("{o:?} is not an origin like http://localhost:5173 (scheme, host, optional port; no path)"),
            ));
        }
        millis_in_range("heartbeat-interval-ms", self.heartbeat_interval, 100, 600_000)?;
        positive("access-token-ttl-secs", self.access_token_ttl.as_nanos())?;
        positive("refresh-token-ttl-secs", self.refresh_token_ttl.as_nanos())?;
        self.limits.validate()?;
        positive("ledger-max-age-days", self.ledger_retention.max_age.as_nanos())?;
        positive("ledger-max-rows", self.ledger_retention.max_rows.into())?;
        in_range("ledger-anonymous-per-second", self.ledger_retention.anonymous_per_second, 0, 100_000)?;
        if let Some(dir) = self.web_dir.as_ref().filter(|d| !d.join("index.html").is_file()) {
            let problem = format!("{} has no index.html (build the web app with `make web`)", dir.display());
            return Err(ConfigError::new("web-dir", problem));
        }
        self.validate_deployment()?;
        if !(1..=64).contains(&self.password_hash_concurrency) {
            let n = self.password_hash_concurrency;
            let problem = format!("{n} is out of range (1 to 64; each hash holds 19 MiB)");
            return Err(ConfigError::new("password-hash-concurrency", problem));
        }
        in_range("password-hash-queue", self.password_hash_queue, 0, 100_000)?;
        in_range("login-free-failures", self.login_throttle.free_failures, 0, 1000)?;
        if let Some(url) = &self.otlp_endpoint {
            let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                let problem = format!("{url:?} is not a collector URL like http://127.0.0.1:4318");
                return Err(ConfigError::new("otlp-endpoint", problem));
            }
        }
        Ok(())
    }

    /// The rules between settings: what a hand-over restart and the demo data need.
    fn validate_deployment(&self) -> Result<(), ConfigError> {
        if self.reuse_port && self.database == Database::Memory {
            return Err(ConfigError::new("reuse-port", "with --database-url memory: each process has its own data, so a hand-over would lose every message; use SQLite or PostgreSQL"));
        }
        if self.demo && !self.bind.ip().is_loopback() {
            return Err(ConfigError::new("demo", "--demo is only allowed when --bind is a loopback address (it creates a user with a published password)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new(PathBuf::from("./natter-data"))
    }

    /// The error of the defaults with one change, which must name `setting`.
    fn refused(setting: &str, change: impl FnOnce(&mut Config)) -> String {
        let mut c = config();
        change(&mut c);
        let e = c.validate().expect_err(setting);
        assert_eq!(e.setting, setting, "{e}");
        let line = e.to_string();
        assert!(line.starts_with(&format!("{setting}: ")) && !line.contains('\n'), "{line}");
        line
    }

    fn accepted(change: impl FnOnce(&mut Config)) {
        let mut c = config();
        change(&mut c);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn defaults_and_test_defaults_are_valid() {
        assert_eq!(config().validate(), Ok(()));
        assert_eq!(Config::for_tests(PathBuf::from("x")).validate(), Ok(()));
    }

    #[test]
    fn durations_in_milliseconds_have_ranges() {
        let ms = Duration::from_millis;
        let e = refused("node-lease-ms", |c| c.node_lease = ms(299));
        assert_eq!(e, "node-lease-ms: 299 is out of range (300 to 600000)");
        refused("node-lease-ms", |c| c.node_lease = ms(600_001));
        accepted(|c| c.node_lease = ms(300));
        refused("heartbeat-interval-ms", |c| c.heartbeat_interval = ms(5));
        refused("heartbeat-interval-ms", |c| c.heartbeat_interval = ms(600_001));
        accepted(|c| c.heartbeat_interval = ms(100));
        refused("http-header-timeout-ms", |c| c.limits.http_header_timeout = ms(99));
        refused("http-header-timeout-ms", |c| c.limits.http_header_timeout = ms(600_001));
        refused("http-idle-timeout-ms", |c| c.limits.http_idle_timeout = Duration::ZERO);
        refused("http-idle-timeout-ms", |c| c.limits.http_idle_timeout = ms(3_600_001));
        accepted(|c| c.limits.http_idle_timeout = ms(3_600_000));
    }

    #[test]
    fn origins_are_scheme_host_and_port() {
        let e = refused("allowed-origin", |c| c.allowed_origins = vec!["localhost:5173".into()]);
        assert!(e.contains("\"localhost:5173\" is not an origin"), "{e}");
        refused("allowed-origin", |c| c.allowed_origins = vec!["http://localhost:5173/app".into()]);
        refused("allowed-origin", |c| c.allowed_origins = vec!["ftp://localhost".into()]);
        accepted(|c| c.allowed_origins = vec!["http://localhost:5173".into(), "https://chat.example/".into()]);
    }

    #[test]
    fn counts_and_lifetimes_must_be_positive() {
        type Change = fn(&mut Config);
        let cases: [(&str, Change); 16] = [
            ("access-token-ttl-secs", |c| c.access_token_ttl = Duration::ZERO),
            ("refresh-token-ttl-secs", |c| c.refresh_token_ttl = Duration::ZERO),
            ("max-content-chars", |c| c.limits.max_content_chars = 0),
            ("max-connections-per-user", |c| c.limits.max_connections_per_user = 0),
            ("max-connections", |c| c.limits.max_connections = 0),
            ("messages-per-second", |c| c.limits.messages_per_second = 0),
            ("message-burst", |c| c.limits.message_burst = 0),
            ("outbound-queue", |c| c.limits.outbound_queue = 0),
            ("bot-concurrency", |c| c.limits.bot_concurrency = 0),
            ("frames-per-second", |c| c.limits.frames_per_second = 0),
            ("frame-burst", |c| c.limits.frame_burst = 0),
            ("user-messages-per-second", |c| c.limits.user_messages_per_second = 0),
            ("user-message-burst", |c| c.limits.user_message_burst = 0),
            ("max-http-connections", |c| c.limits.max_http_connections = 0),
            ("ledger-max-age-days", |c| c.ledger_retention.max_age = Duration::ZERO),
            ("ledger-max-rows", |c| c.ledger_retention.max_rows = 0),
        ];
        for (setting, change) in cases {
            assert_eq!(refused(setting, change), format!("{setting}: must be greater than 0"));
        }
        // A zero queue is a setting (no waiting), not a mistake.
        accepted(|c| c.limits.bot_queue = 0);
    }

    #[test]
    fn sizes_and_budgets_have_bounds() {
        let e = refused("max-frame-bytes", |c| c.limits.max_frame_bytes = 1023);
        assert_eq!(e, "max-frame-bytes: 1023 is too small (at least 1024)");
        accepted(|c| c.limits.max_frame_bytes = 1024);
        let e = refused("max-reply-chars", |c| c.limits.max_reply_chars = 0);
        assert!(e.starts_with("max-reply-chars: 0 is out of range"), "{e}");
        refused("max-reply-chars", |c| c.limits.max_reply_chars = 16 * 1024 * 1024 + 1);
        accepted(|c| c.limits.max_reply_chars = 16 * 1024 * 1024);
        refused("ledger-anonymous-per-second", |c| c.ledger_retention.anonymous_per_second = 100_001);
        accepted(|c| c.ledger_retention.anonymous_per_second = 0);
        let e = refused("password-hash-concurrency", |c| c.password_hash_concurrency = 0);
        assert!(e.ends_with("(1 to 64; each hash holds 19 MiB)"), "{e}");
        refused("password-hash-concurrency", |c| c.password_hash_concurrency = 65);
        refused("password-hash-queue", |c| c.password_hash_queue = 100_001);
        accepted(|c| c.password_hash_queue = 0);
        refused("login-free-failures", |c| c.login_throttle.free_failures = 1001);
        accepted(|c| c.login_throttle.free_failures = 0);
    }

    #[test]
    fn web_dir_needs_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let e = refused("web-dir", |c| c.web_dir = Some(path.clone()));
        assert!(e.ends_with("has no index.html (build the web app with `make web`)"), "{e}");
        std::fs::write(dir.path().join("index.html"), "<!doctype html>").unwrap();
        accepted(|c| c.web_dir = Some(path));
    }

    #[test]
    fn settings_that_exclude_each_other() {
        refused("reuse-port", |c| (c.reuse_port, c.database) = (true, Database::Memory));
        accepted(|c| c.reuse_port = true);
        refused("demo", |c| (c.demo, c.bind) = (true, SocketAddr::from(([0, 0, 0, 0], 8000))));
        accepted(|c| c.demo = true);
    }

    #[test]
    fn otlp_endpoint_is_a_collector_url() {
        for bad in ["127.0.0.1:4318", "http://", "http:///v1", "grpc://tempo:4317", ""] {
            refused("otlp-endpoint", |c| c.otlp_endpoint = Some(bad.into()));
        }
        accepted(|c| c.otlp_endpoint = Some("https://tempo.internal:4318".into()));
    }

    #[test]
    fn database_and_bus_urls() {
        let dir = Path::new("/data");
        assert_eq!(Database::from_url("", dir), Ok(Database::SqliteFile("/data/natter.db".into())));
        assert_eq!(Database::from_url("sqlite", dir), Ok(Database::SqliteFile("/data/natter.db".into())));
        assert_eq!(Database::from_url("sqlite:///tmp/x.db", dir), Ok(Database::SqliteFile("/tmp/x.db".into())));
        assert_eq!(Database::from_url("memory:", dir), Ok(Database::Memory));
        let pg = "postgresql://natter@db/natter";
        assert_eq!(Database::from_url(pg, dir), Ok(Database::Postgres(pg.into())));
        assert_eq!(Database::from_url("mysql://x", dir).unwrap_err().setting, "database-url");
        assert_eq!(BusConfig::from_url("local"), Ok(BusConfig::Local));
        assert_eq!(BusConfig::from_url("tls://nats:4222"), Ok(BusConfig::Nats("tls://nats:4222".into())));
        let e = BusConfig::from_url("redis://x").unwrap_err().to_string();
        assert!(e.starts_with("bus: unsupported value \"redis://x\""), "{e}");
    }
}
