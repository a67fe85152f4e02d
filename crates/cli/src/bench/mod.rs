//! `natter bench`: load scenarios against a natter server, or anything speaking its chat
//! protocol (the peers in `bench/peers/`). Every reply is checked (content and seq), errors are
//! counted by kind, latencies go into HDR histograms; a table or `--json` at the end. Several
//! scenarios can run in order against one server, and `--users` × `--bots` lays the
//! conversations out as many users chatting with many public bots.

mod conn;
mod report;
mod scenarios;
mod server;
mod sse;

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

use conn::{Ident, Target, Transport};
use report::{Report, SetupReport};
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

/// One step of a run: a scenario, and the sizes it overrides (`idle:c=10000,d=3`).
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub scenario: Scenario,
    pub connections: Option<usize>,
    pub duration: Option<f64>,
    pub warmup: Option<f64>,
    pub concurrency: Option<usize>,
    pub tabs: Option<usize>,
}

fn parse_step(s: &str) -> Result<Step, String> {
    let (name, sizes) = s.split_once(':').unwrap_or((s, ""));
    let scenario = Scenario::from_str(name, true).map_err(|_| {
        let names: Vec<_> = Scenario::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|v| v.get_name().to_owned())
            .collect();
        format!("unknown scenario {name:?} (one of {})", names.join(", "))
    })?;
    let mut step = Step { scenario, connections: None, duration: None, warmup: None, concurrency: None, tabs: None };
    for kv in sizes.split(',').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("{kv:?}: expected KEY=VALUE"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{k}={v}: {e}");
        match k {
            "c" | "connections" => step.connections = Some(v.parse().map_err(|e| bad(&e))?),
            "d" | "duration" => step.duration = Some(v.parse().map_err(|e| bad(&e))?),
            "warmup" => step.warmup = Some(v.parse().map_err(|e| bad(&e))?),
            "concurrency" => step.concurrency = Some(v.parse().map_err(|e| bad(&e))?),
            "tabs" => step.tabs = Some(v.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown key {k:?} (c, d, warmup, concurrency, tabs)")),
        }
    }
    Ok(step)
}

