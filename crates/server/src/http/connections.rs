//! `/api/connections`: the connection ledger, so a user (and `natter doctor`, and the web
//! app's diagnostics) can ask how and why their sockets ended. Users see their own attempts —
//! including refused ones whose credentials identified them; admins see everyone's.

use axum::extract::State;
use axum::Json;
use natter_proto::api::ConnectionRecord;
use natter_proto::ErrorCode;
use serde::Deserialize;
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiPath, ApiQuery, AuthUser};
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ConnectionsQuery {
    /// Only attempts to this bot.
    pub bot_id: Option<Uuid>,
    /// 1 to 500, default 50.
    pub limit: Option<u32>,
    /// Admins only: everyone's attempts, not just the caller's.
    pub all: Option<bool>,
}

async fn is_admin(state: &AppState, user: &AuthUser) -> ApiResult<bool> {
    Ok(state.store.user_by_id(user.id).await?.is_some_and(|u| u.is_admin))
}

#[utoipa::path(get, path = "/api/connections", tag = "connections", security(("bearer" = [])), params(ConnectionsQuery),
    responses((status = 200, body = Vec<ConnectionRecord>, description = "Newest first"), (status = 403, body = natter_proto::api::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    ApiQuery(q): ApiQuery<ConnectionsQuery>,
) -> ApiResult<Json<Vec<ConnectionRecord>>> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(ErrorCode::InvalidQuery, "limit must be between 1 and 500"));
    }
    let owner = if q.all.unwrap_or(false) {
        if !is_admin(&state, &user).await? {
            return Err(ApiError::forbidden("only admins may see everyone's connections"));
        }
        None
    } else {
        Some(user.id)
    };
    Ok(Json(state.store.connections(owner, q.bot_id, limit).await?))
}

#[utoipa::path(get, path = "/api/connections/{attempt_id}", tag = "connections", security(("bearer" = [])),
    params(("attempt_id" = Uuid, Path, description = "The attempt id the client passed, or the connection id")),
    responses((status = 200, body = ConnectionRecord), (status = 404, body = natter_proto::api::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<ConnectionRecord>> {
    let not_found = || ApiError::not_found(format!("no connection attempt {id} of yours"));
    // Only the caller's own rows (an admin's: everyone's). Anyone can connect with any
    // attempt id, so the newest row of all could be someone else's: looked up unscoped and
    // then refused, it hid the caller's own row (issue 14).
    let owner = if is_admin(&state, &user).await? { None } else { Some(user.id) };
    Ok(Json(state.store.connection(id, owner).await?.ok_or_else(not_found)?))
}
