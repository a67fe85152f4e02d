//! Admitting a chat connection, in one place for every transport and the preflight endpoint:
//! [`admit`] returns everything a connection holds ([`Admission`]: identity, bot, role,
//! conversation, its place in the hub and in every node's per-user count, its bus
//! subscription) or one typed [`Refusal`] that builds its own close code, reason and retry
//! hint. [`preflight`] runs the very same checks without using up a ticket or holding a place.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::http::{header, HeaderMap};
use chrono::Utc;
use natter_proto::api::{BotRole, TransportKind, UserRef};
use natter_proto::{Close, CloseCode};
use uuid::Uuid;

use super::access::Grant;
use super::hub::{Full, HubGuard};
use super::session::Peer;
use crate::auth::{hash_opaque, TokenError};
use crate::bots::EngineSpec;
use crate::bus::Subscription;
use crate::cluster::{ClaimError, Slot, DEPENDENCY_RETRY_MS};
use crate::state::AppState;

/// The retry hint sent with 1013 when the server is full.
pub const OVERLOAD_RETRY_MS: u64 = 5_000;

/// The reason a connection of an ended login is refused or closed with.
pub const REVOKED_REASON: &str = "logged out: this login was ended; log in again";

/// Everything the checks look at, taken from the request as raw text so that bad values
/// become close codes rather than HTTP errors.
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
    /// The request's span (traces only), which the connection's span continues: the
    /// request's `traceparent` put it in the client's trace.
    pub traceparent: Option<String>,
    /// Which binding the request came by (the ledger and metrics say it).
    pub transport: TransportKind,
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
    /// The request's query (`token`, `ticket`, `after_seq`, `attempt_id`) and headers
    /// (a Bearer `Authorization` when there is no `?token=`).
    pub fn from_parts(
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
            transport: TransportKind::Websocket,
        }
    }
}

/// Why a connection is refused. Each builds its own close ([`Refusal::close`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// This node lost its database or bus (the reason names it).
    Unavailable(String),
    /// The bus refused the subscription.
    BusUnavailable,
    /// This node is at `--max-connections`.
    ServerFull,
    OriginNotAllowed(String),
    /// The request itself is malformed (the text says what).
    BadRequest(String),
    /// The credentials are missing, wrong, expired or ended (the text says which).
    Unauthorized(&'static str),
    BotNotFound(Uuid),
    Forbidden,
    /// The user has this many connections open already (on every node).
    TooManyConnections(usize),
    /// A store error; the text carries the error id that is also logged.
    Internal(String),
}

impl Refusal {
    pub fn close(&self) -> Close {
        match self {
            Refusal::Unavailable(why) => Close::try_again_later(why, DEPENDENCY_RETRY_MS),
            Refusal::BusUnavailable => Close::try_again_later("message bus unavailable", DEPENDENCY_RETRY_MS),
            Refusal::ServerFull => Close::try_again_later("server is at its connection limit", OVERLOAD_RETRY_MS),
            Refusal::OriginNotAllowed(o) => {
                Close::new(CloseCode::OriginNotAllowed, format!("origin {o} is not allowed"))
            }
            Refusal::BadRequest(m) => Close::new(CloseCode::BadRequest, m.clone()),
            Refusal::Unauthorized(m) => Close::new(CloseCode::Unauthorized, *m),
            Refusal::BotNotFound(id) => Close::new(CloseCode::BotNotFound, format!("no bot with id {id}")),
            Refusal::Forbidden => Close::new(CloseCode::Forbidden, "this bot is private and not shared with you"),
            Refusal::TooManyConnections(max) => {
                Close::new(CloseCode::TooManyConnections, format!("this user already has {max} open connections"))
            }
            Refusal::Internal(m) => Close::new(CloseCode::InternalError, m.clone()),
        }
    }

    /// A store error: logged with an error id, which the refusal carries.
    fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        let error_id = Uuid::new_v4();
        tracing::error!(%error_id, error = %e, "store error {what}");
        Refusal::Internal(format!("internal error ({})", crate::telemetry::error_ref(error_id)))
    }
}

/// A refusal, and the user when the credentials identified one before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub refusal: Refusal,
    pub user_id: Option<Uuid>,
}

impl From<Refusal> for Rejected {
    fn from(refusal: Refusal) -> Self {
        Rejected { refusal, user_id: None }
    }
}

