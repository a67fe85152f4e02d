//! `natter serve`: settings from flags, `NATTER_*` variables and an optional TOML file (in
//! that order of precedence), then run until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, ValueEnum};
use natter_server::config::{BusConfig, Database, LogFormat};
use natter_server::{Config, Server};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatArg {
    Pretty,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    Open,
    Closed,
}

/// Every setting of `natter serve`. Each can also be set by its NATTER_* variable or in the
/// TOML file given with --config (keys spelled like the flags, with '_' for '-').
#[derive(Args, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these settings. Flags and NATTER_* variables override it.
    #[arg(long, env = "NATTER_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:8000]
    #[arg(long, env = "NATTER_BIND", value_name = "ADDR")]
    pub bind: Option<SocketAddr>,

    /// Directory for the SQLite database and the token signing secret [default: ./natter-data]
    #[arg(long, env = "NATTER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Where to store data: "sqlite" (a file in the data dir, the default), "sqlite://PATH",
    /// "memory:" (plain data in the server's memory, no database; nothing kept after exit; for
    /// tests and benchmarks), or a PostgreSQL URL,
    /// postgres://user@host:5432/db, shared by several nodes.
    #[arg(long, env = "NATTER_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,

    /// How nodes announce new messages to each other: "local" (in-process, one node; the
    /// default) or a NATS URL, nats://host:4222, shared by several nodes.
    #[arg(long, env = "NATTER_BUS", value_name = "URL")]
    pub bus: Option<String>,

    /// How long a node's leases (its sockets' places in the per-user count, its bot replies in
    /// progress) outlive it if it dies [default: 15000]
    #[arg(long, env = "NATTER_NODE_LEASE_MS", value_name = "MS")]
    pub node_lease_ms: Option<u64>,

    /// A browser origin besides the server's own that may use the API and open sockets,
    /// e.g. http://localhost:5173. Repeatable; comma-separated in NATTER_ALLOWED_ORIGIN.
    #[arg(long, env = "NATTER_ALLOWED_ORIGIN", value_name = "ORIGIN", value_delimiter = ',')]
    #[serde(default)]
    pub allowed_origin: Vec<String>,

    /// How often the server pings each socket; a client silent for two intervals is closed
    /// with 4408. Keep it under your proxies' idle timeouts [default: 25000]
    #[arg(long, env = "NATTER_HEARTBEAT_INTERVAL_MS", value_name = "MS")]
    pub heartbeat_interval_ms: Option<u64>,

    /// Log format [default: pretty]. Filter with RUST_LOG (e.g. RUST_LOG=natter_server=debug).
    #[arg(long, env = "NATTER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormatArg>,

    /// Whether anyone may register [default: open]
    #[arg(long, env = "NATTER_REGISTRATION", value_enum)]
    pub registration: Option<Registration>,

    /// Access token lifetime in seconds [default: 900]
    #[arg(long, env = "NATTER_ACCESS_TOKEN_TTL_SECS", value_name = "SECS")]
    pub access_token_ttl_secs: Option<u64>,

    /// Refresh token lifetime in seconds [default: 2592000, 30 days]
    #[arg(long, env = "NATTER_REFRESH_TOKEN_TTL_SECS", value_name = "SECS")]
    pub refresh_token_ttl_secs: Option<u64>,

    /// Largest WebSocket frame in bytes; larger ones close the socket with 1009 [default: 65536]
    #[arg(long, env = "NATTER_MAX_FRAME_BYTES", value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,

    /// Longest message content in characters [default: 16384]
    #[arg(long, env = "NATTER_MAX_CONTENT_CHARS", value_name = "CHARS")]
    pub max_content_chars: Option<usize>,

    /// Open sockets per user; more close with 4429 [default: 20]
    #[arg(long, env = "NATTER_MAX_CONNECTIONS_PER_USER", value_name = "N")]
    pub max_connections_per_user: Option<usize>,

    /// Open sockets on this server; more close with 1013 and a retry hint [default: 100000]
    #[arg(long, env = "NATTER_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Messages per second per connection [default: 5]
    #[arg(long, env = "NATTER_MESSAGES_PER_SECOND", value_name = "N")]
    pub messages_per_second: Option<u32>,

    /// Burst of messages allowed above the rate [default: 20]
    #[arg(long, env = "NATTER_MESSAGE_BURST", value_name = "N")]
    pub message_burst: Option<u32>,

    /// Frames queued for one socket before it counts as a slow consumer (4409) [default: 256]
    #[arg(long, env = "NATTER_OUTBOUND_QUEUE", value_name = "N")]
    pub outbound_queue: Option<usize>,

    /// Bot replies generated at once per bot [default: 4]
    #[arg(long, env = "NATTER_BOT_CONCURRENCY", value_name = "N")]
    pub bot_concurrency: Option<usize>,

    /// Bot replies waiting per bot beyond those; more get a bot_busy error [default: 64]
    #[arg(long, env = "NATTER_BOT_QUEUE", value_name = "N")]
    pub bot_queue: Option<usize>,

    /// Serve /metrics on this address only (e.g. 127.0.0.1:9100) instead of the main one.
    #[arg(long, env = "NATTER_METRICS_BIND", value_name = "ADDR")]
    pub metrics_bind: Option<SocketAddr>,

    /// Keep connection ledger rows this many days [default: 7]
    #[arg(long, env = "NATTER_LEDGER_MAX_AGE_DAYS", value_name = "DAYS")]
    pub ledger_max_age_days: Option<u64>,

    /// Keep at most this many connection ledger rows [default: 100000]
    #[arg(long, env = "NATTER_LEDGER_MAX_ROWS", value_name = "N")]
    pub ledger_max_rows: Option<u64>,

    /// Serve the web app from this directory (e.g. web/dist).
    #[arg(long, env = "NATTER_WEB_DIR", value_name = "DIR")]
    pub web_dir: Option<PathBuf>,

    /// Listen with SO_REUSEPORT, so the next process can bind the same address before this one
    /// stops: start the new one, then send this one SIGTERM (a restart without refused
    /// connects). Every process on the address must set it. Not with `memory:`.
    #[arg(long, env = "NATTER_REUSE_PORT")]
    #[serde(default)]
    pub reuse_port: bool,

    /// Create a demo user (demo / demo-password) and an echo bot. Loopback only.
    #[arg(long, env = "NATTER_DEMO")]
    #[serde(default)]
    pub demo: bool,

    /// Longest bot reply in characters; a longer one is cut and stored incomplete [default: 65536]
    #[arg(long, env = "NATTER_MAX_REPLY_CHARS", value_name = "N")]
    pub max_reply_chars: Option<usize>,

    /// A network (10.0.0.0/8, 127.0.0.1) or host name (localhost) that every user's
    /// openai/webhook bots may reach. Without it only site admins' bots reach loopback and
    /// private networks; link-local/cloud metadata addresses only when listed here.
    /// Repeatable; comma-separated in NATTER_BOT_EGRESS_ALLOW.
    #[arg(long, env = "NATTER_BOT_EGRESS_ALLOW", value_name = "CIDR|HOST", value_delimiter = ',')]
    #[serde(default)]
    pub bot_egress_allow: Vec<String>,
    /// Password hashes computed at once (argon2id, 19 MiB each) [default: 2]
    #[arg(long, env = "NATTER_PASSWORD_HASH_CONCURRENCY", value_name = "N")]
    pub password_hash_concurrency: Option<usize>,

    /// Logins/registrations waiting for a hash beyond those; more get 503 auth_busy [default: 32]
    #[arg(long, env = "NATTER_PASSWORD_HASH_QUEUE", value_name = "N")]
    pub password_hash_queue: Option<usize>,

    /// Failed logins per username and address before each next attempt waits (1 s, doubling);
    /// per address 4x, per username 2x; 0 turns throttling off [default: 5]
    #[arg(long, env = "NATTER_LOGIN_FREE_FAILURES", value_name = "N")]
    pub login_free_failures: Option<u32>,
    /// Ledger rows stored per second for socket attempts that named no user (refusals anyone
    /// can cause); more are counted, not stored. 0 stores none [default: 20]
    #[arg(long, env = "NATTER_LEDGER_ANONYMOUS_PER_SECOND", value_name = "N")]
    pub ledger_anonymous_per_second: Option<u32>,
    /// Client frames per second per socket (pings, cancels, messages); over it, `rate_limited` [default: 20]
    #[arg(long, env = "NATTER_FRAMES_PER_SECOND", value_name = "N")]
    pub frames_per_second: Option<u32>,

    /// Burst of client frames allowed above that rate [default: 40]
    #[arg(long, env = "NATTER_FRAME_BURST", value_name = "N")]
    pub frame_burst: Option<u32>,

    /// Messages per second per user, over all of the user's sockets on every node [default: 10]
    #[arg(long, env = "NATTER_USER_MESSAGES_PER_SECOND", value_name = "N")]
    pub user_messages_per_second: Option<u32>,

    /// Burst of a user's messages allowed above that rate [default: 30]
    #[arg(long, env = "NATTER_USER_MESSAGE_BURST", value_name = "N")]
    pub user_message_burst: Option<u32>,

    /// Time a client has to send a request's head (also how long a kept-alive HTTP connection waits idle) [default: 10000]
    #[arg(long, env = "NATTER_HTTP_HEADER_TIMEOUT_MS", value_name = "MS")]
    pub http_header_timeout_ms: Option<u64>,

    /// An HTTP connection on which no byte moves for this long is closed (not WebSockets) [default: 60000]
    #[arg(long, env = "NATTER_HTTP_IDLE_TIMEOUT_MS", value_name = "MS")]
    pub http_idle_timeout_ms: Option<u64>,

    /// HTTP connections at once (WebSockets not counted); at the bound new ones wait in the backlog [default: 10000]
    #[arg(long, env = "NATTER_MAX_HTTP_CONNECTIONS", value_name = "N")]
    pub max_http_connections: Option<usize>,

    /// Export traces over OTLP/HTTP (protobuf) to this collector, e.g. http://127.0.0.1:4318
    /// (Jaeger, Grafana Tempo, an OpenTelemetry Collector); traces go to URL/v1/traces. Off by default.
    #[arg(long, env = "NATTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl ServeArgs {
    /// Fills what flags and variables left unset from the file: a setting is unset when it is
    /// absent, an empty list or a switch left off. Done through serde, key by key, so that a
    /// new setting needs no line here.
    fn merge(self, file: ServeArgs) -> anyhow::Result<ServeArgs> {
        use serde_json::Value;
        let given = serde_json::to_value(&self).context("config: a setting given besides the file is not UTF-8")?;
        let (Value::Object(mut merged), Value::Object(given)) = (serde_json::to_value(&file)?, given) else {
            unreachable!("ServeArgs is a struct")
        };
        for (key, value) in given {
            let unset = value.is_null() || value == Value::Bool(false) || value.as_array().is_some_and(Vec::is_empty);
            if !unset {
                merged.insert(key, value);
            }
        }
        Ok(serde_json::from_value(Value::Object(merged))?)
    }

    /// The resolved configuration, or a one-line error naming the setting at fault.
    pub fn resolve(self) -> anyhow::Result<(Config, LogFormat)> {
        let args = match &self.config {
            Some(path) => {
                let file = read_file(path)?;
                self.merge(file)?
            }
            None => self,
        };
        let log = match args.log_format {
            Some(LogFormatArg::Json) => LogFormat::Json,
            _ => LogFormat::Pretty,
        };
        let config = args.into_config()?;
        config.validate()?;
        Ok((config, log))
    }

    /// The settings given, over the defaults. Only parsing fails here; which values the server
    /// runs with is `Config::validate`'s to say.
    fn into_config(self) -> anyhow::Result<Config> {
        let data_dir = self.data_dir.unwrap_or_else(|| PathBuf::from("./natter-data"));
        let mut c = Config::new(data_dir.clone());
        c.database = Database::from_url(self.database_url.as_deref().unwrap_or(""), &data_dir)?;
        c.bus = BusConfig::from_url(self.bus.as_deref().unwrap_or(""))?;
        set(&mut c.bind, self.bind);
        set(&mut c.node_lease, self.node_lease_ms.map(Duration::from_millis));
        c.allowed_origins = self.allowed_origin;
        set(&mut c.heartbeat_interval, self.heartbeat_interval_ms.map(Duration::from_millis));
        c.registration_open = self.registration != Some(Registration::Closed);
        set(&mut c.access_token_ttl, self.access_token_ttl_secs.map(Duration::from_secs));
        set(&mut c.refresh_token_ttl, self.refresh_token_ttl_secs.map(Duration::from_secs));
        let l = &mut c.limits;
        set(&mut l.max_frame_bytes, self.max_frame_bytes);
        set(&mut l.max_content_chars, self.max_content_chars);
        set(&mut l.max_connections_per_user, self.max_connections_per_user);
        set(&mut l.max_connections, self.max_connections);
        set(&mut l.messages_per_second, self.messages_per_second);
        set(&mut l.message_burst, self.message_burst);
        set(&mut l.outbound_queue, self.outbound_queue);
        set(&mut l.bot_concurrency, self.bot_concurrency);
        set(&mut l.bot_queue, self.bot_queue);
        set(&mut l.max_reply_chars, self.max_reply_chars);
        set(&mut l.frames_per_second, self.frames_per_second);
        set(&mut l.frame_burst, self.frame_burst);
        set(&mut l.user_messages_per_second, self.user_messages_per_second);
        set(&mut l.user_message_burst, self.user_message_burst);
        set(&mut l.http_header_timeout, self.http_header_timeout_ms.map(Duration::from_millis));
        set(&mut l.http_idle_timeout, self.http_idle_timeout_ms.map(Duration::from_millis));
        set(&mut l.max_http_connections, self.max_http_connections);
        c.metrics_bind = self.metrics_bind;
        let r = &mut c.ledger_retention;
        set(&mut r.max_age, self.ledger_max_age_days.map(|days| Duration::from_secs(days * 24 * 3600)));
        set(&mut r.max_rows, self.ledger_max_rows);
        set(&mut r.anonymous_per_second, self.ledger_anonymous_per_second);
        c.web_dir = self.web_dir;
        c.demo = self.demo;
        c.reuse_port = self.reuse_port;
        for a in &self.bot_egress_allow {
            c.bot_egress_allow.push(a.parse().map_err(|e| anyhow!("bot-egress-allow: {e}"))?);
        }
        set(&mut c.password_hash_concurrency, self.password_hash_concurrency);
        set(&mut c.password_hash_queue, self.password_hash_queue);
        set(&mut c.login_throttle.free_failures, self.login_free_failures);
        c.otlp_endpoint = self.otlp_endpoint.filter(|u| !u.is_empty());
        Ok(c)
    }
}

