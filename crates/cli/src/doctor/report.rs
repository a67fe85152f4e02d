//! The doctor's report: step outcomes, the summary, the JSON document and the text rendering.
//! Pure data and formatting, no IO, so every shape here is unit-tested.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::stage::Stage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skipped,
}

impl Status {
    fn symbol(self) -> &'static str {
        match self {
            Status::Ok => "✓",
            Status::Warn => "⚠",
            Status::Fail => "✗",
            Status::Skipped => "–",
        }
    }

    /// ANSI colour for the symbol and the step name.
    fn colour(self) -> &'static str {
        match self {
            Status::Ok => "\x1b[32m",
            Status::Warn => "\x1b[33m",
            Status::Fail => "\x1b[31m",
            Status::Skipped => "\x1b[2m",
        }
    }
}

/// One step's outcome: what was measured (`detail`), and when it is not ok, the likely cause
/// and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub cause: Option<String>,
    pub fix: Option<String>,
}

impl Step {
    pub fn ok(name: &'static str, detail: impl Into<String>) -> Step {
        Step { name, status: Status::Ok, detail: detail.into(), cause: None, fix: None }
    }

    pub fn warn(
        name: &'static str,
        detail: impl Into<String>,
        cause: impl Into<String>,
        fix: impl Into<String>,
    ) -> Step {
        Step { name, status: Status::Warn, detail: detail.into(), cause: Some(cause.into()), fix: Some(fix.into()) }
    }

    pub fn fail(
        name: &'static str,
        detail: impl Into<String>,
        cause: impl Into<String>,
        fix: impl Into<String>,
    ) -> Step {
        Step { name, status: Status::Fail, detail: detail.into(), cause: Some(cause.into()), fix: Some(fix.into()) }
    }

    pub fn skipped(name: &'static str, why: impl Into<String>) -> Step {
        Step { name, status: Status::Skipped, detail: why.into(), cause: None, fix: None }
    }
}

/// What the run says about chatting through this path, and the exit status that says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Nothing failed (warnings allowed): exit 0.
    Ok,
    /// Only the WebSocket steps failed and HTTP streaming (SSE) works: chat works, natter's
    /// clients fall back to SSE by themselves, but something on the way blocks WebSockets.
    /// Exit 3.
    WebsocketBlocked,
    /// Anything else failed: exit 1.
    Fail,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Ok => 0,
            Verdict::Fail => 1,
            Verdict::WebsocketBlocked => 3,
        }
    }
}

/// The whole report, as `--json` prints it: `{"ok": bool, "verdict": …, "steps": [...]}`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub ok: bool,
    pub steps: Vec<Step>,
}

/// The JSON document: the report with its verdict.
#[derive(Serialize)]
struct Document<'a> {
    ok: bool,
    verdict: Verdict,
    steps: &'a [Step],
}

impl Report {
    pub fn new() -> Report {
        Report { ok: true, steps: Vec::new() }
    }

    pub fn push(&mut self, step: Step) {
        if step.status == Status::Fail {
            self.ok = false;
        }
        self.steps.push(step);
    }

    pub fn first_failure(&self) -> Option<&Step> {
        self.steps.iter().find(|s| s.status == Status::Fail)
    }

    fn status_of(&self, stage: Stage) -> Option<Status> {
        self.steps.iter().find(|s| s.name == stage.name()).map(|s| s.status)
    }

    /// [`Verdict::WebsocketBlocked`] when every failed step is a WebSocket step and both SSE
    /// steps passed (with warnings allowed).
    pub fn verdict(&self) -> Verdict {
        if self.ok {
            return Verdict::Ok;
        }
        let websocket_only = self
            .steps
            .iter()
            .filter(|s| s.status == Status::Fail)
            .all(|s| Stage::WEBSOCKET.iter().any(|w| w.name() == s.name));
        let sse_works = Stage::SSE.iter().all(|&s| matches!(self.status_of(s), Some(Status::Ok) | Some(Status::Warn)));
        if websocket_only && sse_works {
            Verdict::WebsocketBlocked
        } else {
            Verdict::Fail
        }
    }

