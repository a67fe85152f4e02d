//! Log setup: `tracing` with `RUST_LOG`-style filters (default `info`), pretty or JSON lines;
//! and, with `--otlp-endpoint`, OpenTelemetry traces exported over OTLP/HTTP (protobuf).
//!
//! The trace spans of a message's journey (received, stored, announced, delivered, first
//! token, reply stored) have the target [`TRACE`]. The log layer never shows them, and without
//! `--otlp-endpoint` no layer wants them, so `tracing` turns their call sites off: no span is
//! made, nothing is paid. With it, an OpenTelemetry layer (filtered to natter's own spans)
//! exports them together with the request (`http`) and connection (`ws`) spans.
//!
//! Trace context crosses tasks and nodes as a W3C `traceparent` string: taken from REST
//! requests and the socket's upgrade request, carried on the bus with each message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, Layer};
use uuid::Uuid;

use crate::config::LogFormat;

/// The target of the spans and events that exist only for traces (never logged).
pub const TRACE: &str = "natter_trace";

/// Whether an OpenTelemetry layer is installed: without one, no trace context is read or sent.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported (`--otlp-endpoint`).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Where and as whom traces are exported.
#[derive(Debug, Clone)]
pub struct Otlp {
    /// The collector's base URL (`http://127.0.0.1:4318`); traces go to `{endpoint}/v1/traces`.
    pub endpoint: String,
    /// This process's node id, a resource attribute (`natter.node_id`) of every span.
    pub node_id: Uuid,
}

/// Owns the tracer provider: [`Telemetry::shutdown`] exports what is still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (at most a few seconds) and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            // The batch processor's shutdown blocks until its task (on this runtime) is done.
            let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("otlp-endpoint: {0}")]
pub struct TelemetryError(String);

/// Installs the global subscriber. Call once, from the binary, inside the tokio runtime.
pub fn init(format: LogFormat, otlp: Option<Otlp>) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"))
        .add_directive(format!("{TRACE}=off").parse().expect("a valid directive"));
    let log = fmt::layer().with_writer(std::io::stderr);
    let log = match format {
        LogFormat::Pretty => log.boxed(),
        LogFormat::Json => log.json().flatten_event(true).with_current_span(true).boxed(),
    };
    let registry = tracing_subscriber::registry().with(log.with_filter(filter));
    let Some(otlp) = otlp else {
        registry.init();
        return Ok(Telemetry { provider: None });
    };
    let provider = provider(&otlp)?;
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("natter")).with_filter(
        Targets::new().with_target("natter_server", tracing::Level::INFO).with_target(TRACE, tracing::Level::INFO),
    );
    registry.with(layer).init();
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Telemetry { provider: Some(provider) })
}

fn provider(otlp: &Otlp) -> Result<SdkTracerProvider, TelemetryError> {
    let base = otlp.endpoint.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(TelemetryError(format!("{base:?} is not an http:// or https:// URL")));
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| TelemetryError(format!("HTTP client: {e}")))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_http_client(OtlpClient(client))
        .with_endpoint(format!("{base}/v1/traces"))
        .build()
        .map_err(|e| TelemetryError(e.to_string()))?;
    let resource = Resource::builder_empty()
        .with_service_name("natter")
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("natter.node_id", otlp.node_id.to_string()),
            KeyValue::new("service.instance.id", otlp.node_id.to_string()),
        ])
        .build();
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
}

/// The reqwest 0.12 client natter already has, as OpenTelemetry's HTTP client (its own
/// `reqwest` feature would bring a second reqwest).
#[derive(Debug)]
struct OtlpClient(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<opentelemetry_http::Response<opentelemetry_http::Bytes>, opentelemetry_http::HttpError> {
        let response = self.0.execute(request.try_into()?).await?;
        let mut out = opentelemetry_http::Response::builder().status(response.status());
        if let Some(h) = out.headers_mut() {
            *h = response.headers().clone();
        }
        // A collector answers with a few bytes (an ExportTraceServiceResponse).
        Ok(out.body(response.bytes().await?)?)
    }
}

/// A W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) as a remote parent context.
fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let is_hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ![version, trace, span, flags].into_iter().all(is_hex) {
        return None;
    }
    let cx = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// Makes `span` a child of the span that `traceparent` names (a client's, another node's).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if !enabled() {
        return;
    }
    if let Some(cx) = traceparent.and_then(parse_traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(cx));
    }
}

/// The OpenTelemetry context of the current span, when traces are exported.
fn current_span_context() -> Option<SpanContext> {
    if !enabled() {
        return None;
    }
    let sc = tracing::Span::current().context().span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The current span as a `traceparent`, to carry with a message on the bus.
pub fn current_traceparent() -> Option<String> {
    let sc = current_span_context()?;
    Some(format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// The trace id of the current span, when traces are exported.
pub fn current_trace_id() -> Option<String> {
    current_span_context().map(|sc| sc.trace_id().to_string())
}

/// What an internal error tells the client to look up: the error id (also in the log) and,
/// when traces are exported, the trace id.
pub fn error_ref(error_id: Uuid) -> String {
    error_ref_of(error_id, current_trace_id())
}

fn error_ref_of(error_id: Uuid, trace_id: Option<String>) -> String {
    match trace_id {
        Some(t) => format!("error id {error_id}, trace id {t}"),
        None => format!("error id {error_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_checked() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parse_traceparent(good).unwrap();
        assert_eq!(cx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(cx.is_sampled() && cx.is_remote());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473\u{e9}-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
        // A later version may add fields.
        assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
    }

    #[test]
    fn nothing_without_an_exporter() {
        assert!(!enabled());
        assert_eq!(current_traceparent(), None);
        let id = Uuid::nil();
        assert_eq!(error_ref(id), format!("error id {id}"));
        let reason = format!("internal error ({})", error_ref_of(id, Some("4bf92f3577b34da6a3ce929d0e0e4736".into())));
        assert_eq!(reason, format!("internal error (error id {id}, trace id 4bf92f3577b34da6a3ce929d0e0e4736)"));
        assert!(reason.len() <= 123, "fits a close reason: {}", reason.len());
    }
}
