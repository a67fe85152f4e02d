//! The REST API of issue 2, endpoint by endpoint: every success, every documented error,
//! and what the bot endpoints' successes do (the table of who may call what is `authz.rs`).
//!
//! Every error answer must be `{"error": {"code", "message"}}`; [`expect_error`] checks
//! the status, the code and that the message is a non-empty sentence.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use natter_proto::{MessageRole, MessageStatus, ServerFrame};
use natter_server::config::Database;
use natter_server::store::{NewMessage, Store};
use reqwest::header::{HeaderMap, CONTENT_TYPE};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

// ---------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------

/// Sends a request; returns the status, the headers and the body as text.
async fn send_raw(req: reqwest::RequestBuilder) -> (u16, HeaderMap, String) {
    let res = req.send().await.expect("request sent");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (status, headers, res.text().await.unwrap())
}

/// Sends a request; returns the status and the body parsed as JSON (`Null` when empty).
async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let (status, _, text) = send_raw(req).await;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (status, body)
}

/// Asserts an error answer: its status, its stable code, and a human message.
#[track_caller]
fn expect_error(res: &(u16, Value), status: u16, code: &str) {
    let (got_status, body) = res;
    assert_eq!((*got_status, body["error"]["code"].as_str()), (status, Some(code)), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "an error carries a message: {body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "only `error` at the top: {body}");
}

/// The error message of an error answer.
fn message(res: &(u16, Value)) -> &str {
    res.1["error"]["message"].as_str().unwrap_or_default()
}

fn creds(username: &str, password: &str) -> Value {
    json!({"username": username, "password": password})
}

/// The server's JWT signing secret, as `natter serve` keeps it in the data dir.
fn jwt_secret(app: &TestApp) -> Vec<u8> {
    let hex_secret = std::fs::read_to_string(app.dir.path().join("jwt-secret")).unwrap();
    hex::decode(hex_secret.trim()).unwrap()
}

/// Signs an access token for `user` with the given algorithm, key and expiry.
fn sign(user: &TestUser, alg: Algorithm, key: &[u8], exp_from_now: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": user.id, "name": user.username, "iat": now - 1000, "exp": now + exp_from_now});
    jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(key)).unwrap()
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

async fn add_member(app: &TestApp, by: &TestUser, bot: Uuid, username: &str, role: &str) {
    let res = app
        .post(&format!("/api/bots/{bot}/members"), Some(&by.token), json!({"username": username, "role": role}))
        .await;
    assert_eq!(res.0, 200, "{}", res.1);
}

// ---------------------------------------------------------------------------------------
// Health, readiness, OpenAPI
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn health_is_ok_with_the_version_and_the_node() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/api/health", None).await;
    assert_eq!(status, 200);
    let node = app.state.cluster.node().node_id.to_string();
    assert_eq!(body, json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "node_id": node}));
}

#[tokio::test]
async fn ready_is_ok_while_the_store_answers_and_503_naming_the_store_when_not() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/api/ready", None).await;
    assert_eq!((status, &body), (200, &json!({"status": "ok"})));

    app.state.store.close().await;
    let (status, body) = app.get("/api/ready", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unavailable");
    let failed = body["failed"].as_array().expect("a list of what failed");
    assert_eq!(failed.len(), 1, "{body}");
    assert!(failed[0].as_str().unwrap().starts_with("store:"), "{body}");

    // Liveness does not touch the store.
    assert_eq!(app.get("/api/health", None).await.0, 200);
}

#[tokio::test]
async fn openapi_document_lists_every_api_path() {
    let app = TestApp::spawn().await;
    let (status, doc) = app.get("/api/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "an OpenAPI 3 document");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let expected: &[(&str, &[&str])] = &[
        ("/api/health", &["get"]),
        ("/api/ready", &["get"]),
        ("/api/auth/register", &["post"]),
        ("/api/auth/login", &["post"]),
        ("/api/auth/refresh", &["post"]),
        ("/api/auth/logout", &["post"]),
        ("/api/auth/me", &["get"]),
        ("/api/bots", &["get", "post"]),
        ("/api/bots/{id}", &["get", "patch", "delete"]),
        ("/api/bots/{id}/members", &["get", "post"]),
        ("/api/bots/{id}/members/{username}", &["delete"]),
        ("/api/bots/{id}/messages", &["get"]),
        ("/api/ws/ticket", &["post"]),
        ("/api/ws/codes", &["get"]),
        ("/api/ws/preflight/{bot_id}", &["get"]),
    ];
    for (path, methods) in expected {
        let item = &doc["paths"][path];
        assert!(item.is_object(), "{path} is missing from the OpenAPI paths");
        for m in *methods {
            assert!(item[m].is_object(), "{m} {path} is missing from the OpenAPI document");
        }
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
}

#[tokio::test]
async fn codes_registry_documents_the_rest_error_codes() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/api/ws/codes", None).await;
    assert_eq!(status, 200);
    assert!(!body["close_codes"].as_array().unwrap().is_empty());
    let documented: Vec<&str> =
        body["error_codes"].as_array().unwrap().iter().map(|c| c["code"].as_str().unwrap()).collect();
    for code in REST_ERROR_CODES {
        assert!(documented.contains(code), "{code} is not in /api/ws/codes");
    }
}

/// Every error code these tests expect from the REST API.
const REST_ERROR_CODES: &[&str] = &[
    "invalid_body",
    "invalid_id",
    "invalid_username",
    "invalid_password",
    "invalid_bot",
    "invalid_query",
    "username_taken",
    "registration_closed",
    "invalid_credentials",
    "missing_token",
    "invalid_token",
    "token_expired",
    "invalid_refresh_token",
    "refresh_token_reused",
    "forbidden",
    "not_found",
    "user_not_found",
    "conflict",
    "method_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
    "internal",
];