/// Measure a natter server (or a peer speaking its chat protocol).
///
/// Creates its own users and echo bots through the REST API (or mints tokens with
/// --jwt-secret for the peers in bench/peers/). A natter server limits each user to 20 sockets
/// and each socket to 5 messages/s by default: the bench spreads conversations over enough users
/// (--conns-per-user), but for chat at full speed start the server with
/// --messages-per-second/--message-burst raised, or use --spawn, which does so.
///
/// Several scenarios run in order against the same server process, each with its own sizes:
/// `natter bench connect:d=5 idle:c=10000,d=3 chat:c=1000,d=10 --users 100 --bots 100` serves
/// connects, then holds 10 000 idle sockets, then chats on a server that already holds 10 000
/// conversations. The JSON report is then an array, one object per scenario.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure: connect, idle, chat, fanout or storm; several run in order against the
    /// same server. A scenario may set its own sizes after a colon, overriding the flags below:
    /// c (connections), d (duration), warmup, concurrency, tabs — e.g. chat:c=1000,d=10,warmup=2.
    #[arg(value_name = "SCENARIO[:KEY=VALUE,…]", value_parser = parse_step, required = true, num_args = 1..)]
    pub steps: Vec<Step>,

    /// Lay the conversations out as this many users (needs --bots), each chatting with each of
    /// --bots public echo bots owned by one more user: conversation k is user k / bots with bot
    /// k % bots, and every scenario uses the first conversations of that grid. Users and bots
    /// are made once, before the first scenario; the report says the server's memory before and
    /// after (--server-pid or --spawn).
    #[arg(long, value_name = "N", requires = "bots", conflicts_with_all = ["token", "conns_per_user"])]
    pub users: Option<usize>,

    /// Public echo bots in the --users layout.
    #[arg(long, value_name = "N", requires = "users")]
    pub bots: Option<usize>,

    /// How the clients chat: ws (one WebSocket per connection) or sse (HTTP streaming, the
    /// fallback: an event stream per connection, the client's frames by POST on a kept-alive
    /// second connection). connect, idle, chat and fanout run on either; storm on ws.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,

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
    /// The flags, with the running step's sizes in place.
    pub args: BenchArgs,
    /// The running step's scenario.
    pub scenario: Scenario,
    /// The --users × --bots layout, made before the first step.
    pub grid: Option<Grid>,
    pub target: Target,
    pub url: String,
    pub server_pid: Option<u32>,
    pub spawned: Option<Spawned>,
    pub progress: bool,
    pub timeout: Duration,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    server::raise_nofile_limit();
    for step in &args.steps {
        let (conns, tabs) = (step.connections.unwrap_or(args.connections), step.tabs.unwrap_or(args.tabs));
        if conns == 0 {
            bail!("{:?}: connections must be at least 1", step.scenario);
        }
        if step.scenario == Scenario::Storm && args.transport == Transport::Sse {
            bail!("storm runs on --transport ws only");
        }
        if step.scenario == Scenario::Storm && !args.spawn {
            bail!("storm restarts the server, and the bench can only restart a server it started: add --spawn");
        }
        if step.scenario == Scenario::Fanout && tabs < 2 {
            bail!("fanout needs --tabs 2 or more");
        }
    }
    if args.users == Some(0) || args.bots == Some(0) {
        bail!("--users and --bots must be at least 1");
    }
    let spawned = if args.spawn {
        let bin = match &args.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("finding this binary to spawn it")?,
        };
        let mut server_args = args.server_arg.clone();
        if args.storm_handover && args.steps.iter().any(|s| s.scenario == Scenario::Storm) {
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
    let target = target_for(&url, args.source_ips, args.transport).await?;
    let mut ctx = Ctx {
        server_pid: args.server_pid.or_else(|| spawned.as_ref().and_then(|s| s.pid())),
        progress: std::io::stderr().is_terminal() && !args.json,
        timeout: Duration::from_secs_f64(args.timeout),
        scenario: args.steps[0].scenario,
        grid: None,
        spawned,
        target,
        url,
        args,
    };
    let setup = match (ctx.args.users, ctx.args.bots) {
        (Some(users), Some(bots)) => Some(make_grid(&mut ctx, users, bots).await?),
        _ => None,
    };
    let steps = ctx.args.steps.clone();
    let defaults = (ctx.args.connections, ctx.args.duration, ctx.args.warmup, ctx.args.concurrency, ctx.args.tabs);
    let mut reports: Vec<Report> = Vec::new();
    for step in &steps {
        ctx.scenario = step.scenario;
        ctx.args.connections = step.connections.unwrap_or(defaults.0);
        ctx.args.duration = step.duration.unwrap_or(defaults.1);
        ctx.args.warmup = step.warmup.unwrap_or(defaults.2);
        ctx.args.concurrency = step.concurrency.unwrap_or(defaults.3);
        ctx.args.tabs = step.tabs.unwrap_or(defaults.4);
        reports.push(scenarios::run(&mut ctx).await?);
    }
    reports[0].setup = setup;
    let json = ctx.args.json;
    drop(ctx); // stops a spawned server
    if json {
        let out = match reports.as_slice() {
            [one] => serde_json::to_string_pretty(one)?,
            all => serde_json::to_string_pretty(all)?,
        };
        println!("{out}");
    } else {
        let tables: Vec<String> = reports.iter().map(Report::table).collect();
        print!("{}", tables.join("\n"));
    }
    Ok(if reports.iter().all(Report::ok) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn target_for(url: &str, source_ips: u8, transport: Transport) -> anyhow::Result<Target> {
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
    Ok(Target { ws_base: format!("{ws_scheme}://{host_port}"), authority: host_port, transport, addr, source_ips })
}

/// The `--users` × `--bots` layout: `tokens[u]` chats with `bots[b]`, conversation
/// `u * bots.len() + b`.
pub struct Grid {
    tokens: Vec<String>,
    bots: Vec<Uuid>,
}

impl Grid {
    /// The first `n` conversations of the grid, user by user.
    fn first(&self, n: usize) -> anyhow::Result<Vec<Ident>> {
        let (users, bots) = (self.tokens.len(), self.bots.len());
        if n > users * bots {
            bail!("{n} conversations asked, but --users {users} × --bots {bots} has only {}", users * bots);
        }
        Ok((0..n).map(|k| Ident { token: self.tokens[k / bots].clone(), bot_id: self.bots[k % bots] }).collect())
    }
}

/// Makes the `--users` × `--bots` layout: logs the users in and creates the public bots (or
/// mints tokens and bot ids for the peers), with the server's memory before and after.
async fn make_grid(ctx: &mut Ctx, users: usize, bots: usize) -> anyhow::Result<SetupReport> {
    let t0 = std::time::Instant::now();
    let rss_before = scenarios::server_rss(ctx).await;
    let grid = match &ctx.args.jwt_secret {
        Some(secret) => Grid {
            tokens: (0..users).map(|u| mint_token(secret, u)).collect(),
            bots: (0..bots).map(|_| Uuid::new_v4()).collect(),
        },
        None => {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
            let run = &Uuid::new_v4().simple().to_string()[..8];
            let owner = register(&http, &ctx.url, format!("bench-{run}-owner")).await?;
            let tokens = stream::iter(0..users)
                .map(|u| register(&http, &ctx.url, format!("bench-{run}-{u}")))
                .buffered(8)
                .try_collect()
                .await?;
            let bots = stream::iter(0..bots)
                .map(|b| create_bot(&http, &ctx.url, owner.clone(), b, "public"))
                .buffered(32)
                .try_collect()
                .await?;
            Grid { tokens, bots }
        }
    };
    ctx.grid = Some(grid);
    // Let the setup's allocations settle, as idle does before its baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(SetupReport {
        users,
        bots,
        duration_s: t0.elapsed().as_secs_f64(),
        server_rss_before_kib: rss_before,
        server_rss_after_kib: scenarios::server_rss(ctx).await,
    })
}

