//! Prometheus metrics (`GET /metrics`, OpenMetrics text), one registry per server so tests
//! with several servers in one process don't mix their counts.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `established` or `refused`.
    pub outcome: &'static str,
    /// `websocket` or `sse`.
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// The close code, or `none` when the connection broke without one.
    pub code: String,
    /// `client`, `server` or `network`.
    pub initiator: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `in` (from clients) or `out` (to clients).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route pattern (`/api/bots/{id}`), never the raw path.
    pub route: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub connections_active: Gauge,
    pub attempts: Family<OutcomeLabel, Counter>,
    pub closes: Family<CloseLabels, Counter>,
    pub messages: Family<DirectionLabel, Counter>,
    pub frames_dropped: Counter,
    pub deltas_coalesced: Counter,
    pub outbound_queue_depth: Histogram,
    pub handshake_seconds: Histogram,
    pub ack_seconds: Histogram,
    pub first_token_seconds: Histogram,
    pub bot_errors: Family<CodeLabel, Counter>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub ledger_anonymous_skipped: Counter,
}

fn seconds() -> Histogram {
    // 100 µs to ~100 s.
    Histogram::new(exponential_buckets(0.0001, 2.5, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("natter");
        let m = Metrics {
            connections_active: Gauge::default(),
            attempts: Family::default(),
            closes: Family::default(),
            messages: Family::default(),
            frames_dropped: Counter::default(),
            deltas_coalesced: Counter::default(),
            outbound_queue_depth: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            handshake_seconds: seconds(),
            ack_seconds: seconds(),
            first_token_seconds: seconds(),
            bot_errors: Family::default(),
            http_requests: Family::default(),
            ledger_anonymous_skipped: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("ws_connections_active", "Open chat sockets", m.connections_active.clone());
        registry.register(
            "ws_attempts",
            "Chat connection attempts by outcome and transport (websocket, sse)",
            m.attempts.clone(),
        );
        registry.register("ws_closes", "Socket closes by code and initiator", m.closes.clone());
        registry.register("chat_messages", "Chat messages received from and sent to clients", m.messages.clone());
        registry.register("ws_frames_dropped", "Frames still queued when their socket ended", m.frames_dropped.clone());
        registry.register(
            "ws_deltas_coalesced",
            "Reply deltas merged into a later frame for a slow reader",
            m.deltas_coalesced.clone(),
        );
        registry.register(
            "ws_outbound_queue_depth",
            "Frames waiting in a socket's queue, sampled at each send",
            m.outbound_queue_depth.clone(),
        );
        registry.register(
            "ws_handshake_duration_seconds",
            "Upgrade accepted to connection_established",
            m.handshake_seconds.clone(),
        );
        registry.register("message_ack_seconds", "Message received to ack sent", m.ack_seconds.clone());
        registry.register(
            "bot_first_token_seconds",
            "Message received to the bot's first token",
            m.first_token_seconds.clone(),
        );
        registry.register("bot_errors", "Bot engine failures by error code", m.bot_errors.clone());
        registry.register("http_requests", "HTTP requests by route and status", m.http_requests.clone());
        registry.register(
            "ledger_anonymous_rows_skipped",
            "Ledger rows of anonymous attempts not stored: over the ledger's anonymous budget",
            m.ledger_anonymous_skipped.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// Resident memory, KiB, from the text of a Linux `/proc/PID/status` (its `VmRSS:` line).
/// Also what `natter bench` reads for a server's memory by pid.
pub fn vmrss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `process_resident_memory_bytes` and `process_open_fds` of this process (Linux `/proc`;
/// elsewhere nothing). `natter bench idle --metrics-url` reads the first.
fn process_metrics() -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let rss_kib = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| vmrss_kib(&s));
    if let Some(kib) = rss_kib {
        let _ = write!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\n\
             # UNIT process_resident_memory_bytes bytes\n\
             process_resident_memory_bytes {}\n",
            kib * 1024
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = write!(
            out,
            "# HELP process_open_fds Number of open file descriptors.\n\
             # TYPE process_open_fds gauge\n\
             process_open_fds {}\n",
            fds.count()
        );
    }
    out
}

impl Metrics {
    /// The OpenMetrics text exposition, with the standard process metrics (unprefixed, as
    /// Prometheus' process collector names them) where the OS tells them.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        if let Some(at) = out.rfind("# EOF") {
            out.insert_str(at, &process_metrics());
        }
        out
    }

    pub fn close(&self, code: Option<u16>, initiator: natter_proto::api::ClosedBy) {
        let initiator = initiator.as_str();
        let code = code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        self.closes.get_or_create(&CloseLabels { code, initiator }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::default();
        m.close(Some(4408), natter_proto::api::ClosedBy::Server);
        m.close(None, natter_proto::api::ClosedBy::Network);
        m.attempts.get_or_create(&OutcomeLabel { outcome: "refused", transport: "sse" }).inc();
        m.ack_seconds.observe(0.002);
        let text = m.render();
        assert!(text.contains(r#"natter_ws_closes_total{code="4408",initiator="server"} 1"#), "{text}");
        assert!(text.contains(r#"natter_ws_closes_total{code="none",initiator="network"} 1"#));
        assert!(text.contains(r#"natter_ws_attempts_total{outcome="refused",transport="sse"} 1"#));
        assert!(text.contains("natter_message_ack_seconds_count 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}
