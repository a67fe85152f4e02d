//! The web app's files, served at `/` for every path outside `/api`.

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get_service, MethodRouter};

use crate::config::Config;

/// Serves `config.web_dir` when set; otherwise a page that says how to build the app.
pub fn service(config: &Config) -> MethodRouter {
    match &config.web_dir {
        Some(dir) => get_service(tower_http::services::ServeDir::new(dir).fallback(tower_http::services::ServeFile::new(dir.join("index.html")))),
        None => axum::routing::get(|| async {
            (StatusCode::NOT_FOUND, "natter is running; the web app is not built into this binary. The API lives under /api.").into_response()
        }),
    }
}
