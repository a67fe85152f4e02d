//! The chat gateway: `GET /api/ws/chat/{bot_id}` and its helpers (`/api/ws/ticket`,
//! `/api/ws/preflight/{bot_id}`, `/api/ws/codes`).
//!
//! The upgrade is always accepted; the checks run afterwards, so that a refusal reaches the
//! browser as a close code and a reason instead of a bare 1006. The preflight endpoint runs
//! the very same checks ([`admit`]) without opening a socket.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::Json;
use chrono::Utc;
use natter_proto::api::{BotRole, Preflight, TicketRequest, TicketResponse, UserRef};
use natter_proto::codes::CodeRegistry;
use natter_proto::CloseCode;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::{hash_opaque, new_opaque_token, TokenError};
use crate::bots::EngineSpec;
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{ApiJson, AuthUser};

pub mod hub;
mod session;

/// tungstenite's read buffer per socket, allocated at the upgrade and kept (see `chat`).
const READ_BUFFER_BYTES: usize = 512;

/// The retry hint sent with 1013 when the server is full.
pub const OVERLOAD_RETRY_MS: u64 = 5_000;

/// How long a ticket from `POST /api/ws/ticket` stays valid.
pub const TICKET_TTL_SECS: u64 = 30;

/// Everything the checks look at, taken from the upgrade request as raw text so that bad
/// values become close codes rather than HTTP errors.
#[derive(Clone, Default)]
pub struct ConnectRequest {
    pub bot_id: String,
    pub token: Option<String>,
    pub ticket: Option<String>,
    pub after_seq: Option<String>,
    pub attempt_id: Option<String>,
    pub origin: Option<String>,
    pub host: Option<String>,
    pub user_agent: Option<String>,
    pub remote: Option<SocketAddr>,
    /// Upgrade headers as received: a proxy that drops them is a classic cause of failures.
    pub upgrade: Option<String>,
    pub connection: Option<String>,
    pub ws_version: Option<String>,
    pub forwarded_for: Option<String>,
    /// The upgrade request's span (traces only), which the connection's span continues: the
    /// request's `traceparent` put it in the client's trace.
    pub traceparent: Option<String>,
}

impl std::fmt::Debug for ConnectRequest {
    // Tokens and tickets never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectRequest")
            .field("bot_id", &self.bot_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ticket", &self.ticket.as_ref().map(|_| "<redacted>"))
            .field("after_seq", &self.after_seq)
            .field("origin", &self.origin)
            .finish()
    }
}

impl ConnectRequest {
    fn from_parts(
        bot_id: String,
        mut query: HashMap<String, String>,
        headers: &HeaderMap,
        remote: Option<SocketAddr>,
    ) -> Self {
        let header = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bearer = header(header::AUTHORIZATION).and_then(|v| {
            v.split_once(' ').filter(|(s, _)| s.eq_ignore_ascii_case("bearer")).map(|(_, t)| t.trim().to_owned())
        });
        ConnectRequest {
            bot_id,
            token: query.remove("token").or(bearer),
            ticket: query.remove("ticket"),
            after_seq: query.remove("after_seq"),
            attempt_id: query.remove("attempt_id"),
            origin: header(header::ORIGIN),
            host: header(header::HOST),
            user_agent: header(header::USER_AGENT),
            remote,
            upgrade: header(header::UPGRADE),
            connection: header(header::CONNECTION),
            ws_version: header(header::SEC_WEBSOCKET_VERSION),
            forwarded_for: header(header::HeaderName::from_static("x-forwarded-for")),
            traceparent: crate::telemetry::current_traceparent(),
        }
    }
}

/// Why a connection is refused: the close code and a reason (at most 123 bytes on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: CloseCode,
    pub reason: String,
    /// The user, when the credentials identified one before the refusal.
    pub user_id: Option<Uuid>,
}

