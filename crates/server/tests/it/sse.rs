//! The SSE binding (issue 17): the chat as `text/event-stream` down and HTTP POST up, with the
//! guarantees of the socket — admission codes, resume by seq (`Last-Event-ID`), idempotent
//! resend, per-user limits, revocation, keep-alives and the idle close, shutdown with 1012.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use natter_proto::api::TransportKind;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{TestApp, TestUser};

/// One event of the stream: its name, `id:` and data (a comment is `": …"` with no data).
#[derive(Debug)]
pub struct Event {
    pub name: String,
    pub id: Option<i64>,
    pub data: Value,
}

pub struct SseClient {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buf: String,
    headers: reqwest::header::HeaderMap,
    /// Keep-alive comments seen so far.
    comments: usize,
}

impl SseClient {
    pub async fn open(app: &TestApp, bot_id: Uuid, query: &str, last_event_id: Option<i64>) -> SseClient {
        let mut req = app.http.get(app.url(&format!("/api/sse/chat/{bot_id}?{query}")));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let res = req.send().await.expect("the stream opens");
        assert_eq!(res.status(), 200, "a stream is accepted before any check");
        let headers = res.headers().clone();
        SseClient { body: Box::pin(res.bytes_stream()), buf: String::new(), headers, comments: 0 }
    }

    /// The next event, or `None` when the stream ended.
    async fn next(&mut self) -> Option<Event> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if block.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (mut name, mut id, mut data) = (String::new(), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                return Some(Event { name, id, data: serde_json::from_str(&data).expect("JSON data") });
            }
            let chunk =
                tokio::time::timeout(Duration::from_secs(10), self.body.next()).await.expect("an event in time");
            match chunk {
                Some(Ok(bytes)) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                _ => return None,
            }
        }
    }

    pub async fn event(&mut self) -> Event {
        self.next().await.expect("the stream is open")
    }

    /// `connection_established` and the `stream` event: the connection id.
    async fn established(&mut self) -> Uuid {
        let e = self.event().await;
        assert_eq!(e.name, "connection_established", "{e:?}");
        let s = self.event().await;
        assert_eq!(s.name, "stream", "{s:?}");
        let id: Uuid = s.data["connection_id"].as_str().unwrap().parse().unwrap();
        assert_eq!(e.data["connection_id"].as_str().unwrap(), id.to_string());
        id
    }

    /// The close event's (code, reason), then the end of the stream.
    async fn closed(&mut self) -> (u64, String) {
        loop {
            let e = self.event().await;
            if e.name == "close" {
                assert!(self.next().await.is_none(), "the stream ends after its close event");
                return (e.data["code"].as_u64().unwrap(), e.data["reason"].as_str().unwrap().to_owned());
            }
        }
    }
}

async fn post(app: &TestApp, user: &TestUser, bot_id: Uuid, stream: Uuid, frame: Value) -> (u16, Value) {
    app.post(&format!("/api/sse/chat/{bot_id}/frames?stream={stream}"), Some(&user.token), frame).await
}

fn message(client_id: &str, content: &str) -> Value {
    json!({"type": "message", "client_id": client_id, "content": content})
}

#[tokio::test]
async fn a_stream_chats_by_post_and_streams_the_reply_with_seqs_as_event_ids() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut sse = SseClient::open(&app, bot.id, &format!("token={}", alice.token), None).await;
    assert_eq!(sse.headers["content-type"], "text/event-stream; charset=utf-8");
    assert_eq!(sse.headers["x-accel-buffering"], "no");
    assert!(sse.headers.get("content-encoding").is_none(), "nothing that would buffer");
    let stream = sse.established().await;

    let (status, ack) = post(&app, &alice, bot.id, stream, message("c1", "hello")).await;
    assert_eq!((status, ack["type"].as_str()), (200, Some("ack")), "the POST answers with the outcome: {ack}");
    assert_eq!((ack["message"]["seq"].as_i64(), ack["duplicate"].as_bool()), (Some(1), Some(false)));
    let mine = sse.event().await;
    assert_eq!((mine.name.as_str(), mine.id), ("message", Some(1)));
    assert_eq!(mine.data["message"]["client_id"], "c1");
    let reply = sse.event().await;
    assert_eq!((reply.name.as_str(), reply.id), ("message", Some(2)));
    assert_eq!(reply.data["message"]["in_reply_to"], ack["message"]["id"]);

    // A resend is the stored message again, and no second reply.
    let (_, again) = post(&app, &alice, bot.id, stream, message("c1", "hello")).await;
    assert_eq!(
        (again["message"]["id"].clone(), again["duplicate"].as_bool()),
        (ack["message"]["id"].clone(), Some(true))
    );
    let (status, pong) = post(&app, &alice, bot.id, stream, json!({"type": "ping", "id": "p1"})).await;
    assert_eq!((status, pong["type"].as_str(), pong["id"].as_str()), (200, Some("pong"), Some("p1")));
    let (_, page) = app.get(&format!("/api/bots/{}/messages", bot.id), Some(&alice.token)).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2, "{page}");
}

