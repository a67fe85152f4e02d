//! A single `natter serve` on SQLite, killed with SIGKILL and restarted on the same data
//! directory: every acked user message ends with exactly one bot reply (issue 15, items 1 and
//! 2). Before the fix, messages acked but not yet answered at the kill — an echo reply not yet
//! stored, a streaming reply waiting in the bot's queue — stayed unanswered for ever (a resend
//! is a duplicate).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use common::{post, Node, NO_RATE_LIMITS};

use futures_util::{SinkExt, StreamExt};
use natter_proto::{MessageRole, ServerFrame, WireMessage};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Starts `natter serve` on SQLite in `dir`, with a short lease and no rate limits.
fn serve(dir: &Path, extra: &[&str]) -> (Node, SocketAddr) {
    let mut args = vec!["--node-lease-ms", "1500"];
    args.extend(NO_RATE_LIMITS);
    args.extend(extra);
    let node = Node::start(dir, &args);
    let addr = node.addr;
    (node, addr)
}

/// Registers alice, logs her in and creates `bot` (the JSON of `POST /api/bots`): her access
/// token and the bot's id.
async fn alice_with_bot(addr: SocketAddr, bot: serde_json::Value) -> (String, String) {
    post(addr, "/api/auth/register", None, creds()).await;
    let token = login(addr).await;
    let bot = post(addr, "/api/bots", Some(&token), bot).await;
    (token, bot["id"].as_str().unwrap().to_owned())
}

fn creds() -> serde_json::Value {
    json!({"username": "alice", "password": "correct-horse-battery"})
}

/// Alice's access token from a login.
async fn login(addr: SocketAddr) -> String {
    post(addr, "/api/auth/login", None, creds()).await["access_token"].as_str().unwrap().to_owned()
}

/// Every ack's message: `stop` runs once `n` came back, then the rest (in flight when the
/// server went) are taken until every socket has closed.
async fn acks_around(
    mut acks: tokio::sync::mpsc::UnboundedReceiver<WireMessage>,
    n: usize,
    stop: impl FnOnce(),
) -> Vec<WireMessage> {
    let mut acked = Vec::new();
    while acked.len() < n {
        acked.push(acks.recv().await.expect("acks keep coming"));
    }
    stop();
    while let Some(m) = acks.recv().await {
        acked.push(m);
    }
    acked
}