    /// 0 when nothing failed (warnings allowed), 3 when only the WebSocket failed and chat
    /// works over HTTP streaming (SSE), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        self.verdict().exit_code()
    }

    /// Replaces every occurrence of a secret (token, password, ticket) in every field. The
    /// steps never put secrets into their text; this is the second line of defence against
    /// an error message that quotes a URL or a body.
    pub fn redact(&mut self, secrets: &[&str]) {
        let scrub = |s: &mut String| {
            for secret in secrets.iter().filter(|s| s.len() >= 4) {
                if s.contains(secret) {
                    *s = s.replace(secret, "<redacted>");
                }
            }
        };
        for step in &mut self.steps {
            scrub(&mut step.detail);
            if let Some(c) = &mut step.cause {
                scrub(c);
            }
            if let Some(f) = &mut step.fix {
                scrub(f);
            }
        }
    }

    /// One sentence naming the first failing layer, or saying that all passed.
    pub fn summary(&self) -> String {
        if let Some(f) = self.first_failure() {
            let why = f.cause.as_deref().unwrap_or(&f.detail);
            if self.verdict() == Verdict::WebsocketBlocked {
                return format!(
                    "WebSocket blocked — HTTP streaming (SSE) works. Chat works through this path: natter's clients \
                     fall back to HTTP streaming by themselves. The WebSocket fails at {} (step `{}`): {}\n\
                     To get WebSocket back, make the proxy pass the upgrade (the Upgrade and Connection headers, \
                     over HTTP/1.1); nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; \
                     proxy_set_header Connection \"upgrade\"; (the `{}` step's fix has the details).",
                    Stage::layer_of(f.name),
                    f.name,
                    why,
                    f.name
                );
            }
            return format!("First failing layer: {} (step `{}`): {}", Stage::layer_of(f.name), f.name, why);
        }
        let warnings: Vec<&str> = self.steps.iter().filter(|s| s.status == Status::Warn).map(|s| s.name).collect();
        if warnings.is_empty() {
            "All checks passed.".to_owned()
        } else {
            format!("All checks passed, with warnings: {}.", warnings.join(", "))
        }
    }

    pub fn to_json(&self) -> String {
        let doc = Document { ok: self.ok, verdict: self.verdict(), steps: &self.steps };
        serde_json::to_string_pretty(&doc).expect("a report always serializes")
    }

    /// The text report: one line per step, cause and fix indented under it, then the summary.
    pub fn render_text(&self, title: &str, colour: bool) -> String {
        let (reset, bold) = if colour { ("\x1b[0m", "\x1b[1m") } else { ("", "") };
        let mut out = String::new();
        let _ = writeln!(out, "{bold}natter doctor{reset} {title}\n");
        let width = Stage::ALL.iter().map(|s| s.name().len()).max().unwrap_or(0) + 1;
        let pad = " ".repeat(width + 3);
        for step in &self.steps {
            let (c, r) = if colour { (step.status.colour(), reset) } else { ("", "") };
            let mut lines = step.detail.lines();
            let first = lines.next().unwrap_or("");
            let _ = writeln!(out, "{c}{} {:<width$}{r} {first}", step.status.symbol(), step.name);
            for line in lines {
                let _ = writeln!(out, "{pad}{line}");
            }
            for (label, text) in [("cause", &step.cause), ("fix", &step.fix)] {
                if let Some(text) = text {
                    let mut lines = text.lines();
                    let _ = writeln!(out, "{pad}{label}: {}", lines.next().unwrap_or(""));
                    let inner = " ".repeat(label.len() + 2);
                    for line in lines {
                        let _ = writeln!(out, "{pad}{inner}{line}");
                    }
                }
            }
        }
        let (c, r) = match (colour, self.verdict()) {
            (false, _) => ("", ""),
            (true, Verdict::Ok) => ("\x1b[32m", reset),
            (true, Verdict::WebsocketBlocked) => ("\x1b[33m", reset),
            (true, Verdict::Fail) => ("\x1b[31m", reset),
        };
        let _ = writeln!(out, "\n{bold}{c}{}{r}{reset}", self.summary());
        out
    }
}