#[tokio::test]
async fn bad_frames_get_their_error_and_strangers_get_http_errors() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let mallory = app.user("mallory").await;
    let bot = app.echo_bot(&alice).await;
    let mut sse = SseClient::open(&app, bot.id, &format!("token={}", alice.token), None).await;
    let stream = sse.established().await;
    let (status, e) = post(&app, &alice, bot.id, stream, message("", "hi")).await;
    assert_eq!((status, e["type"].as_str(), e["code"].as_str()), (200, Some("error"), Some("invalid_client_id")));
    let (_, e) = post(&app, &alice, bot.id, stream, json!({"type": "shout"})).await;
    assert_eq!(e["code"], "unknown_type", "{e}");
    let (status, _) =
        app.post(&format!("/api/sse/chat/{}/frames?stream={stream}", bot.id), None, message("c1", "hi")).await;
    assert_eq!(status, 401, "no token");
    let (status, _) = post(&app, &mallory, bot.id, stream, message("c1", "hi")).await;
    assert_eq!(status, 403, "a private bot of someone else");
    let (status, _) = post(&app, &alice, Uuid::new_v4(), stream, message("c1", "hi")).await;
    assert_eq!(status, 404);
    let (status, _) =
        app.post(&format!("/api/sse/chat/{}/frames?stream=nope", bot.id), Some(&alice.token), message("c", "x")).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn last_event_id_resumes_after_the_last_seq_seen() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut sse = SseClient::open(&app, bot.id, &format!("token={}", alice.token), None).await;
    let stream = sse.established().await;
    for i in 0..2 {
        post(&app, &alice, bot.id, stream, message(&format!("m{i}"), "hi")).await;
    }
    drop(sse);
    let mut again = SseClient::open(&app, bot.id, &format!("token={}", alice.token), Some(1)).await;
    again.established().await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(again.event().await.id);
    }
    assert_eq!(seen, [Some(2), Some(3), Some(4)], "every seq after 1, in order, once");
}

#[tokio::test]
async fn refusals_are_a_close_event_with_the_sockets_code() {
    let app = TestApp::spawn_with(|c| c.limits.max_connections_per_user = 1).await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut bad = SseClient::open(&app, bot.id, "token=garbage", None).await;
    assert_eq!(bad.closed().await.0, 4401);
    let mut unknown = SseClient::open(&app, Uuid::new_v4(), &format!("token={}", alice.token), None).await;
    assert_eq!(unknown.closed().await.0, 4404);
    let mut first = SseClient::open(&app, bot.id, &format!("token={}", alice.token), None).await;
    first.established().await;
    let attempt = Uuid::new_v4();
    let mut second = SseClient::open(&app, bot.id, &format!("token={}&attempt_id={attempt}", alice.token), None).await;
    let (code, reason) = second.closed().await;
    assert_eq!((code, reason.as_str()), (4429, "this user already has 1 open connections"));
    // The ledger and the metrics name the transport.
    let row = crate::observability::row(&app, &alice, attempt).await;
    assert_eq!((row.transport, row.close_code, row.established), (TransportKind::Sse, Some(4429), false));
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"natter_ws_attempts_total{outcome="refused",transport="sse"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"natter_ws_attempts_total{outcome="established",transport="sse"} 1"#));
}

#[tokio::test]
async fn logout_closes_the_stream_4401() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut sse = SseClient::open(&app, bot.id, &format!("token={}", alice.token), None).await;
    sse.established().await;
    let (status, _) = app.post("/api/auth/logout", None, json!({"refresh_token": alice.refresh})).await;
    assert_eq!(status, 204);
    assert_eq!(sse.closed().await, (4401, "logged out: this login was ended; log in again".to_owned()));
    // Its POSTs get the REST answer for an ended login, as every endpoint does.
    let (status, v) = post(&app, &alice, bot.id, Uuid::new_v4(), json!({"type": "ping"})).await;
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("token_revoked")), "{v}");
}

