//! The egress policy of bot engines (server-side request forgery): which URLs a bot may be
//! saved with, who may reach internal addresses, what happens at request time (the owner's
//! current role, names resolved through the policy, no redirects), and what the chat is told
//! when the remote fails. Every server here is on loopback; forbidden addresses are refused
//! before any packet is sent.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use natter_proto::{ErrorCode, ServerFrame};
use natter_server::Config;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

const SECRET: &str = "webhook-secret-0123456789";

fn openai(url: &str) -> Value {
    json!({"kind": "openai", "base_url": url, "model": "m", "first_token_timeout_ms": 2000, "timeout_ms": 5000})
}

fn webhook(url: &str) -> Value {
    json!({"kind": "webhook", "url": url, "secret": SECRET, "timeout_ms": 5000})
}

fn allow(entries: &'static [&'static str]) -> impl FnOnce(&mut Config) {
    move |c| c.bot_egress_allow = entries.iter().map(|e| e.parse().unwrap()).collect()
}

/// Every spelling of the cloud metadata endpoint, and other link-local / metadata addresses.
const METADATA: &[&str] = &[
    "http://169.254.169.254/latest/meta-data/",
    "http://2852039166/",
    "http://0xA9FEA9FE/",
    "http://0251.0376.0251.0376/",
    "http://169.254.43518/",
    "http://[::ffff:169.254.169.254]/",
    "http://[fe80::1]/",
    "http://169.254.170.2/v2/credentials",
    "http://[fd00:ec2::254]/",
    "http://metadata.google.internal/computeMetadata/v1/",
];

/// Loopback and private networks.
const INTERNAL: &[&str] = &[
    "http://127.0.0.1:11434/v1",
    "http://2130706433/",
    "http://[::1]:8080/",
    "http://localhost:11434/v1",
    "http://10.0.0.5/",
    "http://172.16.0.1/",
    "http://192.168.1.10/",
    "http://100.64.0.1/",
    "http://[fd12:3456::1]/",
];

/// Never a server, whoever asks.
const NEVER: &[&str] = &["http://0.0.0.0:80/", "http://[::]/", "http://224.0.0.1/", "http://255.255.255.255/"];

/// Creates a bot with this engine; the status and the body.
async fn create(app: &TestApp, user: &TestUser, engine: Value) -> (u16, Value) {
    app.post("/api/bots", Some(&user.token), json!({"name": "B", "engine": engine})).await
}

/// `(engine, field)` for each kind with a URL.
fn both(url: &str) -> [(Value, &'static str); 2] {
    [(openai(url), "engine.base_url"), (webhook(url), "engine.url")]
}

fn assert_refused(status: u16, body: &Value, field: &str, rule: &str, what: &str) {
    assert_eq!(status, 400, "{what}: {body}");
    assert_eq!(body["error"]["code"], "invalid_bot", "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with(&format!("{field}: ")), "{what}: {message}");
    assert!(message.contains(rule), "{what}: {message} should say {rule:?}");
}

const METADATA_RULE: &str =
    "is a link-local/cloud metadata address; natter never connects there unless the operator lists it in --bot-egress-allow";
const INTERNAL_RULE: &str =
    "only bots of site admins may connect there, unless the operator lists it in --bot-egress-allow";
const NEVER_RULE: &str = "natter never connects there";

#[tokio::test]
async fn a_user_cannot_save_a_bot_aimed_at_metadata_or_internal_addresses() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let echo = app.echo_bot(&alice).await;
    for (urls, rule) in [(METADATA, METADATA_RULE), (INTERNAL, INTERNAL_RULE), (NEVER, NEVER_RULE)] {
        for url in urls {
            for (engine, field) in both(url) {
                let (status, body) = create(&app, &alice, engine.clone()).await;
                assert_refused(status, &body, field, rule, &format!("create {url}"));
                let (status, body) =
                    app.patch(&format!("/api/bots/{}", echo.id), Some(&alice.token), json!({"engine": engine})).await;
                assert_refused(status, &body, field, rule, &format!("update {url}"));
            }
        }
    }
    let (status, body) = create(&app, &alice, openai("http://2852039166/")).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        format!("engine.base_url: 169.254.169.254 {METADATA_RULE}"),
        "the message names the address as the client would connect to it"
    );
    let (_, bot) = app.get(&format!("/api/bots/{}", echo.id), Some(&alice.token)).await;
    assert_eq!(bot["engine"]["kind"], "echo", "no refused update was applied");
    // Public addresses and names are fine (names are checked again when resolved).
    for url in ["https://api.openai.com/v1", "http://93.184.215.14/hook", "http://[2606:4700::1111]/"] {
        for (engine, _) in both(url) {
            let (status, body) = create(&app, &alice, engine).await;
            assert_eq!(status, 201, "{url}: {body}");
        }
    }
}

