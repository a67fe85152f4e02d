//! The chat gateway: every close code, every frame, resume, idempotency, fan-out, limits,
//! slow consumers and graceful shutdown — with real WebSocket clients.

use std::time::Duration;

use natter_proto::{ErrorCode, MessageRole, ServerFrame};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::helpers::*;

fn ack(f: ServerFrame) -> (String, natter_proto::WireMessage, bool) {
    match f {
        ServerFrame::Ack { client_id, message, duplicate } => (client_id, message, duplicate),
        other => panic!("expected ack, got {other:?}"),
    }
}

fn msg(f: ServerFrame) -> natter_proto::WireMessage {
    match f {
        ServerFrame::Message { message } => message,
        other => panic!("expected message, got {other:?}"),
    }
}

fn error_code(f: ServerFrame) -> (ErrorCode, String) {
    match f {
        ServerFrame::Error { code, message, .. } => (code, message),
        other => panic!("expected error, got {other:?}"),
    }
}

/// Sends a message and waits for its ack and the echo reply.
async fn chat(ws: &mut WsClient, client_id: &str, text: &str) -> (i64, i64) {
    ws.say(client_id, text).await;
    let (_, m, _) = ack(ws.frame().await);
    let r = msg(ws.frame().await);
    assert_eq!(r.content, text);
    (m.seq, r.seq)
}

#[tokio::test]
async fn connect_chat_and_get_an_echo() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    let ServerFrame::ConnectionEstablished {
        user,
        bot: b,
        last_seq,
        heartbeat_interval_ms,
        limits,
        protocol_version,
        ..
    } = ws.established().await
    else {
        unreachable!()
    };
    assert_eq!(user.username, "alice");
    assert_eq!(b.id, bot.id);
    assert_eq!(last_seq, 0);
    assert_eq!(heartbeat_interval_ms, 25_000);
    assert_eq!(protocol_version, 1);
    assert_eq!(limits.max_content_chars, 16 * 1024);
    assert_eq!(limits.max_connections_per_user, 20);
    ws.say("c1", "hello").await;
    let (client_id, message, duplicate) = ack(ws.frame().await);
    assert_eq!((client_id.as_str(), message.seq, duplicate, message.role), ("c1", 1, false, MessageRole::User));
    let r = msg(ws.frame().await);
    assert_eq!((r.seq, r.content.as_str(), r.in_reply_to, r.role), (2, "hello", Some(message.id), MessageRole::Bot));

    // The history endpoint holds exactly that transcript.
    let (status, page) = app.get(&format!("/api/bots/{}/messages", bot.id), Some(&alice.token)).await;
    assert_eq!(status, 200);
    assert_eq!(page["last_seq"], 2);
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
}

async fn close_of(_app: &TestApp, url: String) -> (u16, String) {
    let mut ws = WsClient::connect(&url).await;
    ws.close_code().await
}

#[tokio::test]
async fn refusals_close_with_their_documented_code() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let bot = app.echo_bot(&alice).await;
    let b = bot.id.to_string();
    let t = &alice.token;

    // 4400: malformed request.
    let (c, r) = close_of(&app, app.ws_url("not-a-uuid", &format!("token={t}"))).await;
    assert_eq!((c, r.as_str()), (4400, "bot id is not a valid UUID"));
    for bad in ["abc", "-1", "1.5"] {
        let (c, r) = close_of(&app, app.ws_url(&b, &format!("token={t}&after_seq={bad}"))).await;
        assert_eq!(c, 4400, "after_seq={bad}");
        assert!(r.contains("after_seq"), "{r}");
    }
    let (c, r) = close_of(&app, app.ws_url(&b, &format!("token={t}&after_seq=5"))).await;
    assert_eq!(c, 4400);
    assert!(r.contains("beyond the conversation's last seq 0"), "{r}");
    let (c, r) = close_of(&app, app.ws_url(&b, &format!("token={t}&attempt_id=nope"))).await;
    assert_eq!((c, r.as_str()), (4400, "attempt_id is not a valid UUID"));

    // 4401: credentials, each with its own reason.
    let (c, r) = close_of(&app, app.ws_url(&b, "")).await;
    assert_eq!(c, 4401);
    assert!(r.starts_with("missing token"), "{r}");
    let (c, r) = close_of(&app, app.ws_url(&b, "token=garbage")).await;
    assert_eq!(c, 4401);
    assert!(r.starts_with("invalid token"), "{r}");
    let expired = expired_token(&app, alice.id);
    let (c, r) = close_of(&app, app.ws_url(&b, &format!("token={expired}"))).await;
    assert_eq!(c, 4401);
    assert!(r.starts_with("token expired"), "{r}");
    let (c, r) = close_of(&app, app.ws_url(&b, "ticket=made-up")).await;
    assert_eq!(c, 4401);
    assert!(r.contains("ticket is unknown"), "{r}");

    // 4403: someone else's private bot. 4404: no such bot.
    let (c, r) = close_of(&app, app.ws_url(&b, &format!("token={}", bob.token))).await;
    assert_eq!(c, 4403, "{r}");
    let (c, r) = close_of(&app, app.ws_url(&Uuid::new_v4().to_string(), &format!("token={t}"))).await;
    assert_eq!(c, 4404, "{r}");
    assert!(r.starts_with("no bot with id"));
}

