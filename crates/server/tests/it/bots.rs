//! Bot engines end to end through the socket: rules, an OpenAI-compatible provider (a local
//! server speaking the real Chat Completions SSE format), and a signed webhook.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use natter_proto::{ErrorCode, MessageRole, MessageStatus, ServerFrame, WireMessage};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

/// What the fake provider saw.
#[derive(Default, Clone)]
pub(crate) struct Seen {
    pub(crate) requests: Vec<(Option<String>, Value)>,
}

pub(crate) type Shared = Arc<Mutex<Seen>>;

/// A stream of (delay before, chunk) items; `None` cuts the connection.
fn sse(items: Vec<(u64, Option<String>)>) -> Body {
    let stream = futures_util::stream::unfold(items.into_iter(), |mut it| async move {
        let (delay, chunk) = it.next()?;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let item: Result<Bytes, std::io::Error> = match chunk {
            Some(c) => Ok(Bytes::from(c)),
            None => Err(std::io::Error::other("cut")),
        };
        Some((item, it))
    });
    Body::from_stream(stream)
}

fn chunk(piece: &str) -> Option<String> {
    let v = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
    Some(format!("data: {v}\n\n"))
}

fn tokens(words: &[&str], delay: u64) -> Vec<(u64, Option<String>)> {
    let mut items = vec![
        (0, Some(": keep-alive comment\n\n".to_string())),
        (0, Some("data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n".into())),
    ];
    items.extend(words.iter().map(|w| (delay, chunk(w))));
    items
}

/// The fake OpenAI-compatible provider; the model name picks the behaviour.
async fn completions(State(seen): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap();
    let auth = headers.get("authorization").map(|v| v.to_str().unwrap().to_owned());
    seen.lock().unwrap().requests.push((auth, body.clone()));
    assert_eq!(body["stream"], true);
    let done = (0, Some("data: [DONE]\n\n".to_string()));
    let items = match body["model"].as_str().unwrap() {
        "ok" => [tokens(&["Hel", "lo", " wörld"], 5), vec![done]].concat(),
        "slow" => [
            tokens(&["one ", "two ", "three ", "four ", "five ", "six ", "seven ", "eight ", "nine ", "ten"], 150),
            vec![done],
        ]
        .concat(),
        "slow-first" => [vec![(3_000, chunk("late"))], vec![done]].concat(),
        "mid-error" => [
            tokens(&["partial ", "answer"], 5),
            vec![(0, Some("data: {\"error\":{\"message\":\"model overloaded\"}}\n\n".into()))],
        ]
        .concat(),
        "cut" => [tokens(&["cut ", "off"], 5), vec![(20, None)]].concat(),
        "malformed" => vec![(0, Some("data: {not json\n\n".into()))],
        "flood" => {
            let words: Vec<String> = (0..3000).map(|i| format!("{:<2000}", i)).collect();
            [tokens(&words.iter().map(String::as_str).collect::<Vec<_>>(), 0), vec![done]].concat()
        }
        "error-500" => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": {"message": "the engine is on fire"}})),
            )
                .into_response()
        }
        "error-401" => {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": {"message": "Incorrect API key provided"}})))
                .into_response()
        }
        other => panic!("unknown test model {other}"),
    };
    Response::builder().header("content-type", "text/event-stream").body(sse(items)).unwrap()
}

/// The fake servers listen on loopback: the operator lets every user's bots reach it
/// (bots::egress), as one who runs a local model for users would.
pub(crate) fn allow_loopback(c: &mut natter_server::Config) {
    c.bot_egress_allow = vec!["127.0.0.1/32".parse().unwrap()];
}

pub(crate) async fn spawn_provider() -> (String, Shared) {
    let seen = Shared::default();
    let app = Router::new().route("/v1/chat/completions", post(completions)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), seen)
}