/// Everything an admitted connection holds, for its whole life.
pub struct Admission {
    pub user: UserRef,
    /// The login (refresh-token family) of the credentials, if they name one: the connection
    /// closes 4401 when it is revoked.
    pub family: Option<Uuid>,
    pub bot_id: Uuid,
    pub bot_name: String,
    pub engine: EngineSpec,
    pub role: BotRole,
    pub conversation_id: Uuid,
    /// The conversation's last seq, read after the subscription: whatever is committed later
    /// is on the bus.
    pub last_seq: i64,
    /// The client's resume point, if it gave one.
    pub after_seq: Option<i64>,
    /// This node's count of the connection (dropped: gone from the hub).
    pub hub: HubGuard,
    /// Its place in the per-user count shared by every node (released at the close).
    pub slot: Slot,
    pub sub: Subscription,
}

/// What the checks found, before anything is held.
struct Checked {
    user: UserRef,
    family: Option<Uuid>,
    bot_id: Uuid,
    bot_name: String,
    engine: EngineSpec,
    role: BotRole,
    conversation_id: Uuid,
    after_seq: Option<i64>,
}

/// Whether the checks may use up a ticket (a connection), only look (the preflight), or
/// admit a frame POSTed to a stream (no ticket, no connection limits: the stream holds its
/// place).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Connect,
    Preflight,
    Post,
}

/// Admits a connection: every check, then its places in the hub and the cluster, its bus
/// subscription and the conversation's last seq.
pub async fn admit(state: &AppState, req: &ConnectRequest, connection_id: Uuid) -> Result<Admission, Rejected> {
    let checked = check(state, req, Mode::Connect).await?;
    let user_id = checked.user.id;
    hold(state, checked, connection_id).await.map_err(|refusal| Rejected { refusal, user_id: Some(user_id) })
}

/// What [`admit`] would say, without using a ticket or holding anything.
pub async fn preflight(state: &AppState, req: &ConnectRequest) -> Result<(), Rejected> {
    check(state, req, Mode::Preflight).await.map(drop)
}

/// The checks of a frame POSTed to the stream `stream_id` (`chat::post_frame`) by a user the
/// REST layer authenticated (`AuthUser`): origin, bot and role.
pub async fn admit_post(
    state: &AppState,
    user: UserRef,
    family: Option<Uuid>,
    req: &ConnectRequest,
    stream_id: Uuid,
) -> Result<Peer, Rejected> {
    let (bot_id, _) = check_request(state, req)?;
    let c = check_access(state, user, family, bot_id, None, Mode::Post).await?;
    Ok(Peer {
        connection_id: stream_id,
        user_id: c.user.id,
        bot_id: c.bot_id,
        conversation_id: c.conversation_id,
        bot_name: c.bot_name,
        engine: c.engine,
        family: c.family,
    })
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

/// The request's own shape: origin, bot id, resume point, attempt id.
fn check_request(state: &AppState, req: &ConnectRequest) -> Result<(Uuid, Option<i64>), Refusal> {
    // A node that lost its database or bus would serve stale data: it sends clients elsewhere.
    if let Some(reason) = state.cluster.unavailable() {
        return Err(Refusal::Unavailable(reason));
    }
    if let Some(origin) = &req.origin {
        if !origin_allowed(state, origin, req.host.as_deref()) {
            return Err(Refusal::OriginNotAllowed(origin.clone()));
        }
    }
    let bad = |m: &str| Refusal::BadRequest(m.to_owned());
    let bot_id = Uuid::parse_str(&req.bot_id).map_err(|_| bad("bot id is not a valid UUID"))?;
    let after_seq = match &req.after_seq {
        None => None,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => return Err(bad("after_seq must be a whole number >= 0")),
        },
    };
    // Only checked: the session reads it from the request for its ledger row.
    if let Some(s) = &req.attempt_id {
        Uuid::parse_str(s).map_err(|_| bad("attempt_id is not a valid UUID"))?;
    }
    Ok((bot_id, after_seq))
}

/// The checks, in order: origin, request shape, credentials, bot, permission, resume point,
/// connection limits.
async fn check(state: &AppState, req: &ConnectRequest, mode: Mode) -> Result<Checked, Rejected> {
    let (bot_id, after_seq) = check_request(state, req)?;
    let (user, family) = authenticate(state, req, bot_id, mode).await?;
    check_access(state, user, family, bot_id, after_seq, mode).await
}

