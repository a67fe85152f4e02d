//! `natter doctor`: the seed's debugging steps as one command. It walks the layers a chat
//! connection goes through — URL, DNS, TCP, TLS, the HTTP API, CORS, the token, the bot,
//! the WebSocket upgrade, admission, pings, idling, a message round trip, the HTTP streaming
//! transport (SSE) the clients fall back to, the server's connection ledger — and names the
//! first one that is broken, with the likely cause and the fix; when only the WebSocket is
//! blocked and SSE works, it says so (exit 3). `--json` prints the same report as one document.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use uuid::Uuid;

mod account;
mod handshake;
mod http;
mod jwt;
mod ledger;
mod net;
mod network;
mod pipeline;
mod report;
mod socket;
mod sse;
mod stage;
mod traffic;

use net::Tls;
use pipeline::{Finished, Settings};

/// Check every layer between this machine and a natter server's chat — the WebSocket and the
/// HTTP streaming (SSE) fallback — and name the one that is broken. Exit status: 0 all passed
/// (warnings allowed), 1 a step failed, 2 bad usage, 3 the WebSocket is blocked on the way but
/// chat works over HTTP streaming (SSE), which natter's clients fall back to by themselves.
#[derive(Args)]
pub struct DoctorArgs {
    /// The server's base URL as a browser reaches it: http(s)://host[:port][/prefix]
    /// (ws:// and wss:// work too).
    #[arg(value_name = "BASE_URL")]
    pub base_url: String,

    /// The bot to chat with (its id). Without it, the first bot this user can chat with.
    #[arg(long, value_name = "ID")]
    pub bot: Option<String>,

    /// An access token (from POST /api/auth/login). It is never printed.
    #[arg(long, value_name = "T", conflicts_with_all = ["username", "password"])]
    pub token: Option<String>,

    /// Log in with this username first (with --password).
    #[arg(long, value_name = "U", requires = "password")]
    pub username: Option<String>,

    /// The password for --username. It is never printed.
    #[arg(long, value_name = "P", requires = "username")]
    pub password: Option<String>,

    /// The web page's origin (e.g. https://app.example.com): is it allowed for the API and
    /// the socket?
    #[arg(long, value_name = "O")]
    pub origin: Option<String>,

    /// Hold the socket idle this long and report if and when it dies (proxy idle timeouts).
    #[arg(long, value_name = "SECS")]
    pub watch: Option<u64>,

    /// Send a test message and wait for the ack and the bot's reply (it stays in the history).
    #[arg(long)]
    pub send: bool,

    /// Print the report as one JSON document: {"ok", "verdict" ("ok", "websocket_blocked" or
    /// "fail"), "steps": [{"name", "status", "detail", "cause", "fix"}]}.
    #[arg(long)]
    pub json: bool,

    /// Seconds to wait for each network answer.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub timeout: u64,

    /// Also trust the CA certificates in this PEM file (a private CA, a self-signed server).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

/// One row of the server's close-code registry (`GET /api/ws/codes`).
#[derive(Debug, Clone, Deserialize)]
struct CloseInfo {
    code: u16,
    name: String,
    #[serde(default)]
    retry: String,
    description: String,
}

#[derive(Debug, Clone, Deserialize)]
struct ErrorInfo {
    code: String,
    description: String,
}

/// The server's code registry: close codes and error codes with their explanations.
#[derive(Debug, Clone, Default, Deserialize)]
struct Registry {
    #[serde(default)]
    close_codes: Vec<CloseInfo>,
    #[serde(default)]
    error_codes: Vec<ErrorInfo>,
    /// True when this came from the server, false for the doctor's built-in copy.
    #[serde(skip)]
    from_server: bool,
}

impl Registry {
    /// The copy compiled into this binary, for servers that do not serve one.
    fn builtin() -> Registry {
        let r = natter_proto::codes::CodeRegistry::build();
        let retry = |p: natter_proto::RetryPolicy| {
            serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
        };
        Registry {
            close_codes: r
                .close_codes
                .iter()
                .map(|c| CloseInfo {
                    code: c.code,
                    name: c.name.to_owned(),
                    retry: retry(c.retry),
                    description: c.description.to_owned(),
                })
                .collect(),
            error_codes: r
                .error_codes
                .iter()
                .map(|e| ErrorInfo { code: e.code.to_owned(), description: e.description.to_owned() })
                .collect(),
            from_server: false,
        }
    }

    fn close(&self, code: u16) -> Option<&CloseInfo> {
        self.close_codes.iter().find(|c| c.code == code)
    }

    fn error(&self, code: &str) -> Option<&ErrorInfo> {
        self.error_codes.iter().find(|c| c.code == code)
    }

    /// `4403 forbidden` (or just the number for a code the registry does not know).
    fn close_name(&self, code: u16) -> String {
        match self.close(code) {
            Some(c) => format!("{code} {}", c.name),
            None => code.to_string(),
        }
    }