pub(crate) async fn openai_bot(app: &TestApp, owner: &TestUser, base_url: &str, model: &str, extra: Value) -> Uuid {
    let mut engine = json!({"kind": "openai", "base_url": base_url, "model": model, "api_key": "sk-test-secret-key",
        "system_prompt": "You are terse.", "context_messages": 4, "first_token_timeout_ms": 1000, "timeout_ms": 10000});
    for (k, v) in extra.as_object().unwrap() {
        engine[k] = v.clone();
    }
    app.bot(owner, json!({"name": model, "engine": engine})).await.id
}

/// Reads until the bot's final message for `in_reply_to`; returns the deltas seen and it.
pub(crate) async fn reply(ws: &mut WsClient) -> (Vec<String>, Vec<ServerFrame>, WireMessage) {
    let mut deltas = Vec::new();
    let mut errors = Vec::new();
    loop {
        match ws.frame().await {
            ServerFrame::MessageDelta { delta, .. } => deltas.push(delta),
            e @ ServerFrame::Error { .. } => errors.push(e),
            ServerFrame::Message { message } => return (deltas, errors, message),
            ServerFrame::Ack { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn openai_reply_streams_token_by_token_with_history_and_key() {
    capture_logs();
    let (url, seen) = spawn_provider().await;
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    let bot = openai_bot(&app, &alice, &url, "ok", json!({})).await;
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    ws.say("c1", "first").await;
    let (deltas, errors, m) = reply(&mut ws).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(deltas, vec!["Hel", "lo", " wörld"]);
    assert_eq!(m.content, "Hello wörld");
    assert_eq!(m.status, MessageStatus::Complete);
    ws.say("c2", "second").await;
    let (_, _, m2) = reply(&mut ws).await;
    assert_eq!(m2.seq, 4);

    let requests = seen.lock().unwrap().requests.clone();
    let (auth, body) = &requests[1];
    assert_eq!(auth.as_deref(), Some("Bearer sk-test-secret-key"));
    let roles: Vec<(&str, &str)> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        vec![("system", "You are terse."), ("user", "first"), ("assistant", "Hello wörld"), ("user", "second")],
        "system prompt, history, then the message"
    );

    // The API never shows the key; an update without it keeps it.
    let (_, view) = app.get(&format!("/api/bots/{bot}"), Some(&alice.token)).await;
    assert_eq!(view["engine"]["api_key_set"], true);
    assert!(!view.to_string().contains("sk-test-secret-key"));
    let (status, view) = app
        .patch(
            &format!("/api/bots/{bot}"),
            Some(&alice.token),
            json!({"engine": {"kind": "openai", "base_url": url, "model": "ok"}}),
        )
        .await;
    assert_eq!(status, 200, "{view}");
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    ws.say("c3", "third").await;
    reply(&mut ws).await;
    let last = seen.lock().unwrap().requests.last().unwrap().0.clone();
    assert_eq!(last.as_deref(), Some("Bearer sk-test-secret-key"), "the stored key was kept");
    assert!(!logs().contains("sk-test-secret-key"), "the api key never reaches the log");
}

#[tokio::test]
async fn provider_failures_become_error_frames_and_the_socket_stays_up() {
    let (url, _) = spawn_provider().await;
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    let cases: Vec<(&str, ErrorCode, &str, Option<&str>)> = vec![
        ("error-500", ErrorCode::BotError, "the provider answered 500 Internal Server Error", None),
        (
            "error-401",
            ErrorCode::BotError,
            "the provider answered 401 Unauthorized (check the bot's credentials)",
            None,
        ),
        ("mid-error", ErrorCode::BotError, "reported an error mid-stream", Some("partial answer")),
        ("cut", ErrorCode::BotError, "broke mid-reply", Some("cut off")),
        ("malformed", ErrorCode::BotError, "sent a malformed stream chunk", None),
        ("slow-first", ErrorCode::BotTimeout, "no token within 1000 ms", None),
    ];
    for (model, code, cause, partial) in cases {
        let bot = openai_bot(&app, &alice, &url, model, json!({})).await;
        let mut ws = app.ws(bot, &alice.token, "").await;
        ws.established().await;
        ws.say("c1", "hi").await;
        let ServerFrame::Ack { message: sent, .. } = ws.frame().await else { panic!() };
        let err = loop {
            match ws.frame().await {
                ServerFrame::Error { code, message, in_reply_to, .. } => break (code, message, in_reply_to),
                ServerFrame::MessageDelta { .. } => {}
                other => panic!("{model}: {other:?}"),
            }
        };
        assert_eq!(err.0, code, "{model}: {}", err.1);
        assert!(err.1.contains(cause), "{model}: {:?} should name {cause:?}", err.1);
        assert_eq!(err.2, Some(sent.id));
        match partial {
            Some(text) => {
                let ServerFrame::Message { message } = ws.frame().await else {
                    panic!("{model}: partial reply stored")
                };
                assert_eq!((message.content.as_str(), message.status), (text, MessageStatus::Incomplete), "{model}");
            }
            // No text: the outcome is still stored (empty, incomplete), so the message is not
            // owed a reply any more.
            None => {
                let ServerFrame::Message { message } = ws.frame().await else { panic!("{model}: outcome stored") };
                assert_eq!((message.content.as_str(), message.status), ("", MessageStatus::Incomplete), "{model}");
                assert_eq!(message.in_reply_to, Some(sent.id));
            }
        }
        ws.send_json(json!({"type": "ping", "id": 1})).await;
        assert!(matches!(ws.frame().await, ServerFrame::Pong { .. }), "{model}: still up");
    }
    // Nobody listening at all.
    let closed = { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap() };
    let bot = openai_bot(&app, &alice, &format!("http://{closed}/v1"), "ok", json!({})).await;
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    ws.say("c1", "hi").await;
    ws.frame().await;
    let ServerFrame::Error { code, message, .. } = ws.frame().await else { panic!() };
    assert_eq!(code, ErrorCode::BotError);
    assert!(message.starts_with("cannot reach the provider: "), "{message}");
}

#[tokio::test]
async fn total_timeout_stores_what_came_marked_incomplete() {
    let (url, _) = spawn_provider().await;
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    let bot = openai_bot(&app, &alice, &url, "slow", json!({"timeout_ms": 400})).await;
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    ws.say("c1", "hi").await;
    let (deltas, errors, m) = reply(&mut ws).await;
    let ServerFrame::Error { code, message, .. } = &errors[0] else { panic!() };
    assert_eq!((*code, message.as_str()), (ErrorCode::BotTimeout, "the reply took longer than 400 ms"));
    assert_eq!(m.status, MessageStatus::Incomplete);
    assert_eq!(m.content, deltas.concat());
    assert!(m.content.starts_with("one "));
}

#[tokio::test]
async fn a_reply_survives_a_disconnect_and_a_resume_gets_it_exactly_once() {
    let (url, _) = spawn_provider().await;
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    let bot = openai_bot(&app, &alice, &url, "slow", json!({})).await;
    let full = "one two three four five six seven eight nine ten";

    // Disconnect mid-reply, reconnect while it is still being generated.
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    ws.say("c1", "count").await;
    let ServerFrame::Ack { message: sent, .. } = ws.frame().await else { panic!() };
    assert!(matches!(ws.frame().await, ServerFrame::MessageDelta { .. }));
    drop(ws);
    let conv = app.state.store.conversation(alice.id, bot).await.unwrap().id;
    wait_until("two words of the reply generated", || async {
        app.state.replier.in_progress(conv).iter().any(|r| r.text.starts_with("one two "))
    })
    .await;
    let mut ws = app.ws(bot, &alice.token, &format!("&after_seq={}", sent.seq)).await;
    ws.established().await;
    let (deltas, errors, m) = reply(&mut ws).await;
    assert!(errors.is_empty());
    assert_eq!(m.content, full);
    assert!(deltas.len() >= 2, "the part so far, then the rest live: {deltas:?}");
    assert!(deltas[0].starts_with("one two "), "first comes all generated so far: {deltas:?}");
    assert_eq!(deltas.concat(), full, "so far + live = whole reply, nothing twice");
    assert!(ws.next_within(Duration::from_millis(300)).await.is_none(), "the final message comes once");

    // Disconnect and come back after it finished: the stored reply is replayed.
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    ws.say("c2", "again").await;
    let ServerFrame::Ack { message: sent, .. } = ws.frame().await else { panic!() };
    drop(ws);
    wait_until("the reply stored", || async {
        app.state.store.messages_after(conv, sent.seq, 1).await.unwrap().len() == 1
    })
    .await;
    let mut ws = app.ws(bot, &alice.token, &format!("&after_seq={}", sent.seq)).await;
    ws.established().await;
    let ServerFrame::Message { message } = ws.frame().await else { panic!() };
    assert_eq!((message.content.as_str(), message.in_reply_to), (full, Some(sent.id)));
}

#[tokio::test]
async fn cancel_stops_the_reply_and_stores_it_cancelled() {
    let (url, _) = spawn_provider().await;
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    let bot = openai_bot(&app, &alice, &url, "slow", json!({})).await;
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    ws.say("c1", "count").await;
    ws.frame().await;
    let ServerFrame::MessageDelta { message_id, .. } = ws.frame().await else { panic!() };
    ws.send_json(json!({"type": "cancel", "message_id": message_id})).await;
    let (deltas, errors, m) = reply(&mut ws).await;
    assert!(errors.is_empty());
    assert_eq!(m.id, message_id);
    assert_eq!(m.status, MessageStatus::Cancelled);
    assert!(m.content.starts_with("one ") && m.content.len() < 30, "{}", m.content);
    assert_eq!(format!("one {}", deltas.concat()), m.content);
    // Cancelling again: nothing in progress.
    ws.send_json(json!({"type": "cancel", "message_id": message_id})).await;
    let ServerFrame::Error { code, .. } = ws.frame().await else { panic!() };
    assert_eq!(code, ErrorCode::UnknownMessage);
}

#[tokio::test]
async fn a_slow_reader_gets_coalesced_deltas_instead_of_a_close() {
    let (url, _) = spawn_provider().await;
    let app = TestApp::spawn_with(|c| {
        allow_loopback(c);
        c.limits.outbound_queue = 4;
        // The whole 6 MB reply, past the default bound on replies (bots_limits.rs tests the cut).
        c.limits.max_reply_chars = 10_000_000;
    })
    .await;
    let alice = app.user("alice").await;
    let bot = openai_bot(&app, &alice, &url, "flood", json!({})).await;
    let mut ws =
        WsClient::connect_small_buffer(&app.ws_url(&bot.to_string(), &format!("token={}", alice.token)), app.addr)
            .await;
    ws.established().await;
    ws.say("c1", "flood me").await;
    // Read nothing until all 6 MB of the reply are produced and stored.
    let conv = app.state.store.conversation(alice.id, bot).await.unwrap().id;
    for _ in 0..300 {
        if app.state.store.messages_after(conv, 1, 1).await.unwrap().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (deltas, errors, m) = reply(&mut ws).await;
    assert!(errors.is_empty());
    assert_eq!(m.content.len(), 3000 * 2000);
    assert!(m.content.starts_with(&deltas.concat()), "the deltas are an in-order prefix of the reply");
    assert!(deltas.len() < 3000, "deltas were coalesced: {} frames for 3000 tokens", deltas.len());
    ws.send_json(json!({"type": "ping", "id": 1})).await;
    assert!(matches!(ws.frame().await, ServerFrame::Pong { .. }), "still connected");
}

#[tokio::test]
async fn a_busy_bot_queues_then_refuses() {
    let (url, _) = spawn_provider().await;
    let app = TestApp::spawn_with(|c| {
        allow_loopback(c);
        c.limits.bot_concurrency = 1;
        c.limits.bot_queue = 1;
    })
    .await;
    let alice = app.user("alice").await;
    let bot = openai_bot(&app, &alice, &url, "slow", json!({})).await;
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    for i in 0..3 {
        ws.say(&format!("c{i}"), "count").await;
    }
    let mut acks = Vec::new();
    let mut busy = Vec::new();
    let mut finals = Vec::new();
    while finals.len() < 3 {
        match ws.frame().await {
            ServerFrame::Ack { message, .. } => acks.push(message.id),
            ServerFrame::Error { code, in_reply_to, .. } => busy.push((code, in_reply_to)),
            ServerFrame::Message { message } => finals.push((message.in_reply_to.unwrap(), message.status)),
            ServerFrame::MessageDelta { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(busy, vec![(ErrorCode::BotBusy, Some(acks[2]))], "one runs, one waits, the third is refused");
    // The refused one's outcome is stored too (empty, incomplete): every message ends once.
    finals.sort_by_key(|(id, _)| acks.iter().position(|a| a == id));
    let done = MessageStatus::Complete;
    assert_eq!(finals, vec![(acks[0], done), (acks[1], done), (acks[2], MessageStatus::Incomplete)]);
}

/// Echo and rules answer in one step inside the socket's own task: the per-bot limits that
/// make a streaming bot busy do not apply, and every message gets its reply, in order.
#[tokio::test]
async fn an_instant_bot_is_never_busy() {
    let app = TestApp::spawn_with(|c| {
        c.limits.bot_concurrency = 1;
        c.limits.bot_queue = 0;
    })
    .await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut tabs = Vec::new();
    for _ in 0..3 {
        let mut ws = app.ws(bot.id, &alice.token, "").await;
        ws.established().await;
        tabs.push(ws);
    }
    // Three sockets on the same conversation send at once, five messages each.
    for (t, ws) in tabs.iter_mut().enumerate() {
        for i in 0..5 {
            ws.say(&format!("t{t}-{i}"), &format!("hello {t} {i}")).await;
        }
    }
    let mut ws = tabs.pop().unwrap();
    let (mut replies, mut seqs) = (Vec::new(), Vec::new());
    while replies.len() < 15 {
        match ws.frame().await {
            ServerFrame::Message { message } => {
                seqs.push(message.seq);
                if message.role == MessageRole::Bot {
                    replies.push(message.content);
                }
            }
            ServerFrame::Ack { message, .. } => seqs.push(message.seq),
            ServerFrame::Error { code, .. } => panic!("an instant bot answered {code:?}"),
            _ => {}
        }
    }
    assert_eq!(seqs, (1..=30).collect::<Vec<i64>>(), "every message and reply once, in seq order");
    for t in 0..3 {
        for i in 0..5 {
            assert!(replies.contains(&format!("hello {t} {i}")), "echo of {t} {i} in {replies:?}");
        }
    }
}

/// An instant reply cut at the bound: the error frame comes before the incomplete reply (the
/// protocol's order), on the sender's socket and on a tab that resumes from the store, and the
/// message has that one outcome.
#[tokio::test]
async fn an_echo_cut_at_the_bound_says_so_before_its_incomplete_reply() {
    let app = TestApp::spawn_with(|c| c.limits.max_reply_chars = 5).await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    ws.say("c1", "hello world").await;
    let (_, errors, m) = reply(&mut ws).await;
    assert_eq!((m.seq, m.content.as_str(), m.status), (2, "hello", MessageStatus::Incomplete));
    match &errors[..] {
        [ServerFrame::Error { code, message, in_reply_to, .. }] => {
            assert_eq!((*code, message.as_str()), (ErrorCode::BotError, "the reply was cut at 5 characters"));
            assert_eq!(*in_reply_to, m.in_reply_to);
        }
        other => panic!("expected one bot_error before the reply, got {other:?}"),
    }
    // Whole replies still go with their message, one outcome each.
    ws.say("c2", "hi").await;
    let (_, errors, m) = reply(&mut ws).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((m.seq, m.content.as_str(), m.status), (4, "hi", MessageStatus::Complete));
    let conv = app.state.store.conversation(alice.id, bot.id).await.unwrap().id;
    let stored = app.state.store.messages_after(conv, 0, 10).await.unwrap();
    let roles: Vec<_> = stored.iter().map(|m| (m.seq, m.role)).collect();
    let (u, b) = (MessageRole::User, MessageRole::Bot);
    assert_eq!(roles, vec![(1, u), (2, b), (3, u), (4, b)]);
}

#[tokio::test]
async fn rules_bot_answers_offline() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let (status, v) = app
        .post(
            "/api/bots",
            Some(&alice.token),
            json!({"name": "FAQ", "engine": {"kind": "rules", "rules": [{"keywords": ["price"], "reply": "10 EUR"}, {"regex": "(?i)^hours?\\b", "reply": "9 to 5"}], "fallback": "Ask me about prices or hours."}}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let bot: Uuid = v["id"].as_str().unwrap().parse().unwrap();
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    for (q, a) in
        [("What's the PRICE?", "10 EUR"), ("Hours please", "9 to 5"), ("hello", "Ask me about prices or hours.")]
    {
        ws.say(q, q).await;
        let (_, _, m) = reply(&mut ws).await;
        assert_eq!(m.content, a);
    }
    let (status, v) = app
        .post(
            "/api/bots",
            Some(&alice.token),
            json!({"name": "Bad", "engine": {"kind": "rules", "rules": [{"regex": "([", "reply": "x"}]}}),
        )
        .await;
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_bot")));
    assert!(v["error"]["message"].as_str().unwrap().starts_with("engine.rules[0].regex"), "{v}");
}

const HOOK_SECRET: &str = "webhook-secret-0123456789";

/// A webhook receiver that checks the signature the way docs/bots.md tells users to.
async fn hook(headers: HeaderMap, body: Bytes) -> Response {
    let ts: i64 = headers["x-natter-timestamp"].to_str().unwrap().parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - ts).abs() < 300, "fresh timestamp");
    let want = natter_server::bots::webhook::signature(HOOK_SECRET, ts, &body);
    if headers["x-natter-signature"].to_str().unwrap() != want {
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    let text = v["message"]["content"].as_str().unwrap().to_owned();
    let history = v["history"].as_array().unwrap().len();
    if text.starts_with("stream") {
        let lines = format!("{{\"delta\":\"you said \"}}\n{{\"delta\":\"{text}\"}}\n{{\"delta\":\" ({history})\"}}\n");
        let body = Body::from_stream(futures_util::stream::iter(
            lines.split_inclusive('\n').map(|l| Ok::<_, Infallible>(l.to_owned())).collect::<Vec<_>>(),
        ));
        return Response::builder().header("content-type", "application/x-ndjson").body(body).unwrap();
    }
    axum::Json(json!({"reply": format!("you said {text} ({history})")})).into_response()
}

#[tokio::test]
async fn webhook_bot_is_signed_and_answers_json_or_ndjson() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().route("/hook", post(hook))).await.unwrap() });
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    let bot = app.bot(&alice, json!({"name": "Hook", "engine": {"kind": "webhook", "url": format!("http://{addr}/hook"), "secret": HOOK_SECRET}})).await;
    assert_eq!(bot.engine["secret_set"], true);
    assert!(!serde_json::to_string(&bot).unwrap().contains(HOOK_SECRET));
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    ws.say("c1", "hello").await;
    let (deltas, errors, m) = reply(&mut ws).await;
    assert!(errors.is_empty() && deltas.is_empty());
    assert_eq!(m.content, "you said hello (0)");
    ws.say("c2", "stream me").await;
    let (deltas, _, m) = reply(&mut ws).await;
    assert_eq!(deltas, vec!["you said ", "stream me", " (2)"]);
    assert_eq!(m.content, "you said stream me (2)");

    // A wrong secret is refused by the receiver, and the user is told.
    app.patch(&format!("/api/bots/{}", bot.id), Some(&alice.token), json!({"engine": {"kind": "webhook", "url": format!("http://{addr}/hook"), "secret": "another-secret-0123456"}})).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    ws.say("c3", "hi").await;
    ws.frame().await;
    let ServerFrame::Error { code, message, .. } = ws.frame().await else { panic!() };
    assert_eq!(code, ErrorCode::BotError);
    assert!(message.contains("401"), "{message}");
}