fn refuse(code: CloseCode, reason: impl Into<String>) -> Refusal {
    Refusal { code, reason: reason.into(), user_id: None }
}

/// A connection that passed every check: only what its session uses (the bot's other fields
/// and its engine JSON would stay in memory for the socket's whole life).
#[derive(Debug, Clone)]
pub struct Admitted {
    pub user: UserRef,
    pub bot_id: Uuid,
    pub bot_name: String,
    pub engine: EngineSpec,
    pub conversation_id: Uuid,
    pub after_seq: Option<i64>,
    /// The login (refresh-token family) of the credentials, if they name one: the socket
    /// closes 4401 when it is revoked.
    pub family: Option<Uuid>,
}

/// Whether the check may use up a ticket (the socket) or only look (the preflight).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Connect,
    Preflight,
}

fn origin_allowed(state: &AppState, origin: &str, host: Option<&str>) -> bool {
    let origin = origin.trim_end_matches('/');
    if state.config.allowed_origins.iter().any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin)) {
        return true;
    }
    // Same origin: the Origin's authority is the Host the browser connected to.
    let authority = origin.split_once("://").map(|(_, a)| a);
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

/// The checks of the socket, in order: origin, request shape, credentials, bot, permission,
/// resume point, connection limit.
pub async fn admit(state: &AppState, req: &ConnectRequest, mode: Mode) -> Result<Admitted, Refusal> {
    // A node that lost its database or bus would serve stale data: it sends clients elsewhere.
    if let Some(reason) = state.cluster.unavailable() {
        let retry = crate::cluster::DEPENDENCY_RETRY_MS;
        return Err(refuse(CloseCode::TryAgainLater, format!("{reason}; retry_after_ms={retry}")));
    }
    if let Some(origin) = &req.origin {
        if !origin_allowed(state, origin, req.host.as_deref()) {
            return Err(refuse(CloseCode::OriginNotAllowed, format!("origin {origin} is not allowed")));
        }
    }
    let bot_id =
        Uuid::parse_str(&req.bot_id).map_err(|_| refuse(CloseCode::BadRequest, "bot id is not a valid UUID"))?;
    let after_seq = match &req.after_seq {
        None => None,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => return Err(refuse(CloseCode::BadRequest, "after_seq must be a whole number >= 0")),
        },
    };
    // Only checked: the session reads it from the request for its ledger row.
    if let Some(s) = &req.attempt_id {
        Uuid::parse_str(s).map_err(|_| refuse(CloseCode::BadRequest, "attempt_id is not a valid UUID"))?;
    }

    let (user, family) = authenticate(state, req, bot_id, mode).await?;
    let with_user = |code, reason: String| Refusal { code, reason, user_id: Some(user.id) };
    let internal = |e: crate::store::StoreError| {
        let error_id = Uuid::new_v4();
        tracing::error!(%error_id, error = %e, "store error during socket admission");
        with_user(CloseCode::InternalError, format!("internal error ({})", crate::telemetry::error_ref(error_id)))
    };

    let bot = state
        .store
        .bot(bot_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| with_user(CloseCode::BotNotFound, format!("no bot with id {bot_id}")))?;
    let role: Option<BotRole> = state.store.bot_role(&bot, user.id).await.map_err(internal)?;
    if role.is_none() {
        return Err(with_user(CloseCode::Forbidden, "this bot is private and not shared with you".into()));
    }
    let engine = EngineSpec::load(&bot.engine).map_err(|e| internal(crate::store::StoreError::Backend(e.message)))?;
    let conversation = state.store.conversation(user.id, bot_id).await.map_err(internal)?;
    if let Some(after) = after_seq {
        if after > conversation.last_seq {
            return Err(with_user(
                CloseCode::BadRequest,
                format!("after_seq {after} is beyond the conversation's last seq {}", conversation.last_seq),
            ));
        }
    }
    if state.hub.len() >= state.config.limits.max_connections {
        return Err(with_user(
            CloseCode::TryAgainLater,
            format!("server is at its connection limit; retry_after_ms={OVERLOAD_RETRY_MS}"),
        ));
    }
    let max = state.config.limits.max_connections_per_user;
    // This node's count first (no IO), then every node's: the socket itself takes its place
    // atomically later (`Cluster::claim_slot`); this gives the preflight the same verdict.
    if state.hub.user_count(user.id) >= max
        || state.cluster.slots_in_use(user.id).await.map_err(internal)?.is_some_and(|n| n >= max)
    {
        return Err(with_user(CloseCode::TooManyConnections, format!("this user already has {max} open connections")));
    }
    Ok(Admitted { user, bot_id, bot_name: bot.name, engine, conversation_id: conversation.id, after_seq, family })
}