/// The conversations a run needs: the first `conversations` of the `--users` × `--bots` grid,
/// or else `conversations` distinct (user, bot) pairs, at most `per_user` sockets per user when
/// each conversation has `tabs` sockets, each bot private to its user.
pub async fn identities(ctx: &Ctx, conversations: usize, tabs: usize) -> anyhow::Result<Vec<Ident>> {
    if let Some(grid) = &ctx.grid {
        return grid.first(conversations);
    }
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
            create_bot(&http, &ctx.url, token, c, "private")
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

async fn create_bot(
    http: &reqwest::Client,
    base: &str,
    token: String,
    c: usize,
    visibility: &str,
) -> anyhow::Result<Uuid> {
    let body =
        serde_json::json!({"name": format!("bench echo {c}"), "visibility": visibility, "engine": {"kind": "echo"}});
    let r = http.post(format!("{base}/api/bots")).bearer_auth(token).json(&body).send().await?;
    if !r.status().is_success() {
        bail!("creating a bot: HTTP {} {}", r.status(), r.text().await.unwrap_or_default());
    }
    Ok(r.json::<BotView>().await?.id)
}

/// A token for the peers: the claims natter's access tokens carry, signed with a shared secret.
fn mint_token(secret: &str, user: usize) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let now = chrono::Utc::now().timestamp();
    let claims =
        serde_json::json!({"sub": Uuid::new_v4(), "name": format!("bench-{user}"), "iat": now, "exp": now + 86_400});
    encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("HS256 signing cannot fail")
}

/// Tokens and bot ids for the peers, `convs_per_user` conversations per user.
fn mint(secret: &str, conversations: usize, convs_per_user: usize) -> Vec<Ident> {
    let users = conversations.div_ceil(convs_per_user);
    let tokens: Vec<String> = (0..users).map(|u| mint_token(secret, u)).collect();
    (0..conversations).map(|c| Ident { token: tokens[c / convs_per_user].clone(), bot_id: Uuid::new_v4() }).collect()
}

/// How many distinct users and bots these conversations span.
pub fn spread(idents: &[Ident]) -> (usize, usize) {
    let users: std::collections::HashSet<&str> = idents.iter().map(|i| i.token.as_str()).collect();
    let bots: std::collections::HashSet<Uuid> = idents.iter().map(|i| i.bot_id).collect();
    (users.len(), bots.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_with_their_sizes() {
        let s = parse_step("idle:c=10000,d=3").unwrap();
        assert_eq!((s.scenario, s.connections, s.duration, s.warmup), (Scenario::Idle, Some(10000), Some(3.0), None));
        let s = parse_step("chat").unwrap();
        assert_eq!((s.scenario, s.connections), (Scenario::Chat, None));
        let s = parse_step("fanout:tabs=3,concurrency=8,warmup=0.5").unwrap();
        assert_eq!((s.tabs, s.concurrency, s.warmup), (Some(3), Some(8), Some(0.5)));
        assert!(parse_step("chatty").unwrap_err().contains("unknown scenario"));
        assert!(parse_step("chat:x=1").unwrap_err().contains("unknown key"));
        assert!(parse_step("chat:c").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_step("chat:c=many").unwrap_err().starts_with("c=many"));
    }

    #[test]
    fn the_grid_goes_user_by_user_over_every_bot() {
        let grid =
            Grid { tokens: (0..3).map(|u| format!("u{u}")).collect(), bots: (0..4).map(|_| Uuid::new_v4()).collect() };
        let first = grid.first(6).unwrap();
        assert_eq!(spread(&first), (2, 4));
        assert_eq!((first[3].token.as_str(), first[3].bot_id), ("u0", grid.bots[3]));
        assert_eq!((first[4].token.as_str(), first[4].bot_id), ("u1", grid.bots[0]));
        let all = grid.first(12).unwrap();
        let pairs: std::collections::HashSet<_> = all.iter().map(|i| (i.token.clone(), i.bot_id)).collect();
        assert_eq!((pairs.len(), spread(&all)), (12, (3, 4)));
        assert!(grid.first(13).unwrap_err().to_string().contains("has only 12"));
    }
}