/// Why an idle connection probably died, when the time it lasted says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleGuess {
    /// The idle timeout to name, in whole seconds (the round number, or the measured time).
    pub timeout_secs: u64,
    /// True when the time is close to a round number that proxies use as a default.
    pub round: bool,
}

/// Proxy and load-balancer idle timeouts seen in the wild (nginx 60 s, AWS ELB 60 s,
/// Cloudflare 100 s, HAProxy and others configured to 30/90/120/300 s…).
const ROUND_TIMEOUTS: &[u64] = &[10, 15, 20, 30, 45, 60, 75, 90, 100, 120, 180, 240, 300, 600, 900, 3600];

/// Guesses whether a connection that died after `lasted` of idling was cut by something in
/// between. The server itself closes an idle client only after 2 × `heartbeat` without traffic
/// (and the doctor answers every ping), so a death before that, or one within a couple of
/// seconds of a common timeout value, points at a proxy's idle timeout.
pub fn guess_idle_timeout(lasted: Duration, heartbeat: Option<Duration>) -> Option<IdleGuess> {
    let secs = lasted.as_secs_f64();
    // Tolerance: ±2 s, or ±3 % for long timeouts.
    let near = |t: u64| (secs - t as f64).abs() <= f64::max(2.0, t as f64 * 0.03);
    if let Some(&t) = ROUND_TIMEOUTS.iter().find(|&&t| near(t)) {
        return Some(IdleGuess { timeout_secs: t, round: true });
    }
    match heartbeat {
        Some(hb) if lasted < hb * 2 => Some(IdleGuess { timeout_secs: secs.round().max(1.0) as u64, round: false }),
        _ => None,
    }
}

/// A duration for people: `0.4 ms`, `12 ms`, `1.25 s`, `3 min 20 s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        format!("{ms:.2} ms")
    } else if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        let s = d.as_secs();
        if s < 3600 {
            format!("{} min {} s", s / 60, s % 60)
        } else {
            format!("{} h {} min", s / 3600, (s % 3600) / 60)
        }
    }
}