/// `sockets` sockets to `bot`, each sending `per_socket` messages at once; every ack's message
/// comes out of the receiver, which ends when every socket has closed.
async fn burst(
    addr: SocketAddr,
    bot: &str,
    token: &str,
    sockets: usize,
    per_socket: usize,
) -> tokio::sync::mpsc::UnboundedReceiver<WireMessage> {
    let (acks_tx, acks_rx) = tokio::sync::mpsc::unbounded_channel::<WireMessage>();
    for s in 0..sockets {
        let url = format!("ws://{addr}/api/ws/chat/{bot}?token={token}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade accepted");
        let acks = acks_tx.clone();
        tokio::spawn(async move {
            for i in 0..per_socket {
                let frame =
                    json!({"type": "message", "client_id": format!("s{s}-{i}"), "content": format!("m {s} {i}")});
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
    acks_rx
}

#[tokio::test]
async fn a_sqlite_server_killed_mid_burst_answers_every_acked_message_once_restarted() {
    const SOCKETS: usize = 12;
    const PER_SOCKET: usize = 150;
    const KILL_AFTER_ACKS: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = serve(dir.path(), &[]);
    let (token, bot) = alice_with_bot(addr, json!({"name": "Echo", "engine": {"kind": "echo"}})).await;

    // Every socket sends its whole burst at once, then reads acks; the server is killed as
    // soon as enough acks came back, while replies are still being stored.
    let acks = burst(addr, &bot, &token, SOCKETS, PER_SOCKET).await;
    let acked = acks_around(acks, KILL_AFTER_ACKS, || child.kill()).await; // SIGKILL

    let (mut child, addr) = serve(dir.path(), &[]);
    let token = login(addr).await;
    // The restart settles what is owed before it serves: no waiting for a lease.
    let all = common::history(addr, &bot, &token).await.unwrap();
    child.kill();

    let mut replies: HashMap<_, usize> = HashMap::new();
    for m in all.iter().filter(|m| m.role == MessageRole::Bot) {
        *replies.entry(m.in_reply_to.expect("a bot message replies to one")).or_default() += 1;
    }
    let users = all.iter().filter(|m| m.role == MessageRole::User).count();
    let unanswered: Vec<_> = acked.iter().filter(|m| !replies.contains_key(&m.id)).map(|m| m.seq).collect();
    let doubled: Vec<_> = replies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        unanswered.is_empty(),
        "{} of {} acked messages have no reply: seqs {unanswered:?}",
        unanswered.len(),
        acked.len()
    );
    assert!(doubled.is_empty(), "replied more than once: {doubled:?}");
    assert_eq!(replies.len(), users, "every stored user message has its one reply");
}

/// A fake OpenAI-compatible provider: its first request streams one word and then holds the
/// stream open for ever; every later one answers "later" at once.
async fn provider() -> String {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut sock, _)) = listener.accept().await {
            n += 1;
            let first = n == 1;
            tokio::spawn(async move {
                if !common::read_request(&mut sock).await {
                    return;
                }
                let chunk =
                    |w: &str| format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"content": w}}]}));
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                let body = if first { chunk("first ") } else { format!("{}data: [DONE]\n\n", chunk("later")) };
                if sock.write_all(format!("{head}{body}").as_bytes()).await.is_err() || !first {
                    return;
                }
                std::future::pending::<()>().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn a_reply_queued_when_the_server_is_killed_is_answered_once_restarted() {
    let provider = provider().await;
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--bot-concurrency", "1", "--bot-egress-allow", "127.0.0.1/32"];
    let (mut child, addr) = serve(dir.path(), &flags);
    let engine = json!({"kind": "openai", "base_url": provider, "model": "m", "timeout_ms": 60000});
    let (token, bot) = alice_with_bot(addr, json!({"name": "Slow", "engine": engine})).await;

    let url = format!("ws://{addr}/api/ws/chat/{bot}?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade accepted");
    for i in 0..2 {
        let frame = json!({"type": "message", "client_id": format!("c{i}"), "content": "hi"});
        ws.send(Message::Text(frame.to_string().into())).await.unwrap();
    }
    // Both acked, and the first reply is streaming: the second waits in the bot's queue.
    let (mut acked, mut streaming) = (Vec::new(), false);
    while acked.len() < 2 || !streaming {
        let Some(Ok(Message::Text(t))) = ws.next().await else { panic!("socket ended") };
        match serde_json::from_str(&t).unwrap() {
            ServerFrame::Ack { message, .. } => acked.push(message),
            ServerFrame::MessageDelta { .. } => streaming = true,
            _ => {}
        }
    }
    child.kill(); // SIGKILL

    let (mut child, addr) = serve(dir.path(), &flags);
    let token = login(addr).await;
    // The cut-off reply is stored `incomplete` once its lease ends (1.5 s); the queued one is
    // run again and answered.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let replies = loop {
        let all = common::history(addr, &bot, &token).await.unwrap();
        let replies: Vec<WireMessage> = all.into_iter().filter(|m| m.role == MessageRole::Bot).collect();
        if replies.len() >= 2 || tokio::time::Instant::now() > deadline {
            break replies;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    child.kill();
    let outcome = |m: &WireMessage| {
        replies
            .iter()
            .filter(|r| r.in_reply_to == Some(m.id))
            .map(|r| (r.content.clone(), r.status))
            .collect::<Vec<_>>()
    };
    let cut = outcome(&acked[0]);
    assert!(
        matches!(&cut[..], [(text, natter_proto::MessageStatus::Incomplete)] if "first ".starts_with(text.as_str())),
        "cut off, stored once with the text of its last checkpoint: {replies:?}"
    );
    assert_eq!(
        outcome(&acked[1]),
        vec![("later".to_owned(), natter_proto::MessageStatus::Complete)],
        "queued: {replies:?}"
    );
}

/// A server stopped with SIGTERM closes its store last: SQLite's appender finishes its batch
/// and the WAL is checkpointed into the database file, so `natter.db` alone, copied once the
/// process is gone, holds every acked message. Before, the store was never closed: the WAL kept
/// everything and the database file held little more than the schema.
#[tokio::test]
async fn a_sqlite_server_stopped_mid_burst_leaves_every_acked_message_in_its_database_file() {
    const SOCKETS: usize = 8;
    const PER_SOCKET: usize = 150;
    const STOP_AFTER_ACKS: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let (mut node, addr) = serve(dir.path(), &[]);
    let (token, bot) = alice_with_bot(addr, json!({"name": "Echo", "engine": {"kind": "echo"}})).await;

    let acks = burst(addr, &bot, &token, SOCKETS, PER_SOCKET).await;
    // SIGTERM, while the burst is still being stored.
    let acked = acks_around(acks, STOP_AFTER_ACKS, || node.terminate()).await;

    let wal = dir.path().join("natter.db-wal");
    let wal_len = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert_eq!(wal_len, 0, "the WAL is checkpointed into natter.db at shutdown");
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("natter.db"), copy.path().join("natter.db")).unwrap();
    let (_node, addr) = serve(copy.path(), &[]);
    let token = login(addr).await;
    let all = common::history(addr, &bot, &token).await.unwrap();
    let stored: std::collections::HashSet<_> = all.iter().map(|m| m.id).collect();
    let missing: Vec<_> = acked.iter().filter(|m| !stored.contains(&m.id)).map(|m| m.seq).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acked messages are not in the copied file: {missing:?}",
        missing.len(),
        acked.len()
    );
    let seqs: Vec<i64> = all.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=all.len() as i64).collect::<Vec<_>>(), "gap-free");
}