#[tokio::test]
async fn site_admins_reach_internal_addresses_and_nobody_reaches_metadata_unless_listed() {
    let app = TestApp::spawn().await;
    let root = app.user("root").await;
    app.state.store.set_admin("root", true).await.unwrap();
    for url in INTERNAL {
        for (engine, _) in both(url) {
            let (status, body) = create(&app, &root, engine).await;
            assert_eq!(status, 201, "an admin's bot may reach {url}: {body}");
        }
    }
    for (urls, rule) in [(METADATA, METADATA_RULE), (NEVER, NEVER_RULE)] {
        for url in urls {
            for (engine, field) in both(url) {
                let (status, body) = create(&app, &root, engine).await;
                assert_refused(status, &body, field, rule, &format!("admin {url}"));
            }
        }
    }

    // The operator's allow-list opens exactly what it lists, to everyone.
    let app = TestApp::spawn_with(allow(&["127.0.0.1/32", "localhost", "10.0.0.0/8", "169.254.169.254"])).await;
    let alice = app.user("alice").await;
    for url in [
        "http://127.0.0.1:11434/v1",
        "http://2130706433/",
        "http://localhost:11434/v1",
        "http://10.0.0.5/",
        "http://0xA9FEA9FE/",
        "http://[::ffff:169.254.169.254]/",
    ] {
        for (engine, _) in both(url) {
            let (status, body) = create(&app, &alice, engine).await;
            assert_eq!(status, 201, "listed: {url}: {body}");
        }
    }
    for (url, rule) in [
        ("http://192.168.1.10/", INTERNAL_RULE),
        ("http://127.0.0.2/", INTERNAL_RULE),
        ("http://169.254.170.2/", METADATA_RULE),
        ("http://0.0.0.0/", NEVER_RULE),
    ] {
        for (engine, field) in both(url) {
            let (status, body) = create(&app, &alice, engine).await;
            assert_refused(status, &body, field, rule, &format!("not listed: {url}"));
        }
    }
}

