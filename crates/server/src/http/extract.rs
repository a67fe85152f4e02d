//! Extractors that answer bad input with [`ApiError`] instead of axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, MissingJsonContentType};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use natter_proto::ErrorCode;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::ApiError;
use crate::auth::{Claims, TokenError};
use crate::domain::json_nul_path;
use crate::state::AppState;

/// A JSON object body. Unlike `axum::Json` it refuses a JSON array, which serde would
/// otherwise accept for a struct by field position (`["alice", "pw"]` as credentials).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(JsonRejection::from(MissingJsonContentType::default()).into());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(JsonRejection::from)?;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|b| *b != b'{') {
            return Err(ApiError::bad_request(ErrorCode::InvalidBody, "the body must be a JSON object"));
        }
        // `from_bytes` names the field of a type error ("username: invalid type ...").
        let axum::Json(value) = axum::Json::<T>::from_bytes(&bytes)?;
        refuse_nul(&bytes)?;
        Ok(ApiJson(value))
    }
}

/// NUL can only reach a JSON string as the escape `\u0000` (a raw one is invalid JSON), so
/// bodies without that text skip the walk. One check for every body: see [`json_nul_path`].
fn refuse_nul(bytes: &[u8]) -> Result<(), ApiError> {
    if !bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
        return Ok(());
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(ErrorCode::InvalidBody, e.to_string()))?;
    match json_nul_path(&value) {
        None => Ok(()),
        Some(field) => Err(ApiError::bad_request(
            ErrorCode::InvalidBody,
            format!("{field}: strings must not contain NUL (U+0000)"),
        )),
    }
}

/// `application/json`, or `application/<something>+json`, as `axum::Json` accepts.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Path parameters.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Query parameters.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// The caller, from `Authorization: Bearer <access token>`.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: Uuid,
    pub username: String,
    /// The token's login (refresh-token family), if the token names one.
    pub family: Option<Uuid>,
}

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A token of a login that was ended (logout, refresh-token reuse).
pub fn revoked() -> ApiError {
    ApiError::unauthorized(ErrorCode::TokenRevoked, "this login was ended (logged out); log in again")
}

pub fn token_error(e: TokenError) -> ApiError {
    match e {
        TokenError::Expired => {
            ApiError::unauthorized(ErrorCode::TokenExpired, "the access token has expired; refresh it")
        }
        TokenError::Invalid => {
            ApiError::unauthorized(ErrorCode::InvalidToken, "the access token is malformed or its signature is wrong")
        }
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized(ErrorCode::MissingToken, "send an access token as Authorization: Bearer <token>")
        })?;
        let Claims { sub, sid, .. } = state.keys.verify(token).map_err(token_error)?;
        if sid.is_some_and(|f| state.revocations.is_revoked(f)) {
            return Err(revoked());
        }
        // A good signature says who the user was when the token was issued; the user may
        // be gone since (deleted, or a fresh database under the same secret). Without this
        // look-up such a token got as far as the store and failed there as a 500.
        // Remembered for a few seconds on one node (`AccessCache::known_user`): every SSE POST
        // is a request of its own.
        let user = state
            .access
            .known_user(&*state.store, sub)
            .await?
            .ok_or_else(|| ApiError::unauthorized(ErrorCode::InvalidToken, "the token's user no longer exists"))?;
        Ok(AuthUser { id: user.id, username: user.username, family: sid })
    }
}