// ---------------------------------------------------------------------------------------
// Registration and request bodies
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn register_answers_201_with_the_user_and_no_secret() {
    let app = TestApp::spawn().await;
    let (status, body) = app.post("/api/auth/register", None, creds("alice", PASSWORD)).await;
    assert_eq!(status, 201, "{body}");
    let mut keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["created_at", "id", "is_admin", "username"]);
    assert_eq!(body["username"], "alice");
    assert_eq!(body["is_admin"], false);
    Uuid::parse_str(body["id"].as_str().unwrap()).expect("the id is a UUID");
    let text = body.to_string();
    assert!(!text.contains(PASSWORD) && !text.contains("argon2"), "{text}");
    // Stored as an argon2id hash, never as the password.
    let stored = app.state.store.user_by_username("alice").await.unwrap().unwrap();
    assert!(stored.password_hash.starts_with("$argon2id$"), "{}", stored.password_hash);
    assert!(!stored.password_hash.contains(PASSWORD));
}

#[tokio::test]
async fn register_enforces_the_username_rules() {
    let app = TestApp::spawn().await;
    let too_long = "x".repeat(33);
    for bad in ["", "ab", too_long.as_str(), "Alice", "al ice", "élan", "bob!", "a/b"] {
        let res = app.post("/api/auth/register", None, creds(bad, PASSWORD)).await;
        expect_error(&res, 400, "invalid_username");
    }
    let longest = "y".repeat(32);
    for good in ["abc", "a_b.c-d9", longest.as_str()] {
        let (status, body) = app.post("/api/auth/register", None, creds(good, PASSWORD)).await;
        assert_eq!(status, 201, "{good}: {body}");
    }
}

#[tokio::test]
async fn register_wants_a_password_of_8_to_1024_characters() {
    let app = TestApp::spawn().await;
    let res = app.post("/api/auth/register", None, creds("alice", "1234567")).await;
    expect_error(&res, 400, "invalid_password");
    let res = app.post("/api/auth/register", None, creds("alice", "")).await;
    expect_error(&res, 400, "invalid_password");
    let res = app.post("/api/auth/register", None, creds("alice", &"p".repeat(1025))).await;
    expect_error(&res, 400, "invalid_password");
    assert_eq!(app.post("/api/auth/register", None, creds("alice", "12345678")).await.0, 201);
}

#[tokio::test]
async fn register_twice_is_409_username_taken() {
    let app = TestApp::spawn().await;
    app.register("alice").await;
    let res = app.post("/api/auth/register", None, creds("alice", "another-password")).await;
    expect_error(&res, 409, "username_taken");
}

#[tokio::test]
async fn register_is_403_when_registration_is_closed() {
    let app = TestApp::spawn_with(|cfg| cfg.registration_open = false).await;
    let res = app.post("/api/auth/register", None, creds("alice", PASSWORD)).await;
    expect_error(&res, 403, "registration_closed");
    // Nobody was created.
    expect_error(&app.post("/api/auth/login", None, creds("alice", PASSWORD)).await, 401, "invalid_credentials");
}

