//! The steps as one typed pipeline, in [`Stage`] order. Each step takes what the steps before
//! it found and hands on what it finds:
//!
//! url → [`Target`](super::net::Target) → dns → addresses → tcp → a connection → tls → the HTTP client ([`Api`])
//! → health → [`Server`] → cors; token → [`Identity`] → bot → [`BotChoice`] → handshake →
//! the upgraded connection → established → the chat [`Socket`] → ping → watch → send; then the
//! HTTP streaming transport (SSE), the clients' fallback: sse_stream → the open event stream →
//! sse_ping; ledger.
//!
//! Up to health a failed step stops the run ([`Gate`]): every step after it is reported as
//! skipped with the reason. After health nothing stops the run; a step that lacks what it
//! needs (no user, no bot, no socket) reports itself skipped and says why.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use uuid::Uuid;

use super::account::{self, BotChoice, Identity};
use super::handshake;
use super::http::{self, Api, Server};
use super::ledger;
use super::net::Tls;
use super::network;
use super::report::{Report, Step};
use super::socket::{self, Socket};
use super::sse;
use super::stage::Stage;
use super::traffic;
use super::DoctorArgs;

/// Why the steps after a failed network step cannot run; each of their lines says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Blocked(pub String);

/// The outcome of a step that can stop the run: its line in the report, and what it hands on
/// to the next step or why the steps after it cannot run.
pub(super) type Gate<T> = (Step, Result<T, Blocked>);

/// A step that passed and hands `next` on.
pub(super) fn pass<T>(step: Step, next: T) -> Gate<T> {
    (step, Ok(next))
}

/// A step that failed so that the network steps after it are pointless.
pub(super) fn stop<T>(step: Step, why: &str) -> Gate<T> {
    (step, Err(Blocked(why.to_owned())))
}

/// What the run starts from. Nothing in it changes while the steps run.
pub(super) struct Settings {
    pub args: DoctorArgs,
    pub timeout: Duration,
    /// The TLS settings, or why they could not be made (reported by the tls step, for https).
    pub tls: Result<Tls, String>,
    /// Sent as `attempt_id`, so this run's attempt can be found in the ledger.
    pub attempt_id: Uuid,
    /// Show which step runs on stderr (when it is a terminal).
    pub progress: bool,
}

/// What a finished run hands back for printing.
pub(super) struct Finished {
    pub report: Report,
    /// The server's base URL as the url step read it (absent when it could not).
    pub base: Option<String>,
    /// The bot the socket steps used.
    pub bot: Option<Uuid>,
    /// Secrets the steps obtained (the token from a login, the socket's ticket), to redact.
    pub secrets: Vec<String>,
}

/// Runs every step in order and returns the report.
pub(super) async fn run(settings: &Settings) -> Finished {
    let mut run = Run { report: Report::new(), progress: settings.progress };
    let mut found = Finished { report: Report::new(), base: None, bot: None, secrets: Vec::new() };
    if let Err(why) = network_steps(settings, &mut run, &mut found).await {
        run.skip_rest(&why);
    }
    run.clear_progress();
    found.report = run.report;
    found
}

/// The steps up to health, each of which can stop the run; then the rest.
async fn network_steps(s: &Settings, run: &mut Run, found: &mut Finished) -> Result<(), Blocked> {
    let target = run.gate(Stage::Url, async { network::url(&s.args.base_url) }).await?;
    found.base = Some(target.http_base());
    let addrs = run.gate(Stage::Dns, network::dns(&target, s.timeout)).await?;
    let tcp = run.gate(Stage::Tcp, network::tcp(&addrs, s.timeout)).await?;
    let link = run.gate(Stage::Tls, network::tls(&target, tcp, &s.tls, s.timeout)).await?;
    let api = Api { target, addrs, http: link.http, tls: link.tls, timeout: s.timeout };
    let server = run.gate(Stage::Health, http::health(&api)).await?;
    chat_steps(s, run, found, &api, &server).await;
    Ok(())
}

