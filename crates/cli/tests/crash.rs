//! A single `natter serve` on SQLite, killed with SIGKILL while an echo bot answers a burst of
//! messages, then restarted on the same data directory: every acked user message ends with
//! exactly one bot reply (issue 15, item 1). Before the fix, the messages acked but not yet
//! answered at the kill stayed unanswered for ever (a resend is a duplicate).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use futures_util::{SinkExt, StreamExt};
use natter_proto::{MessageRole, ServerFrame, WireMessage};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Starts `natter serve` on SQLite in `dir`; returns it with the address it listens on.
fn serve(dir: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_natter"))
        .arg("serve")
        .args(["--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(["--node-lease-ms", "1500", "--messages-per-second", "100000", "--message-burst", "100000"])
        .args(["--log-format", "json"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("natter serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).unwrap_or_else(|| panic!("unexpected first line {line:?}")).trim();
    (child, addr.parse().unwrap())
}

async fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: Value) -> Value {
    let mut req = reqwest::Client::new().post(format!("http://{addr}{path}")).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    assert!(res.status().is_success(), "{path}: {}", res.status());
    res.json().await.unwrap()
}

/// The whole conversation, through the REST history, in pages.
async fn history(addr: SocketAddr, bot: &str, token: &str) -> Vec<WireMessage> {
    let mut all: Vec<WireMessage> = Vec::new();
    loop {
        let after = all.last().map_or(0, |m| m.seq);
        let page: Value = reqwest::Client::new()
            .get(format!("http://{addr}/api/bots/{bot}/messages?after_seq={after}&limit=500"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let msgs: Vec<WireMessage> = serde_json::from_value(page["messages"].clone()).unwrap();
        let more = page["has_more"].as_bool().unwrap() && !msgs.is_empty();
        all.extend(msgs);
        if !more {
            return all;
        }
    }
}

#[tokio::test]
async fn a_sqlite_server_killed_mid_burst_answers_every_acked_message_once_restarted() {
    const SOCKETS: usize = 12;
    const PER_SOCKET: usize = 150;
    const KILL_AFTER_ACKS: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = serve(dir.path());
    let creds = json!({"username": "alice", "password": "correct-horse-battery"});
    post(addr, "/api/auth/register", None, creds.clone()).await;
    let token = post(addr, "/api/auth/login", None, creds.clone()).await["access_token"].as_str().unwrap().to_owned();
    let bot = post(addr, "/api/bots", Some(&token), json!({"name": "Echo", "engine": {"kind": "echo"}})).await;
    let bot = bot["id"].as_str().unwrap().to_owned();

    // Every socket sends its whole burst at once, then reads acks; the server is killed as
    // soon as enough acks came back, while replies are still being stored.
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel::<WireMessage>();
    for s in 0..SOCKETS {
        let url = format!("ws://{addr}/api/ws/chat/{bot}?token={token}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade accepted");
        let acks = acks_tx.clone();
        tokio::spawn(async move {
            for i in 0..PER_SOCKET {
                let frame = json!({"type": "message", "client_id": format!("s{s}-{i}"), "content": format!("m {s} {i}")});
                if ws.send(Message::Text(frame.to_string().into())).await.is_err() {
                    return;
                }
            }
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(t) = msg {
                    if let Ok(ServerFrame::Ack { message, .. }) = serde_json::from_str(&t) {
                        let _ = acks.send(message);
                    }
                }
            }
        });
    }
    drop(acks_tx);
    let mut acked = Vec::new();
    while acked.len() < KILL_AFTER_ACKS {
        acked.push(acks_rx.recv().await.expect("acks keep coming"));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    while let Some(m) = acks_rx.recv().await {
        acked.push(m); // acks already in flight when the server died
    }

    let (mut child, addr) = serve(dir.path());
    let token = post(addr, "/api/auth/login", None, creds).await["access_token"].as_str().unwrap().to_owned();
    // The restart settles what is owed before it serves: no waiting for a lease.
    let all = history(addr, &bot, &token).await;
    let _ = child.kill();
    let _ = child.wait();

    let mut replies: HashMap<_, usize> = HashMap::new();
    for m in all.iter().filter(|m| m.role == MessageRole::Bot) {
        *replies.entry(m.in_reply_to.expect("a bot message replies to one")).or_default() += 1;
    }
    let users = all.iter().filter(|m| m.role == MessageRole::User).count();
    let unanswered: Vec<_> = acked.iter().filter(|m| !replies.contains_key(&m.id)).map(|m| m.seq).collect();
    let doubled: Vec<_> = replies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(unanswered.is_empty(), "{} of {} acked messages have no reply: seqs {unanswered:?}", unanswered.len(), acked.len());
    assert!(doubled.is_empty(), "replied more than once: {doubled:?}");
    assert_eq!(replies.len(), users, "every stored user message has its one reply");
}