#[tokio::test]
async fn keep_alives_flow_and_a_silent_client_is_closed_4408_but_posts_keep_it_open() {
    let app = TestApp::spawn_with(|c| c.heartbeat_interval = Duration::from_millis(200)).await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut talking = SseClient::open(&app, bot.id, &format!("token={}", alice.token), None).await;
    let stream = talking.established().await;
    let mut silent = SseClient::open(&app, bot.id, &format!("token={}", alice.token), None).await;
    silent.established().await;
    let pinger = {
        let (app_http, url, token) = (
            app.http.clone(),
            app.url(&format!("/api/sse/chat/{}/frames?stream={stream}", bot.id)),
            alice.token.clone(),
        );
        tokio::spawn(async move {
            loop {
                let _ = app_http.post(&url).bearer_auth(&token).json(&json!({"type": "ping"})).send().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    assert_eq!(silent.closed().await.0, 4408, "two heartbeats without a POST");
    assert!(silent.comments >= 1, "keep-alive comments came first");
    // The talking client outlived it, and still gets what happens.
    post(&app, &alice, bot.id, stream, message("c1", "still here")).await;
    let e = talking.event().await;
    assert_eq!(e.name, "message");
    pinger.abort();
}

#[tokio::test]
async fn shutdown_closes_the_stream_1012() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut sse = SseClient::open(&app, bot.id, &format!("token={}", alice.token), None).await;
    sse.established().await;
    let stopping = tokio::spawn(app.stop());
    let (code, reason) = sse.closed().await;
    assert_eq!(code, 1012);
    // The same reconnect hint as on a WebSocket.
    assert!(natter_proto::Close::retry_after_ms(&reason).is_some(), "{reason}");
    stopping.await.unwrap();
}

/// No sticky sessions: the stream on node A, its POSTs on node B. B answers with the ack, A
/// streams the message and the reply, and B's POSTs keep A's stream from its idle close.
#[tokio::test]
async fn the_stream_on_one_node_and_its_posts_on_another() {
    let Some(services) = crate::multinode::Services::from_env("sse_two_nodes").await else { return };
    let fast = |c: &mut natter_server::Config| c.heartbeat_interval = Duration::from_millis(300);
    let a = services.node(None, fast).await;
    let b = services.node(Some(&a), fast).await;
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;
    let mut sse = SseClient::open(&a, bot.id, &format!("token={}", alice.token), None).await;
    let stream = sse.established().await;
    let started = std::time::Instant::now();
    for i in 0..6 {
        let (status, ack) = post(&b, &alice, bot.id, stream, message(&format!("c{i}"), "across")).await;
        assert_eq!((status, ack["type"].as_str()), (200, Some("ack")), "{ack}");
        let mine = sse.event().await;
        assert_eq!((mine.name.as_str(), mine.id), ("message", Some(2 * i + 1)));
        let reply = sse.event().await;
        assert_eq!((reply.name.as_str(), reply.id), ("message", Some(2 * i + 2)));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Over three idle limits (600 ms) have passed with no word on A but B's POSTs.
    assert!(started.elapsed() > Duration::from_millis(900));
    let (status, pong) = post(&b, &alice, bot.id, stream, json!({"type": "ping"})).await;
    assert_eq!((status, pong["type"].as_str()), (200, Some("pong")));
}

#[tokio::test]
async fn revoking_access_closes_the_stream_4403_and_its_posts_are_refused() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let carol = app.user("carol").await;
    let bot = app.bot(&alice, json!({"name": "Public", "visibility": "public"})).await;
    let mut sse = SseClient::open(&app, bot.id, &format!("token={}", carol.token), None).await;
    let stream = sse.established().await;
    let (status, _) =
        app.patch(&format!("/api/bots/{}", bot.id), Some(&alice.token), json!({"visibility": "private"})).await;
    assert_eq!(status, 200);
    assert_eq!(sse.closed().await, (4403, "access to this bot was revoked".to_owned()));
    let (status, v) = post(&app, &carol, bot.id, stream, message("c1", "let me in")).await;
    assert_eq!((status, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    // And a new stream is refused too.
    let mut again = SseClient::open(&app, bot.id, &format!("token={}", carol.token), None).await;
    assert_eq!(again.closed().await.0, 4403);
}

#[tokio::test]
async fn the_users_message_budget_holds_for_posts_as_for_sockets() {
    let app = TestApp::spawn_with(|c| {
        c.limits.user_message_burst = 2;
        c.limits.user_messages_per_second = 1;
    })
    .await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut sse = SseClient::open(&app, bot.id, &format!("token={}", alice.token), None).await;
    let stream = sse.established().await;
    for i in 0..2 {
        let (status, v) = post(&app, &alice, bot.id, stream, message(&format!("c{i}"), "hi")).await;
        assert_eq!((status, v["type"].as_str()), (200, Some("ack")), "{v}");
    }
    // The third is over the user's budget: an error answer that says how long to wait, and
    // nothing stored.
    let (status, v) = post(&app, &alice, bot.id, stream, message("c2", "hi")).await;
    assert_eq!((status, v["type"].as_str(), v["code"].as_str()), (200, Some("error"), Some("rate_limited")), "{v}");
    assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{v}");
    assert_eq!(v["client_id"].as_str(), Some("c2"));
    let (_, history) = app.get(&format!("/api/bots/{}/messages", bot.id), Some(&alice.token)).await;
    let stored: Vec<_> = history["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "user").collect();
    assert_eq!(stored.len(), 2, "{history}");
}
