//! The connection ledger, metrics and request ids: for every way a connection can end, the
//! user can ask the server how and why, and the metrics count it.

use std::time::Duration;

use natter_proto::api::{ClosedBy, ConnectionRecord};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

use crate::helpers::*;

/// The ledger row of an attempt, as its user sees it (waits for the batch writer).
pub async fn row(app: &TestApp, user: &TestUser, attempt: Uuid) -> ConnectionRecord {
    for _ in 0..100 {
        let (status, v) = app.get(&format!("/api/connections/{attempt}"), Some(&user.token)).await;
        if status == 200 {
            let rec: ConnectionRecord = serde_json::from_value(v).unwrap();
            if rec.ended_at.is_some() {
                return rec;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no finished ledger row for attempt {attempt}");
}

fn url(app: &TestApp, bot: &str, query: &str, attempt: Uuid) -> String {
    app.ws_url(bot, &format!("{query}&attempt_id={attempt}"))
}

#[tokio::test]
async fn every_way_a_connection_ends_is_in_the_ledger_and_the_metrics() {
    let app = TestApp::spawn_with(|c| {
        c.heartbeat_interval = Duration::from_millis(150);
        c.limits.max_frame_bytes = 2048;
        c.limits.max_connections_per_user = 2;
        c.allowed_origins = vec![];
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let bot = app.echo_bot(&alice).await;
    let b = bot.id.to_string();
    let tok = format!("token={}", alice.token);

    // Success: established, chatted, closed by the client.
    let ok = Uuid::new_v4();
    let mut ws = WsClient::connect(&url(&app, &b, &tok, ok)).await;
    ws.established().await;
    ws.say("c1", "hello").await;
    ws.frame().await;
    ws.frame().await;
    ws.close().await;
    let r = row(&app, &alice, ok).await;
    assert!(r.established);
    assert_eq!((r.close_code, r.closed_by), (Some(1000), Some(ClosedBy::Client)));
    assert_eq!((r.user_id, r.bot_id), (Some(alice.id), Some(bot.id)));
    assert_eq!((r.msgs_in, r.msgs_out), (2, 3), "message + close in; established, ack, reply out");
    assert!(r.bytes_in > 0 && r.bytes_out > r.bytes_in);
    assert_eq!(r.upgrade.as_deref().map(str::to_lowercase).as_deref(), Some("websocket"));
    assert_eq!(r.sec_websocket_version.as_deref(), Some("13"));
    assert!(r.remote_addr.unwrap().starts_with("127.0.0.1:"));

    // Refusals, each under the user its credentials named.
    let expired = expired_token(&app, alice.id);
    let cases: Vec<(&TestUser, String, u16)> =
        vec![(&alice, format!("token={expired}"), 4401), (&bob, format!("token={}", bob.token), 4403)];
    for (user, query, code) in cases {
        let attempt = Uuid::new_v4();
        let (c, _) = WsClient::connect(&url(&app, &b, &query, attempt)).await.close_code().await;
        assert_eq!(c, code);
        let r = row(&app, user, attempt).await;
        assert_eq!((r.close_code, r.closed_by, r.established), (Some(code), Some(ClosedBy::Server), false));
        assert_eq!(r.user_id, Some(user.id));
    }
    let attempt = Uuid::new_v4();
    WsClient::connect(&url(&app, &Uuid::new_v4().to_string(), &tok, attempt)).await.close_code().await;
    assert_eq!(row(&app, &alice, attempt).await.close_code, Some(4404));
    let attempt = Uuid::new_v4();
    WsClient::connect(&url(&app, "nope", &tok, attempt)).await.close_code().await;
    let r = row(&app, &alice, attempt).await;
    assert_eq!((r.close_code, r.bot_id), (Some(4400), None), "malformed, but still alice's");
    let attempt = Uuid::new_v4();
    let mut req = url(&app, &b, &tok, attempt).into_client_request().unwrap();
    req.headers_mut().insert("origin", "http://evil.example".parse().unwrap());
    WsClient::connect_with(req).await.close_code().await;
    let r = row(&app, &alice, attempt).await;
    assert_eq!((r.close_code, r.origin.as_deref()), (Some(1008), Some("http://evil.example")));

    // Heartbeat timeout, oversized frame, too many connections.
    let attempt = Uuid::new_v4();
    let mut ws = WsClient::connect(&url(&app, &b, &tok, attempt)).await;
    ws.established().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ws.close_code().await.0, 4408);
    assert_eq!(row(&app, &alice, attempt).await.close_reason.as_deref(), Some("no traffic from the client for 300 ms"));
    let attempt = Uuid::new_v4();
    let mut ws = WsClient::connect(&url(&app, &b, &tok, attempt)).await;
    ws.established().await;
    ws.say("big", &"x".repeat(4000)).await;
    assert_eq!(ws.close_code().await.0, 1009);
    assert_eq!(row(&app, &alice, attempt).await.close_code, Some(1009));
    let keep: Vec<WsClient> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            let mut ws = app.ws(bot.id, &alice.token, "").await;
            ws.established().await;
            // Keep them alive past the short heartbeat.
            ws.send_json(json!({"type": "ping"})).await;
            v.push(ws);
        }
        v
    };
    let attempt = Uuid::new_v4();
    assert_eq!(WsClient::connect(&url(&app, &b, &tok, attempt)).await.close_code().await.0, 4429);
    assert_eq!(row(&app, &alice, attempt).await.close_code, Some(4429));
    drop(keep);

    // A client that vanishes without a close frame (once the server let go of those two).
    wait_until("alice's sockets closed", || async { app.state.hub.user_count(alice.id) == 0 }).await;
    let attempt = Uuid::new_v4();
    let mut ws = WsClient::connect(&url(&app, &b, &tok, attempt)).await;
    ws.established().await;
    drop(ws);
    let r = row(&app, &alice, attempt).await;
    assert_eq!((r.close_code, r.closed_by), (None, Some(ClosedBy::Network)));

    // The metrics count all of it.
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        r#"natter_ws_closes_total{code="1000",initiator="client"} 1"#,
        r#"natter_ws_closes_total{code="4401",initiator="server"} 1"#,
        r#"natter_ws_closes_total{code="4403",initiator="server"} 1"#,
        r#"natter_ws_closes_total{code="4404",initiator="server"} 1"#,
        r#"natter_ws_closes_total{code="4400",initiator="server"} 1"#,
        r#"natter_ws_closes_total{code="1008",initiator="server"} 1"#,
        r#"natter_ws_closes_total{code="1009",initiator="server"} 1"#,
        r#"natter_ws_closes_total{code="4429",initiator="server"} 1"#,
        r#"natter_ws_closes_total{code="none",initiator="network"}"#,
        r#"natter_ws_attempts_total{outcome="refused",transport="websocket"} 6"#,
        r#"natter_chat_messages_total{direction="in"} 1"#,
        "natter_message_ack_seconds_count 1",
        "natter_bot_first_token_seconds_count 1",
        "natter_ws_handshake_duration_seconds_count",
        "natter_ws_connections_active",
    ] {
        assert!(text.contains(line), "metrics lack {line}:\n{text}");
    }
    // The process collector's metrics, before the exposition's end marker.
    let rss: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no process_resident_memory_bytes:\n{text}"));
    assert!(rss > 1e6, "a running server has more than 1 MB resident: {rss}");
    assert!(text.lines().any(|l| l.starts_with("process_open_fds ")), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "still one well-formed exposition");
}

#[tokio::test]
async fn server_errors_restarts_and_overload_are_recorded() {
    let app = TestApp::spawn_with(|c| c.limits.max_connections = 1).await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let b = bot.id.to_string();
    let tok = format!("token={}", alice.token);
    let first = Uuid::new_v4();
    let mut ws = WsClient::connect(&url(&app, &b, &tok, first)).await;
    ws.established().await;
    // While it is open, the ledger shows it established and not ended.
    app.state.ledger.flush().await;
    let open = app.state.store.connection(first, None).await.unwrap().unwrap();
    assert!(open.established && open.ended_at.is_none());
    let full = Uuid::new_v4();
    assert_eq!(WsClient::connect(&url(&app, &b, &tok, full)).await.close_code().await.0, 1013);
    assert!(row(&app, &alice, full).await.close_reason.unwrap().ends_with("retry_after_ms=5000"));

    // 1011: a corrupted engine.
    ws.close().await;
    let db =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", app.dir.path().join("natter.db").display())).await.unwrap();
    let broken = app.echo_bot(&alice).await;
    sqlx::query("UPDATE bots SET engine = '{\"kind\":\"lost\"}' WHERE id = ?")
        .bind(broken.id.to_string())
        .execute(&db)
        .await
        .unwrap();
    let err = Uuid::new_v4();
    let (c, reason) = WsClient::connect(&url(&app, &broken.id.to_string(), &tok, err)).await.close_code().await;
    assert_eq!(c, 1011);
    assert_eq!(row(&app, &alice, err).await.close_reason, Some(reason), "the error id is in the ledger too");

    // 1012: shutdown; the row is written before the server exits (on the one place there is,
    // once the 1011 socket has left it).
    wait_until("the server's only place free", || async { app.state.hub.is_empty() }).await;
    let last = Uuid::new_v4();
    let mut ws = WsClient::connect(&url(&app, &b, &tok, last)).await;
    ws.established().await;
    let dir = app.stop().await;
    assert_eq!(ws.close_code().await.0, 1012);
    // The stopped server closed its store; the next one on the same data reads the row.
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let r = app.state.store.connection(last, None).await.unwrap().unwrap();
    assert_eq!((r.close_code, r.closed_by), (Some(1012), Some(ClosedBy::Server)));
}

#[tokio::test]
async fn users_see_only_their_own_attempts_and_admins_see_all() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let bot = app.bot(&alice, json!({"name": "Pub", "visibility": "public"})).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    WsClient::connect(&url(&app, &bot.id.to_string(), &format!("token={}", alice.token), a)).await.close().await;
    WsClient::connect(&url(&app, &bot.id.to_string(), &format!("token={}", bob.token), b)).await.close().await;
    row(&app, &alice, a).await;
    row(&app, &bob, b).await;

    let (status, _) = app.get(&format!("/api/connections/{a}"), Some(&bob.token)).await;
    assert_eq!(status, 404, "another user's attempt is not found");
    let (_, list) = app.get(&format!("/api/connections?bot_id={}", bot.id), Some(&bob.token)).await;
    let ids: Vec<&str> = list.as_array().unwrap().iter().map(|r| r["attempt_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![b.to_string().as_str()]);
    let (status, v) = app.get("/api/connections?all=true", Some(&bob.token)).await;
    assert_eq!((status, v["error"]["code"].as_str()), (403, Some("forbidden")));
    let (status, _) = app.get("/api/connections", None).await;
    assert_eq!(status, 401);
    let (status, _) = app.get("/api/connections?limit=0", Some(&bob.token)).await;
    assert_eq!(status, 400);

    app.state.store.set_admin("alice", true).await.unwrap();
    let (_, all) = app.get("/api/connections?all=true", Some(&alice.token)).await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (status, _) = app.get(&format!("/api/connections/{b}"), Some(&alice.token)).await;
    assert_eq!(status, 200, "admins see everyone's");
}

/// Issue 14: the newest row with an attempt id used to win, whoever owned it, so anyone (even
/// an anonymous client) reusing alice's `attempt_id` made her lookup 404.
#[tokio::test]
async fn an_attempt_id_reused_by_someone_else_does_not_hide_the_callers_row() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let bot = app.bot(&alice, json!({"name": "Pub", "visibility": "public"})).await;
    let a = Uuid::new_v4();
    WsClient::connect(&url(&app, &bot.id.to_string(), &format!("token={}", alice.token), a)).await.close().await;
    let mine = row(&app, &alice, a).await;
    // Later rows with the same attempt id: bob's, then an anonymous refusal.
    tokio::time::sleep(Duration::from_millis(5)).await;
    WsClient::connect(&url(&app, &bot.id.to_string(), &format!("token={}", bob.token), a)).await.close().await;
    row(&app, &bob, a).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut anon = WsClient::connect(&url(&app, &bot.id.to_string(), "x=1", a)).await;
    assert_eq!(anon.close_code().await.0, 4401);
    app.state.ledger.flush().await;
    assert_eq!(
        app.state.store.connection(a, None).await.unwrap().unwrap().user_id,
        None,
        "the newest row is anonymous"
    );

    let (status, v) = app.get(&format!("/api/connections/{a}"), Some(&alice.token)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(serde_json::from_value::<ConnectionRecord>(v).unwrap().connection_id, mine.connection_id);
    let (status, v) = app.get(&format!("/api/connections/{a}"), Some(&bob.token)).await;
    assert_eq!((status, v["user_id"].as_str()), (200, Some(bob.id.to_string().as_str())));
    // A site admin sees the newest row of anyone's.
    app.state.store.set_admin("alice", true).await.unwrap();
    let (status, v) = app.get(&format!("/api/connections/{a}"), Some(&alice.token)).await;
    assert_eq!((status, v["user_id"].is_null()), (200, true), "{v}");
}

#[tokio::test]
async fn the_ledger_is_pruned_by_count_and_age() {
    let app = TestApp::spawn_with(|c| c.ledger_retention.max_rows = 2).await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut attempts = Vec::new();
    for _ in 0..4 {
        let a = Uuid::new_v4();
        WsClient::connect(&url(&app, &bot.id.to_string(), &format!("token={}", alice.token), a)).await.close().await;
        row(&app, &alice, a).await;
        attempts.push(a);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(app.state.ledger.prune().await, 2);
    let (_, list) = app.get("/api/connections", Some(&alice.token)).await;
    let ids: Vec<String> =
        list.as_array().unwrap().iter().map(|r| r["attempt_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, vec![attempts[3].to_string(), attempts[2].to_string()], "the newest stay");
}

#[tokio::test]
async fn requests_carry_an_id_and_are_counted_by_route() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let res = app.http.get(app.url(&format!("/api/bots/{}", bot.id))).bearer_auth(&alice.token).send().await.unwrap();
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    Uuid::parse_str(&id).unwrap();
    let res = app.http.get(app.url("/api/health")).header("x-request-id", "from-the-proxy-42").send().await.unwrap();
    assert_eq!(res.headers()["x-request-id"], "from-the-proxy-42");
    let res = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = res.text().await.unwrap();
    assert!(
        text.contains(r#"natter_http_requests_total{method="GET",route="/api/bots/{id}",status="200"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"route="/api/auth/login",status="200"} 1"#));
}

#[tokio::test]
async fn metrics_can_live_on_their_own_address() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let app = TestApp::spawn_with(|c| c.metrics_bind = Some(free)).await;
    let public = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!public.contains("natter_ws_connections_active"), "not on the public address");
    let mut text = String::new();
    for _ in 0..50 {
        if let Ok(r) = app.http.get(format!("http://{free}/metrics")).send().await {
            text = r.text().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(text.contains("natter_ws_connections_active"), "{text}");
}