/// What an identified user may do with the bot: it exists, they have a role, the resume point
/// is in the conversation, and (for a connection) the limits leave room.
async fn check_access(
    state: &AppState,
    user: UserRef,
    family: Option<Uuid>,
    bot_id: Uuid,
    after_seq: Option<i64>,
    mode: Mode,
) -> Result<Checked, Rejected> {
    let user_id = user.id;
    let refuse = |refusal| Rejected { refusal, user_id: Some(user_id) };
    let internal = |e| refuse(Refusal::internal("during admission", e));
    // The last seq when the store was asked (a remembered grant has none).
    let (grant, last_seq) = match state.access.grant(bot_id, user_id) {
        Some(grant) => (grant, None),
        None => {
            let seen = state.access.epoch();
            let bot = state.store.bot(bot_id).await.map_err(internal)?.ok_or(refuse(Refusal::BotNotFound(bot_id)))?;
            let role =
                state.store.bot_role(&bot, user_id).await.map_err(internal)?.ok_or(refuse(Refusal::Forbidden))?;
            let engine = EngineSpec::load(&bot.engine)
                .map_err(|e| refuse(Refusal::internal("loading the engine", e.message)))?;
            let conversation = state.store.conversation(user_id, bot_id).await.map_err(internal)?;
            let grant = Grant { bot_name: bot.name, engine, role, conversation_id: conversation.id };
            state.access.keep_grant(seen, bot_id, user_id, &grant);
            (grant, Some(conversation.last_seq))
        }
    };
    // A connection checks its resume point against the last seq it reads once subscribed
    // (`hold`); the preflight and a POST, which hold nothing, check it here.
    if mode != Mode::Connect {
        if let Some(after) = after_seq {
            let last = match last_seq {
                Some(last) => last,
                None => state.store.conversation(user_id, bot_id).await.map_err(internal)?.last_seq,
            };
            check_resume_point(after, last).map_err(refuse)?;
        }
    }
    let Grant { bot_name, engine, role, conversation_id } = grant;
    let checked = Checked { user, family, bot_id, bot_name, engine, role, conversation_id, after_seq };
    if mode == Mode::Post {
        return Ok(checked);
    }
    if state.hub.len() >= state.config.limits.max_connections {
        return Err(refuse(Refusal::ServerFull));
    }
    let max = state.config.limits.max_connections_per_user;
    // This node's count first (no IO), then every node's: the connection itself takes its
    // place atomically later (`hold`); this gives the preflight the same verdict.
    if state.hub.user_count(user_id) >= max
        || state.cluster.slots_in_use(user_id).await.map_err(internal)?.is_some_and(|n| n >= max)
    {
        return Err(refuse(Refusal::TooManyConnections(max)));
    }
    Ok(checked)
}

/// A resume point beyond the conversation's end: the server lost data (a restored backup) or
/// the client mixed conversations up.
fn check_resume_point(after_seq: i64, last_seq: i64) -> Result<(), Refusal> {
    if after_seq > last_seq {
        let m = format!("after_seq {after_seq} is beyond the conversation's last seq {last_seq}");
        return Err(Refusal::BadRequest(m));
    }
    Ok(())
}

/// Takes the connection's places (this node's hub, every node's per-user count), subscribes
/// to the conversation and reads its last seq — in that order: subscribed before reading, so
/// nothing committed falls between.
async fn hold(state: &AppState, c: Checked, connection_id: Uuid) -> Result<Admission, Refusal> {
    let limits = &state.config.limits;
    let max = limits.max_connections_per_user;
    let login = c.family.map(|f| (f, c.conversation_id));
    let hub = match state.hub.try_register(connection_id, c.user.id, login, max, limits.max_connections) {
        Ok(guard) => guard,
        Err(Full::User) => return Err(Refusal::TooManyConnections(max)),
        Err(Full::Server) => return Err(Refusal::ServerFull),
    };
    let slot = match state.cluster.claim_slot(connection_id, c.user.id, max).await {
        Ok(slot) => slot,
        Err(ClaimError::Full) => return Err(Refusal::TooManyConnections(max)),
        Err(ClaimError::Unavailable) => return Err(Refusal::Unavailable("database unavailable".into())),
    };
    let sub = state.bus.subscribe(c.conversation_id).await.map_err(|e| {
        tracing::warn!(error = %e, "bus unavailable");
        Refusal::BusUnavailable
    })?;
    // A logout racing this connect: either its revocation is in the set now, or it comes
    // after, and then its announcement reaches this (registered, subscribed) connection.
    if c.family.is_some_and(|f| state.revocations.is_revoked(f)) {
        return Err(Refusal::Unauthorized(REVOKED_REASON));
    }
    let last_seq = match state.store.conversation(c.user.id, c.bot_id).await {
        Ok(conv) => conv.last_seq,
        Err(e) => return Err(Refusal::internal("reading the conversation", e)),
    };
    if let Some(after) = c.after_seq {
        check_resume_point(after, last_seq)?;
    }
    Ok(Admission {
        user: c.user,
        family: c.family,
        bot_id: c.bot_id,
        bot_name: c.bot_name,
        engine: c.engine,
        role: c.role,
        conversation_id: c.conversation_id,
        last_seq,
        after_seq: c.after_seq,
        hub,
        slot,
        sub,
    })
}

