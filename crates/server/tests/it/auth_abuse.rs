//! Issue 14, authentication abuse: a login flood can't exhaust memory, brute force is
//! throttled without locking the real user out, logout ends the login at once, and a
//! connection attempt id can't be used to hide someone else's lookup.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

fn rss_kib() -> u64 {
    natter_server::metrics::vmrss_kib(&std::fs::read_to_string("/proc/self/status").unwrap()).unwrap()
}

/// A client whose requests come from `127.0.0.<n>`: another client address, as the server sees it.
fn client_from(n: u8) -> reqwest::Client {
    reqwest::Client::builder().local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))).build().unwrap()
}

async fn login_from(
    app: &TestApp,
    http: &reqwest::Client,
    username: &str,
    password: &str,
) -> (u16, Option<u64>, Value) {
    let res = http
        .post(app.url("/api/auth/login"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let retry = res.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    (status, retry, res.json().await.unwrap())
}

/// 32 concurrent logins for unknown users took RSS from 15 to 625 MiB: each argon2 hash holds
/// 19 MiB, up to 512 blocking threads ran them, and the memory stayed. Now at most 2 run at
/// once, each in a buffer its thread keeps, and what doesn't fit in the queue gets 503.
#[tokio::test]
async fn a_login_flood_keeps_memory_bounded_and_overflow_gets_503() {
    // The throttle would answer most of this flood with 429 before any hash: off, to load the pool.
    let app = TestApp::spawn_with(|c| c.login_throttle.free_failures = 0).await;
    assert_eq!(app.state.passwords.workers(), 2, "the default");
    let idle = rss_kib();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(idle));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut statuses = Vec::new();
    for round in 0..2 {
        let logins = (0..64).map(|i| {
            let app = &app;
            async move {
                let res = app
                    .http
                    .post(app.url("/api/auth/login"))
                    .json(&json!({"username": format!("nobody-{round}-{i}"), "password": "wrong-password"}))
                    .send()
                    .await
                    .unwrap();
                let retry = res.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                let status = res.status().as_u16();
                let body: Value = res.json().await.unwrap();
                (status, retry, body["error"]["code"].as_str().unwrap().to_owned())
            }
        });
        statuses.extend(futures_util::future::join_all(logins).await);
    }
    sampler.abort();
    let over_idle_mib = (peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(idle)) / 1024;
    let checked = statuses.iter().filter(|(s, _, code)| *s == 401 && code == "invalid_credentials").count();
    let busy = statuses.iter().filter(|(s, r, code)| *s == 503 && r.as_deref() == Some("2") && code == "auth_busy");
    assert_eq!(checked + busy.count(), statuses.len(), "each is a wrong password or busy: {statuses:?}");
    // Each round, the 32 queued are checked, plus whatever the 2 workers took off the queue
    // while the burst arrived (0 to 2: the queue is a channel the workers pull from).
    assert!(checked >= 2 * 32, "at least the 32 queued of each round were checked: {checked}");
    println!("login flood: 2 x 64 concurrent, {checked} checked, peak RSS {over_idle_mib} MiB over idle");
    // 2 workers x 19 MiB, plus this process's HTTP clients and buffers.
    assert!(over_idle_mib < 64, "peak RSS {over_idle_mib} MiB over idle");
}

/// 150 wrong passwords for one user in 3 s all got 401. Now failures back off exponentially
/// (429 + Retry-After) per username and address, unknown users alike, while the real user from
/// an address with no failures still logs in.
#[tokio::test]
async fn brute_force_is_throttled_without_locking_the_user_out() {
    let app = TestApp::spawn().await;
    app.register("alice").await;
    let attacker = client_from(2);
    let (user, other) = (client_from(3), client_from(4));
    let mut answers = Vec::new();
    for i in 0..8 {
        answers.push(login_from(&app, &attacker, "alice", &format!("guess-{i}-wrong")).await);
    }
    let statuses: Vec<(u16, Option<u64>)> = answers.iter().map(|(s, r, _)| (*s, *r)).collect();
    assert_eq!(&statuses[..5], &[(401, None); 5], "five free failures");
    assert_eq!(statuses[5], (429, Some(1)), "then a wait: {:?}", answers[5]);
    assert_eq!(answers[5].2["error"]["code"], "too_many_attempts");
    assert!(statuses[5..].iter().all(|(s, r)| *s == 429 && r.is_some()));
    // Even the right password waits, from the attacking address.
    assert_eq!(login_from(&app, &attacker, "alice", PASSWORD).await.0, 429);
    // The real user, from another address, is not locked out — every time.
    for _ in 0..3 {
        let (status, _, body) = login_from(&app, &user, "alice", PASSWORD).await;
        assert_eq!(status, 200, "{body}");
    }

    // An unknown username answers exactly the same: 5 × 401, then 429 with the same wait.
    let mut unknown = Vec::new();
    for i in 0..6 {
        let (s, r, body) = login_from(&app, &other, "nobody-here", &format!("guess-{i}-wrong")).await;
        unknown.push((s, r, body["error"]["code"].as_str().unwrap().to_owned()));
    }
    let mut expected = vec![(401, None, "invalid_credentials".to_owned()); 5];
    expected.push((429, Some(1), "too_many_attempts".to_owned()));
    assert_eq!(unknown, expected);

    // After the wait one more guess is allowed, and the next wait doubles.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(login_from(&app, &other, "nobody-here", "guess-again").await.0, 401);
    assert_eq!(login_from(&app, &other, "nobody-here", "guess-again").await.1, Some(2));
}

/// Only failures count: many logins from one address (the bench, the tests) are never throttled.
#[tokio::test]
async fn successful_logins_are_never_throttled() {
    let app = TestApp::spawn_with(|c| c.login_throttle.free_failures = 2).await;
    app.register("bob").await;
    for _ in 0..12 {
        app.login("bob").await;
    }
    // A mistyped password, then the right one: the pair's count is forgotten on success.
    let http = client_from(1);
    assert_eq!(login_from(&app, &http, "bob", "mistyped-pw").await.0, 401);
    assert_eq!(login_from(&app, &http, "bob", PASSWORD).await.0, 200);
    assert_eq!(login_from(&app, &http, "bob", "mistyped-pw").await.0, 401);
    assert_eq!(login_from(&app, &http, "bob", PASSWORD).await.0, 200);
}

/// After logout the access token kept working for up to 15 minutes, and the login's sockets
/// stayed open. Now logout ends the login: its tokens get 401 `token_revoked` and its
/// sockets (by token or by ticket) close 4401 — while the user's other logins carry on.
#[tokio::test]
async fn logout_ends_the_logins_tokens_and_sockets_at_once() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let other = app.login("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut by_token = app.ws(bot.id, &alice.token, "").await;
    by_token.established().await;
    let (_, t) = app.post("/api/ws/ticket", Some(&alice.token), json!({"bot_id": bot.id})).await;
    let mut by_ticket =
        WsClient::connect(&app.ws_url(&bot.id.to_string(), &format!("ticket={}", t["ticket"].as_str().unwrap()))).await;
    by_ticket.established().await;
    let mut other_login = app.ws(bot.id, &other.access_token, "").await;
    other_login.established().await;

    let (status, _) = app.post("/api/auth/logout", None, json!({"refresh_token": alice.refresh})).await;
    assert_eq!(status, 204);
    let (status, v) = app.get("/api/auth/me", Some(&alice.token)).await;
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("token_revoked")), "{v}");
    let logged_out = (4401, "logged out: this login was ended; log in again".to_owned());
    assert_eq!(by_token.close_code().await, logged_out);
    assert_eq!(by_ticket.close_code().await, logged_out);
    assert_eq!(app.ws(bot.id, &alice.token, "").await.close_code().await, logged_out, "no new socket either");
    // The other login is untouched.
    assert_eq!(app.get("/api/auth/me", Some(&other.access_token)).await.0, 200);
    other_login.say("still-here", "hello").await;
    assert!(matches!(other_login.frame().await, natter_proto::ServerFrame::Ack { .. }));

    // A refresh token used twice ends its login the same way (the access token of the
    // rotation, held by whoever refreshed first, included).
    let (_, first) = app.post("/api/auth/refresh", None, json!({"refresh_token": other.refresh_token})).await;
    let rotated = first["access_token"].as_str().unwrap().to_owned();
    assert_eq!(app.get("/api/auth/me", Some(&rotated)).await.0, 200);
    let (status, v) = app.post("/api/auth/refresh", None, json!({"refresh_token": other.refresh_token})).await;
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("refresh_token_reused")));
    for token in [&rotated, &other.access_token] {
        let (status, v) = app.get("/api/auth/me", Some(token)).await;
        assert_eq!((status, v["error"]["code"].as_str()), (401, Some("token_revoked")));
    }
    assert_eq!(other_login.close_code().await, logged_out);
    app.state.hub.check_invariants();
}

/// A restarted node knows the logins ended before it started (from the store).
#[tokio::test]
async fn revoked_logins_survive_a_restart() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    app.post("/api/auth/logout", None, json!({"refresh_token": alice.refresh})).await;
    let app = TestApp::spawn_in(app.stop().await, |_| {}).await;
    let (status, v) = app.get("/api/auth/me", Some(&alice.token)).await;
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("token_revoked")));
}
