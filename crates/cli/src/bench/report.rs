//! What a bench run measured: HDR latency histograms, errors by kind, the JSON report and the
//! table printed at the end. Pure: no IO but the final print.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latency {
    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record((d.as_micros() as u64).max(1));
    }

    pub fn merge(&mut self, other: &Latency) {
        self.0.add(&other.0).expect("same bounds");
    }

    pub fn summary(&self) -> Option<Percentiles> {
        if self.0.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Percentiles {
            count: self.0.len(),
            p50: ms(self.0.value_at_quantile(0.50)),
            p90: ms(self.0.value_at_quantile(0.90)),
            p99: ms(self.0.value_at_quantile(0.99)),
            p999: ms(self.0.value_at_quantile(0.999)),
            max: ms(self.0.max()),
        })
    }
}

/// Milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Errors counted by kind (`close 4429`, `wrong reply: …`, `timeout`).
#[derive(Default, Debug, Clone)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    pub fn add(&mut self, key: String) {
        *self.0.entry(key).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Errors) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// What one worker measured; merged at the end.
#[derive(Default)]
pub struct Tally {
    pub ops: u64,
    pub latency: Latency,
    pub ack_latency: Latency,
    pub errors: Errors,
}

impl Tally {
    pub fn merge(&mut self, o: &Tally) {
        self.ops += o.ops;
        self.latency.merge(&o.latency);
        self.ack_latency.merge(&o.ack_latency);
        self.errors.merge(&o.errors);
    }
}

/// The storm's own results.
#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    pub clients: usize,
    /// Restarts done.
    pub restarts: u32,
    /// How: `sigterm` (stop, then start), `sigkill` (crash, then start) or `hand-over` (start
    /// the new process on the same port, then SIGTERM the old one).
    pub restart: &'static str,
    /// hand-over: how long the new process took to answer, while the old one still served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub successor_ready_ms: Option<f64>,
    /// From the stop signal until the server answered `/api/health` again (0 with a hand-over:
    /// the new process was answering before the signal).
    pub server_down_ms: f64,
    /// Of that, until the old process had exited (the rest is the new one starting).
    pub server_stop_ms: f64,
    /// From the stop signal until the last client was reconnected and caught up.
    pub all_back_ms: Option<f64>,
    /// Clients that never came back.
    pub not_back: usize,
    pub messages_sent: u64,
    /// Sent but never stored, seq gaps, or user messages without their bot reply.
    pub lost: u64,
    /// A seq delivered twice, a client_id stored twice, or two replies to one message.
    pub doubled: u64,
    pub reconnect_attempts: u64,
    /// Close codes the clients saw (1012 is the server restarting: expected).
    pub closes: BTreeMap<String, u64>,
}