#[tokio::test]
async fn preflight_gives_the_verdict_the_socket_would() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let bot = app.echo_bot(&alice).await;
    let cases = [
        (format!("/api/ws/preflight/{}?token={}", bot.id, alice.token), None),
        (format!("/api/ws/preflight/{}?token=bad", bot.id), Some(4401)),
        (format!("/api/ws/preflight/{}", bot.id), Some(4401)),
        (format!("/api/ws/preflight/{}?token={}", bot.id, bob.token), Some(4403)),
        (format!("/api/ws/preflight/{}?token={}", Uuid::new_v4(), alice.token), Some(4404)),
        (format!("/api/ws/preflight/x?token={}", alice.token), Some(4400)),
        (format!("/api/ws/preflight/{}?token={}&after_seq=9", bot.id, alice.token), Some(4400)),
    ];
    for (path, want) in cases {
        let (status, v) = app.get(&path, None).await;
        assert_eq!(status, 200);
        assert_eq!(v["ok"], want.is_none(), "{path}: {v}");
        assert_eq!(v["close_code"].as_u64().map(|c| c as u16), want, "{path}: {v}");
        // The socket agrees.
        let ws_path = path.replace("/api/ws/preflight/", "/api/ws/chat/");
        let mut ws = WsClient::connect(&format!("ws://{}{ws_path}", app.addr)).await;
        match (ws.next().await, want) {
            (Next::Frame(ServerFrame::ConnectionEstablished { .. }), None) => {}
            (Next::Close(code, reason), Some(w)) => {
                assert_eq!(code, w);
                assert_eq!(Some(reason.as_str()), v["reason"].as_str());
            }
            (other, w) => panic!("{path}: socket gave {other:?}, preflight said {w:?}"),
        }
    }
    // Bearer header works for the preflight too.
    let res =
        app.http.get(app.url(&format!("/api/ws/preflight/{}", bot.id))).bearer_auth(&alice.token).send().await.unwrap();
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["ok"], true);
}

