//! `natter bench`: load scenarios against a natter server, or anything speaking its chat
//! protocol (the peers in `bench/peers/`). Every reply is checked (content and seq), errors are
//! counted by kind, latencies go into HDR histograms; a table or `--json` at the end.

mod conn;
mod report;
mod scenarios;
mod server;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, ValueEnum};
use futures_util::{stream, StreamExt, TryStreamExt};
use natter_proto::api::{BotView, TokenPair};
use uuid::Uuid;

use conn::{Ident, Target};
use server::Spawned;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Scenario {
    /// Open, authenticate, wait for connection_established, close; again and again.
    Connect,
    /// Hold N authenticated connections; server memory per connection with --server-pid.
    Idle,
    /// N connections, each with one message outstanding: message → ack → bot reply.
    Chat,
    /// Like chat, with --tabs sockets per conversation: every tab gets every message.
    Fanout,
    /// N chatting clients, the server restarted (needs --spawn): all reconnect with backoff and
    /// resume with after_seq; nothing may be lost or doubled.
    Storm,
}

/// Measure a natter server (or a peer speaking its chat protocol).
///
/// Creates its own users and echo bots through the REST API (or mints tokens with
/// --jwt-secret for the peers in bench/peers/). A natter server limits each user to 20 sockets
/// and each socket to 5 messages/s by default: the bench spreads conversations over enough users
/// (--conns-per-user), but for chat at full speed start the server with
/// --messages-per-second/--message-burst raised, or use --spawn, which does so.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// The server [default: http://127.0.0.1:8000]; ignored with --spawn.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,

    /// Start `natter serve` as a child on a free loopback port with a temporary data dir and
    /// raised per-user and rate limits (storm needs it: the bench restarts it).
    #[arg(long)]
    pub spawn: bool,

    /// An extra flag for the spawned server, e.g. --server-arg=--database-url=memory:. Repeatable.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub server_arg: Vec<String>,

    /// The natter binary to spawn [default: this one].
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,

    /// Pin the spawned server to these CPUs (taskset -c LIST).
    #[arg(long, value_name = "LIST")]
    pub server_cpus: Option<String>,

    /// Connections (storm: clients).
    #[arg(short = 'c', long, default_value_t = 100)]
    pub connections: usize,

    /// How long to measure, seconds (connect, chat, fanout; idle: how long to hold).
    #[arg(short = 'd', long, default_value_t = 10.0)]
    pub duration: f64,

    /// Seconds of load before measuring starts (chat, fanout, connect).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,

    /// Message content size in bytes (chat, fanout, storm).
    #[arg(long, default_value_t = 64)]
    pub message_bytes: usize,

    /// Sockets per conversation (fanout).
    #[arg(long, default_value_t = 4)]
    pub tabs: usize,

    /// Connections opened at once (connect: workers; others: while opening).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,

    /// Sockets per created user [default: 20, the server's default per-user cap; 1000 with --spawn].
    #[arg(long, value_name = "N")]
    pub conns_per_user: Option<usize>,

    /// Use this access token instead of registering users (bots are created as this user).
    #[arg(long, env = "NATTER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Mint access tokens (HS256, claims sub/name/iat/exp) with this secret and use random bot
    /// ids, instead of the REST API: for the peers in bench/peers/.
    #[arg(long, value_name = "SECRET", hide_env_values = true, env = "BENCH_JWT_SECRET")]
    pub jwt_secret: Option<String>,

    /// The server's process id, to report its memory (idle) from /proc/PID/status.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// A Prometheus URL with process_resident_memory_bytes (the standard process collector's
    /// metric, which natter's /metrics exports), to report server memory (idle) of a server
    /// whose pid is not at hand, e.g. on another host.
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,

    /// Spread connections over this many source addresses 127.0.0.1… (loopback targets).
    #[arg(long, default_value_t = 32)]
    pub source_ips: u8,

    /// Seconds a client waits for any one answer before counting a timeout.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,

    /// storm: seconds of chat before the restart.
    #[arg(long, default_value_t = 2.0)]
    pub storm_after: f64,

    /// storm: milliseconds between one client's messages.
    #[arg(long, default_value_t = 1000)]
    pub storm_interval_ms: u64,

    /// storm: give up on clients not back this many seconds after the stop signal.
    #[arg(long, default_value_t = 60.0)]
    pub storm_timeout: f64,

    /// storm: kill the server with SIGKILL instead of SIGTERM (replies in flight are then lost
    /// by design: only a graceful restart promises them).
    #[arg(long)]
    pub storm_kill: bool,

    /// storm: restart by hand-over: start the new server on the same port (both run with
    /// --reuse-port) and SIGTERM the old one once the new one answers, so no connect is ever
    /// refused. Not with memory: (a new process would start empty).
    #[arg(long, conflicts_with = "storm_kill")]
    pub storm_handover: bool,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Everything a scenario needs.
