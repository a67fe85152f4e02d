//! The session core driven without a socket: a transport made of two channels, a real server
//! state (in-memory store, local bus), real frames.

use std::task::{Context, Poll};
use std::time::Duration;

use natter_proto::api::Visibility;
use natter_proto::{Close, CloseCode, ServerFrame};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;
use uuid::Uuid;

use super::transport::{End, Inbound, Out, Transport, WriteFailed};
use super::ConnectRequest;
use crate::bots::EngineSpec;
use crate::config::Database;
use crate::store::{NewBot, NewUser};
use crate::{AppState, Config, Server};

/// Frames in through one channel, out through another (bounded: a full one is a client that
/// does not read).
struct ChannelTransport {
    inbound: mpsc::Receiver<Inbound<String>>,
    outbound: PollSender<Out>,
}

impl Transport for ChannelTransport {
    type Text = String;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Inbound<String>, End>> {
        self.inbound.poll_recv(cx).map(|f| f.ok_or_else(|| End::Network("client gone".into())))
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        self.outbound.poll_reserve(cx).map_err(|_| WriteFailed)
    }

    fn start_send(&mut self, out: Out) -> Result<(), WriteFailed> {
        self.outbound.send_item(out).map_err(|_| WriteFailed)
    }

    fn poll_flush(&mut self, _: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        Poll::Ready(Ok(()))
    }
}

/// The client's side of a [`ChannelTransport`].
struct Client {
    tx: mpsc::Sender<Inbound<String>>,
    rx: mpsc::Receiver<Out>,
}

impl Client {
    async fn next(&mut self) -> Out {
        tokio::time::timeout(Duration::from_secs(5), self.rx.recv()).await.expect("a frame in time").expect("open")
    }

    async fn frame(&mut self) -> ServerFrame {
        match self.next().await {
            Out::Text(t) => serde_json::from_str(&t).expect("a server frame"),
            Out::Ping => Box::pin(self.frame()).await,
            Out::Close(c) => panic!("closed: {c:?}"),
        }
    }

    async fn say(&self, client_id: &str, content: &str) {
        let text = serde_json::json!({"type": "message", "client_id": client_id, "content": content}).to_string();
        self.tx.send(Inbound::Text(text)).await.unwrap();
    }
}

struct Fixture {
    state: AppState,
    token: String,
    bot_id: Uuid,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { database: Database::Memory, ..Config::for_tests(dir.path().to_path_buf()) };
    let server = Server::build(config).await.expect("server starts");
    let state = server.state().clone();
    let user = state
        .store
        .create_user(NewUser { username: "alice".into(), password_hash: "h".into(), is_admin: false })
        .await
        .unwrap();
    let bot = state
        .store
        .create_bot(NewBot {
            owner_id: user.id,
            name: "Echo".into(),
            description: String::new(),
            visibility: Visibility::Private,
            engine: EngineSpec::Echo(Default::default()).to_stored(),
        })
        .await
        .unwrap();
    let token = state.keys.issue(user.id, "alice", Uuid::new_v4());
    Fixture { state, token, bot_id: bot.id, _dir: dir }
}

fn connect(f: &Fixture, req: ConnectRequest, queue: usize) -> (Client, tokio::task::JoinHandle<()>) {
    let (tx, inbound) = mpsc::channel(16);
    let (out_tx, rx) = mpsc::channel(queue);
    let transport = ChannelTransport { inbound, outbound: PollSender::new(out_tx) };
    let task = tokio::spawn(super::run(f.state.clone(), transport, req, Uuid::new_v4()));
    (Client { tx, rx }, task)
}

