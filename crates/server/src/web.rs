//! The web app, served at `/` for every path outside `/api`.
//!
//! Release builds carry `web/dist` inside the binary (built with `make web` before `cargo build
//! --release`), so an installed `natter` needs no source tree; debug builds read the same files
//! from disk. `--web-dir` serves another directory instead. Hashed assets under `/assets/` are
//! cached for a year; everything else (index.html) is revalidated on every load.

use std::path::{Component, Path, PathBuf};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use rust_embed::RustEmbed;

use crate::config::Config;

#[derive(RustEmbed)]
#[folder = "../../web/dist"]
#[allow_missing = true]
struct Embedded;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const REVALIDATE: &str = "no-cache";

/// A file to serve: its bytes, content type and a strong validator.
struct File {
    bytes: Vec<u8>,
    mime: String,
    etag: String,
}

fn embedded(path: &str) -> Option<File> {
    let f = Embedded::get(path)?;
    Some(File {
        mime: f.metadata.mimetype().to_owned(),
        etag: format!("\"{}\"", hex::encode(f.metadata.sha256_hash())),
        bytes: f.data.into_owned(),
    })
}

async fn from_dir(dir: &Path, path: &str) -> Option<File> {
    // Only plain relative components: no `..`, no absolute paths.
    let rel = PathBuf::from(path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let bytes = tokio::fs::read(dir.join(&rel)).await.ok()?;
    let etag = {
        use sha2::{Digest, Sha256};
        format!("\"{}\"", hex::encode(Sha256::digest(&bytes)))
    };
    let mime = mime_for(path);
    Some(File { bytes, mime, etag })
}

fn mime_for(path: &str) -> String {
    match Path::new(path).extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
    .to_owned()
}

/// Whether the built app is available (embedded or on disk).
pub fn available(config: &Config) -> bool {
    match &config.web_dir {
        Some(dir) => dir.join("index.html").is_file(),
        None => Embedded::get("index.html").is_some(),
    }
}

async fn lookup(config_dir: Option<&Path>, path: &str) -> Option<File> {
    match config_dir {
        Some(dir) => from_dir(dir, path).await,
        None => embedded(path),
    }
}

async fn serve(dir: Option<PathBuf>, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    let (file, cache) = match lookup(dir.as_deref(), path).await {
        Some(f) => (f, if path.starts_with("assets/") { IMMUTABLE } else { REVALIDATE }),
        // Client-side routes (no extension) get the app; a missing asset is a 404.
        None if Path::new(path).extension().is_none() => match lookup(dir.as_deref(), "index.html").await {
            Some(f) => (f, REVALIDATE),
            None => return not_built(),
        },
        None => return (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(file.etag.as_str()) {
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header(header::ETAG, &file.etag)
            .header(header::CACHE_CONTROL, cache)
            .body(Body::empty())
            .expect("valid response");
    }
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_str(&file.mime).unwrap_or(HeaderValue::from_static("application/octet-stream")),
        )
        .header(header::ETAG, &file.etag)
        .header(header::CACHE_CONTROL, cache)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .body(Body::from(file.bytes))
        .expect("valid response")
}

fn not_built() -> Response {
    (
        StatusCode::NOT_FOUND,
        "natter is running, but the web app is not built into this binary. Build it with `make web` (or pass --web-dir web/dist). The API lives under /api.",
    )
        .into_response()
}

/// The handler for every path outside `/api`.
pub fn service(config: &Config) -> MethodRouter {
    let dir = config.web_dir.clone();
    get(move |uri: Uri, headers: HeaderMap| serve(dir.clone(), uri, headers))
}