pub struct Ctx {
    pub args: BenchArgs,
    pub target: Target,
    pub url: String,
    pub server_pid: Option<u32>,
    pub spawned: Option<Spawned>,
    pub progress: bool,
    pub timeout: Duration,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    server::raise_nofile_limit();
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.scenario == Scenario::Storm && !args.spawn {
        bail!("storm restarts the server, and the bench can only restart a server it started: add --spawn");
    }
    if args.scenario == Scenario::Fanout && args.tabs < 2 {
        bail!("fanout needs --tabs 2 or more");
    }
    let spawned = if args.spawn {
        let bin = match &args.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("finding this binary to spawn it")?,
        };
        let mut server_args = args.server_arg.clone();
        if args.scenario == Scenario::Storm && args.storm_handover {
            server_args.insert(0, "--reuse-port".into());
        }
        Some(Spawned::start(bin, &server_args, args.server_cpus.clone()).await?)
    } else {
        None
    };
    let url = match &spawned {
        Some(s) => format!("http://{}", s.addr),
        None => args.url.trim_end_matches('/').to_owned(),
    };
    let target = target_for(&url, args.source_ips).await?;
    let mut ctx = Ctx {
        server_pid: args.server_pid.or_else(|| spawned.as_ref().and_then(|s| s.pid())),
        progress: std::io::stderr().is_terminal() && !args.json,
        timeout: Duration::from_secs_f64(args.timeout),
        spawned,
        target,
        url,
        args,
    };
    let report = scenarios::run(&mut ctx).await?;
    let json = ctx.args.json;
    drop(ctx); // stops a spawned server
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn target_for(url: &str, source_ips: u8) -> anyhow::Result<Target> {
    let u = reqwest::Url::parse(url).with_context(|| format!("--url {url}"))?;
    let ws_scheme = match u.scheme() {
        "http" | "ws" => "ws",
        other => bail!("--url: the bench speaks plain http/ws to measure the server, not {other}"),
    };
    let host = u.host_str().ok_or_else(|| anyhow!("--url has no host"))?;
    let port = u.port_or_known_default().unwrap_or(80);
    let addr: SocketAddr = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} resolves to nothing"))?;
    let host_port = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    Ok(Target { ws_base: format!("{ws_scheme}://{host_port}"), addr, source_ips })
}

/// The conversations a run needs: `conversations` distinct (user, bot) pairs, at most
/// `per_user` sockets per user when each conversation has `tabs` sockets.
pub async fn identities(ctx: &Ctx, conversations: usize, tabs: usize) -> anyhow::Result<Vec<Ident>> {
    let spawned = ctx.spawned.is_some();
    let per_user = ctx.args.conns_per_user.unwrap_or(if spawned { 1000 } else { 20 });
    let convs_per_user = (per_user / tabs.max(1)).max(1);
    let users = conversations.div_ceil(convs_per_user);
    if let Some(secret) = &ctx.args.jwt_secret {
        return Ok(mint(secret, conversations, convs_per_user));
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let tokens: Vec<String> = match &ctx.args.token {
        Some(t) => vec![t.clone(); 1],
        None => {
            let run = &Uuid::new_v4().simple().to_string()[..8];
            stream::iter(0..users)
                .map(|u| register(&http, &ctx.url, format!("bench-{run}-{u}")))
                .buffered(8)
                .try_collect()
                .await?
        }
    };
    let bots: Vec<Uuid> = stream::iter(0..conversations)
        .map(|c| {
            let token = tokens[(c / convs_per_user) % tokens.len()].clone();
            create_bot(&http, &ctx.url, token, c)
        })
        .buffered(32)
        .try_collect()
        .await?;
    Ok(bots
        .into_iter()
        .enumerate()
        .map(|(c, bot_id)| Ident { token: tokens[(c / convs_per_user) % tokens.len()].clone(), bot_id })
        .collect())
}

async fn register(http: &reqwest::Client, base: &str, username: String) -> anyhow::Result<String> {
    let password = format!("pw-{}", Uuid::new_v4().simple());
    let creds = serde_json::json!({"username": username, "password": password});
    let r = http.post(format!("{base}/api/auth/register")).json(&creds).send().await?;
    if !r.status().is_success() {
        bail!("registering {username}: HTTP {} {}", r.status(), r.text().await.unwrap_or_default());
    }
    let r = http.post(format!("{base}/api/auth/login")).json(&creds).send().await?;
    if !r.status().is_success() {
        bail!("logging in {username}: HTTP {}", r.status());
    }
    Ok(r.json::<TokenPair>().await?.access_token)
}

async fn create_bot(http: &reqwest::Client, base: &str, token: String, c: usize) -> anyhow::Result<Uuid> {
    let body = serde_json::json!({"name": format!("bench echo {c}"), "engine": {"kind": "echo"}});
    let r = http.post(format!("{base}/api/bots")).bearer_auth(token).json(&body).send().await?;
    if !r.status().is_success() {
        bail!("creating a bot: HTTP {} {}", r.status(), r.text().await.unwrap_or_default());
    }
    Ok(r.json::<BotView>().await?.id)
}

/// Tokens for the peers: the claims natter's access tokens carry, signed with a shared secret.
fn mint(secret: &str, conversations: usize, convs_per_user: usize) -> Vec<Ident> {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let key = EncodingKey::from_secret(secret.as_bytes());
    let now = chrono::Utc::now().timestamp();
    let users = conversations.div_ceil(convs_per_user);
    let tokens: Vec<String> = (0..users)
        .map(|u| {
            let claims =
                serde_json::json!({"sub": Uuid::new_v4(), "name": format!("bench-{u}"), "iat": now, "exp": now + 86_400});
            encode(&Header::default(), &claims, &key).expect("HS256 signing cannot fail")
        })
        .collect();
    (0..conversations).map(|c| Ident { token: tokens[c / convs_per_user].clone(), bot_id: Uuid::new_v4() }).collect()
}