#[tokio::test]
async fn bad_json_bodies_are_400_invalid_body_naming_the_field() {
    let app = TestApp::spawn().await;
    let raw = |body: &'static str| {
        app.http.post(app.url("/api/auth/register")).header(CONTENT_TYPE, "application/json").body(body)
    };

    let res = send(raw(r#"{"username": "alice", "password": "#)).await;
    expect_error(&res, 400, "invalid_body");

    let res = send(raw(r#"{"username": "alice"}"#)).await;
    expect_error(&res, 400, "invalid_body");
    assert!(message(&res).contains("password"), "names the missing field: {}", message(&res));

    let res = send(raw(r#"{"username": 42, "password": "12345678"}"#)).await;
    expect_error(&res, 400, "invalid_body");
    assert!(message(&res).contains("username"), "names the mistyped field: {}", message(&res));

    // serde would take an array for a struct, field by field; the API takes objects only.
    let res = send(raw(r#"["alice", "12345678"]"#)).await;
    expect_error(&res, 400, "invalid_body");
    expect_error(&send(raw(r#""alice""#)).await, 400, "invalid_body");
    expect_error(&send(raw("")).await, 400, "invalid_body");
}

#[tokio::test]
async fn bodies_over_1_mib_are_413() {
    let app = TestApp::spawn().await;
    let envelope = creds("alice", "").to_string();
    // One byte over the limit.
    let padding = "p".repeat(1024 * 1024 + 1 - envelope.len());
    let body = creds("alice", &padding).to_string();
    assert_eq!(body.len(), 1024 * 1024 + 1);
    let res =
        send(app.http.post(app.url("/api/auth/register")).header(CONTENT_TYPE, "application/json").body(body)).await;
    expect_error(&res, 413, "payload_too_large");

    // Just under the limit is parsed (and refused for what it says, not for its size).
    let padding = "p".repeat(1024 * 1024 - 1 - envelope.len());
    let res = app.post("/api/auth/register", None, creds("alice", &padding)).await;
    expect_error(&res, 400, "invalid_password");
}

#[tokio::test]
async fn bodies_without_a_json_content_type_are_415() {
    let app = TestApp::spawn().await;
    let body = creds("alice", PASSWORD).to_string();
    let res =
        send(app.http.post(app.url("/api/auth/register")).header(CONTENT_TYPE, "text/plain").body(body.clone())).await;
    expect_error(&res, 415, "unsupported_media_type");
    let res = send(app.http.post(app.url("/api/auth/register")).body(body.clone())).await;
    expect_error(&res, 415, "unsupported_media_type");
    // Parameters of the media type are fine.
    let with_charset =
        app.http.post(app.url("/api/auth/register")).header(CONTENT_TYPE, "application/json; charset=utf-8");
    assert_eq!(send(with_charset.body(body)).await.0, 201);
}

// ---------------------------------------------------------------------------------------
// Login, refresh, logout, me
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn login_returns_a_bearer_token_pair() {
    let app = TestApp::spawn().await;
    app.register("alice").await;
    let (status, body) = app.post("/api/auth/login", None, creds("alice", PASSWORD)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 15 * 60);
    assert_eq!(body["access_token"].as_str().unwrap().split('.').count(), 3, "a JWT");
    assert!(body["refresh_token"].as_str().unwrap().len() >= 32);
    let (status, me) = app.get("/api/auth/me", body["access_token"].as_str()).await;
    assert_eq!((status, me["username"].as_str()), (200, Some("alice")));

    // An HS256 JWT with sub/iat/exp, valid for 15 minutes.
    let part = |i: usize| -> Value {
        use base64::Engine as _;
        let segment = body["access_token"].as_str().unwrap().split('.').nth(i).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(segment).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    assert_eq!(part(0)["alg"], "HS256");
    let claims = part(1);
    assert_eq!(claims["sub"], me["id"]);
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 15 * 60);
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_the_same_401() {
    let app = TestApp::spawn().await;
    app.register("alice").await;
    let wrong_password = app.post("/api/auth/login", None, creds("alice", "not-the-password")).await;
    let unknown_user = app.post("/api/auth/login", None, creds("nobody", PASSWORD)).await;
    expect_error(&wrong_password, 401, "invalid_credentials");
    assert_eq!(wrong_password, unknown_user, "the answers must not tell the two apart");
}

async fn refresh(app: &TestApp, token: &str) -> (u16, Value) {
    app.post("/api/auth/refresh", None, json!({"refresh_token": token})).await
}

#[tokio::test]
async fn refresh_rotates_the_token_pair() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let (status, pair) = refresh(&app, &alice.refresh).await;
    assert_eq!(status, 200, "{pair}");
    assert_eq!(pair["token_type"], "bearer");
    let next = pair["refresh_token"].as_str().unwrap();
    assert_ne!(next, alice.refresh, "a new refresh token each time");
    let (status, me) = app.get("/api/auth/me", pair["access_token"].as_str()).await;
    assert_eq!((status, me["id"].as_str()), (200, Some(alice.id.to_string().as_str())));
    // The new one works in turn.
    assert_eq!(refresh(&app, next).await.0, 200);
}

#[tokio::test]
async fn reusing_a_refresh_token_revokes_its_whole_family() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let other_login = app.login("alice").await;

    let (_, first) = refresh(&app, &alice.refresh).await;
    let (_, second) = refresh(&app, first["refresh_token"].as_str().unwrap()).await;
    let newest = second["refresh_token"].as_str().unwrap();

    // The first token, stolen and replayed:
    expect_error(&refresh(&app, &alice.refresh).await, 401, "refresh_token_reused");
    // ...so the legitimate newest token of that login is dead too.
    expect_error(&refresh(&app, newest).await, 401, "invalid_refresh_token");
    // Another login (another family) is untouched.
    assert_eq!(refresh(&app, &other_login.refresh_token).await.0, 200);
}

#[tokio::test]
async fn unknown_refresh_tokens_are_401() {
    let app = TestApp::spawn().await;
    expect_error(&refresh(&app, "no-such-token").await, 401, "invalid_refresh_token");
    expect_error(&refresh(&app, "").await, 401, "invalid_refresh_token");
    let res = app.post("/api/auth/refresh", None, json!({})).await;
    expect_error(&res, 400, "invalid_body");
    assert!(message(&res).contains("refresh_token"), "{}", message(&res));
}

#[tokio::test]
async fn expired_refresh_tokens_are_401() {
    // The shortest lifetime the server takes (a zero one is refused as a setting), then waited out.
    let app = TestApp::spawn_with(|cfg| cfg.refresh_token_ttl = std::time::Duration::from_millis(1)).await;
    let alice = app.user("alice").await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    expect_error(&refresh(&app, &alice.refresh).await, 401, "invalid_refresh_token");
}

#[tokio::test]
async fn logout_revokes_the_refresh_token() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let other_login = app.login("alice").await;
    let (status, body) = app.post("/api/auth/logout", None, json!({"refresh_token": alice.refresh})).await;
    assert_eq!((status, body), (204, Value::Null));
    expect_error(&refresh(&app, &alice.refresh).await, 401, "invalid_refresh_token");
    // Logging out again, or with a token the server never issued, is harmless.
    assert_eq!(app.post("/api/auth/logout", None, json!({"refresh_token": alice.refresh})).await.0, 204);
    assert_eq!(app.post("/api/auth/logout", None, json!({"refresh_token": "never-issued"})).await.0, 204);
    // Other logins of the same user stay logged in.
    assert_eq!(refresh(&app, &other_login.refresh_token).await.0, 200);
}

#[tokio::test]
async fn me_returns_the_caller() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let (status, me) = app.get("/api/auth/me", Some(&alice.token)).await;
    assert_eq!(status, 200);
    assert_eq!(me["id"], json!(alice.id));
    assert_eq!(me["username"], "alice");
    assert_eq!(me["is_admin"], false);
}

#[tokio::test]
async fn me_without_a_token_is_401_missing_token() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    expect_error(&app.get("/api/auth/me", None).await, 401, "missing_token");
    // A token in another scheme is no bearer token.
    let basic = app.http.get(app.url("/api/auth/me")).header("authorization", format!("Basic {}", alice.token));
    expect_error(&send(basic).await, 401, "missing_token");
}

#[tokio::test]
async fn me_with_a_bad_token_is_401_invalid_token() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let secret = jwt_secret(&app);

    let mut tampered: Vec<String> = alice.token.split('.').map(str::to_owned).collect();
    tampered[1] =
        b64(&json!({"sub": Uuid::new_v4(), "name": "mallory", "iat": 0, "exp": 4_000_000_000_i64}).to_string());
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&json!({"sub": alice.id, "name": "alice", "iat": 0, "exp": 4_000_000_000_i64}).to_string())
    );
    let cases = [
        ("garbage", "not-a-jwt".to_owned()),
        ("three parts of garbage", "a.b.c".to_owned()),
        ("payload swapped, signature kept", tampered.join(".")),
        ("signed with another secret", sign(&alice, Algorithm::HS256, b"not-the-server-secret", 600)),
        ("HS512 with the server's own secret", sign(&alice, Algorithm::HS512, &secret, 600)),
        ("alg none", alg_none),
    ];
    for (what, token) in cases {
        let res = app.get("/api/auth/me", Some(&token)).await;
        assert_eq!(res.1["error"]["code"], "invalid_token", "{what}: {}", res.1);
        expect_error(&res, 401, "invalid_token");
    }
    // Sanity: the same claims signed properly are accepted, so the cases above fail for
    // the reason they name.
    assert_eq!(app.get("/api/auth/me", Some(&sign(&alice, Algorithm::HS256, &secret, 600))).await.0, 200);
}

#[tokio::test]
async fn me_with_an_expired_token_is_401_token_expired() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let secret = jwt_secret(&app);
    let expired = sign(&alice, Algorithm::HS256, &secret, -60);
    expect_error(&app.get("/api/auth/me", Some(&expired)).await, 401, "token_expired");
    // Within the 5 s leeway for clock skew, a token is still good.
    let just_expired = sign(&alice, Algorithm::HS256, &secret, -2);
    assert_eq!(app.get("/api/auth/me", Some(&just_expired)).await.0, 200);
}

#[tokio::test]
async fn tokens_of_users_that_no_longer_exist_are_401_invalid_token() {
    // An in-memory database forgets its users on restart; the signing secret in the data
    // dir survives, so the old access token still has a good signature.
    let app = TestApp::spawn_with(|cfg| cfg.database = Database::Memory).await;
    let alice = app.user("alice").await;
    let dir = app.stop().await;
    let app = TestApp::spawn_in(dir, |cfg| cfg.database = Database::Memory).await;

    expect_error(&app.get("/api/auth/me", Some(&alice.token)).await, 401, "invalid_token");
    expect_error(&app.get("/api/bots", Some(&alice.token)).await, 401, "invalid_token");
    let res = app.post("/api/bots", Some(&alice.token), json!({"name": "Ghost"})).await;
    expect_error(&res, 401, "invalid_token");
}

#[tokio::test]
async fn store_failures_are_500_with_an_error_id_and_no_details() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    app.state.store.close().await;
    let res = app.get("/api/bots", Some(&alice.token)).await;
    expect_error(&res, 500, "internal");
    let msg = message(&res).to_ascii_lowercase();
    assert!(msg.contains("error id"), "{msg}");
    for detail in ["pool", "sqlite", "sqlx", "closed"] {
        assert!(!msg.contains(detail), "the cause stays in the log: {msg}");
    }
}

// ---------------------------------------------------------------------------------------
// Bots
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn create_bot_defaults_to_private_echo() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let (status, bot) = app.post("/api/bots", Some(&alice.token), json!({"name": "  Echo  "})).await;
    assert_eq!(status, 201, "{bot}");
    assert_eq!(bot["name"], "Echo", "the name is trimmed");
    assert_eq!(bot["description"], "");
    assert_eq!(bot["visibility"], "private");
    assert_eq!(bot["engine"], json!({"kind": "echo"}));
    assert_eq!(bot["my_role"], "owner");
    assert_eq!(bot["owner"], json!({"id": alice.id, "username": "alice"}));
    Uuid::parse_str(bot["id"].as_str().unwrap()).expect("the id is a UUID");

    let (status, bot) = app
        .post(
            "/api/bots",
            Some(&alice.token),
            json!({"name": "Parrot", "description": "repeats", "visibility": "public", "engine": {"kind": "echo"}}),
        )
        .await;
    assert_eq!(status, 201, "{bot}");
    assert_eq!((bot["description"].as_str(), bot["visibility"].as_str()), (Some("repeats"), Some("public")));
}

