//! `/api/auth/*`: registration, login, token refresh with rotation and reuse detection, logout.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use natter_proto::api::{Credentials, RefreshRequest, TokenPair, UserView};
use natter_proto::ErrorCode;
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, AuthUser};
use crate::accounts::{self, AccountError};
use crate::auth::{hash_opaque, new_opaque_token};
use crate::domain::{Password, Username};
use crate::passwords::{self, Busy};
use crate::revocation;
use crate::state::AppState;
use crate::store::{NewRefreshToken, RefreshUse, User};

pub fn user_view(u: &User) -> UserView {
    UserView { id: u.id, username: u.username.clone(), is_admin: u.is_admin, created_at: u.created_at }
}

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::Busy => auth_busy(),
            AccountError::Store(e) => e.into(),
        }
    }
}

/// How long a client refused by a full password pool should wait: one round of the pool's
/// work is well under a second; a little more spreads the retries.
const AUTH_BUSY_RETRY: Duration = Duration::from_secs(2);

fn auth_busy() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::AuthBusy,
        "the server is checking too many passwords at once; retry shortly",
    )
    .retry_after(AUTH_BUSY_RETRY)
}

#[utoipa::path(post, path = "/api/auth/register", tag = "auth", request_body = Credentials,
    responses((status = 201, body = UserView), (status = 400, body = natter_proto::api::ErrorBody), (status = 409, body = natter_proto::api::ErrorBody)))]
pub async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    if !state.config.registration_open {
        return Err(
            ApiError::forbidden("registration is closed on this server").with_code(ErrorCode::RegistrationClosed)
        );
    }
    let username = Username::parse(&body.username)?;
    let password = Password::parse(&body.password)?;
    let user = accounts::create_user(&state.passwords, &*state.store, username, password, false).await?;
    tracing::info!(user_id = %user.id, username = %user.username, "user registered");
    Ok((StatusCode::CREATED, Json(user_view(&user))))
}

async fn issue_pair(state: &AppState, user_id: Uuid, username: &str, family_id: Uuid) -> ApiResult<TokenPair> {
    let refresh = new_opaque_token();
    state
        .store
        .insert_refresh_token(NewRefreshToken {
            token_hash: hash_opaque(&refresh),
            user_id,
            family_id,
            expires_at: Utc::now() + state.config.refresh_token_ttl,
        })
        .await?;
    Ok(TokenPair {
        access_token: state.keys.issue(user_id, username, family_id),
        refresh_token: refresh,
        token_type: "bearer".into(),
        expires_in: state.keys.ttl().as_secs(),
    })
}

fn invalid_credentials() -> ApiError {
    ApiError::unauthorized(ErrorCode::InvalidCredentials, "wrong username or password")
}

#[utoipa::path(post, path = "/api/auth/login", tag = "auth", request_body = Credentials,
    responses((status = 200, body = TokenPair), (status = 401, body = natter_proto::api::ErrorBody)))]
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<Json<TokenPair>> {
    // Before any work: a throttled attempt costs no hash. Known and unknown usernames are
    // counted alike, and both run one hash below, so neither status nor timing tells them apart.
    let attempt = state.throttle.begin(&body.username, peer.ip()).map_err(|wait| {
        tracing::info!(username = %crate::logsafe::Untrusted(&body.username), peer = %peer.ip(), "login throttled");
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyAttempts,
            "too many failed logins for this username or from this address; wait before trying again",
        )
        .retry_after(wait)
    })?;
    let user = state.store.user_by_username(&body.username).await?;
    let hash = user.as_ref().map_or(passwords::dummy_hash(), |u| u.password_hash.as_str());
    let ok = state.passwords.verify(&body.password, hash).await.map_err(|Busy| auth_busy())?;
    let user = match (user, ok) {
        (Some(u), true) => u,
        _ => {
            attempt.failed();
            tracing::info!(username = %crate::logsafe::Untrusted(&body.username), peer = %peer.ip(), "login refused");
            return Err(invalid_credentials());
        }
    };
    attempt.succeeded();
    tracing::info!(user_id = %user.id, "login");
    Ok(Json(issue_pair(&state, user.id, &user.username, Uuid::new_v4()).await?))
}

#[utoipa::path(post, path = "/api/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = TokenPair), (status = 401, body = natter_proto::api::ErrorBody)))]
pub async fn refresh(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> ApiResult<Json<TokenPair>> {
    match state.store.use_refresh_token(&hash_opaque(&body.refresh_token), Utc::now()).await? {
        RefreshUse::Valid { user_id, family_id } => {
            let user = state.store.user_by_id(user_id).await?.ok_or_else(|| {
                ApiError::unauthorized(ErrorCode::InvalidRefreshToken, "the refresh token's user no longer exists")
            })?;
            Ok(Json(issue_pair(&state, user.id, &user.username, family_id).await?))
        }
        RefreshUse::Reused { family_id } => {
            tracing::warn!("refresh token reused; its family was revoked");
            // Whoever holds this login's tokens (the thief or the user) must log in again.
            revocation::revoke(&state, family_id).await;
            Err(ApiError::unauthorized(
                ErrorCode::RefreshTokenReused,
                "this refresh token was already used; every token of this login is now revoked. Log in again",
            ))
        }
        RefreshUse::Invalid => Err(ApiError::unauthorized(
            ErrorCode::InvalidRefreshToken,
            "the refresh token is unknown, expired or revoked; log in again",
        )),
    }
}

#[utoipa::path(post, path = "/api/auth/logout", tag = "auth", request_body = RefreshRequest,
    responses((status = 204, description = "The refresh token's login is ended: its refresh tokens, its access tokens (401 token_revoked) and its sockets (closed 4401), on every node")))]
pub async fn logout(State(state): State<AppState>, ApiJson(body): ApiJson<RefreshRequest>) -> ApiResult<StatusCode> {
    if let Some(family) = state.store.revoke_refresh_token(&hash_opaque(&body.refresh_token), Utc::now()).await? {
        // The login's access tokens and sockets end now, on every node, not when they expire.
        revocation::revoke(&state, family).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = natter_proto::api::ErrorBody)))]
pub async fn me(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<UserView>> {
    let u = state
        .store
        .user_by_id(user.id)
        .await?
        .ok_or_else(|| ApiError::unauthorized(ErrorCode::InvalidToken, "the token's user no longer exists"))?;
    Ok(Json(user_view(&u)))
}
