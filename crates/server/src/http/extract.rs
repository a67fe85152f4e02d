//! Extractors that answer bad input with [`ApiError`] instead of axum's plain-text rejections.

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use natter_proto::ErrorCode;
use uuid::Uuid;

use super::error::ApiError;
use crate::app::AppState;
use crate::auth::{Claims, TokenError};

/// A JSON body.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

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
}

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub fn token_error(e: TokenError) -> ApiError {
    match e {
        TokenError::Expired => ApiError::unauthorized(ErrorCode::TokenExpired, "the access token has expired; refresh it"),
        TokenError::Invalid => ApiError::unauthorized(ErrorCode::InvalidToken, "the access token is malformed or its signature is wrong"),
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized(ErrorCode::MissingToken, "send an access token as Authorization: Bearer <token>")
        })?;
        let Claims { sub, name, .. } = state.keys.verify(token).map_err(token_error)?;
        Ok(AuthUser { id: sub, username: name })
    }
}
