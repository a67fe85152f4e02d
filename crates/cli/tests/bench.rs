//! `natter bench` end to end with tiny numbers: the binary spawns its own server, runs a
//! scenario, and its `--json` report must show zero errors (and, for the storm, nothing lost or
//! doubled). A server that answers fast but wrong must fail the run. Several scenarios in one
//! run share one server, and `--users` × `--bots` makes exactly that grid of conversations.
//! `--transport sse` runs connect, idle and chat over the SSE binding.

mod common;

use std::process::Command;

use common::{Node, NO_RATE_LIMITS};
use sqlx::{Connection, Row};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

fn bench(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_natter")).arg("bench").args(args).arg("--json").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("no JSON report ({e}): {stdout}\nstderr: {stderr}"));
    (out.status.code().unwrap_or(-1), report, stderr)
}

#[test]
fn chat_on_a_spawned_server_round_trips_without_errors() {
    let (code, r, err) = bench(&["chat", "--spawn", "-c", "20", "-d", "2", "--warmup", "0.5"]);
    assert_eq!(code, 0, "{r:#}\n{err}");
    assert_eq!(r["scenario"], "chat");
    assert_eq!(r["connected"], 20);
    assert_eq!(r["error_total"], 0, "{r:#}");
    assert!(r["ops"].as_u64().unwrap() > 20, "{r:#}");
    assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(r["ack_latency_ms"]["p50"].as_f64().is_some());
}

#[test]
fn fanout_connect_and_idle_run_clean() {
    let (code, r, err) = bench(&["fanout", "--spawn", "-c", "12", "--tabs", "3", "-d", "1", "--warmup", "0.3"]);
    assert_eq!(code, 0, "{r:#}\n{err}");
    assert_eq!(r["tabs"], 3);
    assert!(r["ops"].as_u64().unwrap() > 0, "{r:#}");

    let (code, r, err) = bench(&["connect", "--spawn", "--concurrency", "4", "-d", "1", "--warmup", "0.2"]);
    assert_eq!(code, 0, "{r:#}\n{err}");
    assert!(r["ops"].as_u64().unwrap() > 0, "{r:#}");

    let (code, r, err) = bench(&["idle", "--spawn", "-c", "30", "-d", "1"]);
    assert_eq!(code, 0, "{r:#}\n{err}");
    assert_eq!(r["connected"], 30, "{r:#}");
    assert!(r["server_rss_after_kib"].as_u64().is_some(), "{r:#}");
    assert!(r["server_kib_per_connection"].as_f64().is_some(), "{r:#}");
}

/// A storm of 50 clients chatting every 100 ms, the server restarted after 1 s.
fn storm(extra: &[&str]) -> (i32, Value, String) {
    let mut args = vec!["storm", "--spawn", "-c", "50", "--storm-after", "1", "--storm-interval-ms", "100"];
    args.extend(["--storm-timeout", "30"]);
    args.extend(extra);
    bench(&args)
}

#[test]
fn storm_brings_every_client_back_with_nothing_lost_or_doubled() {
    let (code, r, err) = storm(&[]);
    assert_eq!(code, 0, "{r:#}\n{err}");
    let s = &r["storm"];
    assert_eq!(s["clients"], 50, "{r:#}");
    assert_eq!(s["not_back"], 0, "{r:#}");
    assert_eq!(s["lost"], 0, "{r:#}");
    assert_eq!(s["doubled"], 0, "{r:#}");
    assert!(s["messages_sent"].as_u64().unwrap() >= 50, "{r:#}");
    assert!(s["all_back_ms"].as_f64().is_some(), "{r:#}");
    let (down, stop) = (s["server_down_ms"].as_f64().unwrap(), s["server_stop_ms"].as_f64().unwrap());
    assert!(stop > 0.0 && stop <= down, "stopping is part of the downtime: {r:#}");
    // Every client saw the graceful restart's close code.
    assert_eq!(s["closes"]["close 1012"], 50, "{r:#}");
}

