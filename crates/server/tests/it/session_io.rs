//! The session's write path under load (issue 15, item 6): replies are written while client
//! frames keep arriving, and a client's close frame that arrives with a broken write is
//! recorded as the client's close, not the network's.

use std::time::Duration;

use futures_util::SinkExt;
use natter_proto::api::ClosedBy;
use natter_proto::ServerFrame;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as TCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::helpers::*;

fn unlimited_frames(c: &mut natter_server::Config) {
    c.limits.frames_per_second = 1_000_000;
    c.limits.frame_burst = 1_000_000;
    c.limits.messages_per_second = 1_000_000;
    c.limits.message_burst = 1_000_000;
    c.limits.user_messages_per_second = 1_000_000;
    c.limits.user_message_burst = 1_000_000;
}

/// The value of one sample line of the Prometheus text.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// 3 000 pings arrive in one write, so the session always has another frame ready to read.
/// Before the fix it wrote only when idle or when its 256-frame queue was full; now it writes
/// as soon as 16 frames wait, so the queue depth seen at each push never exceeds 16.
#[tokio::test]
async fn replies_are_written_while_client_frames_keep_coming() {
    const PINGS: usize = 3000;
    let app = TestApp::spawn_with(unlimited_frames).await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    for i in 0..PINGS {
        let ping = json!({"type": "ping", "id": i}).to_string();
        ws.ws.feed(Message::Text(ping.into())).await.unwrap();
    }
    ws.ws.flush().await.unwrap();
    for i in 0..PINGS {
        match ws.frame().await {
            ServerFrame::Pong { id, .. } => assert_eq!(id, json!(i)),
            other => panic!("expected pong {i}, got {other:?}"),
        }
    }
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let total = sample(&metrics, "natter_ws_outbound_queue_depth_count");
    let at_most_16 = sample(&metrics, "natter_ws_outbound_queue_depth_bucket{le=\"16.0\"}");
    assert!(total >= PINGS as f64, "every pong was counted: {total}");
    assert_eq!(at_most_16, total, "frames waited in a queue deeper than 16:\n{metrics}");
}

/// The server is stuck writing to a client that reads nothing; the client sends its close frame
/// and drops the connection (with unread data, so its kernel resets it). The server's next
/// write fails, but the client's close frame is already in the server's buffers: the ledger
/// says the client closed, with the client's code (before: `closed_by=network`, no code).
#[tokio::test]
async fn a_close_frame_behind_a_failed_write_is_the_clients() {
    let app = TestApp::spawn_with(unlimited_frames).await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    // ~10 MB of history (more than any socket buffer here) to replay.
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    let content = "x".repeat(16_000);
    for i in 0..150 {
        ws.say(&format!("c{i}"), &content).await;
    }
    let conv = app.state.store.conversation(alice.id, bot.id).await.unwrap().id;
    for _ in 0..500 {
        if app.state.store.messages_after(conv, 299, 1).await.unwrap().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ws.close().await;

    let attempt = Uuid::new_v4();
    let query = format!("token={}&after_seq=0&attempt_id={attempt}", alice.token);
    let mut ws = WsClient::connect_small_buffer(&app.ws_url(&bot.id.to_string(), &query), app.addr).await;
    ws.established().await;
    // The replay fills every buffer between us and the server, whose writes now wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let close = CloseFrame { code: TCloseCode::Away, reason: "tab closed".into() };
    ws.ws.send(Message::Close(Some(close))).await.unwrap();
    drop(ws);

    let r = crate::observability::row(&app, &alice, attempt).await;
    assert_eq!((r.closed_by, r.close_code), (Some(ClosedBy::Client), Some(1001)), "{r:?}");
}
