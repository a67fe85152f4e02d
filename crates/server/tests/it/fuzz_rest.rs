//! Property test of every REST body (issue 14): arbitrary JSON — of the right shape with wrong
//! values, hostile strings (NUL, escapes, invisible and reordering characters, long ones), or
//! not JSON at all — sent to each endpoint that takes a body, on a real server, on SQLite and
//! on PostgreSQL. No answer is a 5xx, every refusal is `{"error": {"code", "message"}}` with a
//! registered code. Bounded: PROPTEST_CASES cases per endpoint (default 40), a few seconds.

use natter_proto::ErrorCode;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};

use crate::helpers::*;

/// Strings a hostile client would try, and any others.
fn text() -> impl Strategy<Value = String> {
    let nasty = prop_oneof![
        Just('\0'),
        Just('\x1b'),
        Just('\n'),
        Just('\r'),
        Just('\x07'),
        Just('\u{85}'),
        Just('\u{200B}'),
        Just('\u{202E}'),
        Just('\u{FEFF}'),
        Just('é'),
        Just('a'),
        Just(' '),
        any::<char>(),
    ];
    prop_oneof![
        any::<String>(),
        "[a-z0-9_.-]{0,40}",
        prop::collection::vec(nasty, 0..24).prop_map(|v| v.into_iter().collect()),
        (1usize..5000).prop_map(|n| "x".repeat(n)),
    ]
}

/// Any JSON value a few levels deep, keys from the API's own field names or anything.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
        Just(json!("00000000-0000-0000-0000-000000000000")),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "username",
    "password",
    "refresh_token",
    "name",
    "description",
    "visibility",
    "engine",
    "role",
    "bot_id",
    "kind",
    "rules",
    "keywords",
    "regex",
    "reply",
    "fallback",
    "base_url",
    "model",
    "api_key",
    "system_prompt",
    "temperature",
    "max_tokens",
    "context_messages",
    "first_token_timeout_ms",
    "timeout_ms",
    "url",
    "secret",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![3 => prop::sample::select(FIELDS).prop_map(str::to_owned), 1 => text()]
}

/// Values as the API means them, often enough that requests get past the first check.
fn field_value(name: &'static str) -> BoxedStrategy<Value> {
    let meant: BoxedStrategy<Value> = match name {
        "visibility" => prop::sample::select(vec!["private", "public"]).prop_map(Value::from).boxed(),
        "role" => prop::sample::select(vec!["chat", "admin", "owner"]).prop_map(Value::from).boxed(),
        "password" => "[a-z]{8,20}".prop_map(Value::from).boxed(),
        "engine" => engine().boxed(),
        _ => text().prop_map(Value::from).boxed(),
    };
    prop_oneof![2 => meant, 1 => value()].boxed()
}

fn engine() -> impl Strategy<Value = Value> {
    let kind =
        prop_oneof![prop::sample::select(vec!["echo", "rules", "openai", "webhook"]).prop_map(Value::from), value()];
    let rule = prop_oneof![
        (prop::collection::vec(text(), 0..3), text()).prop_map(|(k, r)| json!({"keywords": k, "reply": r})),
        (text(), text()).prop_map(|(re, r)| json!({"regex": re, "reply": r})),
        value(),
    ];
    (kind, prop::collection::vec(rule, 0..3), prop::collection::vec((key(), value()), 0..3)).prop_map(
        |(kind, rules, extra)| {
            let mut m = Map::new();
            m.insert("kind".into(), kind);
            m.insert("rules".into(), Value::Array(rules));
            // Engine URLs stay on loopback: saving a bot may resolve its host.
            m.insert("base_url".into(), json!("http://127.0.0.1:9/v1"));
            m.insert("url".into(), json!("http://127.0.0.1:9/hook"));
            for (k, v) in extra {
                if k != "base_url" && k != "url" {
                    m.insert(k, v);
                }
            }
            Value::Object(m)
        },
    )
}

/// A body for an endpoint with these fields: each present or not, sometimes an extra key,
/// sometimes not an object at all.
fn body(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let members: Vec<_> = fields.iter().map(|f| prop::option::weighted(0.8, field_value(f))).collect();
    let object = (members, prop::option::weighted(0.2, (key(), value()))).prop_map(move |(vals, extra)| {
        let mut m = Map::new();
        for (f, v) in fields.iter().zip(vals) {
            if let Some(v) = v {
                m.insert((*f).to_owned(), v);
            }
        }
        if let Some((k, v)) = extra {
            m.insert(k, v);
        }
        Value::Object(m)
    });
    prop_oneof![6 => object, 1 => value()]
}

/// What a request may answer: anything but a 5xx; a refusal in the one error shape.
fn check(method: &str, path: &str, sent: &str, status: u16, text: &str) -> Result<(), TestCaseError> {
    prop_assert!(status < 500, "{method} {path} answered {status} {text} to {sent}");
    if status >= 400 {
        let v: Value = serde_json::from_str(text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        let code = v["error"]["code"].as_str().unwrap_or_default();
        prop_assert!(ErrorCode::parse(code).is_some(), "{method} {path}: unregistered code in {text}");
        prop_assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
    }
    Ok(())
}

async fn fuzz_every_body(app: &TestApp) {
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    app.user("bob").await;
    let endpoints: Vec<(&str, String, &'static [&'static str])> = vec![
        ("POST", "/api/auth/register".into(), &["username", "password"]),
        ("POST", "/api/auth/login".into(), &["username", "password"]),
        ("POST", "/api/auth/refresh".into(), &["refresh_token"]),
        ("POST", "/api/auth/logout".into(), &["refresh_token"]),
        ("POST", "/api/bots".into(), &["name", "description", "visibility", "engine"]),
        ("PATCH", format!("/api/bots/{}", bot.id), &["name", "description", "visibility", "engine"]),
        ("POST", format!("/api/bots/{}/members", bot.id), &["username", "role"]),
        ("POST", "/api/ws/ticket".into(), &["bot_id"]),
    ];
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(40);
    let handle = tokio::runtime::Handle::current();
    for (method, path, fields) in endpoints {
        let mut runner = TestRunner::new(RunnerConfig { cases, failure_persistence: None, ..RunnerConfig::default() });
        // Now and then, not JSON at all.
        let strategy = prop_oneof![8 => body(fields).prop_map(|v| v.to_string()), 1 => any::<String>()];
        let result = runner.run(&strategy, |sent| {
            tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let req = match method {
                        "PATCH" => app.http.patch(app.url(&path)),
                        _ => app.http.post(app.url(&path)),
                    };
                    let res = req
                        .bearer_auth(&alice.token)
                        .header("content-type", "application/json")
                        .body(sent.clone())
                        .send()
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let status = res.status().as_u16();
                    let text = res.text().await.unwrap_or_default();
                    check(method, &path, &sent, status, &text)
                })
            })
        });
        if let Err(e) = result {
            panic!("{method} {path}: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rest_body_is_answered_without_a_5xx_on_sqlite() {
    let app = TestApp::spawn().await;
    fuzz_every_body(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rest_body_is_answered_without_a_5xx_on_postgres() {
    let Some(schema) =
        natter_server::store::postgres::TestSchema::from_env("every_rest_body_is_answered_without_a_5xx_on_postgres")
            .await
    else {
        return;
    };
    let url = schema.url.clone();
    let app = TestApp::spawn_with(|c| c.database = natter_server::config::Database::Postgres(url)).await;
    fuzz_every_body(&app).await;
}
