//! The HTTP surface: the router, with one module per area.

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use natter_proto::api::{Health, Ready};
use natter_proto::ErrorCode;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;
use utoipa::OpenApi;

use crate::logsafe::Untrusted;
use crate::state::AppState;
use error::ApiError;

pub mod auth;
pub mod bots;
pub mod chat;
pub mod connections;
pub mod error;
pub mod extract;

/// Request bodies larger than this get 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/openapi.json", get(openapi))
        .route("/auth/register", post(auth::register))
        .route("/auth/login", post(auth::login))
        .route("/auth/refresh", post(auth::refresh))
        .route("/auth/logout", post(auth::logout))
        .route("/auth/me", get(auth::me))
        .route("/bots", get(bots::list).post(bots::create))
        .route("/bots/{id}", get(bots::get).patch(bots::update).delete(bots::delete))
        .route("/bots/{id}/members", get(bots::members).post(bots::add_member))
        .route("/bots/{id}/members/{username}", delete(bots::remove_member))
        .route("/bots/{id}/messages", get(bots::messages))
        .route("/ws/ticket", post(chat::ticket))
        .route("/ws/codes", get(chat::codes))
        .route("/ws/preflight/{bot_id}", get(chat::preflight))
        .route("/ws/chat/{bot_id}", get(crate::ws::chat))
        .route("/sse/chat/{bot_id}", get(crate::sse::chat))
        .route("/sse/chat/{bot_id}/frames", post(chat::post_frame))
        .route("/connections", get(connections::list))
        .route("/connections/{attempt_id}", get(connections::get))
        .fallback(api_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));

    // `nest` leaves `/api/` itself to the outer fallback (the web app); it is an API path.
    let mut app = Router::new().nest("/api", api).route("/api/", any(api_not_found));
    if state.config.metrics_bind.is_none() {
        app = app.route("/metrics", get(metrics));
    }
    let mut app = app.layer(axum::middleware::from_fn_with_state(state.clone(), observe)).with_state(state.clone());
    if !state.config.allowed_origins.is_empty() {
        let origins: Vec<HeaderValue> = state
            .config
            .allowed_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
            .collect();
        app = app.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
                .allow_headers([axum::http::header::AUTHORIZATION, axum::http::header::CONTENT_TYPE])
                .max_age(std::time::Duration::from_secs(600)),
        );
    }
    app
}

/// `/metrics` alone, for `--metrics-bind`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(state)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
}

/// A request id taken from a proxy's `x-request-id` when it looks like one, else made here.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Every request: a span with its request id (echoed in `x-request-id`), an access log line
/// and the request counter. Paths are logged without their query, where tokens may be.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let method = req.method().clone();
    let route =
        req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let path = req.uri().path().to_owned();
    // Both come from the client: a path can be kilobytes long, a method any token.
    let span = tracing::info_span!(
        "http",
        request_id = %id,
        method = %Untrusted(method.as_str()),
        path = %Untrusted(&path),
        otel.name = tracing::field::Empty,
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    // The trace's view of the request (set only when traces are exported: log lines keep
    // their fields): named by route, in the client's trace if it sent a W3C `traceparent`.
    let traced = crate::telemetry::enabled();
    if traced {
        span.record("otel.name", format!("{} {route}", method_label(&method))).record("http.route", route.as_str());
        let traceparent = req.headers().get("traceparent").and_then(|v| v.to_str().ok());
        crate::telemetry::set_parent(&span, traceparent);
    }
    let started = std::time::Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    let status = res.status().as_u16();
    if traced {
        span.record("http.response.status_code", status);
    }
    span.in_scope(|| tracing::info!(status, elapsed_ms = started.elapsed().as_millis() as u64, "request"));
    state
        .metrics
        .http_requests
        .get_or_create(&crate::metrics::HttpLabels { method: method_label(&method).to_owned(), route, status })
        .inc();
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// The method as a metrics label: the standard ones by name, any other token a client made up
/// as `other`, so that clients cannot create label sets without end.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

async fn api_not_found() -> ApiError {
    ApiError::not_found("no such API endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        "this endpoint does not accept that method",
    )
}

#[utoipa::path(get, path = "/api/health", tag = "health", responses((status = 200, body = Health)))]
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        node_id: Some(state.cluster.node().node_id),
    })
}

#[utoipa::path(get, path = "/api/ready", tag = "health",
    responses((status = 200, body = Ready), (status = 503, body = Ready, description = "Names what failed")))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Ready>) {
    let mut failed = Vec::new();
    if let Err(e) = state.store.ping().await {
        tracing::warn!(error = %e, "readiness: store unreachable");
        failed.push(format!("store: {e}"));
    }
    if let Err(e) = state.bus.health() {
        tracing::warn!(error = %e, "readiness: bus unreachable");
        failed.push(format!("bus: {e}"));
    }
    if failed.is_empty() {
        (StatusCode::OK, Json(Ready { status: "ok".into(), failed }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Ready { status: "unavailable".into(), failed }))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "natter", description = "Self-hosted real-time chat server for bots. The chat socket is described in docs/protocol.md."),
    paths(
        health, ready,
        auth::register, auth::login, auth::refresh, auth::logout, auth::me,
        bots::list, bots::create, bots::get, bots::update, bots::delete,
        bots::members, bots::add_member, bots::remove_member, bots::messages,
        chat::ticket, chat::codes, chat::preflight, chat::post_frame,
        connections::list, connections::get,
    ),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    Json(doc)
}