#[tokio::test]
async fn tickets_are_single_use_and_bound_to_their_bot() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let other = app.echo_bot(&alice).await;
    let (status, v) = app.post("/api/ws/ticket", Some(&alice.token), json!({"bot_id": bot.id})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["expires_in"], 30);
    let ticket = v["ticket"].as_str().unwrap().to_owned();

    // Preflight does not use it up.
    let (_, pf) = app.get(&format!("/api/ws/preflight/{}?ticket={ticket}", bot.id), None).await;
    assert_eq!(pf["ok"], true, "{pf}");

    let mut ws = WsClient::connect(&app.ws_url(&bot.id.to_string(), &format!("ticket={ticket}"))).await;
    let ServerFrame::ConnectionEstablished { user, .. } = ws.established().await else { unreachable!() };
    assert_eq!(user.id, alice.id);
    let (c, r) = close_of(&app, app.ws_url(&bot.id.to_string(), &format!("ticket={ticket}"))).await;
    assert_eq!(c, 4401);
    assert!(r.contains("already used"), "{r}");

    let (_, v) = app.post("/api/ws/ticket", Some(&alice.token), json!({"bot_id": bot.id})).await;
    let (c, r) =
        close_of(&app, app.ws_url(&other.id.to_string(), &format!("ticket={}", v["ticket"].as_str().unwrap()))).await;
    assert_eq!((c, r.as_str()), (4401, "ticket was issued for another bot"));

    // No ticket for a bot you may not use.
    let bob = app.user("bob").await;
    let (status, v) = app.post("/api/ws/ticket", Some(&bob.token), json!({"bot_id": bot.id})).await;
    assert_eq!((status, v["error"]["code"].as_str()), (403, Some("forbidden")));
    let (status, _) = app.post("/api/ws/ticket", None, json!({"bot_id": bot.id})).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn origins_are_checked_only_when_present() {
    let app = TestApp::spawn_with(|c| c.allowed_origins = vec!["http://localhost:5173".into()]).await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let url = app.ws_url(&bot.id.to_string(), &format!("token={}", alice.token));
    let with_origin = |origin: &str| {
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        req
    };
    let mut ws = WsClient::connect_with(with_origin("http://evil.example")).await;
    let (c, r) = ws.close_code().await;
    assert_eq!((c, r.as_str()), (1008, "origin http://evil.example is not allowed"));
    for ok in ["http://localhost:5173", &format!("http://{}", app.addr)] {
        let mut ws = WsClient::connect_with(with_origin(ok)).await;
        ws.established().await;
    }
    // No Origin header: not a browser, allowed.
    WsClient::connect(&url).await.established().await;
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_socket_stays_up() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;

    let cases: Vec<(&str, ErrorCode)> = vec![
        ("{nope", ErrorCode::InvalidJson),
        (r#"{"type":"shout"}"#, ErrorCode::UnknownType),
        (r#"{"content":"x"}"#, ErrorCode::InvalidFrame),
        (r#"{"type":"message","content":"x"}"#, ErrorCode::InvalidFrame),
        (r#"{"type":"message","client_id":7,"content":"x"}"#, ErrorCode::InvalidFrame),
        (r#"{"type":"message","client_id":"","content":"x"}"#, ErrorCode::InvalidClientId),
        (r#"{"type":"message","client_id":"a","content":"   "}"#, ErrorCode::EmptyContent),
        (r#"{"type":"cancel","message_id":"00000000-0000-0000-0000-000000000001"}"#, ErrorCode::UnknownMessage),
    ];
    for (text, want) in cases {
        ws.send_text(text).await;
        let (code, message) = error_code(ws.frame().await);
        assert_eq!(code, want, "{text}: {message}");
    }
    let long_id = "x".repeat(65);
    ws.say(&long_id, "hi").await;
    assert_eq!(error_code(ws.frame().await).0, ErrorCode::InvalidClientId);
    ws.say("big", &"é".repeat(16 * 1024 + 1)).await;
    let f = ws.frame().await;
    let ServerFrame::Error { code, client_id, .. } = f else { panic!("{f:?}") };
    assert_eq!((code, client_id.as_deref()), (ErrorCode::ContentTooLong, Some("big")));
    use futures_util::SinkExt;
    ws.ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(error_code(ws.frame().await).0, ErrorCode::BinaryNotSupported);

    // Still up: ping/pong echoes the id, and chat works.
    ws.send_json(json!({"type": "ping", "id": "p-1"})).await;
    let f = ws.frame().await;
    let ServerFrame::Pong { id, .. } = f else { panic!("{f:?}") };
    assert_eq!(id, json!("p-1"));
    assert_eq!(chat(&mut ws, "c1", "still here").await, (1, 2));
    // Nothing refused was stored.
    assert_eq!(
        app.state.store.messages_after(conversation(&app, &alice, bot.id).await, 0, 100).await.unwrap().len(),
        2
    );
}

async fn conversation(app: &TestApp, user: &TestUser, bot: Uuid) -> Uuid {
    app.state.store.conversation(user.id, bot).await.unwrap().id
}

#[tokio::test]
async fn oversized_frames_close_with_1009() {
    let app = TestApp::spawn_with(|c| c.limits.max_frame_bytes = 2048).await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    let ServerFrame::ConnectionEstablished { limits, .. } = ws.established().await else { unreachable!() };
    assert_eq!(limits.max_frame_bytes, 2048);
    ws.say("big", &"x".repeat(4000)).await;
    let (c, r) = ws.close_code().await;
    assert_eq!((c, r.as_str()), (1009, "frame larger than 2048 bytes"));
}

#[tokio::test]
async fn resend_of_a_client_id_is_acked_again_and_not_stored_twice() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    ws.say("same", "once").await;
    let (_, first, dup) = ack(ws.frame().await);
    assert!(!dup);
    msg(ws.frame().await);
    // The client did not see the ack (say, it reconnected) and sends again.
    drop(ws);
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    ws.say("same", "once").await;
    let (_, again, dup) = ack(ws.frame().await);
    assert!(dup);
    assert_eq!(again, first, "same id, seq and content");
    // No second reply.
    assert!(ws.next_within(Duration::from_millis(300)).await.is_none());
    assert_eq!(
        app.state.store.messages_after(conversation(&app, &alice, bot.id).await, 0, 100).await.unwrap().len(),
        2
    );
}

#[tokio::test]
async fn two_tabs_see_every_message() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut a = app.ws(bot.id, &alice.token, "").await;
    let mut b = app.ws(bot.id, &alice.token, "").await;
    a.established().await;
    b.established().await;
    a.say("a1", "from tab a").await;
    let (_, sent, _) = ack(a.frame().await);
    let reply_a = msg(a.frame().await);
    let seen = msg(b.frame().await);
    assert_eq!(seen, sent, "tab b gets the user's own message");
    let reply_b = msg(b.frame().await);
    assert_eq!(reply_a, reply_b);

    // Another user's conversation with the same (public) bot stays separate.
    app.patch(&format!("/api/bots/{}", bot.id), Some(&alice.token), json!({"visibility": "public"})).await;
    let bob = app.user("bob").await;
    let mut c = app.ws(bot.id, &bob.token, "").await;
    c.established().await;
    assert_eq!(chat(&mut c, "b1", "bob here").await, (1, 2));
    assert!(a.next_within(Duration::from_millis(300)).await.is_none(), "alice sees nothing of bob's chat");
}

#[tokio::test]
async fn resume_replays_exactly_what_was_missed_while_messages_race() {
    let app = TestApp::spawn_with(|c| {
        c.limits.messages_per_second = 10_000;
        c.limits.message_burst = 10_000;
        c.limits.user_messages_per_second = 10_000;
        c.limits.user_message_burst = 10_000;
        c.limits.frames_per_second = 10_000;
        c.limits.frame_burst = 10_000;
    })
    .await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut writer = app.ws(bot.id, &alice.token, "").await;
    writer.established().await;
    for i in 0..20 {
        chat(&mut writer, &format!("w{i}"), &format!("m{i}")).await;
    }
    // Keep writing from the writer tab while the other tab resumes from seq 10.
    let writer_task = tokio::spawn(async move {
        for i in 20..60 {
            writer.say(&format!("w{i}"), &format!("m{i}")).await;
        }
        // Drain acks and replies: 40 acks + 40 replies, plus fan-out is not sent to self.
        let mut n = 0;
        while n < 80 {
            if let Next::Frame(_) = writer.next().await {
                n += 1;
            }
        }
        writer
    });
    let mut reader = app.ws(bot.id, &alice.token, "&after_seq=10").await;
    let ServerFrame::ConnectionEstablished { last_seq, .. } = reader.established().await else { unreachable!() };
    assert!(last_seq >= 40);
    let mut seqs = Vec::new();
    while seqs.last() != Some(&120) {
        let m = msg(reader.frame().await);
        seqs.push(m.seq);
    }
    assert_eq!(seqs, (11..=120).collect::<Vec<_>>(), "every seq after 10, once, in order");
    writer_task.await.unwrap();
}

#[tokio::test]
async fn rate_limit_answers_with_retry_after() {
    let app = TestApp::spawn_with(|c| {
        c.limits.messages_per_second = 1;
        c.limits.message_burst = 3;
    })
    .await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    for i in 0..3 {
        ws.say(&format!("c{i}"), "x").await;
    }
    ws.say("c3", "x").await;
    let mut limited = None;
    for _ in 0..7 {
        if let ServerFrame::Error { code: ErrorCode::RateLimited, retry_after_ms, client_id, .. } = ws.frame().await {
            limited = Some((retry_after_ms, client_id));
        }
    }
    let (retry, client_id) = limited.expect("the fourth message is rate limited");
    assert_eq!(client_id.as_deref(), Some("c3"));
    let retry = retry.unwrap();
    assert!(retry > 0 && retry <= 1001, "{retry}");
    tokio::time::sleep(Duration::from_millis(retry)).await;
    ws.say("c3", "x").await;
    assert_eq!(ack(ws.frame().await).1.seq, 7, "accepted after waiting");
}

#[tokio::test]
async fn connection_limits_per_user_and_per_server() {
    let app = TestApp::spawn_with(|c| {
        c.limits.max_connections_per_user = 2;
        c.limits.max_connections = 3;
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let bot = app.bot(&alice, json!({"name": "Pub", "visibility": "public"})).await;
    let mut a1 = app.ws(bot.id, &alice.token, "").await;
    a1.established().await;
    let mut a2 = app.ws(bot.id, &alice.token, "").await;
    a2.established().await;
    let (c, r) = app.ws(bot.id, &alice.token, "").await.close_code().await;
    assert_eq!((c, r.as_str()), (4429, "this user already has 2 open connections"));
    let (_, pf) = app.get(&format!("/api/ws/preflight/{}?token={}", bot.id, alice.token), None).await;
    assert_eq!(pf["close_code"], 4429);

    let mut b1 = app.ws(bot.id, &bob.token, "").await;
    b1.established().await;
    let (c, r) = app.ws(bot.id, &carol.token, "").await.close_code().await;
    assert_eq!(c, 1013);
    assert!(r.ends_with("retry_after_ms=5000"), "{r}");

    // Closing frees the slot.
    let open = app.state.hub.len();
    a2.close().await;
    wait_until("the closed socket leaves the hub", || async { app.state.hub.len() < open }).await;
    app.ws(bot.id, &carol.token, "").await.established().await;
    app.state.hub.check_invariants();
}

#[tokio::test]
async fn a_silent_client_is_closed_with_4408() {
    let app = TestApp::spawn_with(|c| c.heartbeat_interval = Duration::from_millis(200)).await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    let ServerFrame::ConnectionEstablished { heartbeat_interval_ms, .. } = ws.established().await else {
        unreachable!()
    };
    assert_eq!(heartbeat_interval_ms, 200);

    // An active client stays: app-level pings count as traffic.
    for i in 0..6 {
        ws.send_json(json!({"type": "ping", "id": i})).await;
        assert!(matches!(ws.frame().await, ServerFrame::Pong { .. }));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Not reading means not answering the server's pings either.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (c, r) = ws.close_code().await;
    assert_eq!((c, r.as_str()), (4408, "no traffic from the client for 400 ms"));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_4409_and_resumes_without_loss() {
    let app = TestApp::spawn_with(|c| {
        c.limits.outbound_queue = 8;
        c.limits.messages_per_second = 100_000;
        c.limits.message_burst = 100_000;
        c.limits.user_messages_per_second = 100_000;
        c.limits.user_message_burst = 100_000;
        c.limits.frames_per_second = 100_000;
        c.limits.frame_burst = 100_000;
    })
    .await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut lazy = app.ws(bot.id, &alice.token, "").await;
    lazy.established().await;
    let mut busy = app.ws(bot.id, &alice.token, "").await;
    busy.established().await;
    // 16 KiB messages, each delivered twice to the lazy tab (message + reply), until the
    // socket buffers and the 8-frame queue are full.
    let text = "z".repeat(16 * 1024);
    let mut sent = 0;
    let mut last_seq = 0;
    let started = std::time::Instant::now();
    // Until the lazy tab is dropped: its queue must stay full for the grace period.
    while app.state.hub.len() == 2 && started.elapsed() < Duration::from_secs(30) {
        busy.say(&format!("b{sent}"), &text).await;
        let (_, m, _) = ack(busy.frame().await);
        last_seq = m.seq + 1;
        msg(busy.frame().await);
        sent += 1;
    }
    assert!(app.state.hub.len() < 2, "the lazy tab was dropped after {sent} messages");
    let mut got = Vec::new();
    let (code, reason) = loop {
        match lazy.next().await {
            Next::Frame(ServerFrame::Message { message }) => got.push(message.seq),
            Next::Frame(other) => panic!("{other:?}"),
            Next::Close(c, r) => break (c, r),
        }
    };
    assert_eq!(code, 4409, "{reason}");
    // The ledger and the metrics say so too.
    app.state.ledger.flush().await;
    let rows = app.state.store.connections(Some(alice.id), None, 10).await.unwrap();
    assert!(rows.iter().any(|r| r.close_code == Some(4409) && r.established), "{rows:?}");
    assert!(app.state.metrics.render().contains(r#"natter_ws_closes_total{code="4409",initiator="server"} 1"#));
    // Everything it got was in order; it resumes from there and gets the rest.
    let from = got.last().copied().unwrap_or(0);
    assert_eq!(got, (1..=from).collect::<Vec<_>>());
    let mut again = app.ws(bot.id, &alice.token, &format!("&after_seq={from}")).await;
    again.established().await;
    for want in from + 1..=last_seq {
        assert_eq!(msg(again.frame().await).seq, want);
    }
}

#[tokio::test]
async fn graceful_shutdown_closes_1012_and_loses_nothing() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut a = app.ws(bot.id, &alice.token, "").await;
    let mut b = app.ws(bot.id, &alice.token, "").await;
    a.established().await;
    b.established().await;
    for i in 0..5 {
        chat(&mut a, &format!("c{i}"), &format!("m{i}")).await;
    }
    let started = std::time::Instant::now();
    let dir = app.stop().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let (c, _) = a.close_code().await;
    assert_eq!(c, 1012);
    // Tab b had 10 messages queued for it; it gets them all, then 1012.
    let mut seqs = Vec::new();
    let code = loop {
        match b.next().await {
            Next::Frame(f) => seqs.push(seq_of(&f).unwrap()),
            Next::Close(c, _) => break c,
        }
    };
    assert_eq!(code, 1012);
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());

    // Restart on the same data: the resume after seq 4 gets 5..10.
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let mut a = app.ws(bot.id, &alice.token, "&after_seq=4").await;
    let ServerFrame::ConnectionEstablished { last_seq, .. } = a.established().await else { unreachable!() };
    assert_eq!(last_seq, 10);
    for want in 5..=10 {
        assert_eq!(msg(a.frame().await).seq, want);
    }
}

#[tokio::test]
async fn a_hand_over_restart_on_a_shared_port_loses_and_doubles_nothing() {
    let old = TestApp::spawn_with(|c| c.reuse_port = true).await;
    let alice = old.user("alice").await;
    let bot = old.echo_bot(&alice).await;
    let mut a = old.ws(bot.id, &alice.token, "").await;
    a.established().await;
    for i in 0..3 {
        chat(&mut a, &format!("c{i}"), &format!("m{i}")).await;
    }
    let data = old.dir.path().to_path_buf();
    let shared = |c: &mut natter_server::Config, reuse_port: bool| {
        c.bind = old.addr;
        c.data_dir = data.clone();
        c.database = natter_server::config::Database::SqliteFile(data.join("natter.db"));
        c.reuse_port = reuse_port;
    };
    // A second process without SO_REUSEPORT cannot take the address: no silent split by mistake.
    let mut config = natter_server::Config::for_tests(data.clone());
    shared(&mut config, false);
    match natter_server::Server::build(config).await {
        Err(natter_server::StartError::Bind { .. }) => {}
        Err(e) => panic!("expected a bind error, got {e}"),
        Ok(_) => panic!("two servers listen on {} without SO_REUSEPORT", old.addr),
    }
    // The new process listens on the same address while the old one still serves.
    let new = TestApp::spawn_with(|c| shared(c, true)).await;
    assert_eq!(new.addr, old.addr);
    let new_node = new.state.cluster.node().node_id;
    assert_ne!(new_node, old.state.cluster.node().node_id);

    let _old_dir = old.stop().await;
    assert_eq!(a.close_code().await.0, 1012);
    // Only the new process answers now.
    for _ in 0..5 {
        let (status, body) = new.get("/api/health", None).await;
        assert_eq!((status, body["node_id"].as_str()), (200, Some(new_node.to_string().as_str())));
    }
    // The tab resumes after seq 4 on the new process: 5 and 6, then the conversation goes on at 7.
    let mut b = new.ws(bot.id, &alice.token, "&after_seq=4").await;
    let ServerFrame::ConnectionEstablished { last_seq, .. } = b.established().await else { unreachable!() };
    assert_eq!(last_seq, 6);
    assert_eq!((msg(b.frame().await).seq, msg(b.frame().await).seq), (5, 6));
    // A resend of what the old process stored is a duplicate, not a new message.
    b.say("c1", "m1").await;
    let (cid, m, duplicate) = ack(b.frame().await);
    assert_eq!((cid.as_str(), m.seq, duplicate), ("c1", 3, true));
    assert_eq!(chat(&mut b, "c3", "m3").await, (7, 8));
}

#[tokio::test]
async fn an_internal_error_closes_1011_with_an_error_id_that_is_in_the_log() {
    capture_logs();
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    // Corrupt the stored engine behind the server's back.
    let db =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", app.dir.path().join("natter.db").display())).await.unwrap();
    sqlx::query("UPDATE bots SET engine = '{\"kind\":\"lost\"}' WHERE id = ?")
        .bind(bot.id.to_string())
        .execute(&db)
        .await
        .unwrap();
    let (c, r) = app.ws(bot.id, &alice.token, "").await.close_code().await;
    assert_eq!(c, 1011);
    let id = r.strip_prefix("internal error (error id ").and_then(|s| s.strip_suffix(')')).expect(&r);
    Uuid::parse_str(id).unwrap();
    assert!(logs().lines().any(|l| l.contains(id) && l.contains("ERROR")), "error id {id} is logged");
}

#[tokio::test]
async fn closes_are_logged_with_the_connection_and_no_secrets() {
    capture_logs();
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    let ServerFrame::ConnectionEstablished { connection_id, .. } = ws.established().await else { unreachable!() };
    chat(&mut ws, "c1", "hi").await;
    ws.close().await;
    let (_, v) = app.post("/api/ws/ticket", Some(&alice.token), json!({"bot_id": bot.id})).await;
    let ticket = v["ticket"].as_str().unwrap().to_owned();
    WsClient::connect(&app.ws_url(&bot.id.to_string(), &format!("ticket={ticket}"))).await.established().await;
    app.post("/api/auth/login", None, json!({"username": "alice", "password": "wrong-password"})).await;
    let close_line = |l: &str| l.contains("connection closed") && l.contains(&connection_id.to_string());
    wait_until("the close is logged", || async { logs().lines().any(close_line) }).await;
    let logs = logs();
    let closed = logs
        .lines()
        .find(|l| l.contains("connection closed") && l.contains(&connection_id.to_string()))
        .unwrap_or_else(|| panic!("no close line for {connection_id} in\n{logs}"));
    for field in ["closed_by=\"client\"", "close_code=Some(1000)", "duration_ms=", &format!("user_id={}", alice.id)] {
        assert!(closed.contains(field), "{field} missing in {closed}");
    }
    for secret in [alice.token.as_str(), alice.refresh.as_str(), ticket.as_str(), PASSWORD, "wrong-password"] {
        assert!(!logs.contains(secret), "a secret reached the log");
    }
}

#[tokio::test]
async fn codes_registry_is_served_and_documented() {
    let app = TestApp::spawn().await;
    let (status, v) = app.get("/api/ws/codes", None).await;
    assert_eq!(status, 200);
    let codes: Vec<u64> = v["close_codes"].as_array().unwrap().iter().map(|c| c["code"].as_u64().unwrap()).collect();
    for want in [4400, 4401, 4403, 4404, 4408, 4409, 4429, 1008, 1009, 1011, 1012, 1013] {
        assert!(codes.contains(&want), "{want} in the registry");
    }
    let c4401 = v["close_codes"].as_array().unwrap().iter().find(|c| c["code"] == 4401).unwrap();
    assert_eq!(c4401["retry"], "reauth_once");
    assert!(v["error_codes"].as_array().unwrap().iter().any(|e| e["code"] == "rate_limited"));

    // docs/protocol.md has a row for every close code and every error code.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md")).unwrap();
    for c in natter_proto::CloseCode::ALL {
        assert!(
            doc.contains(&format!("| {} | `{}` |", c.code(), c.name())),
            "docs/protocol.md lacks close code {}",
            c.code()
        );
    }
    for e in natter_proto::ErrorCode::ALL {
        assert!(doc.contains(&format!("`{}`", e.as_str())), "docs/protocol.md lacks error code {}", e.as_str());
    }
}

#[tokio::test]
async fn revoking_access_closes_open_sockets_and_edits_apply_live() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let bot = app.bot(&alice, json!({"name": "Shared", "visibility": "public"})).await;
    app.post(&format!("/api/bots/{}/members", bot.id), Some(&alice.token), json!({"username": "bob", "role": "chat"}))
        .await;
    let mut owner = app.ws(bot.id, &alice.token, "").await;
    let mut member = app.ws(bot.id, &bob.token, "").await;
    let mut public = app.ws(bot.id, &carol.token, "").await;
    for ws in [&mut owner, &mut member, &mut public] {
        ws.established().await;
    }

    // Made private: the stranger who came in through visibility is shut out at once.
    let (status, _) =
        app.patch(&format!("/api/bots/{}", bot.id), Some(&alice.token), json!({"visibility": "private"})).await;
    assert_eq!(status, 200);
    assert_eq!(public.close_code().await, (4403, "access to this bot was revoked".to_string()));
    // And a new connection is refused: admission did not keep the old answer (chat/access.rs).
    assert_eq!(app.ws(bot.id, &carol.token, "").await.close_code().await.0, 4403);
    // The member is removed: the same.
    let (status, _) = app.delete(&format!("/api/bots/{}/members/bob", bot.id), Some(&alice.token)).await;
    assert_eq!(status, 204);
    assert_eq!(member.close_code().await.0, 4403);
    assert_eq!(app.ws(bot.id, &bob.token, "").await.close_code().await.0, 4403);

    // The owner stays, and an engine change applies to the open socket.
    app.patch(
        &format!("/api/bots/{}", bot.id),
        Some(&alice.token),
        json!({"engine": {"kind": "rules", "rules": [], "fallback": "now I am rules"}}),
    )
    .await;
    owner.say("c1", "hello").await;
    ack(owner.frame().await);
    assert_eq!(msg(owner.frame().await).content, "now I am rules");

    // Deleted: 4404.
    let (status, _) = app.delete(&format!("/api/bots/{}", bot.id), Some(&alice.token)).await;
    assert_eq!(status, 204);
    assert_eq!(owner.close_code().await, (4404, "this bot was deleted".to_string()));
    assert_eq!(app.ws(bot.id, &alice.token, "").await.close_code().await.0, 4404);
}

#[tokio::test]
async fn a_token_of_a_user_who_no_longer_exists_is_refused_4401() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let bot = app.bot(&alice, json!({"name": "Pub", "visibility": "public"})).await;
    let db =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", app.dir.path().join("natter.db").display())).await.unwrap();
    sqlx::query("DELETE FROM users WHERE id = ?").bind(bob.id.to_string()).execute(&db).await.unwrap();
    let (c, r) = app.ws(bot.id, &bob.token, "").await.close_code().await;
    assert_eq!((c, r.as_str()), (4401, "invalid token: its user no longer exists"));
}

/// A proxy that drops the hop-by-hop `Upgrade`/`Connection` headers turns the handshake into a
/// plain GET: the answer names that cause in natter's JSON error shape, with 426.
#[tokio::test]
async fn a_handshake_without_upgrade_headers_gets_426_naming_the_proxy() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let url = app.url(&format!("/api/ws/chat/{}?token={}", bot.id, alice.token));
    let res = app.http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 426);
    assert_eq!(res.headers()["upgrade"], "websocket");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("a proxy in between drops them") && message.contains("/api/sse/chat/"), "{message}");
    // Upgrade headers that arrived, but no key: a broken client, not a proxy.
    let res = app
        .http
        .get(&url)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().starts_with("not a WebSocket handshake"), "{body}");
}