/// The steps after health, which never stop the run.
async fn chat_steps(s: &Settings, run: &mut Run, found: &mut Finished, api: &Api, server: &Server) {
    let args = &s.args;
    run.step(Stage::Cors, http::cors(api, args.origin.as_deref(), args.bot.as_deref())).await;
    let user: Identity = run.hand(Stage::Token, account::token(api, args, server.skew)).await;
    found.secrets.extend(user.token().map(str::to_owned));
    let bot: BotChoice = run.hand(Stage::Bot, account::bot(api, args.bot.as_deref(), &user, &server.registry)).await;
    found.bot = bot.id;
    let upgrade =
        run.hand(Stage::Handshake, handshake::step(api, &user, &bot, args.origin.as_deref(), s.attempt_id)).await;
    found.secrets.extend(upgrade.ticket);
    let established = socket::established(api, args, &server.registry, &user, &bot, upgrade.socket);
    let sock: Socket = run.hand(Stage::Established, established).await;
    let sock = run.hand(Stage::Ping, traffic::ping(api.timeout, &server.registry, sock)).await;
    let sock = run.hand(Stage::Watch, traffic::watch(&server.registry, sock, args.watch)).await;
    let sock = run.hand(Stage::Send, traffic::send(api.timeout, &server.registry, sock, args.send)).await;
    let sse = run.hand(Stage::SseStream, sse::stream(api, args, &server.registry, &user, &bot)).await;
    found.secrets.extend(sse.ticket);
    run.step(Stage::SsePing, sse::ping(api, args, &user, sse.stream)).await;
    run.step(Stage::Ledger, ledger::step(api, server, &user, bot.id, sock, s.attempt_id)).await;
}

/// The report being written, one step after the other.
struct Run {
    report: Report,
    progress: bool,
}

impl Run {
    /// Adds a step's line; steps come in [`Stage`] order, each once.
    fn record(&mut self, stage: Stage, step: Step) {
        debug_assert_eq!(step.name, stage.name(), "a step reports under its own name");
        debug_assert_eq!(self.report.steps.len(), stage as usize, "steps run in order");
        self.report.push(step);
    }

    async fn step(&mut self, stage: Stage, step: impl Future<Output = Step>) {
        self.show_progress(stage);
        let step = step.await;
        self.record(stage, step);
    }

    /// Runs a step that hands something on to the steps after it.
    async fn hand<T>(&mut self, stage: Stage, step: impl Future<Output = (Step, T)>) -> T {
        self.show_progress(stage);
        let (step, next) = step.await;
        self.record(stage, step);
        next
    }

    /// Runs a step that can stop the run.
    async fn gate<T>(&mut self, stage: Stage, step: impl Future<Output = Gate<T>>) -> Result<T, Blocked> {
        self.hand(stage, step).await
    }

    /// Reports every step that has not run as skipped, for the reason the run stopped.
    fn skip_rest(&mut self, why: &Blocked) {
        for stage in Stage::ALL.into_iter().skip(self.report.steps.len()) {
            self.show_progress(stage);
            self.record(stage, Step::skipped(stage.name(), why.0.clone()));
        }
    }

    fn show_progress(&self, stage: Stage) {
        if self.progress {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K[{}/{}] {}…", stage as usize + 1, Stage::ALL.len(), stage.name());
            let _ = err.flush();
        }
    }