    /// The cause and the fix for a close code, from the registry's description: its first
    /// sentence says what happened, the rest what to do.
    fn explain_close(&self, code: u16, reason: &str) -> (String, String) {
        let said = if reason.is_empty() { String::new() } else { format!(" The server said: \"{reason}\".") };
        match self.close(code) {
            Some(info) => {
                let (what, todo) = split_advice(&info.description);
                let retry =
                    if info.retry.is_empty() { String::new() } else { format!(" (retry policy: {})", info.retry) };
                (format!("{what}{said}"), format!("{todo}{retry}").trim().to_owned())
            }
            None => (
                format!("close code {code} is not in the server's code registry.{said}"),
                "see docs/protocol.md, or the server log around this time".to_owned(),
            ),
        }
    }
}

/// Splits "What happened. What to do." at the first sentence end.
fn split_advice(description: &str) -> (String, String) {
    match description.find(". ") {
        Some(i) => (description[..=i].trim().to_owned(), description[i + 1..].trim().to_owned()),
        None => (description.trim().to_owned(), String::new()),
    }
}

/// Runs every step and prints the report. Returns the process's exit status.
pub async fn run(args: DoctorArgs) -> ExitCode {
    let tls = match tls_settings(args.ca_file.as_deref()) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("natter doctor: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = Settings {
        timeout: Duration::from_secs(args.timeout),
        args,
        tls,
        attempt_id: Uuid::new_v4(),
        progress: std::io::stderr().is_terminal(),
    };
    let finished = pipeline::run(&settings).await;
    print(finished, &settings.args)
}

/// The TLS settings, with the roots of `--ca-file` when given. A bad `--ca-file` is a usage
/// error; without one, the error is kept for the tls step to report (for https only).
fn tls_settings(ca_file: Option<&std::path::Path>) -> Result<Result<Tls, String>, String> {
    let extra_ca = match ca_file {
        None => None,
        Some(path) => Some(std::fs::read(path).map_err(|e| format!("cannot read --ca-file {}: {e}", path.display()))?),
    };
    match Tls::new(extra_ca.as_deref()) {
        Err(e) if ca_file.is_some() => Err(e),
        tls => Ok(tls),
    }
}

/// Prints the report (its secrets redacted) as text or JSON; returns the exit status.
fn print(finished: Finished, args: &DoctorArgs) -> ExitCode {
    let Finished { mut report, base, bot, secrets: found } = finished;
    let secrets: Vec<String> = [args.token.clone(), args.password.clone()].into_iter().flatten().chain(found).collect();
    report.redact(&secrets.iter().map(String::as_str).collect::<Vec<_>>());
    let mut out = std::io::stdout().lock();
    if args.json {
        let _ = writeln!(out, "{}", report.to_json());
    } else {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let mut title = base.unwrap_or_else(|| args.base_url.clone());
        if let Some(bot) = bot {
            title.push_str(&format!(" (bot {bot})"));
        }
        let _ = write!(out, "{}", report.render_text(&title, colour));
    }
    let _ = out.flush();
    ExitCode::from(report.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_are_explained_from_the_registry() {
        let r = Registry::builtin();
        let (cause, fix) = r.explain_close(4403, "this bot is private and not shared with you");
        assert!(cause.starts_with("This user is not allowed to chat with this bot."), "{cause}");
        assert!(cause.contains("The server said: \"this bot is private and not shared with you\""), "{cause}");
        assert!(fix.starts_with("Ask the bot's owner to share it."), "{fix}");
        assert!(fix.contains("retry policy: stop"), "{fix}");
        assert_eq!(r.close_name(4401), "4401 unauthorized");
        assert_eq!(r.close_name(4999), "4999");
        let (cause, _) = r.explain_close(4999, "");
        assert!(cause.contains("not in the server's code registry"));
    }

    #[test]
    fn registry_parses_what_the_server_serves() {
        let served = serde_json::to_string(&natter_proto::codes::CodeRegistry::build()).unwrap();
        let r: Registry = serde_json::from_str(&served).unwrap();
        assert_eq!(r.close_codes.len(), natter_proto::CloseCode::ALL.len());
        assert_eq!(r.close(4408).unwrap().name, "heartbeat_timeout");
        assert_eq!(r.close(4401).unwrap().retry, "reauth_once");
        assert!(r.error("rate_limited").unwrap().description.contains("retry_after_ms"));
    }

    #[test]
    fn advice_splits_after_the_first_sentence() {
        assert_eq!(
            split_advice("No bot has this id. Check the bot id."),
            ("No bot has this id.".into(), "Check the bot id.".into())
        );
        assert_eq!(split_advice("Just one"), ("Just one".into(), String::new()));
    }
}