/// The reason a socket of an ended login is refused or closed with.
pub const REVOKED_REASON: &str = "logged out: this login was ended; log in again";

/// The user and the login (refresh-token family) the credentials belong to.
async fn authenticate(
    state: &AppState,
    req: &ConnectRequest,
    bot_id: Uuid,
    mode: Mode,
) -> Result<(UserRef, Option<Uuid>), Refusal> {
    if let Some(ticket) = &req.ticket {
        let hash = hash_opaque(ticket);
        let found = match mode {
            Mode::Connect => state.store.consume_ticket(&hash, Utc::now()).await,
            Mode::Preflight => state.store.peek_ticket(&hash, Utc::now()).await,
        };
        let (user_id, ticket_bot) = found
            .map_err(|e| {
                let error_id = Uuid::new_v4();
                tracing::error!(%error_id, error = %e, "store error checking a ticket");
                refuse(CloseCode::InternalError, format!("internal error ({})", crate::telemetry::error_ref(error_id)))
            })?
            .ok_or_else(|| refuse(CloseCode::Unauthorized, "ticket is unknown, expired or already used"))?;
        if ticket_bot != bot_id {
            return Err(Refusal {
                user_id: Some(user_id),
                ..refuse(CloseCode::Unauthorized, "ticket was issued for another bot")
            });
        }
        let user = state
            .store
            .user_by_id(user_id)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| refuse(CloseCode::Unauthorized, "ticket's user no longer exists"))?;
        let family = ticket_family(ticket);
        if family.is_some_and(|f| state.revocations.is_revoked(f)) {
            return Err(Refusal { user_id: Some(user.id), ..refuse(CloseCode::Unauthorized, REVOKED_REASON) });
        }
        return Ok((UserRef { id: user.id, username: user.username }, family));
    }
    let Some(token) = &req.token else {
        return Err(refuse(CloseCode::Unauthorized, "missing token: pass ?token=<access token> or ?ticket=<ticket>"));
    };
    match state.keys.verify(token) {
        Ok(claims) if claims.sid.is_some_and(|f| state.revocations.is_revoked(f)) => {
            Err(Refusal { user_id: Some(claims.sub), ..refuse(CloseCode::Unauthorized, REVOKED_REASON) })
        }
        Ok(claims) => match state.store.user_by_id(claims.sub).await {
            Ok(Some(user)) => Ok((UserRef { id: user.id, username: user.username }, claims.sid)),
            Ok(None) => Err(refuse(CloseCode::Unauthorized, "invalid token: its user no longer exists")),
            Err(e) => {
                let error_id = Uuid::new_v4();
                tracing::error!(%error_id, error = %e, "store error checking a token's user");
                Err(refuse(
                    CloseCode::InternalError,
                    format!("internal error ({})", crate::telemetry::error_ref(error_id)),
                ))
            }
        },
        Err(TokenError::Expired) => Err(Refusal {
            user_id: state.keys.identify(token),
            ..refuse(CloseCode::Unauthorized, "token expired: refresh it and reconnect")
        }),
        Err(TokenError::Invalid) => Err(refuse(CloseCode::Unauthorized, "invalid token: malformed or bad signature")),
    }
}

