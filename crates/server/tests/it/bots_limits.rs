//! Hostile bot settings (issue 14): bounds on every engine field and on replies, rules that
//! cannot stall the server, secrets that never follow a changed URL, and engine settings shown
//! only to those who may edit them.

use std::time::{Duration, Instant};

use natter_proto::{ErrorCode, MessageStatus, ServerFrame};
use natter_server::store::BotChanges;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::bots::{allow_loopback, openai_bot, reply, spawn_provider};
use crate::helpers::*;

fn invalid_bot(status: u16, body: &Value) -> String {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_bot", "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_rule_set_whose_regexes_compile_too_big_is_refused_naming_the_rule_and_the_bound() {
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    // 42 × \w{200} took 2 s per reply and stalled /api/health: each needs ~10 MB compiled.
    let rules: Vec<Value> = (0..42).map(|i| json!({"regex": "\\w{200}", "reply": format!("r{i}")})).collect();
    let started = Instant::now();
    let (status, body) = app
        .post("/api/bots", Some(&alice.token), json!({"name": "Heavy", "engine": {"kind": "rules", "rules": rules}}))
        .await;
    let msg = invalid_bot(status, &body);
    assert!(msg.starts_with("engine.rules[0].regex: compiles to more than"), "{msg}");
    assert!(msg.contains("1048576 bytes"), "names the budget: {msg}");
    assert!(started.elapsed() < Duration::from_secs(2), "refused quickly: {:?}", started.elapsed());
}

#[tokio::test]
async fn engine_fields_are_bounded_on_create_and_update() {
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    let create = |engine: Value| app.post("/api/bots", Some(&alice.token), json!({"name": "B", "engine": engine}));

    let (s, b) = create(json!({"kind": "rules", "rules": [], "fallback": "x".repeat(900_000)})).await;
    assert!(invalid_bot(s, &b).starts_with("engine.fallback: at most 4096 characters"));
    let (s, b) = create(json!({"kind": "openai", "base_url": "https://api.example.com/v1", "model": "m",
        "system_prompt": "p".repeat(900_000)}))
    .await;
    assert!(invalid_bot(s, &b).starts_with("engine.system_prompt: at most 32768 characters"));
    let keywords: Vec<String> = (0..30_000).map(|i| format!("k{i}")).collect();
    let (s, b) = create(json!({"kind": "rules", "rules": [{"keywords": keywords, "reply": "r"}]})).await;
    assert!(invalid_bot(s, &b).starts_with("engine.rules[0].keywords: at most 50 keywords per rule"));
    let rules: Vec<Value> = (0..101).map(|i| json!({"keywords": [format!("k{i}")], "reply": "r"})).collect();
    let (s, b) = create(json!({"kind": "rules", "rules": rules})).await;
    assert!(invalid_bot(s, &b).starts_with("engine.rules: at most 100 rules"));
    let (s, b) = create(json!({"kind": "rules", "rules": [{"regex": "a", "reply": "r".repeat(5000)}]})).await;
    assert!(invalid_bot(s, &b).starts_with("engine.rules[0].reply: at most 4096 characters"));

    // An update is held to the same bounds, and a refused one changes nothing.
    let bot = app.bot(&alice, json!({"name": "FAQ", "engine": {"kind": "rules", "rules": [], "fallback": "ok"}})).await;
    let (s, b) = app
        .patch(
            &format!("/api/bots/{}", bot.id),
            Some(&alice.token),
            json!({"engine": {"kind": "rules", "rules": [], "fallback": "x".repeat(900_000)}}),
        )
        .await;
    assert!(invalid_bot(s, &b).starts_with("engine.fallback: at most 4096 characters"));
    let (_, view) = app.get(&format!("/api/bots/{}", bot.id), Some(&alice.token)).await;
    assert_eq!(view["engine"]["fallback"], "ok");
}

/// Writes engine settings straight into the store, as a bot saved before the bounds existed.
async fn store_engine(app: &TestApp, bot: Uuid, engine: Value) {
    let changes = BotChanges { engine: Some(engine), ..Default::default() };
    app.state.store.update_bot(bot, changes).await.unwrap();
}

#[tokio::test]
async fn a_stored_oversized_rule_set_neither_stalls_health_nor_compiles_per_message() {
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    let bot = app.bot(&alice, json!({"name": "Old", "engine": {"kind": "rules", "rules": [], "fallback": "?"}})).await;
    // Saved before the bounds: 42 × \w{200}, a keyword rule, and a 900 000-character fallback.
    let mut rules: Vec<Value> = (0..42).map(|i| json!({"regex": "\\w{200}", "reply": format!("r{i}")})).collect();
    rules.push(json!({"keywords": ["price"], "reply": "10 EUR"}));
    store_engine(&app, bot.id, json!({"kind": "rules", "rules": rules, "fallback": "f".repeat(900_000)})).await;

    // This test runs the server and the client on one thread (current_thread runtime): any
    // compiling or matching on the async workers delays /api/health by as much.
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    for i in 0..5 {
        ws.say(&format!("c{i}"), &format!("what is the price of {}", "a".repeat(300))).await;
        let started = Instant::now();
        let (status, _) = app.get("/api/health", None).await;
        assert_eq!(status, 200);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "/api/health took {took:?} while a rules bot answered");
        let (_, errors, m) = reply(&mut ws).await;
        assert!(errors.is_empty(), "{errors:?}");
        // The regexes that don't fit the limits are left out; the keyword rule still answers.
        assert_eq!(m.content, "10 EUR");
    }

    // The stored 900 000-character fallback is cut at the bound on replies, marked incomplete.
    ws.say("long", "nothing matches").await;
    let (_, errors, m) = reply(&mut ws).await;
    assert_eq!(m.content.chars().count(), 65_536);
    assert_eq!(m.status, MessageStatus::Incomplete);
    match &errors[..] {
        [ServerFrame::Error { code, message, .. }] => {
            assert_eq!(*code, ErrorCode::BotError);
            assert_eq!(message, "the reply was cut at 65536 characters");
        }
        other => panic!("expected one bot_error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_streamed_reply_is_cut_at_the_bound_and_stored_incomplete() {
    let (url, _) = spawn_provider().await;
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    // 3000 tokens of 2000 characters: 6 000 000 characters unless cut.
    let bot = openai_bot(&app, &alice, &url, "flood", json!({})).await;
    let mut ws = app.ws(bot, &alice.token, "").await;
    ws.established().await;
    ws.say("c1", "flood me").await;
    let (deltas, errors, m) = reply(&mut ws).await;
    assert_eq!(m.content.chars().count(), 65_536, "cut at the default --max-reply-chars");
    assert_eq!(m.status, MessageStatus::Incomplete);
    assert_eq!(deltas.concat(), m.content, "the deltas stop at the bound too");
    assert!(
        matches!(&errors[..], [ServerFrame::Error { code: ErrorCode::BotError, message, .. }] if message.contains("cut at 65536")),
        "{errors:?}"
    );
    let conv = app.state.store.conversation(alice.id, bot).await.unwrap().id;
    let stored = app.state.store.messages_after(conv, 0, 10).await.unwrap();
    assert_eq!(stored.last().unwrap().content.chars().count(), 65_536, "stored as cut");
}

async fn add_member(app: &TestApp, owner: &TestUser, bot: Uuid, username: &str, role: &str) {
    let (status, body) = app
        .post(&format!("/api/bots/{bot}/members"), Some(&owner.token), json!({"username": username, "role": role}))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_admin_member_who_changes_the_url_does_not_get_the_owners_secret() {
    // The owner's provider, and the one the admin member controls.
    let (owner_url, _) = spawn_provider().await;
    let (mallory_url, mallory_seen) = spawn_provider().await;
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    let mallory = app.user("mallory").await;
    let bot = openai_bot(&app, &alice, &owner_url, "ok", json!({})).await;
    add_member(&app, &alice, bot, "mallory", "admin").await;

    let (status, view) = app
        .patch(
            &format!("/api/bots/{bot}"),
            Some(&mallory.token),
            json!({"engine": {"kind": "openai", "base_url": mallory_url, "model": "ok"}}),
        )
        .await;
    assert_eq!(status, 200, "{view}");
    assert!(view["engine"].get("api_key_set").is_none(), "the key was dropped: {view}");
    let stored = app.state.store.bot(bot).await.unwrap().unwrap();
    assert!(stored.engine.get("api_key").is_none(), "no key is stored: {}", stored.engine);

    let mut ws = app.ws(bot, &mallory.token, "").await;
    ws.established().await;
    ws.say("c1", "hello").await;
    reply(&mut ws).await;
    let requests = mallory_seen.lock().unwrap().requests.clone();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].0, None, "no Authorization header reached the new URL");

    // A webhook's secret is dropped the same way: its URL changed without a secret is refused
    // (a webhook needs one), and the owner's secret is never sent to the new URL.
    let hook = app
        .bot(
            &alice,
            json!({"name": "Hook", "engine": {"kind": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "owner-secret-0123456789"}}),
        )
        .await;
    add_member(&app, &alice, hook.id, "mallory", "admin").await;
    let (s, b) = app
        .patch(
            &format!("/api/bots/{}", hook.id),
            Some(&mallory.token),
            json!({"engine": {"kind": "webhook", "url": "http://127.0.0.1:10/steal"}}),
        )
        .await;
    assert!(invalid_bot(s, &b).starts_with("engine.secret"));
    // The same URL keeps the secret (an edit of other settings).
    let (s, b) = app
        .patch(
            &format!("/api/bots/{}", hook.id),
            Some(&mallory.token),
            json!({"engine": {"kind": "webhook", "url": "http://127.0.0.1:9/hook", "timeout_ms": 5000}}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["engine"]["secret_set"], true);
}

#[tokio::test]
async fn engine_settings_are_shown_to_the_owner_and_admins_only() {
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    let (bob, carol, dave) = (app.user("bob").await, app.user("carol").await, app.user("dave").await);
    let url = "http://127.0.0.1:9/hook?token=sekrit-url-token";
    let bot = app
        .bot(
            &alice,
            json!({"name": "Hook", "visibility": "public",
                "engine": {"kind": "webhook", "url": url, "secret": "owner-secret-0123456789"}}),
        )
        .await;
    add_member(&app, &alice, bot.id, "bob", "admin").await;
    add_member(&app, &alice, bot.id, "carol", "chat").await;
    let path = format!("/api/bots/{}", bot.id);
    // The owner and admins see the settings (secrets still write-only).
    for who in [&alice, &bob] {
        let (s, v) = app.get(&path, Some(&who.token)).await;
        assert_eq!(s, 200);
        assert_eq!(v["engine"]["url"], url, "{} sees the settings", who.username);
        assert_eq!(v["engine"]["secret_set"], true);
    }
    // A chat member and a stranger on a public bot see the kind, nothing else: in the bot and
    // in the list.
    for who in [&carol, &dave] {
        let (s, v) = app.get(&path, Some(&who.token)).await;
        assert_eq!(s, 200);
        assert_eq!(v["engine"], json!({"kind": "webhook"}), "{} sees only the kind", who.username);
        let (_, list) = app.get("/api/bots", Some(&who.token)).await;
        assert!(!list.to_string().contains("sekrit-url-token"), "{list}");
        let mine = list.as_array().unwrap().iter().find(|b| b["id"] == json!(bot.id)).unwrap();
        assert_eq!(mine["engine"], json!({"kind": "webhook"}));
    }
}

#[tokio::test]
async fn a_webhook_cannot_make_natter_hold_an_unbounded_answer() {
    use axum::routing::post;
    // 2 MiB in one JSON answer, and 2 MiB of NDJSON with no newline.
    let big = "x".repeat(2 * 1024 * 1024);
    let json_answer = json!({"reply": big}).to_string();
    let ndjson_answer = format!("{{\"delta\":\"{big}");
    let router = axum::Router::new()
        .route("/json", post(move || async move { ([("content-type", "application/json")], json_answer) }))
        .route("/ndjson", post(move || async move { ([("content-type", "application/x-ndjson")], ndjson_answer) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let app = TestApp::spawn_with(allow_loopback).await;
    let alice = app.user("alice").await;
    for (path, want) in [
        ("json", "the webhook's JSON answer is longer than 1048576 bytes"),
        ("ndjson", "the webhook sent a line longer than 1048576 bytes"),
    ] {
        let engine = json!({"kind": "webhook", "url": format!("http://{addr}/{path}"), "secret": "0123456789abcdef"});
        let bot = app.bot(&alice, json!({"name": path, "engine": engine})).await;
        let mut ws = app.ws(bot.id, &alice.token, "").await;
        ws.established().await;
        ws.say("c1", "hi").await;
        loop {
            match ws.frame().await {
                ServerFrame::Ack { .. } => {}
                ServerFrame::Error { code, message, .. } => {
                    assert_eq!(code, ErrorCode::BotError);
                    assert!(message.starts_with(want), "{path}: {message}");
                    break;
                }
                other => panic!("{path}: unexpected {other:?}"),
            }
        }
    }
}