/// A signed number of seconds for people: `3 min ago`, `in 14 min`.
pub fn relative(secs: i64) -> String {
    let abs = secs.unsigned_abs();
    if abs < 2 {
        return "just now".to_owned();
    }
    let amount = if abs < 120 {
        format!("{abs} s")
    } else if abs < 7200 {
        format!("{} min", abs / 60)
    } else if abs < 2 * 86400 {
        format!("{} h", abs / 3600)
    } else {
        format!("{} days", abs / 86400)
    };
    if secs < 0 {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}

/// Minimum, median and maximum of some samples (`None` when there are none).
pub fn min_median_max(samples: &[Duration]) -> Option<(Duration, Duration, Duration)> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort();
    let mid = s.len() / 2;
    let median = if s.len() % 2 == 1 { s[mid] } else { (s[mid - 1] + s[mid]) / 2 };
    Some((s[0], median, s[s.len() - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut r = Report::new();
        r.push(Step::ok("url", "http://127.0.0.1:1"));
        r.push(Step::warn("dns", "slow", "the resolver is slow", "use a closer resolver"));
        r.push(Step::fail("tcp", "refused", "nothing listens on 127.0.0.1:1", "start the server"));
        r.push(Step::skipped("tls", "tcp failed"));
        r
    }

    #[test]
    fn a_failure_makes_the_report_not_ok_and_exit_1() {
        let r = sample();
        assert!(!r.ok);
        assert_eq!(r.exit_code(), 1);
        assert_eq!(r.first_failure().unwrap().name, "tcp");
        let mut fine = Report::new();
        fine.push(Step::ok("url", "x"));
        fine.push(Step::warn("tls", "expires soon", "c", "f"));
        fine.push(Step::skipped("send", "no --send"));
        assert!(fine.ok);
        assert_eq!(fine.exit_code(), 0);
        assert_eq!(fine.summary(), "All checks passed, with warnings: tls.");
    }

    #[test]
    fn summary_names_the_first_failing_layer_and_its_cause() {
        let s = sample().summary();
        assert!(s.contains("TCP connect"), "{s}");
        assert!(s.contains("`tcp`"), "{s}");
        assert!(s.contains("nothing listens on 127.0.0.1:1"), "{s}");
        let mut all = Report::new();
        all.push(Step::ok("url", "x"));
        assert_eq!(all.summary(), "All checks passed.");
    }

    #[test]
    fn json_has_the_documented_shape() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(v["ok"], false);
        let steps = v["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 4);
        assert_eq!(
            steps[0],
            serde_json::json!({"name": "url", "status": "ok", "detail": "http://127.0.0.1:1", "cause": null, "fix": null})
        );
        assert_eq!(steps[1]["status"], "warn");
        assert_eq!(steps[2]["status"], "fail");
        assert_eq!(steps[2]["cause"], "nothing listens on 127.0.0.1:1");
        assert_eq!(steps[3]["status"], "skipped");
        assert_eq!(v["verdict"], "fail");
        assert_eq!(v.as_object().unwrap().len(), 3, "only ok, verdict and steps");
    }

    /// Steps named as a run names them, with these statuses for the WebSocket and SSE steps.
    fn transports(handshake: Status, sse: Status) -> Report {
        let step = |name, status| Step { status, ..Step::fail(name, "d", "c", "f") };
        let mut r = Report::new();
        r.push(Step::ok("health", "200"));
        r.push(step("handshake", handshake));
        let after = if handshake == Status::Fail { Status::Skipped } else { Status::Ok };
        r.push(step("established", after));
        r.push(step("ping", after));
        r.push(step("sse_stream", sse));
        r.push(step("sse_ping", if sse == Status::Fail { Status::Skipped } else { sse }));
        r
    }

    #[test]
    fn a_blocked_websocket_with_working_sse_is_its_own_verdict_and_exit_code() {
        let r = transports(Status::Fail, Status::Ok);
        assert_eq!((r.verdict(), r.exit_code(), r.ok), (Verdict::WebsocketBlocked, 3, false));
        let s = r.summary();
        assert!(s.starts_with("WebSocket blocked — HTTP streaming (SSE) works."), "{s}");
        assert!(s.contains("fall back to HTTP streaming by themselves"), "{s}");
        assert!(s.contains("proxy_set_header Upgrade $http_upgrade;"), "{s}");
        assert!(s.contains("proxy_http_version 1.1;"), "{s}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&r.to_json()).unwrap()["verdict"], "websocket_blocked");
        // A warning on the stream still carries chat.
        assert_eq!(transports(Status::Fail, Status::Warn).exit_code(), 3);
        // Both broken, or only SSE broken: a failure.
        assert_eq!(
            (transports(Status::Fail, Status::Fail).verdict(), transports(Status::Ok, Status::Fail).exit_code()),
            (Verdict::Fail, 1)
        );
        assert_eq!(transports(Status::Ok, Status::Ok).exit_code(), 0);
        // Any other failure too, even when SSE works.
        let mut r = transports(Status::Fail, Status::Ok);
        r.push(Step::fail("ledger", "x", "c", "f"));
        assert_eq!((r.verdict(), r.exit_code()), (Verdict::Fail, 1));
        assert!(r.summary().starts_with("First failing layer"), "{}", r.summary());
    }

    #[test]
    fn text_has_symbols_indented_cause_and_fix_and_no_colour_unless_asked() {
        let mut r = sample();
        r.push(Step::fail("handshake", "HTTP 400", "a proxy strips Upgrade", "nginx:\n  proxy_http_version 1.1;"));
        let t = r.render_text("http://127.0.0.1:1", false);
        assert!(!t.contains('\x1b'), "{t}");
        assert!(t.contains("✓ url "), "{t}");
        assert!(t.contains("⚠ dns "), "{t}");
        assert!(t.contains("✗ tcp "), "{t}");
        assert!(t.contains("– tls "), "{t}");
        assert!(t.contains("cause: nothing listens on 127.0.0.1:1"), "{t}");
        assert!(t.contains("fix: start the server"), "{t}");
        // A multi-line fix keeps its lines, indented under the label.
        let line = t.lines().find(|l| l.contains("proxy_http_version")).unwrap();
        assert!(line.starts_with(&" ".repeat(22)), "{line:?}");
        assert!(t.trim_end().ends_with("start the server") || t.contains("First failing layer"), "{t}");
        let coloured = r.render_text("x", true);
        assert!(coloured.contains("\x1b[31m✗"), "{coloured}");
        assert!(coloured.contains("\x1b[32m✓"), "{coloured}");
    }

    #[test]
    fn redact_scrubs_secrets_from_every_field() {
        let mut r = Report::new();
        r.push(Step::fail("token", "sent eyJhbGciOi.secret", "cause eyJhbGciOi.secret", "fix hunter22"));
        r.redact(&["eyJhbGciOi.secret", "hunter22", ""]);
        let j = r.to_json();
        assert!(!j.contains("eyJhbGciOi") && !j.contains("hunter22"), "{j}");
        assert!(j.contains("<redacted>"));
    }

    #[test]
    fn idle_deaths_near_round_numbers_name_a_proxy_timeout() {
        let hb = Some(Duration::from_secs(25));
        assert_eq!(
            guess_idle_timeout(Duration::from_millis(60_400), hb),
            Some(IdleGuess { timeout_secs: 60, round: true })
        );
        assert_eq!(
            guess_idle_timeout(Duration::from_millis(99_000), hb),
            Some(IdleGuess { timeout_secs: 100, round: true })
        );
        assert_eq!(
            guess_idle_timeout(Duration::from_millis(29_000), hb),
            Some(IdleGuess { timeout_secs: 30, round: true })
        );
        assert_eq!(
            guess_idle_timeout(Duration::from_secs(3590), hb),
            Some(IdleGuess { timeout_secs: 3600, round: true })
        );
        // Before the server's own 2 × heartbeat limit: something in between, whatever the number.
        assert_eq!(
            guess_idle_timeout(Duration::from_millis(2_300), hb),
            Some(IdleGuess { timeout_secs: 2, round: false })
        );
        assert_eq!(
            guess_idle_timeout(Duration::from_millis(37_000), hb),
            Some(IdleGuess { timeout_secs: 37, round: false })
        );
        // After 2 × heartbeat and not near a round number: no guess.
        assert_eq!(guess_idle_timeout(Duration::from_secs(53), hb), None);
        assert_eq!(guess_idle_timeout(Duration::from_secs(53), None), None);
        assert_eq!(guess_idle_timeout(Duration::from_millis(300), None), None);
    }

    #[test]
    fn statistics_and_human_units() {
        let ms = Duration::from_millis;
        assert_eq!(min_median_max(&[ms(5), ms(1), ms(3)]), Some((ms(1), ms(3), ms(5))));
        assert_eq!(min_median_max(&[ms(4), ms(1), ms(2), ms(3)]), Some((ms(1), Duration::from_micros(2500), ms(4))));
        assert_eq!(min_median_max(&[]), None);
        assert_eq!(human(Duration::from_micros(400)), "0.40 ms");
        assert_eq!(human(ms(12)), "12 ms");
        assert_eq!(human(ms(1250)), "1.25 s");
        assert_eq!(human(Duration::from_secs(200)), "3 min 20 s");
        assert_eq!(relative(-180), "3 min ago");
        assert_eq!(relative(840), "in 14 min");
        assert_eq!(relative(30), "in 30 s");
        assert_eq!(relative(0), "just now");
        assert_eq!(relative(-3 * 86400), "3 days ago");
    }
}
