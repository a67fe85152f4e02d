//! Hostile input (issue 14): NUL and control characters get the same clear refusal on every
//! store, user text in the logs is escaped and cut, and the connection ledger stays small
//! whatever headers anonymous clients send.

use natter_proto::{ErrorCode, ServerFrame};
use natter_server::config::Database;
use natter_server::store::postgres::TestSchema;
use serde_json::{json, Value};

use crate::helpers::*;

/// A server on PostgreSQL (a schema of this test's own), or `None` (with a SKIPPED line) when
/// `NATTER_TEST_DATABASE_URL` is not set.
async fn on_postgres(test: &str) -> Option<(TestApp, TestSchema)> {
    let schema = TestSchema::from_env(test).await?;
    let url = schema.url.clone();
    Some((TestApp::spawn_with(|c| c.database = Database::Postgres(url)).await, schema))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

/// Every string field that reaches the store, with NUL and other control characters: a 400
/// naming the field, the same on every store, never a 500.
async fn bad_strings_are_refused_alike(app: &TestApp) {
    let alice = app.user("alice").await;
    let tok = Some(alice.token.as_str());

    // NUL anywhere in a body: refused before any handler runs, naming the field.
    let cases = [
        ("/api/bots", json!({"name": "a\u{0}b"}), "name"),
        ("/api/bots", json!({"name": "ok", "description": "a\u{0}"}), "description"),
        (
            "/api/bots",
            json!({"name": "ok", "engine": {"kind": "rules", "rules": [], "fallback": "x\u{0}"}}),
            "engine.fallback",
        ),
        ("/api/auth/login", json!({"username": "a\u{0}b", "password": "whatever-pass"}), "username"),
        ("/api/auth/register", json!({"username": "a\u{0}b", "password": "whatever-pass"}), "username"),
    ];
    for (path, body, field) in cases {
        let (status, resp) = app.post(path, tok, body.clone()).await;
        assert_eq!((status, code(&resp)), (400, "invalid_body"), "{path} {body}: {resp}");
        assert!(message(&resp).starts_with(&format!("{field}: ")), "{resp}");
        assert!(message(&resp).contains("NUL"), "{resp}");
    }

    // Names: control characters anywhere, or nothing visible.
    for name in ["a\u{1b}[31mred", "two\r\nlines", "bell\u{7}", "tab\tbed", "\u{202E}evil", "a\u{85}b"] {
        let (status, resp) = app.post("/api/bots", tok, json!({"name": name})).await;
        assert_eq!((status, code(&resp)), (400, "invalid_bot"), "{name:?}: {resp}");
        assert!(message(&resp).starts_with("name must not contain control characters"), "{resp}");
    }
    for name in ["\u{200B}", "\u{200B}\u{200C}\u{200D}\u{FEFF}", " \u{3164} ", "\u{2060}"] {
        let (status, resp) = app.post("/api/bots", tok, json!({"name": name})).await;
        assert_eq!((status, code(&resp)), (400, "invalid_bot"), "{name:?}: {resp}");
        assert_eq!(message(&resp), "name must contain a visible character");
    }
    // Descriptions: tab and line breaks are text; other control characters are not.
    let (status, resp) = app.post("/api/bots", tok, json!({"name": "x", "description": "see\u{1b}[2J"})).await;
    assert_eq!((status, code(&resp)), (400, "invalid_bot"), "{resp}");
    assert!(message(&resp).starts_with("description must not contain control characters"), "{resp}");
    let bot = app
        .bot(
            &alice,
            json!({"name": "Family 👨\u{200D}👩\u{200D}👧", "description": "line one\r\nline two\n\tindented"}),
        )
        .await;
    assert_eq!(bot.description, "line one\r\nline two\n\tindented");

    // The same rules on an update.
    let path = format!("/api/bots/{}", bot.id);
    for (body, want) in [
        (json!({"name": "a\u{0}"}), "invalid_body"),
        (json!({"name": "a\nb"}), "invalid_bot"),
        (json!({"name": "\u{200B}"}), "invalid_bot"),
    ] {
        let (status, resp) = app.patch(&path, tok, body.clone()).await;
        assert_eq!((status, code(&resp)), (400, want), "{body}: {resp}");
    }
    // A username no one can have, in a path: not found, not a store error.
    let (status, resp) = app.delete(&format!("/api/bots/{}/members/a%00b", bot.id), tok).await;
    assert_eq!((status, code(&resp)), (404, "user_not_found"), "{resp}");

    // Chat messages: NUL is refused with an error frame naming the field, the socket stays up;
    // every other character is stored as sent.
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    ws.say("c1", "a\u{0}b").await;
    match ws.frame().await {
        ServerFrame::Error { code, message, client_id, .. } => {
            assert_eq!((code, client_id.as_deref()), (ErrorCode::InvalidFrame, Some("c1")));
            assert!(message.starts_with("content must not contain NUL"), "{message}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    ws.say("c\u{0}2", "hello").await;
    match ws.frame().await {
        ServerFrame::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::InvalidClientId);
            assert!(message.starts_with("client_id must not contain NUL"), "{message}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    let odd = "esc\u{1b}[31m bel\u{7} cr\r lf\n zw\u{200B} rlo\u{202E} c1\u{85}";
    ws.say("c3", odd).await;
    match ws.frame().await {
        ServerFrame::Ack { message, .. } => assert_eq!(message.content, odd),
        other => panic!("expected an ack, got {other:?}"),
    }
    let (status, page) = app.get(&format!("/api/bots/{}/messages", bot.id), tok).await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["content"], odd, "stored as sent, nothing else stored");
    assert_eq!(page["messages"].as_array().unwrap().len(), 2, "the message and its echo: {page}");
}

/// A webhook that answers with NUL in its reply (whole, or streamed as deltas): the reply is
/// stored with U+FFFD in its place on every store, not lost to a store error.
async fn engine_replies_with_nul_are_stored_alike(app: &TestApp) {
    use axum::routing::post;
    async fn hook(body: String) -> axum::response::Response {
        use axum::response::IntoResponse;
        if body.contains("stream") {
            let lines = "{\"delta\":\"x\\u0000\"}\n{\"delta\":\"y\"}\n";
            return ([("content-type", "application/x-ndjson")], lines).into_response();
        }
        axum::Json(json!({"reply": "a\u{0}b"})).into_response()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, axum::Router::new().route("/hook", post(hook))).await.unwrap() });
    let owner = app.user("hookowner").await;
    // Site admins may use loopback engine URLs whatever the egress policy says.
    app.state.store.set_admin("hookowner", true).await.unwrap();
    let engine =
        json!({"kind": "webhook", "url": format!("http://{addr}/hook"), "secret": "webhook-secret-0123456789"});
    let bot = app.bot(&owner, json!({"name": "Hook", "engine": engine})).await;
    let mut ws = app.ws(bot.id, &owner.token, "").await;
    ws.established().await;
    for (client_id, said, want) in [("h1", "whole", "a\u{FFFD}b"), ("h2", "stream", "x\u{FFFD}y")] {
        ws.say(client_id, said).await;
        let reply = loop {
            match ws.frame().await {
                ServerFrame::Message { message } => break message,
                ServerFrame::Error { code, message, .. } => panic!("{code:?}: {message}"),
                _ => continue,
            }
        };
        assert_eq!(reply.content, want);
    }
    let (_, page) = app.get(&format!("/api/bots/{}/messages", bot.id), Some(&owner.token)).await;
    let stored: Vec<&str> =
        page["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(stored, ["whole", "a\u{FFFD}b", "stream", "x\u{FFFD}y"]);
}

#[tokio::test]
async fn nul_and_control_characters_are_refused_alike_on_sqlite() {
    let app = TestApp::spawn().await;
    bad_strings_are_refused_alike(&app).await;
    engine_replies_with_nul_are_stored_alike(&app).await;
}

#[tokio::test]
async fn nul_and_control_characters_are_refused_alike_on_postgres() {
    let Some((app, _schema)) = on_postgres("nul_and_control_characters_are_refused_alike_on_postgres").await else {
        return;
    };
    bad_strings_are_refused_alike(&app).await;
    engine_replies_with_nul_are_stored_alike(&app).await;
}

/// A login with a username that holds a line break, a forged log line, an ANSI escape and
/// 512 KiB; a socket whose bot id (from the path) holds the same: the log gets each escaped
/// and cut, not a forged line, not an escape byte, not half a megabyte.
#[tokio::test]
async fn user_text_in_the_logs_is_escaped_and_cut() {
    capture_logs();
    let app = TestApp::spawn().await;
    let before = logs().len();
    let forged = "2026-12-06T09:00:00.000000Z  INFO natter_server::http::auth: login user_id=forged";
    let username = format!("mallory\n{forged}\x1b[31m{}", "x".repeat(512 * 1024));
    let (status, _) =
        app.post("/api/auth/login", None, json!({"username": username, "password": "whatever-pass"})).await;
    assert_eq!(status, 401);
    let bot_id = format!("nope%0A{}%1B%5B31m", forged.replace(' ', "%20"));
    let (code, _) = WsClient::connect(&app.ws_url(&bot_id, "")).await.close_code().await;
    assert_eq!(code, 4400);
    let (status, _) = app.get(&format!("/api/{}", "p".repeat(32 * 1024)), None).await;
    assert_eq!(status, 404);

    let new = logs()[before..].to_owned();
    assert!(new.contains("mallory\\n2026-12-06T09:00:00.000000Z"), "the username is logged, escaped:\n{new}");
    assert!(new.contains("nope\\n2026-12-06T09:00:00.000000Z"), "the bot id is logged, escaped:\n{new}");
    assert!(new.contains("more bytes]"), "long values are cut with a marker:\n{new}");
    assert!(!new.lines().any(|l| l.starts_with("2026-12-06T09:00:00")), "a forged line:\n{new}");
    assert!(!new.contains('\x1b'), "an escape byte reached the log:\n{new}");
    assert!(new.len() < 8 * 1024, "the log grew by {} bytes:\n{new}", new.len());
}

/// Twenty refused upgrades with a 256 KiB User-Agent each: every stored header is cut to a
/// small bound and marked. Then a flood of anonymous refusals: the ledger stores at most its
/// anonymous budget and counts the rest.
#[tokio::test]
async fn refused_upgrades_with_huge_headers_keep_the_ledger_small() {
    use natter_server::ledger::{CUT_MARK, HEADER_BYTES};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let app = TestApp::spawn().await;
    let bot = uuid::Uuid::new_v4().to_string();
    let huge = "A".repeat(256 * 1024);
    for _ in 0..20 {
        let mut req = app.ws_url(&bot, "").into_client_request().unwrap();
        req.headers_mut().insert("user-agent", huge.parse().unwrap());
        req.headers_mut().insert("x-forwarded-for", huge[..16 * 1024].parse().unwrap());
        let (code, _) = WsClient::connect_with(req).await.close_code().await;
        assert_eq!(code, 4401);
    }
    app.state.ledger.flush().await;
    let rows = app.state.store.connections(None, None, 500).await.unwrap();
    assert_eq!(rows.len(), 20, "within the anonymous burst, each is stored");
    let stored: usize = rows
        .iter()
        .map(|r| {
            let headers = [&r.user_agent, &r.origin, &r.upgrade, &r.connection, &r.forwarded_for, &r.close_reason];
            headers.iter().map(|h| h.as_ref().map_or(0, |s| s.len())).sum::<usize>()
        })
        .sum();
    assert!(stored < 16 * 1024, "20 rows store {stored} bytes of headers");
    for r in &rows {
        assert_eq!(r.user_agent.as_deref(), Some(format!("{}{CUT_MARK}", &huge[..HEADER_BYTES]).as_str()));
        assert!(r.forwarded_for.as_deref().unwrap().ends_with(CUT_MARK));
    }

    // A flood: 150 more anonymous refusals, as fast as they can go.
    let started = std::time::Instant::now();
    for _ in 0..150 {
        WsClient::connect(&app.ws_url(&bot, "")).await.close_code().await;
    }
    let secs = started.elapsed().as_secs_f64();
    app.state.ledger.flush().await;
    let stored = app.state.store.connections(None, None, 500).await.unwrap().len() - 20;
    let per_second = natter_server::ledger::Retention::default().anonymous_per_second as f64;
    // The burst was spent above; only the refill since counts.
    assert!((stored as f64) <= per_second * (secs + 1.0), "{stored} anonymous rows stored in {secs:.2} s");
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let skipped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("natter_ledger_anonymous_rows_skipped_total "))
        .unwrap_or_else(|| panic!("no skipped counter in\n{metrics}"));
    assert_eq!(skipped.parse::<usize>().unwrap(), 150 - stored, "every row not stored is counted");
}