/// A fake OpenAI-compatible provider that answers "hi" and counts its requests.
async fn provider() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                let body = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
                ([("content-type", "text/event-stream")], body).into_response()
            }
        }),
    );
    (serve(app).await, hits)
}

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Says something to the bot and returns what came back: the reply's text, or the error.
async fn ask(app: &TestApp, bot: Uuid, user: &TestUser) -> Result<String, (ErrorCode, String)> {
    let mut ws = app.ws(bot, &user.token, "").await;
    ws.established().await;
    ws.say(&Uuid::new_v4().to_string(), "hello").await; // a new message each time, not a retry
    let ServerFrame::Ack { .. } = ws.frame().await else { panic!("expected the ack") };
    loop {
        let Some(Next::Frame(f)) = ws.next_within(std::time::Duration::from_secs(5)).await else {
            panic!("no answer; log:\n{}", logs())
        };
        match f {
            ServerFrame::Error { code, message, .. } => return Err((code, message)),
            ServerFrame::Message { message } => return Ok(message.content),
            ServerFrame::MessageDelta { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn at_request_time_the_owners_current_role_decides_and_names_are_checked_once_resolved() {
    capture_logs();
    let (addr, hits) = provider().await;
    let app = TestApp::spawn().await;
    let root = app.user("root").await;
    app.state.store.set_admin("root", true).await.unwrap();
    let port = addr.port();
    // A literal address (checked before sending) and a name (checked by the resolver).
    let by_ip = app.bot(&root, json!({"name": "ip", "engine": openai(&format!("http://127.0.0.1:{port}/v1"))})).await;
    let by_name = app.bot(&root, json!({"name": "n", "engine": openai(&format!("http://localhost:{port}/v1"))})).await;
    for bot in [by_ip.id, by_name.id] {
        assert_eq!(ask(&app, bot, &root).await, Ok("hi".to_string()), "an admin's bot reaches loopback");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // Demoted: the same bots now get the policy of everyone else, at their next reply.
    app.state.store.set_admin("root", false).await.unwrap();
    for bot in [by_ip.id, by_name.id] {
        let (code, message) = ask(&app, bot, &root).await.unwrap_err();
        assert_eq!(code, ErrorCode::BotError);
        assert_eq!(message, "cannot reach the provider: its address is refused by this server's egress policy");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2, "the provider was never reached");
    let logs = logs();
    assert!(logs.contains("127.0.0.1 is a loopback address; only bots of site admins"), "the reason is logged");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let (target, hits) = provider().await;
    let redirect = Router::new().route(
        "/v1/chat/completions",
        post(move || async move {
            (StatusCode::TEMPORARY_REDIRECT, [("location", format!("http://{target}/v1/chat/completions"))])
                .into_response()
        }),
    );
    let hook = Router::new().route(
        "/hook",
        post(
            move || async move { (StatusCode::FOUND, [("location", format!("http://{target}/hook"))]).into_response() },
        ),
    );
    let (redirect, hook) = (serve(redirect).await, serve(hook).await);
    let app = TestApp::spawn_with(allow(&["127.0.0.1/32"])).await;
    let alice = app.user("alice").await;
    let llm = app.bot(&alice, json!({"name": "r", "engine": openai(&format!("http://{redirect}/v1"))})).await;
    let (code, message) = ask(&app, llm.id, &alice).await.unwrap_err();
    assert_eq!(
        (code, message.as_str()),
        (ErrorCode::BotError, "the provider answered 307 Temporary Redirect (redirects are not followed)")
    );
    let wh = app.bot(&alice, json!({"name": "w", "engine": webhook(&format!("http://{hook}/hook"))})).await;
    let (_, message) = ask(&app, wh.id, &alice).await.unwrap_err();
    assert_eq!(message, "the webhook answered 302 Found (redirects are not followed)");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect's target was never asked");
}

const MARKER: &str = "SECRET-INTERNAL-MARKER-7f3a";

#[tokio::test]
async fn the_remotes_error_text_reaches_the_log_not_the_chat() {
    capture_logs();
    // Long, with a terminal escape and a newline that would forge a log line if logged raw;
    // the marker comes first, where quoting the body's start would show it.
    let long = format!("{MARKER} \u{1b}[31m\nforged line {}", "y".repeat(5000));
    let body = long.clone();
    let failing = Router::new()
        .route(
            "/v1/chat/completions",
            post(move || {
                let body = body.clone();
                async move { (StatusCode::INTERNAL_SERVER_ERROR, body).into_response() }
            }),
        )
        .route(
            "/hook",
            post(move || {
                let body = long.clone();
                async move { (StatusCode::BAD_GATEWAY, body).into_response() }
            }),
        )
        .route(
            "/mid/chat/completions",
            post(|| async {
                let body = format!(
                    "data: {{\"choices\":[{{\"delta\":{{\"content\":\"part\"}}}}]}}\n\ndata: {{\"error\":{{\"message\":\"{MARKER}\"}}}}\n\n"
                );
                ([("content-type", "text/event-stream")], body).into_response()
            }),
        )
        .route(
            "/bad/chat/completions",
            post(|| async { ([("content-type", "text/event-stream")], format!("data: {{{MARKER}\n\n")).into_response() }),
        );
    let addr = serve(failing).await;
    let app = TestApp::spawn_with(allow(&["127.0.0.1/32"])).await;
    let alice = app.user("alice").await;
    let cases = [
        (openai(&format!("http://{addr}/v1")), "the provider answered 500 Internal Server Error"),
        (webhook(&format!("http://{addr}/hook")), "the webhook answered 502 Bad Gateway"),
        (openai(&format!("http://{addr}/mid")), "the provider reported an error mid-stream"),
        (openai(&format!("http://{addr}/bad")), "the provider sent a malformed stream chunk"),
    ];
    for (engine, want) in cases {
        let bot = app.bot(&alice, json!({"name": "f", "engine": engine})).await;
        let (code, message) = ask(&app, bot.id, &alice).await.unwrap_err();
        assert_eq!((code, message.as_str()), (ErrorCode::BotError, want));
        assert!(!message.contains(MARKER) && message.chars().count() <= 200, "{message}");
    }
    let logs = logs();
    assert!(logs.matches(MARKER).count() >= 4, "the remote's words are in the log");
    assert!(!logs.contains("\u{1b}[31m") && !logs.contains("\nforged line"), "escaped in the log");
    assert!(logs.contains("(cut, "), "a long body is cut in the log");
}