/// A setting that was given replaces the default.
fn set<T>(slot: &mut T, given: Option<T>) {
    if let Some(v) = given {
        *slot = v;
    }
}

fn read_file(path: &Path) -> anyhow::Result<ServeArgs> {
    let text = std::fs::read_to_string(path).with_context(|| format!("config: cannot read {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start].lines().count().max(1));
        let msg = e.message().replace('\n', " ");
        match line {
            Some(l) => anyhow!("config {}:{l}: {msg}", path.display()),
            None => anyhow!("config {}: {msg}", path.display()),
        }
    })
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (mut config, log) = args.resolve()?;
    let otlp = config.otlp_endpoint.clone().map(|endpoint| {
        let node_id = uuid::Uuid::new_v4();
        config.node_id = Some(node_id);
        natter_server::telemetry::Otlp { endpoint, node_id }
    });
    let telemetry = natter_server::telemetry::init(log, otlp)?;
    let demo = config.demo;
    // A StartError's message already names its cause: as an anyhow chain it would say it twice.
    let server = Server::build(config).await.map_err(|e| anyhow!("{e}"))?;
    let addr = server.local_addr();
    println!("natter {} listening on http://{addr}", env!("CARGO_PKG_VERSION"));
    if demo {
        println!(
            "demo data ready: log in at http://{addr} as {} / {}",
            natter_server::app::DEMO_USER,
            natter_server::app::DEMO_PASSWORD
        );
    }
    server.run_until_stopped(shutdown_signal()).await?;
    telemetry.shutdown().await;
    println!("natter stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        T::try_parse_from(std::iter::once("natter").chain(args.iter().copied())).unwrap().a
    }

    #[test]
    fn defaults() {
        let (c, log) = parse(&[]).resolve().unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:8000");
        assert_eq!(c.data_dir, PathBuf::from("./natter-data"));
        assert_eq!(c.database, Database::SqliteFile(PathBuf::from("./natter-data/natter.db")));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(25_000));
        assert_eq!(log, LogFormat::Pretty);
        assert!(c.registration_open);
    }

    #[test]
    fn several_nodes() {
        let (c, _) = parse(&["--database-url", "postgres://natter@db:5432/natter", "--bus", "nats://nats:4222"])
            .resolve()
            .unwrap();
        assert_eq!(c.database, Database::Postgres("postgres://natter@db:5432/natter".into()));
        assert_eq!(c.bus, BusConfig::Nats("nats://nats:4222".into()));
        let (c, _) = parse(&["--node-lease-ms", "3000"]).resolve().unwrap();
        assert_eq!((c.bus, c.node_lease), (BusConfig::Local, Duration::from_millis(3000)), "local bus by default");
        let e = parse(&["--bus", "redis://x"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("bus:"), "{e}");
        let e = parse(&["--node-lease-ms", "10"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("node-lease-ms:"), "{e}");
    }

    #[test]
    fn reuse_port_needs_shared_storage() {
        let (c, _) = parse(&[]).resolve().unwrap();
        assert!(!c.reuse_port, "off by default: two servers on one port by mistake must fail to bind");
        let (c, _) = parse(&["--reuse-port"]).resolve().unwrap();
        assert!(c.reuse_port);
        let e = parse(&["--reuse-port", "--database-url", "memory:"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("reuse-port:"), "{e}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = parse(&["--heartbeat-interval-ms", "5"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("heartbeat-interval-ms:"), "{e}");
        let e = parse(&["--allowed-origin", "localhost:5173"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("allowed-origin:"), "{e}");
        let e = parse(&["--demo", "--bind", "0.0.0.0:8000"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("demo:"), "{e}");
        let e = parse(&["--database-url", "mysql://x"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("database-url:"), "{e}");
        let e = parse(&["--password-hash-concurrency", "0"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("password-hash-concurrency:"), "{e}");
        let (c, _) = parse(&["--password-hash-queue", "0", "--login-free-failures", "3"]).resolve().unwrap();
        assert_eq!((c.password_hash_concurrency, c.password_hash_queue, c.login_throttle.free_failures), (2, 0, 3));
        assert!(T::try_parse_from(["natter", "--bind", "not-an-address"]).is_err());
        let e = parse(&["--ledger-anonymous-per-second", "100001"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("ledger-anonymous-per-second:"), "{e}");
    }

    #[test]
    fn ledger_anonymous_budget() {
        assert_eq!(parse(&[]).resolve().unwrap().0.ledger_retention.anonymous_per_second, 20);
        let (c, _) = parse(&["--ledger-anonymous-per-second", "0"]).resolve().unwrap();
        assert_eq!(c.ledger_retention.anonymous_per_second, 0, "0 stores no anonymous rows");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.toml");
        std::fs::write(&path, "ledger_anonymous_per_second = 7\n").unwrap();
        let (c, _) = parse(&["--config", path.to_str().unwrap()]).resolve().unwrap();
        assert_eq!(c.ledger_retention.anonymous_per_second, 7);
        for (flag, v) in [
            ("--http-header-timeout-ms", "5"),
            ("--http-idle-timeout-ms", "0"),
            ("--max-http-connections", "0"),
            ("--frames-per-second", "0"),
            ("--frame-burst", "0"),
            ("--user-messages-per-second", "0"),
            ("--user-message-burst", "0"),
        ] {
            let e = parse(&[flag, v]).resolve().unwrap_err().to_string();
            assert!(e.starts_with(&format!("{}:", &flag[2..])), "{e}");
        }
    }

    #[test]
    fn transport_and_budget_settings() {
        let (c, _) = parse(&[
            "--http-header-timeout-ms",
            "2000",
            "--http-idle-timeout-ms",
            "30000",
            "--max-http-connections",
            "50",
            "--frames-per-second",
            "7",
            "--user-message-burst",
            "9",
        ])
        .resolve()
        .unwrap();
        let l = &c.limits;
        assert_eq!((l.http_header_timeout, l.http_idle_timeout), (Duration::from_secs(2), Duration::from_secs(30)));
        assert_eq!((l.max_http_connections, l.frames_per_second, l.frame_burst), (50, 7, 40));
        assert_eq!((l.user_messages_per_second, l.user_message_burst), (10, 9));
    }

    #[test]
    fn file_fills_in_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.toml");
        std::fs::write(
            &path,
            "bind = \"127.0.0.1:9000\"\nheartbeat_interval_ms = 1000\nallowed_origin = [\"http://localhost:5173\"]\n",
        )
        .unwrap();
        let (c, _) = parse(&["--config", path.to_str().unwrap(), "--heartbeat-interval-ms", "2000"]).resolve().unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:9000", "from the file");
        assert_eq!(c.heartbeat_interval, Duration::from_millis(2000), "flag wins");
        assert_eq!(c.allowed_origins, vec!["http://localhost:5173".to_string()]);

        std::fs::write(&path, "bnd = \"127.0.0.1:9000\"\n").unwrap();
        let e = parse(&["--config", path.to_str().unwrap()]).resolve().unwrap_err().to_string();
        assert!(e.contains("natter.toml:1") && e.contains("bnd") && !e.contains('\n'), "{e}");
    }
    #[test]
    fn every_kind_of_setting_comes_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.toml");
        std::fs::write(
            &path,
            "demo = true\nreuse_port = true\nbot_egress_allow = [\"10.0.0.0/8\"]\nmax_connections = 7\n\
             log_format = \"json\"\nregistration = \"closed\"\nnode_lease_ms = 3000\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let (c, log) = parse(&["--config", file]).resolve().unwrap();
        assert!(c.demo && c.reuse_port && !c.registration_open, "switches and choices");
        assert_eq!((c.limits.max_connections, c.node_lease, log), (7, Duration::from_secs(3), LogFormat::Json));
        assert_eq!(c.bot_egress_allow.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["10.0.0.0/8"]);
        // A list given as a flag replaces the file's; a value the file has wrong is named.
        let (c, _) = parse(&["--config", file, "--bot-egress-allow", "127.0.0.1"]).resolve().unwrap();
        assert_eq!(c.bot_egress_allow.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["127.0.0.1/32"]);
        std::fs::write(&path, "node_lease_ms = 10\n").unwrap();
        let e = parse(&["--config", file]).resolve().unwrap_err().to_string();
        assert_eq!(e, "node-lease-ms: 10 is out of range (300 to 600000)");
    }

    #[test]
    fn otlp_endpoint_from_flag_or_file() {
        assert_eq!(parse(&[]).resolve().unwrap().0.otlp_endpoint, None, "off by default");
        let (c, _) = parse(&["--otlp-endpoint", "http://127.0.0.1:4318"]).resolve().unwrap();
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
        for bad in ["127.0.0.1:4318", "http://", "grpc://tempo:4317"] {
            let e = parse(&["--otlp-endpoint", bad]).resolve().unwrap_err().to_string();
            assert!(e.starts_with("otlp-endpoint:"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.toml");
        std::fs::write(&path, "otlp_endpoint = \"https://tempo.internal:4318\"\n").unwrap();
        let (c, _) = parse(&["--config", path.to_str().unwrap()]).resolve().unwrap();
        assert_eq!(c.otlp_endpoint.as_deref(), Some("https://tempo.internal:4318"));
    }

    #[test]
    fn max_reply_chars_from_flag_or_file_within_range() {
        let (c, _) = parse(&[]).resolve().unwrap();
        assert_eq!(c.limits.max_reply_chars, 65_536);
        let (c, _) = parse(&["--max-reply-chars", "1000"]).resolve().unwrap();
        assert_eq!(c.limits.max_reply_chars, 1000);
        let e = parse(&["--max-reply-chars", "0"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("max-reply-chars: 0 is out of range"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.toml");
        std::fs::write(&path, "max_reply_chars = 2000\n").unwrap();
        let (c, _) = parse(&["--config", path.to_str().unwrap()]).resolve().unwrap();
        assert_eq!(c.limits.max_reply_chars, 2000);
    }

    #[test]
    fn bot_egress_allow_from_flags_and_file() {
        let (c, _) = parse(&[]).resolve().unwrap();
        assert!(c.bot_egress_allow.is_empty(), "nothing internal for non-admins by default");
        let (c, _) = parse(&["--bot-egress-allow", "127.0.0.1/32,localhost", "--bot-egress-allow", "10.1.0.0/16"])
            .resolve()
            .unwrap();
        let got: Vec<String> = c.bot_egress_allow.iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["127.0.0.1/32", "localhost", "10.1.0.0/16"]);
        let e = parse(&["--bot-egress-allow", "10.0.0.0/40"]).resolve().unwrap_err().to_string();
        assert!(e.starts_with("bot-egress-allow:"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.toml");
        std::fs::write(&path, "bot_egress_allow = [\"fd00::/8\", \"llm.intranet\"]\n").unwrap();
        let (c, _) = parse(&["--config", path.to_str().unwrap()]).resolve().unwrap();
        let got: Vec<String> = c.bot_egress_allow.iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["fd00::/8", "llm.intranet"]);
    }
}