#[test]
fn storm_with_a_hand_over_restart_refuses_nothing_and_loses_nothing() {
    let (code, r, err) = storm(&["--storm-handover"]);
    assert_eq!(code, 0, "{r:#}\n{err}");
    let s = &r["storm"];
    assert_eq!((s["restart"].as_str(), s["clients"].as_u64()), (Some("hand-over"), Some(50)), "{r:#}");
    assert_eq!(
        (s["not_back"].as_u64(), s["lost"].as_u64(), s["doubled"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{r:#}"
    );
    assert!(s["successor_ready_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{r:#}");
    assert_eq!(s["server_down_ms"], 0.0, "{r:#}");
    // The old process closed every socket with 1012, and every client found the new one.
    assert_eq!(s["closes"]["close 1012"], 50, "{r:#}");

    // memory: cannot hand over (the new process would start empty): a clear refusal.
    let out = Command::new(env!("CARGO_BIN_EXE_natter"))
        .args(["serve", "--reuse-port", "--database-url", "memory:"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reuse-port:"), "{out:?}");
}

/// A server that acks with the wrong seq, quickly.
async fn wrong_server(listener: TcpListener) {
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
            let hello = r#"{"type":"connection_established","last_seq":0}"#;
            ws.send(Message::text(hello)).await.unwrap();
            while let Some(Ok(Message::Text(t))) = ws.next().await {
                let f: Value = serde_json::from_str(&t).unwrap();
                let m = serde_json::json!({"id": "u1", "seq": 7, "role": "user", "content": f["content"], "client_id": f["client_id"]});
                let ack =
                    serde_json::json!({"type": "ack", "client_id": f["client_id"], "duplicate": false, "message": m});
                if ws.send(Message::text(ack.to_string())).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[test]
fn a_fast_wrong_answer_fails_the_run() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(wrong_server(listener));
    let (code, r, _) =
        bench(&["chat", "--url", &url, "--jwt-secret", "s", "-c", "3", "-d", "1", "--warmup", "0", "--timeout", "2"]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["error_total"], 3, "{r:#}");
    assert_eq!(r["errors"]["wrong reply: seq 7 where 1 was due"], 3, "{r:#}");
}

/// connect → idle → chat in one run against one server the test started, laid out as 3 users ×
/// 4 public bots: the database must hold exactly that grid, the idle sockets' conversations must
/// exist before the chat's first message, and the chat must use the first 6 conversations
/// (user 0 with every bot, user 1 with two).
#[test]
fn scenarios_in_one_run_share_one_server_and_the_users_by_bots_grid() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), NO_RATE_LIMITS);
    let (url, pid) = (format!("http://{}", node.addr), node.child.id().to_string());
    let steps = ["connect:concurrency=4,d=1,warmup=0.2", "idle:c=12,d=1", "chat:c=6,d=1,warmup=0.2"];
    let mut args = steps.to_vec();
    args.extend(["--url", &url, "--users", "3", "--bots", "4", "--server-pid", &pid]);
    let (code, r, err) = bench(&args);
    assert_eq!(code, 0, "{r:#}\n{err}");
    let scenarios: Vec<&str> = r.as_array().unwrap().iter().map(|s| s["scenario"].as_str().unwrap()).collect();
    assert_eq!(scenarios, ["connect", "idle", "chat"], "{r:#}");
    let (connect, idle, chat) = (&r[0], &r[1], &r[2]);
    let setup = &connect["setup"];
    assert_eq!((setup["users"].as_u64(), setup["bots"].as_u64()), (Some(3), Some(4)), "{r:#}");
    assert!(setup["server_rss_after_kib"].as_u64().is_some(), "{r:#}");
    assert_eq!((connect["users"].as_u64(), connect["bots"].as_u64()), (Some(1), Some(4)), "{r:#}");
    assert_eq!(
        (idle["connected"].as_u64(), idle["users"].as_u64(), idle["bots"].as_u64()),
        (Some(12), Some(3), Some(4))
    );
    assert_eq!(
        (chat["connected"].as_u64(), chat["users"].as_u64(), chat["bots"].as_u64()),
        (Some(6), Some(2), Some(4))
    );
    assert!(chat["ops"].as_u64().unwrap() > 0 && connect["ops"].as_u64().unwrap() > 0, "{r:#}");
    assert!(chat["server_cpu_us_per_op"].as_f64().is_some_and(|us| us > 0.0), "{r:#}");
    for s in r.as_array().unwrap() {
        assert_eq!(s["error_total"], 0, "{r:#}");
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let db = dir.path().join("natter.db");
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display())).await.unwrap();
        let one = |q: &'static str| sqlx::query(q);
        let users: i64 = one("SELECT COUNT(*) FROM users").fetch_one(&mut c).await.unwrap().get(0);
        assert_eq!(users, 3 + 1, "three users and the bots' owner");
        let row = one("SELECT COUNT(*), COUNT(DISTINCT owner_id), SUM(visibility = 'public') FROM bots")
            .fetch_one(&mut c)
            .await
            .unwrap();
        let bots: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(bots, (4, 1, 4), "four public bots of one owner");
        let row = one("SELECT COUNT(*), COUNT(DISTINCT user_id), COUNT(DISTINCT bot_id), \
             SUM(user_id IN (SELECT owner_id FROM bots)) FROM conversations")
        .fetch_one(&mut c)
        .await
        .unwrap();
        let convs: (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(convs, (12, 3, 4, 0), "every (user, bot) pair once, none of the owner's");
        // The chat's messages: in 6 conversations (2 users × 4 bots, user 0 with all four).
        let row = one("SELECT COUNT(DISTINCT c.id), COUNT(DISTINCT c.user_id), COUNT(DISTINCT c.bot_id) \
             FROM messages m JOIN conversations c ON c.id = m.conversation_id")
        .fetch_one(&mut c)
        .await
        .unwrap();
        let chatted: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(chatted, (6, 2, 4));
        let first_user_convs: i64 =
            one("SELECT MAX(n) FROM (SELECT COUNT(DISTINCT m.conversation_id) AS n FROM messages m \
             JOIN conversations c ON c.id = m.conversation_id GROUP BY c.user_id)")
            .fetch_one(&mut c)
            .await
            .unwrap()
            .get(0);
        assert_eq!(first_user_convs, 4, "one user chatted with every bot");
        // The chat ran on a server that already held every idle conversation.
        let ordered: bool =
            one("SELECT (SELECT MAX(created_at) FROM conversations) <= (SELECT MIN(created_at) FROM messages)")
                .fetch_one(&mut c)
                .await
                .unwrap()
                .get(0);
        assert!(ordered, "a conversation made after the chat began");
        // One server served all three: its ledger has the connects, the idle and the chat sockets.
        let established: i64 =
            one("SELECT COUNT(*) FROM connections WHERE established = 1").fetch_one(&mut c).await.unwrap().get(0);
        let connects = connect["ops"].as_i64().unwrap();
        assert!(established >= connects + 12 + 6, "{established} ledger rows for {connects} connects + 12 + 6");
    });
}

/// The SSE transport (issue 17): connect, idle and chat over event streams and POSTs against a
/// `natter serve` on port 0. Every scenario does work and counts no error, and the server's
/// ledger shows that every attempt came over SSE.
#[test]
fn sse_transport_connects_idles_and_chats_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), NO_RATE_LIMITS);
    let (url, pid) = (format!("http://{}", node.addr), node.child.id().to_string());
    let mut args = vec!["connect:concurrency=4,d=1,warmup=0.2", "idle:c=10,d=1", "chat:c=10,d=2,warmup=0.3"];
    args.extend(["--transport", "sse", "--url", &url, "--server-pid", &pid, "--timeout", "5"]);
    let (code, r, err) = bench(&args);
    assert_eq!(code, 0, "{r:#}\n{err}");
    let (connect, idle, chat) = (&r[0], &r[1], &r[2]);
    for s in r.as_array().unwrap() {
        assert_eq!((s["transport"].as_str(), s["error_total"].as_u64()), (Some("sse"), Some(0)), "{r:#}");
    }
    assert!(connect["ops"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(idle["connected"], 10, "{r:#}");
    assert!(idle["server_kib_per_connection"].as_f64().is_some(), "{r:#}");
    assert_eq!(chat["connected"], 10, "{r:#}");
    assert!(chat["ops"].as_u64().unwrap() > 10, "{r:#}");
    assert!(chat["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(chat["ack_latency_ms"]["p50"].as_f64().is_some(), "{r:#}");
    assert!(chat["server_cpu_us_per_op"].as_f64().is_some_and(|us| us > 0.0), "{r:#}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let db = dir.path().join("natter.db");
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display())).await.unwrap();
        let row = sqlx::query("SELECT COUNT(*), SUM(transport = 'sse') FROM connections WHERE established = 1")
            .fetch_one(&mut c)
            .await
            .unwrap();
        let (all, sse): (i64, i64) = (row.get(0), row.get(1));
        let connects = connect["ops"].as_i64().unwrap();
        assert!(all >= connects + 10 + 10, "{all} ledger rows for {connects} connects + 10 + 10");
        assert_eq!(sse, all, "every attempt came over SSE");
    });
}