#[tokio::test]
async fn create_bot_refuses_invalid_fields() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let create = |body: Value| app.post("/api/bots", Some(&alice.token), body);

    let res = create(json!({"name": "B", "engine": {"kind": "gpt-17"}})).await;
    expect_error(&res, 400, "invalid_bot");
    assert!(message(&res).contains("engine.kind"), "{}", message(&res));
    let res = create(json!({"name": "B", "engine": {}})).await;
    expect_error(&res, 400, "invalid_bot");
    assert!(message(&res).contains("engine.kind"), "{}", message(&res));
    expect_error(&create(json!({"name": "B", "engine": "echo"})).await, 400, "invalid_bot");
    expect_error(&create(json!({"name": "B", "engine": {"kind": "echo", "model": "x"}})).await, 400, "invalid_bot");

    expect_error(&create(json!({"name": ""})).await, 400, "invalid_bot");
    expect_error(&create(json!({"name": "   "})).await, 400, "invalid_bot");
    expect_error(&create(json!({"name": "n".repeat(101)})).await, 400, "invalid_bot");
    assert_eq!(create(json!({"name": "n".repeat(100)})).await.0, 201);
    expect_error(&create(json!({"name": "B", "description": "d".repeat(2001)})).await, 400, "invalid_bot");

    let res = create(json!({"name": "B", "colour": "blue"})).await;
    expect_error(&res, 400, "invalid_body");
    assert!(message(&res).contains("colour"), "names the unknown field: {}", message(&res));
    let res = create(json!({"description": "no name"})).await;
    expect_error(&res, 400, "invalid_body");
    assert!(message(&res).contains("name"), "{}", message(&res));
    let res = create(json!({"name": "B", "visibility": "secret"})).await;
    expect_error(&res, 400, "invalid_body");
    assert!(message(&res).contains("visibility"), "{}", message(&res));

    expect_error(&app.post("/api/bots", None, json!({"name": "B"})).await, 401, "missing_token");
}

#[tokio::test]
async fn list_bots_shows_mine_shared_and_public_with_my_role() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let mine = app.bot(&alice, json!({"name": "Mine"})).await;
    let shared_chat = app.bot(&bob, json!({"name": "Bob chat"})).await;
    let shared_admin = app.bot(&bob, json!({"name": "Bob admin"})).await;
    let public = app.bot(&carol, json!({"name": "Carol public", "visibility": "public"})).await;
    let _private = app.bot(&carol, json!({"name": "Carol private"})).await;
    add_member(&app, &bob, shared_chat.id, "alice", "chat").await;
    add_member(&app, &bob, shared_admin.id, "alice", "admin").await;

    let (status, list) = app.get("/api/bots", Some(&alice.token)).await;
    assert_eq!(status, 200, "{list}");
    let mut seen: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["id"].as_str().unwrap().to_owned(), b["my_role"].as_str().unwrap().to_owned()))
        .collect();
    seen.sort();
    let mut expected = vec![
        (mine.id.to_string(), "owner".to_owned()),
        (shared_chat.id.to_string(), "chat".to_owned()),
        (shared_admin.id.to_string(), "admin".to_owned()),
        (public.id.to_string(), "public".to_owned()),
    ];
    expected.sort();
    assert_eq!(seen, expected, "not Carol's private bot");

    // Someone with nothing of their own sees only the public bot.
    let dave = app.user("dave").await;
    let (_, list) = app.get("/api/bots", Some(&dave.token)).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], json!(public.id));
    expect_error(&app.get("/api/bots", None).await, 401, "missing_token");
}

