//! The chat's REST endpoints beside its transports: `POST /api/ws/ticket`,
//! `GET /api/ws/preflight/{bot_id}` (the admission's verdict without a connection) and
//! `GET /api/ws/codes` (the close- and error-code registry).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use chrono::Utc;
use natter_proto::api::{Preflight, TicketRequest, TicketResponse};
use natter_proto::codes::CodeRegistry;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, AuthUser};
use crate::auth::{hash_opaque, new_ticket};
use crate::chat::{ConnectRequest, Rejected};
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

#[utoipa::path(get, path = "/api/ws/codes", tag = "chat",
    responses((status = 200, body = CodeRegistry, description = "Every close code and error code, with retry policy and help")))]
pub async fn codes() -> Json<CodeRegistry> {
    Json(CodeRegistry::build())
}