fn request(f: &Fixture, after_seq: Option<i64>) -> ConnectRequest {
    ConnectRequest {
        bot_id: f.bot_id.to_string(),
        token: Some(f.token.clone()),
        after_seq: after_seq.map(|s| s.to_string()),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_message_is_stored_acked_and_answered_without_a_socket() {
    let f = fixture().await;
    let (mut client, task) = connect(&f, request(&f, None), 64);
    let ServerFrame::ConnectionEstablished { last_seq, .. } = client.frame().await else { panic!("established first") };
    assert_eq!(last_seq, 0);
    client.say("c1", "hello").await;
    let ServerFrame::Ack { message, duplicate, .. } = client.frame().await else { panic!("an ack") };
    assert_eq!((message.seq, duplicate), (1, false));
    let ServerFrame::Message { message: reply } = client.frame().await else { panic!("the reply") };
    assert_eq!((reply.seq, reply.in_reply_to), (2, Some(message.id)));
    // A resend of the same client_id is the same message, and no second reply.
    client.say("c1", "hello").await;
    let ServerFrame::Ack { message: again, duplicate, .. } = client.frame().await else { panic!("an ack") };
    assert_eq!((again.id, duplicate), (message.id, true));
    client.tx.send(Inbound::Close(Some(1000))).await.unwrap();
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("the session ends").unwrap();
    assert_eq!(f.state.hub.len(), 0, "gone from the hub");
    f.state.hub.check_invariants();
}

#[tokio::test]
async fn a_resume_replays_what_was_missed_in_order() {
    let f = fixture().await;
    let (mut first, _task) = connect(&f, request(&f, None), 64);
    first.frame().await;
    for i in 0..3 {
        first.say(&format!("m{i}"), "hi").await;
    }
    let mut got = 0;
    while got < 6 {
        if let ServerFrame::Message { .. } | ServerFrame::Ack { .. } = first.frame().await {
            got += 1;
        }
    }
    let (mut second, _task) = connect(&f, request(&f, Some(2)), 64);
    let ServerFrame::ConnectionEstablished { last_seq, .. } = second.frame().await else { panic!() };
    assert_eq!(last_seq, 6);
    let mut replayed = Vec::new();
    for _ in 0..4 {
        let ServerFrame::Message { message } = second.frame().await else { panic!("a replayed message") };
        replayed.push(message.seq);
    }
    assert_eq!(replayed, [3, 4, 5, 6]);
}

#[tokio::test]
async fn a_refusal_is_a_close_with_its_code_and_reason() {
    let f = fixture().await;
    let (mut client, task) = connect(&f, ConnectRequest { bot_id: f.bot_id.to_string(), ..Default::default() }, 64);
    let Out::Close(close) = client.next().await else { panic!("a close, nothing before it") };
    assert_eq!(close.code, CloseCode::Unauthorized);
    assert!(close.reason.starts_with("missing token"), "{}", close.reason);
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("the attempt ends").unwrap();
    assert_eq!(f.state.hub.len(), 0);
}

#[tokio::test]
async fn shutdown_closes_with_1012_after_what_is_queued() {
    let f = fixture().await;
    let (mut client, _task) = connect(&f, request(&f, None), 64);
    client.frame().await;
    client.say("c1", "hello").await;
    let ServerFrame::Ack { .. } = client.frame().await else { panic!("an ack") };
    f.state.shutdown.cancel();
    loop {
        match client.next().await {
            Out::Close(close) => {
                assert_eq!(close.code, CloseCode::ServiceRestart);
                // When to come back, drawn from the window for the one open connection.
                let hint = Close::retry_after_ms(&close.reason).expect("a retry_after_ms hint");
                assert!(hint < super::session::reconnect_window_ms(1), "{}", close.reason);
                assert!(close.wire_reason() == close.reason, "the hint fits a close frame: {}", close.reason);
                break;
            }
            Out::Text(_) | Out::Ping => {}
        }
    }
}

#[test]
fn the_reconnect_window_grows_with_the_open_connections_within_bounds() {
    use super::session::reconnect_window_ms;
    assert_eq!(reconnect_window_ms(0), 1_000);
    assert_eq!(reconnect_window_ms(1), 1_000);
    assert_eq!(reconnect_window_ms(10_000), 5_000, "10 000 connections at 2 000 reconnects/s");
    assert_eq!(reconnect_window_ms(usize::MAX), 10_000);
}