#[tokio::test]
async fn get_patch_and_delete_a_bot() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let path = format!("/api/bots/{}", bot.id);

    let (status, got) = app.get(&path, Some(&alice.token)).await;
    assert_eq!(status, 200);
    assert_eq!((got["name"].as_str(), got["my_role"].as_str()), (Some("Echo"), Some("owner")));

    // An empty patch changes nothing.
    let (status, same) = app.patch(&path, Some(&alice.token), json!({})).await;
    assert_eq!((status, &same["name"], &same["visibility"]), (200, &got["name"], &got["visibility"]));

    let (status, patched) = app
        .patch(
            &path,
            Some(&alice.token),
            json!({"name": "Echo 2", "description": "new", "visibility": "public", "engine": {"kind": "echo"}}),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["name"], "Echo 2");
    assert_eq!(patched["description"], "new");
    assert_eq!(patched["visibility"], "public");
    assert_eq!(patched["created_at"], got["created_at"]);
    assert_eq!(app.get(&path, Some(&alice.token)).await.1["name"], "Echo 2", "the change is stored");

    expect_error(&app.patch(&path, Some(&alice.token), json!({"name": ""})).await, 400, "invalid_bot");
    let res = app.patch(&path, Some(&alice.token), json!({"engine": {"kind": "nope"}})).await;
    expect_error(&res, 400, "invalid_bot");
    assert!(message(&res).contains("engine.kind"), "{}", message(&res));
    expect_error(&app.patch(&path, Some(&alice.token), json!({"owner": "bob"})).await, 400, "invalid_body");

    let (status, body) = app.delete(&path, Some(&alice.token)).await;
    assert_eq!((status, body), (204, Value::Null));
    expect_error(&app.get(&path, Some(&alice.token)).await, 404, "not_found");
    expect_error(&app.delete(&path, Some(&alice.token)).await, 404, "not_found");
    assert_eq!(app.get("/api/bots", Some(&alice.token)).await.1, json!([]));
}

#[tokio::test]
async fn members_are_added_listed_changed_and_removed() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    app.register("carol").await;
    let bot = app.echo_bot(&alice).await;
    let members = format!("/api/bots/{}/members", bot.id);

    let (status, added) = app.post(&members, Some(&alice.token), json!({"username": "bob", "role": "chat"})).await;
    assert_eq!(status, 200, "{added}");
    assert_eq!(added, json!({"user": {"id": bob.id, "username": "bob"}, "role": "chat"}));
    add_member(&app, &alice, bot.id, "carol", "chat").await;
    // Adding again changes the role.
    add_member(&app, &alice, bot.id, "bob", "admin").await;

    let (status, list) = app.get(&members, Some(&alice.token)).await;
    assert_eq!(status, 200);
    let roles: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["user"]["username"].as_str().unwrap(), m["role"].as_str().unwrap()))
        .collect();
    assert_eq!(roles, [("bob", "admin"), ("carol", "chat")], "the owner is not listed as a member");
    assert_eq!(app.get(&format!("/api/bots/{}", bot.id), Some(&bob.token)).await.1["my_role"], "admin");

    let res = app.post(&members, Some(&alice.token), json!({"username": "nobody", "role": "chat"})).await;
    expect_error(&res, 404, "user_not_found");
    let res = app.post(&members, Some(&alice.token), json!({"username": "alice", "role": "admin"})).await;
    expect_error(&res, 409, "conflict");
    let res = app.post(&members, Some(&alice.token), json!({"username": "bob", "role": "owner"})).await;
    expect_error(&res, 400, "invalid_body");
    assert!(message(&res).contains("role"), "{}", message(&res));

    let (status, body) = app.delete(&format!("{members}/carol"), Some(&alice.token)).await;
    assert_eq!((status, body), (204, Value::Null));
    expect_error(&app.delete(&format!("{members}/carol"), Some(&alice.token)).await, 404, "not_found");
    expect_error(&app.delete(&format!("{members}/nobody"), Some(&alice.token)).await, 404, "user_not_found");
    let (_, list) = app.get(&members, Some(&alice.token)).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
}

/// Every endpoint that takes a bot id in its path, as (method, path with `{id}`).
const BOT_ID_ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/api/bots/{id}"),
    ("PATCH", "/api/bots/{id}"),
    ("DELETE", "/api/bots/{id}"),
    ("GET", "/api/bots/{id}/members"),
    ("POST", "/api/bots/{id}/members"),
    ("DELETE", "/api/bots/{id}/members/bob"),
    ("GET", "/api/bots/{id}/messages"),
];

async fn call(app: &TestApp, method: &str, path: &str, token: &str) -> (u16, Value) {
    match method {
        "GET" => app.get(path, Some(token)).await,
        "DELETE" => app.delete(path, Some(token)).await,
        "PATCH" => app.patch(path, Some(token), json!({"name": "X"})).await,
        "POST" => app.post(path, Some(token), json!({"username": "bob", "role": "chat"})).await,
        other => unreachable!("{other}"),
    }
}

#[tokio::test]
async fn malformed_bot_ids_are_400_and_unknown_ones_404() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    app.register("bob").await;
    for (method, template) in BOT_ID_ENDPOINTS {
        let res = call(&app, method, &template.replace("{id}", "not-a-uuid"), &alice.token).await;
        assert_eq!(res.1["error"]["code"], "invalid_id", "{method} {template}: {}", res.1);
        expect_error(&res, 400, "invalid_id");
        let res = call(&app, method, &template.replace("{id}", &Uuid::new_v4().to_string()), &alice.token).await;
        assert_eq!(res.1["error"]["code"], "not_found", "{method} {template}: {}", res.1);
        expect_error(&res, 404, "not_found");
    }
    let res = app.post("/api/ws/ticket", Some(&alice.token), json!({"bot_id": Uuid::new_v4()})).await;
    expect_error(&res, 404, "not_found");
    let res = app.post("/api/ws/ticket", Some(&alice.token), json!({"bot_id": "not-a-uuid"})).await;
    expect_error(&res, 400, "invalid_body");
    assert!(message(&res).contains("bot_id"), "{}", message(&res));
}