/// The user and the login (refresh-token family) the credentials belong to.
async fn authenticate(
    state: &AppState,
    req: &ConnectRequest,
    bot_id: Uuid,
    mode: Mode,
) -> Result<(UserRef, Option<Uuid>), Rejected> {
    if let Some(ticket) = &req.ticket {
        return authenticate_ticket(state, ticket, bot_id, mode).await;
    }
    let Some(token) = &req.token else {
        return Err(Refusal::Unauthorized("missing token: pass ?token=<access token> or ?ticket=<ticket>").into());
    };
    let as_user = |user_id, refusal| Rejected { refusal, user_id };
    match state.keys.verify(token) {
        Ok(claims) if claims.sid.is_some_and(|f| state.revocations.is_revoked(f)) => {
            Err(as_user(Some(claims.sub), Refusal::Unauthorized(REVOKED_REASON)))
        }
        Ok(claims) => match state.access.known_user(&*state.store, claims.sub).await {
            Ok(Some(user)) => Ok((user, claims.sid)),
            Ok(None) => Err(Refusal::Unauthorized("invalid token: its user no longer exists").into()),
            Err(e) => Err(Refusal::internal("checking a token's user", e).into()),
        },
        Err(TokenError::Expired) => {
            Err(as_user(state.keys.identify(token), Refusal::Unauthorized("token expired: refresh it and reconnect")))
        }
        Err(TokenError::Invalid) => Err(Refusal::Unauthorized("invalid token: malformed or bad signature").into()),
    }
}

/// A ticket from `POST /api/ws/ticket`: used up by a connection, only looked at by the
/// preflight.
async fn authenticate_ticket(
    state: &AppState,
    ticket: &str,
    bot_id: Uuid,
    mode: Mode,
) -> Result<(UserRef, Option<Uuid>), Rejected> {
    let hash = hash_opaque(ticket);
    let found = match mode {
        Mode::Connect => state.store.consume_ticket(&hash, Utc::now()).await,
        Mode::Preflight | Mode::Post => state.store.peek_ticket(&hash, Utc::now()).await,
    };
    let (user_id, ticket_bot) = found
        .map_err(|e| Refusal::internal("checking a ticket", e))?
        .ok_or(Refusal::Unauthorized("ticket is unknown, expired or already used"))?;
    let as_user = |refusal| Rejected { refusal, user_id: Some(user_id) };
    if ticket_bot != bot_id {
        return Err(as_user(Refusal::Unauthorized("ticket was issued for another bot")));
    }
    let user = state
        .access
        .known_user(&*state.store, user_id)
        .await
        .ok()
        .flatten()
        .ok_or(Refusal::Unauthorized("ticket's user no longer exists"))?;
    let family = crate::auth::ticket_family(ticket);
    if family.is_some_and(|f| state.revocations.is_revoked(f)) {
        return Err(as_user(Refusal::Unauthorized(REVOKED_REASON)));
    }
    Ok((user, family))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_closes_with_its_code_and_a_retry_hint_where_one_applies() {
        let cases = [
            (Refusal::Unavailable("database unavailable".into()), CloseCode::TryAgainLater, Some(DEPENDENCY_RETRY_MS)),
            (Refusal::BusUnavailable, CloseCode::TryAgainLater, Some(DEPENDENCY_RETRY_MS)),
            (Refusal::ServerFull, CloseCode::TryAgainLater, Some(OVERLOAD_RETRY_MS)),
            (Refusal::OriginNotAllowed("https://evil.example".into()), CloseCode::OriginNotAllowed, None),
            (Refusal::BadRequest("bot id is not a valid UUID".into()), CloseCode::BadRequest, None),
            (Refusal::Unauthorized(REVOKED_REASON), CloseCode::Unauthorized, None),
            (Refusal::BotNotFound(Uuid::nil()), CloseCode::BotNotFound, None),
            (Refusal::Forbidden, CloseCode::Forbidden, None),
            (Refusal::TooManyConnections(3), CloseCode::TooManyConnections, None),
            (Refusal::Internal("internal error (error id x)".into()), CloseCode::InternalError, None),
        ];
        for (refusal, code, hint) in cases {
            let close = refusal.close();
            assert_eq!(close.code, code, "{refusal:?}");
            assert!(!close.reason.is_empty() && close.reason.len() <= 123, "{refusal:?}: {}", close.reason);
            assert_eq!(Close::retry_after_ms(&close.reason), hint, "{refusal:?}: {}", close.reason);
        }
        assert_eq!(Refusal::TooManyConnections(3).close().reason, "this user already has 3 open connections");
    }
}