    fn clear_progress(&self) {
        if self.progress {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::report::Status;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn args(base_url: &str) -> DoctorArgs {
        DoctorArgs {
            base_url: base_url.to_owned(),
            bot: None,
            token: None,
            username: None,
            password: None,
            origin: None,
            watch: None,
            send: false,
            json: true,
            timeout: 5,
            ca_file: None,
        }
    }

    async fn run_against(base_url: &str) -> Finished {
        let settings = Settings {
            args: args(base_url),
            timeout: Duration::from_secs(5),
            tls: Tls::new(None),
            attempt_id: Uuid::new_v4(),
            progress: false,
        };
        run(&settings).await
    }

    /// A fake server on 127.0.0.1 that answers each request (one per connection) with
    /// `answer(path)`: a status line with its reason, a content type and a body.
    async fn fake_server(answer: fn(&str) -> (&'static str, &'static str, String)) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let (status, content_type, body) = answer(&path);
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    fn names_and_statuses(report: &Report) -> Vec<(&'static str, Status)> {
        report.steps.iter().map(|s| (s.name, s.status)).collect()
    }

    /// Every step after `stopped_at` is skipped, and says why.
    fn assert_skipped_after(report: &Report, stopped_at: Stage, why: &str) {
        let names: Vec<&str> = report.steps.iter().map(|s| s.name).collect();
        assert_eq!(names, Stage::ALL.map(Stage::name), "every step is reported, in order");
        assert_eq!(report.steps[stopped_at as usize].status, Status::Fail, "{:?}", report.steps);
        for step in &report.steps[stopped_at as usize + 1..] {
            assert_eq!((step.status, step.detail.as_str()), (Status::Skipped, why), "{}", step.name);
        }
        assert_eq!(report.exit_code(), 1);
    }

    #[tokio::test]
    async fn a_url_that_cannot_be_read_skips_every_later_step() {
        let found = run_against("gopher://example.com").await;
        assert_skipped_after(&found.report, Stage::Url, "the base URL could not be read");
        assert!(found.report.steps[0].detail.contains("unsupported scheme gopher://"), "{:?}", found.report.steps[0]);
        assert_eq!(found.base, None);
    }

    #[tokio::test]
    async fn a_server_that_is_not_natter_stops_the_run_at_health() {
        let base = fake_server(|_| ("404 Not Found", "text/plain", "no such page".into())).await;
        let found = run_against(&base).await;
        assert_eq!(
            names_and_statuses(&found.report)[..5],
            [
                ("url", Status::Ok),
                ("dns", Status::Ok),
                ("tcp", Status::Ok),
                ("tls", Status::Skipped),
                ("health", Status::Fail)
            ]
        );
        assert_skipped_after(&found.report, Stage::Health, "the HTTP API does not answer as natter (health failed)");
        assert_eq!(found.base.as_deref(), Some(base.as_str()));
    }

    #[tokio::test]
    async fn after_health_nothing_stops_the_run_and_each_step_says_what_it_lacks() {
        // natter's health answers, but it is not ready, and nothing passes WebSockets.
        let base = fake_server(|path| match path {
            "/api/health" => ("200 OK", "application/json", r#"{"status": "ok", "version": "9.9.9"}"#.into()),
            "/api/ready" => (
                "503 Service Unavailable",
                "application/json",
                r#"{"status": "unavailable", "failed": ["store: disk full"]}"#.into(),
            ),
            _ => ("404 Not Found", "text/plain", "no such page".into()),
        })
        .await;
        let found = run_against(&base).await;
        let report = &found.report;
        let detail = |name: &str| report.steps.iter().find(|s| s.name == name).unwrap().detail.clone();
        assert_eq!(
            names_and_statuses(report)[4..],
            [
                ("health", Status::Fail),
                ("cors", Status::Skipped),
                ("token", Status::Skipped),
                ("bot", Status::Skipped),
                ("handshake", Status::Fail),
                ("established", Status::Skipped),
                ("ping", Status::Skipped),
                ("watch", Status::Skipped),
                ("send", Status::Skipped),
                ("sse_stream", Status::Skipped),
                ("sse_ping", Status::Skipped),
                ("ledger", Status::Skipped),
            ]
        );
        assert!(detail("health").contains("store: disk full"), "{}", detail("health"));
        assert!(detail("health").contains("using this doctor's copy"), "{}", detail("health"));
        assert!(detail("bot").starts_with("needs a user"), "{}", detail("bot"));
        assert!(detail("handshake").contains("404 Not Found instead of 101"), "{}", detail("handshake"));
        assert_eq!(detail("established"), "the WebSocket upgrade did not succeed (handshake step)");
        assert_eq!(detail("ping"), "no open chat socket (the established step did not pass)");
        assert!(detail("watch").starts_with("pass --watch"), "{}", detail("watch"));
        assert!(detail("send").starts_with("pass --send"), "{}", detail("send"));
        assert!(detail("sse_stream").starts_with("needs a user"), "{}", detail("sse_stream"));
        assert_eq!(detail("sse_ping"), "no open event stream (the sse_stream step did not pass)");
        assert_eq!(detail("ledger"), "needs a valid token");
        assert_eq!(found.bot, None);
        assert!(found.secrets.is_empty());
    }
}