// ---------------------------------------------------------------------------------------
// The authorisation matrix: the table of every endpoint × caller is in `authz.rs`
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn matrix_successes_do_what_they_say() {
    let app = TestApp::spawn().await;
    let owner = app.user("owner").await;
    let admin = app.user("admin").await;
    let chat = app.user("chatter").await;
    let bot = app.echo_bot(&owner).await.id;
    add_member(&app, &owner, bot, "admin", "admin").await;
    add_member(&app, &owner, bot, "chatter", "chat").await;

    // An admin edits, and manages members.
    assert_eq!(
        app.patch(&format!("/api/bots/{bot}"), Some(&admin.token), json!({"name": "By admin"})).await.1["name"],
        "By admin"
    );
    assert_eq!(app.delete(&format!("/api/bots/{bot}/members/chatter"), Some(&admin.token)).await.0, 204);
    expect_error(&app.get(&format!("/api/bots/{bot}"), Some(&chat.token)).await, 403, "forbidden");
    add_member(&app, &admin, bot, "chatter", "chat").await;
    assert_eq!(app.get(&format!("/api/bots/{bot}"), Some(&chat.token)).await.0, 200);

    // A member leaves and loses access.
    assert_eq!(app.delete(&format!("/api/bots/{bot}/members/chatter"), Some(&chat.token)).await.0, 204);
    expect_error(&app.get(&format!("/api/bots/{bot}"), Some(&chat.token)).await, 403, "forbidden");

    // The ticket is a usable secret for this bot.
    let (status, t) = app.post("/api/ws/ticket", Some(&admin.token), json!({"bot_id": bot})).await;
    assert_eq!(status, 200, "{t}");
    assert!(t["ticket"].as_str().unwrap().len() >= 32);
    assert_eq!(t["expires_in"], 30);

    // The owner deletes.
    assert_eq!(app.delete(&format!("/api/bots/{bot}"), Some(&owner.token)).await.0, 204);
    expect_error(&app.get(&format!("/api/bots/{bot}"), Some(&admin.token)).await, 404, "not_found");
}

// ---------------------------------------------------------------------------------------
// Message history
// ---------------------------------------------------------------------------------------

/// Appends `n` messages (user, bot, user, ...) to `user`'s conversation with `bot`, with
/// contents `"{tag} 1"`, `"{tag} 2"`, ...
async fn seed_messages(app: &TestApp, user: &TestUser, bot: Uuid, tag: &str, n: usize) -> Uuid {
    let store: &dyn Store = &*app.state.store;
    let conv = store.conversation(user.id, bot).await.unwrap();
    for i in 1..=n {
        let role = if i % 2 == 1 { MessageRole::User } else { MessageRole::Bot };
        store
            .append_message(NewMessage {
                id: Uuid::new_v4(),
                conversation_id: conv.id,
                role,
                content: format!("{tag} {i}"),
                client_id: (role == MessageRole::User).then(|| format!("c{i}")),
                in_reply_to: None,
                status: MessageStatus::Complete,
            })
            .await
            .unwrap();
    }
    conv.id
}

/// GETs a page of `user`'s history; returns (seqs, has_more, last_seq).
async fn page(app: &TestApp, user: &TestUser, bot: Uuid, query: &str) -> (Vec<i64>, bool, i64) {
    let (status, body) = app.get(&format!("/api/bots/{bot}/messages{query}"), Some(&user.token)).await;
    assert_eq!(status, 200, "{query}: {body}");
    let seqs = body["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    (seqs, body["has_more"].as_bool().unwrap(), body["last_seq"].as_i64().unwrap())
}

#[tokio::test]
async fn messages_page_forwards_and_backwards() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await.id;

    assert_eq!(page(&app, &alice, bot, "").await, (vec![], false, 0), "an empty conversation");
    let conv = seed_messages(&app, &alice, bot, "alice", 7).await;

    let (status, body) = app.get(&format!("/api/bots/{bot}/messages"), Some(&alice.token)).await;
    assert_eq!(status, 200);
    let first = &body["messages"][0];
    assert_eq!(first["conversation_id"], json!(conv));
    assert_eq!(
        (first["role"].as_str(), first["content"].as_str(), first["client_id"].as_str()),
        (Some("user"), Some("alice 1"), Some("c1"))
    );
    assert_eq!(body["messages"][1]["role"], "bot");

    assert_eq!(page(&app, &alice, bot, "").await, (vec![1, 2, 3, 4, 5, 6, 7], false, 7));
    assert_eq!(page(&app, &alice, bot, "?after_seq=2&limit=3").await, (vec![3, 4, 5], true, 7));
    assert_eq!(page(&app, &alice, bot, "?after_seq=5&limit=3").await, (vec![6, 7], false, 7));
    assert_eq!(page(&app, &alice, bot, "?after_seq=4&limit=3").await, (vec![5, 6, 7], false, 7), "exactly the rest");
    assert_eq!(page(&app, &alice, bot, "?after_seq=7").await, (vec![], false, 7));
    assert_eq!(page(&app, &alice, bot, "?after_seq=0&limit=1").await, (vec![1], true, 7));
    // Backwards: the newest messages before a seq, still in seq order.
    assert_eq!(page(&app, &alice, bot, "?before_seq=6&limit=2").await, (vec![4, 5], true, 7));
    assert_eq!(page(&app, &alice, bot, "?before_seq=3&limit=5").await, (vec![1, 2], false, 7));
    assert_eq!(page(&app, &alice, bot, "?before_seq=8").await, (vec![1, 2, 3, 4, 5, 6, 7], false, 7));
    assert_eq!(page(&app, &alice, bot, "?before_seq=1").await, (vec![], false, 7));
    // The bounds of limit.
    assert_eq!(page(&app, &alice, bot, "?limit=500").await.0.len(), 7);
}

#[tokio::test]
async fn messages_refuses_bad_queries_with_400_invalid_query() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await.id;
    for query in [
        "limit=0",
        "limit=501",
        "limit=-1",
        "limit=ten",
        "after_seq=-1",
        "after_seq=x",
        "before_seq=0",
        "before_seq=-5",
        "before_seq=1.5",
        "after_seq=1&before_seq=5",
    ] {
        let res = app.get(&format!("/api/bots/{bot}/messages?{query}"), Some(&alice.token)).await;
        assert_eq!(res.1["error"]["code"], "invalid_query", "{query}: {}", res.1);
        expect_error(&res, 400, "invalid_query");
    }
    let res = app.get(&format!("/api/bots/{bot}/messages?limit=ten"), Some(&alice.token)).await;
    assert!(message(&res).contains("limit"), "names the parameter: {}", message(&res));
}

