//! The chat's REST endpoints beside its transports: `POST /api/ws/ticket`,
//! `GET /api/ws/preflight/{bot_id}` (the admission's verdict without a connection) and
//! `GET /api/ws/codes` (the close- and error-code registry).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use natter_proto::api::{Preflight, TicketRequest, TicketResponse, UserRef};
use natter_proto::codes::CodeRegistry;
use natter_proto::ErrorCode;
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery, AuthUser};
use crate::auth::{hash_opaque, new_ticket};
use crate::chat::{ConnectRequest, Refusal, Rejected};
use crate::state::AppState;

/// How long a ticket from `POST /api/ws/ticket` stays valid.
pub const TICKET_TTL_SECS: u64 = 30;

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
    Json(match crate::chat::preflight(&state, &req).await {
        Ok(()) => Preflight { ok: true, close_code: None, reason: None },
        Err(Rejected { refusal, .. }) => {
            let close = refusal.close();
            Preflight { ok: false, close_code: Some(close.code.code()), reason: Some(close.reason) }
        }
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
    let ticket = new_ticket(user.family);
    let expires = Utc::now() + chrono::Duration::seconds(TICKET_TTL_SECS as i64);
    state.store.create_ticket(&hash_opaque(&ticket), user.id, bot.id, expires).await?;
    Ok(Json(TicketResponse { ticket, expires_in: TICKET_TTL_SECS }))
}

/// Which stream a POSTed frame is for.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct StreamQuery {
    /// The `connection_id` of the stream (its `connection_established` and `stream` events).
    pub stream: String,
}

#[utoipa::path(post, path = "/api/sse/chat/{bot_id}/frames", tag = "chat", security(("bearer" = [])),
    params(("bot_id" = String, Path), StreamQuery),
    request_body(content = String, description = "One client frame (JSON): message, cancel or ping", content_type = "application/json"),
    responses((status = 200, description = "The frame's outcome: an ack, an error or a pong (a server frame)"),
        (status = 202, description = "Accepted; nothing to say (a cancel)"),
        (status = 400, body = natter_proto::api::ErrorBody), (status = 401, body = natter_proto::api::ErrorBody),
        (status = 403, body = natter_proto::api::ErrorBody), (status = 404, body = natter_proto::api::ErrorBody)))]
pub async fn post_frame(
    State(state): State<AppState>,
    Path(bot_id): Path<String>,
    ApiQuery(query): ApiQuery<StreamQuery>,
    user: AuthUser,
    headers: HeaderMap,
    body: String,
) -> ApiResult<Response> {
    let stream = Uuid::parse_str(&query.stream)
        .map_err(|_| ApiError::bad_request(ErrorCode::InvalidQuery, "stream is not a valid UUID"))?;
    // The origin and host the admission checks; the credentials were checked by `AuthUser`.
    let req = ConnectRequest::from_parts(bot_id, HashMap::new(), &headers, None);
    let identity = UserRef { id: user.id, username: user.username };
    let peer = crate::chat::admit_post(&state, identity, user.family, &req, stream)
        .await
        .map_err(|r| refusal_error(r.refusal))?;
    Ok(match crate::chat::post_frame(&state, &peer, &body).await? {
        Some(frame) => ([(header::CONTENT_TYPE, "application/json")], frame.to_json()).into_response(),
        None => StatusCode::ACCEPTED.into_response(),
    })
}

/// A refused POST as the REST error its close code stands for.
fn refusal_error(refusal: Refusal) -> ApiError {
    let close = refusal.close();
    match refusal {
        // Not from `admit_post` (the token is `AuthUser`'s), but a refusal is a refusal.
        Refusal::Unauthorized(m) => ApiError::unauthorized(ErrorCode::InvalidToken, m),
        Refusal::Forbidden | Refusal::OriginNotAllowed(_) => ApiError::forbidden(close.reason),
        Refusal::BotNotFound(_) => ApiError::not_found(close.reason),
        Refusal::BadRequest(m) => ApiError::bad_request(ErrorCode::BadRequest, m),
        Refusal::Internal(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, m),
        _ => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NotReady, close.reason),
    }
}

#[utoipa::path(get, path = "/api/ws/codes", tag = "chat",
    responses((status = 200, body = CodeRegistry, description = "Every close code and error code, with retry policy and help")))]
pub async fn codes() -> Json<CodeRegistry> {
    Json(CodeRegistry::build())
}
