//! `natter backup` and `natter restore` (issue 20, part 3): a backup of a server under load is
//! consistent and does not stall its chats; a restore into a fresh data dir serves what the
//! backup held; a restore refuses a running server, a newer schema and bad files, and keeps
//! the database it replaces.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{post, Node, NO_RATE_LIMITS};

use futures_util::{SinkExt, StreamExt};
use natter_proto::{MessageRole, ServerFrame, WireMessage};
use serde_json::json;
use sqlx::Connection;
use tokio_tungstenite::tungstenite::Message;

/// Runs `natter ARGS`; returns its output (stdout and stderr).
fn natter(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_natter"))
        .args(args)
        .env_remove("NATTER_DATA_DIR")
        .env_remove("NATTER_DATABASE_URL")
        .env_remove("NATTER_CONFIG")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `natter ARGS` must fail with a message containing `expected`.
fn refused(args: &[&str], expected: &str) {
    let o = natter(args);
    assert!(!o.status.success(), "natter {args:?} should fail: {}", text(&o));
    assert!(text(&o).contains(expected), "natter {args:?}: expected {expected:?} in {:?}", text(&o));
    assert_eq!(text(&o).trim().lines().count(), 1, "one line: {}", text(&o));
}

fn succeeds(args: &[&str]) -> String {
    let o = natter(args);
    assert!(o.status.success(), "natter {args:?}: {}", text(&o));
    text(&o)
}

/// A user with an echo bot on the server at `addr`: (token, bot id).
async fn user_and_bot(addr: SocketAddr) -> (String, String) {
    post(addr, "/api/auth/register", None, creds()).await;
    let token = login(addr).await;
    let bot = post(addr, "/api/bots", Some(&token), json!({"name": "Echo", "engine": {"kind": "echo"}})).await;
    (token, bot["id"].as_str().unwrap().to_owned())
}

fn creds() -> serde_json::Value {
    json!({"username": "alice", "password": "correct-horse-battery"})
}

async fn login(addr: SocketAddr) -> String {
    post(addr, "/api/auth/login", None, creds()).await["access_token"].as_str().unwrap().to_owned()
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr, bot: &str, token: &str, after_seq: Option<i64>) -> Socket {
    let resume = after_seq.map(|n| format!("&after_seq={n}")).unwrap_or_default();
    let url = format!("ws://{addr}/api/ws/chat/{bot}?token={token}{resume}");
    tokio_tungstenite::connect_async(url).await.expect("upgrade accepted").0
}

async fn next_frame(ws: &mut Socket) -> ServerFrame {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame in time");
        if let Some(Ok(Message::Text(t))) = msg {
            return serde_json::from_str(&t).unwrap();
        }
        assert!(matches!(msg, Some(Ok(_))), "socket ended: {msg:?}");
    }
}

/// Sends one message and waits for its ack (bot replies and other frames are skipped).
async fn send(ws: &mut Socket, client_id: &str, content: &str) -> WireMessage {
    let frame = json!({"type": "message", "client_id": client_id, "content": content});
    ws.send(Message::Text(frame.to_string().into())).await.unwrap();
    loop {
        if let ServerFrame::Ack { message, .. } = next_frame(ws).await {
            if message.client_id.as_deref() == Some(client_id) {
                return message;
            }
        }
    }
}

/// Seqs 1..n, in order, each once.
fn assert_gap_free(history: &[WireMessage]) {
    for (i, m) in history.iter().enumerate() {
        assert_eq!(m.seq, i as i64 + 1, "seqs run 1..n without a gap");
    }
}