#[tokio::test]
async fn messages_are_only_the_callers_own_conversation() {
    let app = TestApp::spawn().await;
    let owner = app.user("olga").await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let bot = app.bot(&owner, json!({"name": "Public", "visibility": "public"})).await.id;
    let alice_conv = seed_messages(&app, &alice, bot, "from alice", 3).await;
    let bob_conv = seed_messages(&app, &bob, bot, "from bob", 2).await;
    assert_ne!(alice_conv, bob_conv);

    for (user, conv, tag, n) in [(&alice, alice_conv, "from alice", 3), (&bob, bob_conv, "from bob", 2)] {
        let (status, body) = app.get(&format!("/api/bots/{bot}/messages"), Some(&user.token)).await;
        assert_eq!(status, 200);
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), n, "{body}");
        assert_eq!(body["last_seq"], n, "{body}");
        for m in msgs {
            assert_eq!(m["conversation_id"], json!(conv));
            assert!(m["content"].as_str().unwrap().starts_with(tag), "{} saw {m}", user.username);
        }
    }
    // The owner has a conversation of their own, empty: owning a bot shows no one else's.
    assert_eq!(page(&app, &owner, bot, "").await, (vec![], false, 0));
}

#[tokio::test]
async fn messages_sent_over_the_socket_show_up_in_the_history() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await.id;
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    ws.say("hello-1", "hello there").await;
    // The ack, then the echo (stored before it is sent).
    let mut seen = 0;
    while seen < 2 {
        if let ServerFrame::Ack { .. } | ServerFrame::Message { .. } = ws.frame().await {
            seen += 1;
        }
    }
    ws.close().await;

    let (status, body) = app.get(&format!("/api/bots/{bot}/messages"), Some(&alice.token)).await;
    assert_eq!(status, 200);
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "{body}");
    assert_eq!((msgs[0]["role"].as_str(), msgs[0]["client_id"].as_str()), (Some("user"), Some("hello-1")));
    assert_eq!((msgs[1]["role"].as_str(), msgs[1]["content"].as_str()), (Some("bot"), Some("hello there")));
    assert_eq!(msgs[1]["in_reply_to"], msgs[0]["id"]);
    assert_eq!(body["last_seq"], 2);
}

// ---------------------------------------------------------------------------------------
// CORS, unknown paths, wrong methods
// ---------------------------------------------------------------------------------------

const DEV_ORIGIN: &str = "http://localhost:5173";

