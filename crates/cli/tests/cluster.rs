//! Real `natter serve` processes sharing PostgreSQL and NATS: a node killed with SIGKILL in
//! the middle of a bot reply. Its client resumes on another node with nothing lost or
//! doubled, the cut-off reply is stored as `incomplete` by the surviving node, and the dead
//! node's socket stops counting against its user's limit when its lease ends.
//!
//! Needs `NATTER_TEST_DATABASE_URL` and `NATTER_TEST_NATS_URL`; without them the test prints a
//! SKIPPED line and passes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use natter_proto::{MessageStatus, ServerFrame};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The words the fake provider streams, one every 50 ms: far longer than the test runs.
fn word(i: usize) -> String {
    format!("w{i} ")
}

/// A `natter serve` child process on the shared services, killed (SIGKILL) on drop.
struct Node {
    node: common::Node,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(database_url: &str, nats_url: &str, secret: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jwt-secret"), secret).unwrap();
        let args = ["--database-url", database_url, "--bus", nats_url, "--node-lease-ms", "1500"];
        // The fake provider listens on loopback (docs/bots.md, egress policy).
        let args = [&args[..], &["--max-connections-per-user", "1", "--bot-egress-allow", "127.0.0.1/32"]].concat();
        let node = common::Node::start(dir.path(), &args);
        Node { addr: node.addr, node, _dir: dir }
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Value {
        let mut req = reqwest::Client::new().post(format!("http://{}{path}", self.addr)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        assert!(res.status().is_success(), "{path}: {}", res.status());
        res.json().await.unwrap()
    }

    async fn ws(&self, bot: &str, token: &str, extra: &str) -> Ws {
        let url = format!("ws://{}/api/ws/chat/{bot}?token={token}{extra}", self.addr);
        tokio_tungstenite::connect_async(url).await.expect("upgrade accepted").0
    }
}

/// The next frame or close code, within 10 s.
async fn next(ws: &mut Ws) -> Result<ServerFrame, u16> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame within 10 s");
        match msg {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(c))) => return Err(c.map_or(1005, |c| u16::from(c.code))),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(1006),
        }
    }
}

#[tokio::test]
async fn a_node_killed_mid_reply_leaves_nothing_lost_doubled_or_dangling() {
    const TEST: &str = "cluster::a_node_killed_mid_reply_leaves_nothing_lost_doubled_or_dangling";
    let Some((nats, schema)) = common::shared_services(TEST).await else { return };
    let provider = common::streaming_provider(10_000, Duration::from_millis(50)).await;
    let secret = "ab".repeat(32);
    let a = Node::start(&schema.url, &nats, &secret);
    let b = Node::start(&schema.url, &nats, &secret);

    a.post("/api/auth/register", None, json!({"username": "alice", "password": "correct-horse-battery"})).await;
    let login =
        a.post("/api/auth/login", None, json!({"username": "alice", "password": "correct-horse-battery"})).await;
    let token = login["access_token"].as_str().unwrap().to_owned();
    let engine = json!({"kind": "openai", "base_url": provider, "model": "slow", "timeout_ms": 60000});
    let bot = a.post("/api/bots", Some(&token), json!({"name": "Slow", "engine": engine})).await;
    let bot = bot["id"].as_str().unwrap().to_owned();

    let mut on_a = a.ws(&bot, &token, "").await;
    assert!(matches!(next(&mut on_a).await, Ok(ServerFrame::ConnectionEstablished { .. })));
    on_a.send(Message::Text(json!({"type": "message", "client_id": "c1", "content": "go"}).to_string().into()))
        .await
        .unwrap();
    let Ok(ServerFrame::Ack { message: asked, .. }) = next(&mut on_a).await else { panic!("expected the ack") };
    assert_eq!(asked.seq, 1);
    // Stream long enough for a checkpoint (every 500 ms with a 1.5 s lease).
    let (mut seen, mut reply_id) = (String::new(), None);
    while seen.len() < word(0).len() * 20 {
        match next(&mut on_a).await {
            Ok(ServerFrame::MessageDelta { message_id, delta, .. }) => {
                reply_id = Some(message_id);
                seen.push_str(&delta);
            }
            other => panic!("expected deltas, got {other:?}"),
        }
    }
    let reply_id = reply_id.unwrap();

    let mut a = a;
    a.node.kill(); // SIGKILL
    assert!(next(&mut on_a).await.is_err(), "the socket on A is gone");

    // The dead node's socket still holds alice's only slot until its lease ends; then it is
    // freed without anyone releasing it.
    let mut first = b.ws(&bot, &token, "&after_seq=1").await;
    assert_eq!(next(&mut first).await.err(), Some(4429), "A's socket still counts right after the kill");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut on_b = loop {
        let mut ws = b.ws(&bot, &token, "&after_seq=1").await;
        match next(&mut ws).await {
            Ok(ServerFrame::ConnectionEstablished { .. }) => break ws,
            Err(4429) => assert!(tokio::time::Instant::now() < deadline, "the dead node's slot never expired"),
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The cut-off reply arrives once, stored as incomplete, with the text of a checkpoint.
    let stored = match next(&mut on_b).await {
        Ok(ServerFrame::Message { message }) => message,
        other => panic!("expected the stored reply (no node generates it any more), got {other:?}"),
    };
    assert_eq!((stored.id, stored.seq, stored.status), (reply_id, 2, MessageStatus::Incomplete));
    assert_eq!(stored.in_reply_to, Some(asked.id));
    let full: String = (0..10_000).map(word).collect();
    assert!(!stored.content.is_empty() && full.starts_with(&stored.content), "{:?}", stored.content);
    assert!(stored.content.len() <= seen.len() + 200, "no text from after the kill");

    // Nothing doubled: the next frame is the answer to a ping.
    on_b.send(Message::Text(json!({"type": "ping", "id": 1}).to_string().into())).await.unwrap();
    assert!(matches!(next(&mut on_b).await, Ok(ServerFrame::Pong { .. })));
    let history: Value = reqwest::Client::new()
        .get(format!("http://{}/api/bots/{bot}/messages", b.addr))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seqs: Vec<i64> = history["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2]);
}