#[tokio::test]
async fn a_backup_under_load_is_consistent_and_restores_into_a_fresh_data_dir() {
    const SOCKETS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = Node::start(&data, NO_RATE_LIMITS);
    let addr = node.addr;
    let (token, bot) = user_and_bot(addr).await;

    // Some bulk first (with the echoes, ~20 MB), so that the copy takes a while.
    let mut ws = connect(addr, &bot, &token, None).await;
    let bulk = "x".repeat(16_000);
    for i in 0..600 {
        send(&mut ws, &format!("bulk-{i}"), &bulk).await;
    }
    drop(ws);

    // Clients chat, one message outstanding each, and note when each ack came.
    let started = Instant::now();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for c in 0..SOCKETS {
        let mut ws = connect(addr, &bot, &token, None).await;
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            let mut i = 0;
            while !stop.is_cancelled() {
                let m = send(&mut ws, &format!("c{c}-{i}"), &format!("hello {c} {i}")).await;
                acks.push((started.elapsed(), m));
                i += 1;
            }
            acks
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let backup = dir.path().join("natter.backup");
    let (t0, out, t1) = tokio::task::spawn_blocking({
        let (data, backup) = (data.clone(), backup.clone());
        move || {
            let t0 = started.elapsed();
            let out = natter(&["backup", "--to", s(&backup), "--data-dir", s(&data)]);
            (t0, out, started.elapsed())
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("backed up"), "{}", text(&out));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let mut acks: Vec<(Duration, WireMessage)> = Vec::new();
    for c in clients {
        acks.extend(c.await.unwrap());
    }
    acks.sort_by_key(|(t, _)| *t);

    // Chats went on during the backup: acks kept coming, never stalled.
    let during = acks.iter().filter(|(t, _)| *t > t0 && *t < t1).count();
    let longest_gap = acks.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap();
    eprintln!("backup took {:?}; {during} acks during it; longest gap between acks {longest_gap:?}", t1 - t0);
    assert!(during > 0, "messages are acked while the backup runs ({:?})", t1 - t0);
    assert!(longest_gap < Duration::from_secs(1), "no ack waited long for the backup: {longest_gap:?}");

    let live = common::history(addr, &bot, &token).await.unwrap();
    drop(node);

    // Restore into a fresh data dir and serve it.
    let fresh = dir.path().join("fresh");
    let out = succeeds(&["restore", "--from", s(&backup), "--data-dir", s(&fresh)]);
    assert!(out.contains("there was no database to replace"), "{out}");
    assert!(out.contains("no jwt-secret"), "{out}");
    let restored_node = Node::start(&fresh, NO_RATE_LIMITS);
    let raddr = restored_node.addr;
    let rtoken = login(raddr).await; // the accounts are in the backup
    let restored = common::history(raddr, &bot, &rtoken).await.unwrap();

    // Consistent: gap-free, a prefix of what the live server stored, every message acked
    // before the backup began is there, and every user message in it was acked.
    assert_gap_free(&restored);
    let same = restored.iter().zip(&live).take_while(|(r, l)| r.id == l.id && r.seq == l.seq).count();
    assert!(same < live.len(), "the clients went on after the backup");
    // Past the live history's prefix, only the replies the restored server owed and gave at start.
    for m in &restored[same..] {
        assert_eq!(m.role, MessageRole::Bot, "the backup is the live history up to a point: {m:?}");
        assert!(restored[..same].iter().any(|u| Some(u.id) == m.in_reply_to), "a reply owed in the backup: {m:?}");
    }
    let acked: HashMap<_, _> = acks.iter().map(|(_, m)| (m.id, m.seq)).collect();
    for (t, m) in &acks {
        if *t < t0 {
            assert!(restored.iter().any(|r| r.id == m.id && r.seq == m.seq), "acked before the backup: {m:?}");
        }
    }
    for m in restored
        .iter()
        .filter(|m| m.role == MessageRole::User && m.client_id.as_deref().is_some_and(|c| c.starts_with('c')))
    {
        assert_eq!(acked.get(&m.id), Some(&m.seq), "a user message in the backup was acked");
    }

    // The restored server resumes a client from a seq it had, and chats on from its last seq.
    let from = restored.len() as i64 - 3;
    let mut ws = connect(raddr, &bot, &rtoken, Some(from)).await;
    let mut replayed = Vec::new();
    while replayed.len() < 3 {
        if let ServerFrame::Message { message } = next_frame(&mut ws).await {
            replayed.push(message.id);
        }
    }
    assert_eq!(replayed, restored[restored.len() - 3..].iter().map(|m| m.id).collect::<Vec<_>>());
    let m = send(&mut ws, "after-restore", "still here").await;
    assert_eq!(m.seq, restored.len() as i64 + 1);
}

#[tokio::test]
async fn restore_refuses_a_running_server_a_newer_schema_and_bad_files_and_keeps_what_it_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start(&data, NO_RATE_LIMITS);
    let (token, bot) = user_and_bot(node.addr).await;
    let mut ws = connect(node.addr, &bot, &token, None).await;
    for i in 0..5 {
        send(&mut ws, &format!("before-{i}"), "in the backup").await;
    }
    let backup = dir.path().join("natter.backup");
    succeeds(&["backup", "--to", s(&backup), "--data-dir", s(&data)]);
    for i in 0..5 {
        send(&mut ws, &format!("after-{i}"), "only in the side copy").await;
    }
    let before_kill = common::history(node.addr, &bot, &token).await.unwrap();

    // Never overwrites a file unless told to.
    refused(&["backup", "--to", s(&backup), "--data-dir", s(&data)], "already exists: pass --force to replace it");
    let other = dir.path().join("other.backup");
    succeeds(&["backup", "--to", s(&other), "--data-dir", s(&data)]);
    succeeds(&["backup", "--to", s(&other), "--force", "--data-dir", s(&data)]);

    // Never swaps the database under a running server.
    refused(&["restore", "--from", s(&backup), "--data-dir", s(&data)], "a natter server is running on");

    // Bad inputs, each with its own message (into a data dir no server runs on); none of them
    // leaves anything behind.
    let spare = dir.path().join("spare");
    let nowhere = dir.path().join("missing.backup");
    refused(&["restore", "--from", s(&nowhere), "--data-dir", s(&spare)], "no backup at");
    refused(&["restore", "--from", s(dir.path()), "--data-dir", s(&spare)], "is not a file");
    let junk = dir.path().join("junk.backup");
    std::fs::write(&junk, "this is not a database\n".repeat(100)).unwrap();
    refused(&["restore", "--from", s(&junk), "--data-dir", s(&spare)], "not a SQLite database");
    let cut = dir.path().join("cut.backup");
    let whole = std::fs::read(&backup).unwrap();
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    refused(&["restore", "--from", s(&cut), "--data-dir", s(&spare)], "damaged");
    let foreign = dir.path().join("foreign.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", s(&foreign))).await.unwrap();
    sqlx::query("CREATE TABLE notes (body TEXT)").execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    refused(&["restore", "--from", s(&foreign), "--data-dir", s(&spare)], "not a natter database");
    let newer = dir.path().join("newer.backup");
    std::fs::copy(&backup, &newer).unwrap();
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", s(&newer))).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', 1, x'00', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    refused(
        &["restore", "--from", s(&newer), "--data-dir", s(&spare)],
        "schema version 9999 is newer than this natter's",
    );
    let empty = dir.path().join("empty");
    refused(&["backup", "--to", s(&other), "--force", "--data-dir", s(&empty)], "no database at");
    let no_dir = dir.path().join("no-such-dir").join("x.backup");
    refused(&["backup", "--to", s(&no_dir), "--data-dir", s(&data)], "no directory");
    refused(&["backup", "--to", s(&no_dir), "--database-url", "postgres://u@127.0.0.1/x"], "pg_dump");
    refused(&["restore", "--from", s(&backup), "--database-url", "memory:"], "nothing is kept");
    let leftovers: Vec<_> = std::fs::read_dir(&spare)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "a refused restore leaves nothing behind: {leftovers:?}");
    assert_eq!(common::history(node.addr, &bot, &token).await.unwrap().len(), before_kill.len());

    // Killed (its WAL not copied into the file), then restored: the server serves the backup,
    // and the replaced database, with its WAL, is kept aside whole.
    drop(ws);
    node.kill();
    assert!(data.join("natter.db-wal").exists(), "a killed server leaves its WAL");
    let out = succeeds(&["restore", "--from", s(&backup), "--data-dir", s(&data)]);
    let side = out.lines().find_map(|l| l.strip_prefix("the database it replaced is kept as ")).expect(&out).to_owned();
    assert!(!data.join("natter.db-wal").exists() && !data.join("natter.db-shm").exists(), "no stale WAL beside it");
    let node = Node::start(&data, NO_RATE_LIMITS);
    let token = login(node.addr).await;
    let restored = common::history(node.addr, &bot, &token).await.unwrap();
    assert_gap_free(&restored);
    assert_eq!(restored.iter().filter(|m| m.role == MessageRole::User).count(), 5, "what the backup held");
    assert!(restored.iter().all(|m| m.content != "only in the side copy"));
    drop(node);
    let side_node = Node::start(&data, &["--database-url", &format!("sqlite://{side}")]);
    let token = login(side_node.addr).await;
    let kept = common::history(side_node.addr, &bot, &token).await.unwrap();
    let ids = |h: &[WireMessage]| h.iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(ids(&kept[..before_kill.len()]), ids(&before_kill), "nothing the replaced database held is lost");
}