async fn preflight(app: &TestApp, origin: &str) -> (u16, HeaderMap) {
    let req = app
        .http
        .request(Method::OPTIONS, app.url("/api/bots"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type");
    let (status, headers, _) = send_raw(req).await;
    (status, headers)
}

fn allow_origin(headers: &HeaderMap) -> Option<&str> {
    headers.get("access-control-allow-origin").and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn cors_admits_configured_origins_only() {
    let app = TestApp::spawn_with(|cfg| cfg.allowed_origins = vec![DEV_ORIGIN.into()]).await;

    let (status, headers) = preflight(&app, DEV_ORIGIN).await;
    assert!((200..300).contains(&status), "{status}");
    assert_eq!(allow_origin(&headers), Some(DEV_ORIGIN));
    let methods = headers.get("access-control-allow-methods").unwrap().to_str().unwrap().to_ascii_uppercase();
    assert!(methods.contains("POST") && methods.contains("PATCH") && methods.contains("DELETE"), "{methods}");
    let allowed_headers = headers.get("access-control-allow-headers").unwrap().to_str().unwrap().to_ascii_lowercase();
    assert!(allowed_headers.contains("authorization") && allowed_headers.contains("content-type"), "{allowed_headers}");

    let (_, headers) = preflight(&app, "http://evil.example").await;
    assert_eq!(allow_origin(&headers), None);

    // Simple requests too.
    let (_, headers, _) = send_raw(app.http.get(app.url("/api/health")).header("origin", DEV_ORIGIN)).await;
    assert_eq!(allow_origin(&headers), Some(DEV_ORIGIN));
    let (_, headers, _) = send_raw(app.http.get(app.url("/api/health")).header("origin", "http://evil.example")).await;
    assert_eq!(allow_origin(&headers), None);
}

#[tokio::test]
async fn cors_origins_match_with_or_without_a_trailing_slash() {
    let app = TestApp::spawn_with(|cfg| cfg.allowed_origins = vec![format!("{DEV_ORIGIN}/")]).await;
    let (_, headers) = preflight(&app, DEV_ORIGIN).await;
    assert_eq!(allow_origin(&headers), Some(DEV_ORIGIN));
}

#[tokio::test]
async fn cors_admits_no_other_origin_by_default() {
    let app = TestApp::spawn().await;
    let (_, headers) = preflight(&app, DEV_ORIGIN).await;
    assert_eq!(allow_origin(&headers), None);
    let (_, headers, _) = send_raw(app.http.get(app.url("/api/health")).header("origin", DEV_ORIGIN)).await;
    assert_eq!(allow_origin(&headers), None);
}

#[tokio::test]
async fn unknown_api_paths_are_404_json() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await.id;
    expect_error(&app.get("/api/nope", None).await, 404, "not_found");
    expect_error(&app.get("/api/", None).await, 404, "not_found");
    expect_error(&app.get("/api", None).await, 404, "not_found");
    expect_error(&app.get("/api/auth", None).await, 404, "not_found");
    expect_error(&app.get(&format!("/api/bots/{bot}/nope"), Some(&alice.token)).await, 404, "not_found");
    expect_error(&app.post("/api/nope", None, json!({})).await, 404, "not_found");
}

#[tokio::test]
async fn wrong_methods_are_405_json() {
    let app = TestApp::spawn().await;
    expect_error(&app.get("/api/auth/login", None).await, 405, "method_not_allowed");
    expect_error(&app.delete("/api/health", None).await, 405, "method_not_allowed");
    expect_error(&app.patch("/api/bots", None, json!({})).await, 405, "method_not_allowed");
    let put = app.http.put(app.url(&format!("/api/bots/{}", Uuid::new_v4()))).json(&json!({}));
    expect_error(&send(put).await, 405, "method_not_allowed");
}

// ---------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn no_answer_reveals_a_password_hash_refresh_token_or_engine_secret() {
    let app = TestApp::spawn_with(|c| c.bot_egress_allow = vec!["127.0.0.1/32".parse().unwrap()]).await;
    let other_password = "bobs-own-password";
    let mut answers: Vec<(String, String)> = Vec::new();
    let mut token_answers: Vec<String> = Vec::new();
    macro_rules! record {
        ($what:expr, $req:expr) => {{
            let (_, _, text) = send_raw($req).await;
            answers.push(($what.to_string(), text.clone()));
            text
        }};
    }
    let post = |path: &str, token: Option<&str>, body: Value| {
        let req = app.http.post(app.url(path)).json(&body);
        if let Some(t) = token {
            req.bearer_auth(t)
        } else {
            req
        }
    };
    let get = |path: &str, token: &str| app.http.get(app.url(path)).bearer_auth(token);

    record!("register", post("/api/auth/register", None, creds("alice", PASSWORD)));
    record!("register bob", post("/api/auth/register", None, creds("bob", other_password)));
    record!("register again", post("/api/auth/register", None, creds("alice", PASSWORD)));
    record!("register short password", post("/api/auth/register", None, creds("carol", "short")));
    record!("bad login", post("/api/auth/login", None, creds("alice", "wrong-password")));
    let (_, _, login) = send_raw(post("/api/auth/login", None, creds("alice", PASSWORD))).await;
    token_answers.push(login.clone());
    let login: Value = serde_json::from_str(&login).unwrap();
    let access = login["access_token"].as_str().unwrap().to_owned();
    let first_refresh = login["refresh_token"].as_str().unwrap().to_owned();
    let (_, _, refreshed) = send_raw(post("/api/auth/refresh", None, json!({"refresh_token": first_refresh}))).await;
    token_answers.push(refreshed.clone());
    let second_refresh =
        serde_json::from_str::<Value>(&refreshed).unwrap()["refresh_token"].as_str().unwrap().to_owned();
    record!("refresh reuse", post("/api/auth/refresh", None, json!({"refresh_token": first_refresh})));
    record!("refresh revoked", post("/api/auth/refresh", None, json!({"refresh_token": second_refresh})));
    record!("me of an ended login", get("/api/auth/me", &access));
    // The reuse ended that login, its access token included (issue 14): a fresh login for the rest.
    let (_, _, relogin) = send_raw(post("/api/auth/login", None, creds("alice", PASSWORD))).await;
    token_answers.push(relogin.clone());
    let access = serde_json::from_str::<Value>(&relogin).unwrap()["access_token"].as_str().unwrap().to_owned();
    record!("me", get("/api/auth/me", &access));
    let bot = record!("create bot", post("/api/bots", Some(&access), json!({"name": "B"})));
    let bot: Value = serde_json::from_str(&bot).unwrap();
    let id = bot["id"].as_str().unwrap();
    record!(
        "add member",
        post(&format!("/api/bots/{id}/members"), Some(&access), json!({"username": "bob", "role": "chat"}))
    );
    record!("members", get(&format!("/api/bots/{id}/members"), &access));
    record!("bots", get("/api/bots", &access));
    record!("bot", get(&format!("/api/bots/{id}"), &access));
    record!("messages", get(&format!("/api/bots/{id}/messages"), &access));
    // Engine secrets are write-only too.
    let api_key = "sk-never-in-an-answer-0123456789";
    let hook_secret = "whsec-never-in-an-answer-0123456789";
    let rotated_key = "sk-rotated-never-in-an-answer-0123";
    let openai = json!({"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key": api_key});
    let llm = record!("create openai bot", post("/api/bots", Some(&access), json!({"name": "L", "engine": openai})));
    let llm = serde_json::from_str::<Value>(&llm).unwrap()["id"].as_str().unwrap().to_owned();
    let webhook = json!({"kind": "webhook", "url": "http://127.0.0.1:9/hook", "secret": hook_secret});
    let hook = record!("create webhook bot", post("/api/bots", Some(&access), json!({"name": "W", "engine": webhook})));
    let hook = serde_json::from_str::<Value>(&hook).unwrap()["id"].as_str().unwrap().to_owned();
    let patch =
        |id: &str, body: Value| app.http.patch(app.url(&format!("/api/bots/{id}"))).bearer_auth(&access).json(&body);
    record!("patch keeping the key", patch(&llm, json!({"name": "L2"})));
    let engine = json!({"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m2"});
    record!("patch engine without the key", patch(&llm, json!({"engine": engine})));
    let engine = json!({"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m2", "api_key": rotated_key});
    record!("patch a new key", patch(&llm, json!({"engine": engine})));
    record!("patch webhook", patch(&hook, json!({"description": "d"})));
    let view = record!("openai bot", get(&format!("/api/bots/{llm}"), &access));
    let view: Value = serde_json::from_str(&view).unwrap();
    assert_eq!((&view["name"], &view["engine"]["model"]), (&json!("L2"), &json!("m2")), "the patches applied");
    assert_eq!(view["engine"]["api_key_set"], true, "{view}");
    record!("webhook bot", get(&format!("/api/bots/{hook}"), &access));
    record!("bots with engines", get("/api/bots", &access));

    record!("logout", post("/api/auth/logout", None, json!({"refresh_token": second_refresh})));
    record!("openapi", app.http.get(app.url("/api/openapi.json")));

    let mut hashes = Vec::new();
    for name in ["alice", "bob"] {
        let user = app.state.store.user_by_username(name).await.unwrap().unwrap();
        hashes.push(user.password_hash);
    }
    for (what, text) in &answers {
        for secret in [PASSWORD, other_password, &first_refresh, &second_refresh, api_key, hook_secret, rotated_key] {
            assert!(!text.contains(secret), "{what} reveals a secret: {text}");
        }
        for hash in &hashes {
            assert!(!text.contains(hash.as_str()), "{what} reveals a password hash: {text}");
        }
        assert!(!text.contains("$argon2"), "{what} reveals a password hash: {text}");
    }
    for text in &token_answers {
        assert!(!text.contains(PASSWORD) && !text.contains("$argon2"), "{text}");
    }
}