/// The login a ticket was issued for (see [`ticket`]).
fn ticket_family(ticket: &str) -> Option<Uuid> {
    ticket.rsplit_once('.').and_then(|(_, f)| Uuid::parse_str(f).ok())
}

/// `GET /api/ws/chat/{bot_id}`: the chat socket. See `docs/protocol.md`.
pub async fn chat(
    State(state): State<AppState>,
    Path(bot_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let req = ConnectRequest::from_parts(bot_id, query, &headers, Some(remote));
    let limits = &state.config.limits;
    let tracker = state.tasks.clone();
    // Memory per idle socket (issue 10): tungstenite allocates its read buffer up front and
    // keeps it, so it is small; a larger frame reserves what it needs and is read in chunks of
    // this size. The request is boxed: the upgrade task keeps its callback's room for its life.
    let req = Box::new(req);
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(4 * 1024)
        .max_frame_size(limits.max_frame_bytes)
        .max_message_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| tracker.track_future(session::run(state, socket, *req)))
}

#[utoipa::path(get, path = "/api/ws/preflight/{bot_id}", tag = "chat",
    params(("bot_id" = String, Path), ("token" = Option<String>, Query), ("ticket" = Option<String>, Query), ("after_seq" = Option<String>, Query)),
    responses((status = 200, body = Preflight, description = "What the socket would do with these credentials")))]
pub async fn preflight(
    State(state): State<AppState>,
    Path(bot_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Json<Preflight> {
    let req = ConnectRequest::from_parts(bot_id, query, &headers, None);
    Json(match admit(&state, &req, Mode::Preflight).await {
        Ok(_) => Preflight { ok: true, close_code: None, reason: None },
        Err(r) => Preflight { ok: false, close_code: Some(r.code.code()), reason: Some(r.reason) },
    })
}

#[utoipa::path(post, path = "/api/ws/ticket", tag = "chat", security(("bearer" = [])), request_body = TicketRequest,
    responses((status = 200, body = TicketResponse), (status = 403, body = natter_proto::api::ErrorBody), (status = 404, body = natter_proto::api::ErrorBody)))]
pub async fn ticket(
    State(state): State<AppState>,
    user: AuthUser,
    ApiJson(body): ApiJson<TicketRequest>,
) -> ApiResult<Json<TicketResponse>> {
    let bot = state
        .store
        .bot(body.bot_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no bot with id {}", body.bot_id)))?;
    if state.store.bot_role(&bot, user.id).await?.is_none() {
        return Err(ApiError::forbidden("this bot is private and not shared with you"));
    }
    // The login rides in the ticket itself (after a '.', under the stored hash, so it can't
    // be altered): a socket opened with it closes when that login ends.
    let ticket = match user.family {
        Some(f) => format!("{}.{}", new_opaque_token(), f.simple()),
        None => new_opaque_token(),
    };
    state
        .store
        .create_ticket(
            &hash_opaque(&ticket),
            user.id,
            bot.id,
            Utc::now() + chrono::Duration::seconds(TICKET_TTL_SECS as i64),
        )
        .await?;
    Ok(Json(TicketResponse { ticket, expires_in: TICKET_TTL_SECS }))
}

#[utoipa::path(get, path = "/api/ws/codes", tag = "chat",
    responses((status = 200, body = CodeRegistry, description = "Every close code and error code, with retry policy and help")))]
pub async fn codes() -> Json<CodeRegistry> {
    Json(CodeRegistry::build())
}

/// Cuts a close reason to the 123 bytes a close frame can carry, on a character boundary.
pub fn close_reason(s: &str) -> String {
    if s.len() <= 123 {
        return s.to_owned();
    }
    let mut end = 123;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::close_reason;

    #[test]
    fn close_reasons_fit_a_frame() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= 123 && long.starts_with(&cut));
    }
}