/// Making the `--users` × `--bots` layout, before the first scenario.
#[derive(Debug, Clone, Serialize)]
pub struct SetupReport {
    /// Users logged in (tokens minted, for the peers).
    pub users: usize,
    /// Public echo bots created (bot ids drawn, for the peers).
    pub bots: usize,
    pub duration_s: f64,
    /// The server's memory before the users logged in, and after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_after_kib: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub scenario: String,
    pub url: String,
    /// `ws` or `sse` (`--transport`).
    pub transport: String,
    pub connections: usize,
    /// How many distinct users and bots the scenario's conversations span.
    pub users: usize,
    pub bots: usize,
    /// The first scenario of a `--users` × `--bots` run: how the layout was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup: Option<SetupReport>,
    /// Connections that completed the handshake (idle: held at the end).
    pub connected: usize,
    pub duration_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tabs: Option<usize>,
    /// chat: round trips (message → ack → bot reply); fanout: bot replies delivered to tabs;
    /// connect: completed connects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops_name: Option<String>,
    /// chat: message sent → bot reply; fanout: message sent → reply at each tab; connect: TCP
    /// connect → `connection_established`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<Percentiles>,
    /// chat: message sent → ack (stored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_latency_ms: Option<Percentiles>,
    /// connect, chat, fanout (with the server's pid): the server's CPU time (user + system)
    /// over the measured window, per operation, in µs…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_op: Option<f64>,
    /// … and as a share of the window (1.0: one core busy throughout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_busy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_after_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_kib_per_connection: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storm: Option<StormReport>,
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.error_total == 0 && self.storm.as_ref().is_none_or(|s| s.lost == 0 && s.doubled == 0 && s.not_back == 0)
    }

    /// The human table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        if let Some(s) = &self.setup {
            let rss = match (s.server_rss_before_kib, s.server_rss_after_kib) {
                (Some(b), Some(a)) => format!("; server RSS {b} KiB before, {a} KiB after"),
                _ => String::new(),
            };
            rows.push((
                "layout".into(),
                format!("{} users × {} public bots, made in {:.1} s{rss}", s.users, s.bots, s.duration_s),
            ));
        }
        rows.extend([
            ("scenario".into(), self.scenario.clone()),
            ("url".into(), self.url.clone()),
            ("transport".into(), self.transport.clone()),
            ("connections".into(), format!("{} asked, {} connected", self.connections, self.connected)),
            ("conversations of".into(), format!("{} users, {} bots", self.users, self.bots)),
            ("duration".into(), format!("{:.1} s", self.duration_s)),
        ]);
        if let Some(b) = self.message_bytes {
            rows.push(("message size".into(), format!("{b} bytes")));
        }
        if let Some(t) = self.tabs {
            rows.push(("tabs per conversation".into(), t.to_string()));
        }
        if let (Some(n), Some(r), Some(name)) = (self.ops, self.ops_per_s, &self.ops_name) {
            rows.push((name.clone(), format!("{n} ({r:.0}/s)")));
        }
        let pct = |p: &Percentiles| {
            format!("p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms", p.p50, p.p90, p.p99, p.p999, p.max)
        };
        if let Some(p) = &self.latency_ms {
            rows.push(("latency".into(), pct(p)));
        }
        if let Some(p) = &self.ack_latency_ms {
            rows.push(("ack latency".into(), pct(p)));
        }
        if let Some(busy) = self.server_cpu_busy {
            let per = self.server_cpu_us_per_op.map_or(String::new(), |us| format!("{us:.1} µs per op, "));
            rows.push(("server CPU".into(), format!("{per}{:.0}% of one core", busy * 100.0)));
        }
        if let (Some(b), Some(a)) = (self.server_rss_before_kib, self.server_rss_after_kib) {
            rows.push(("server RSS".into(), format!("{b} KiB before, {a} KiB after")));
        }
        if let Some(k) = self.server_kib_per_connection {
            rows.push(("server memory per connection".into(), format!("{k:.2} KiB")));
        }
        if let Some(s) = &self.storm {
            rows.push(("restart".into(), s.restart.into()));
            if let Some(ms) = s.successor_ready_ms {
                rows.push(("new process answering".into(), format!("{ms:.0} ms before the stop signal")));
            }
            rows.push((
                "server down".into(),
                format!("{:.0} ms (old process stopping {:.0} ms)", s.server_down_ms, s.server_stop_ms),
            ));
            let back = s.all_back_ms.map_or("never".into(), |ms| format!("{ms:.0} ms after the stop signal"));
            rows.push(("all clients back".into(), back));
            rows.push(("clients not back".into(), s.not_back.to_string()));
            rows.push(("messages sent".into(), s.messages_sent.to_string()));
            rows.push(("lost / doubled".into(), format!("{} / {}", s.lost, s.doubled)));
            rows.push(("reconnect attempts".into(), s.reconnect_attempts.to_string()));
            let closes: Vec<String> = s.closes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            rows.push(("closes seen".into(), closes.join(", ")));
        }
        if self.errors.is_empty() {
            rows.push(("errors".into(), "none".into()));
        } else {
            for (k, v) in &self.errors {
                rows.push((format!("error: {k}"), v.to_string()));
            }
        }
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter().map(|(k, v)| format!("{k:<w$}  {v}\n")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_in_milliseconds() {
        let mut l = Latency::default();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let p = l.summary().unwrap();
        assert_eq!(p.count, 100);
        assert!((p.p50 - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
        assert!(Latency::default().summary().is_none());
    }

    #[test]
    fn a_report_with_errors_or_losses_is_not_ok() {
        let mut r = Report { scenario: "chat".into(), ..Default::default() };
        assert!(r.ok());
        r.error_total = 1;
        r.errors.insert("close 4429".into(), 1);
        assert!(!r.ok());
        assert!(r.table().contains("error: close 4429"));
    }
}
