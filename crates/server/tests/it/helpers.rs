//! `TestApp`: spawns the real server and offers typed helpers to talk to it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use natter_proto::api::{BotView, TokenPair, UserView};
use natter_proto::ServerFrame;
use natter_server::{AppState, Config, Server};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as TCloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

pub const PASSWORD: &str = "correct-horse-battery";

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: Uuid,
    pub username: String,
    pub token: String,
    pub refresh: String,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(f: impl FnOnce(&mut Config)) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        Self::spawn_in(dir, f).await
    }

    /// Spawns on an existing data dir (to restart a server on the same data).
    pub async fn spawn_in(dir: tempfile::TempDir, f: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = Config::for_tests(dir.path().to_path_buf());
        f(&mut config);
        let server = Server::build(config).await.expect("server starts");
        let addr = server.local_addr();
        let state = server.state().clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.run_until_stopped(async move {
            let _ = rx.await;
        }));
        TestApp {
            addr,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            state,
            dir,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Graceful shutdown, as on SIGTERM. Returns the data dir for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(15), self.handle.take().unwrap())
            .await
            .expect("shutdown within 15 s")
            .unwrap()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        respond(req).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        respond(req).await
    }

    pub async fn patch(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.patch(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        respond(req).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.delete(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        respond(req).await
    }

    pub async fn register(&self, username: &str) -> UserView {
        let (status, body) =
            self.post("/api/auth/register", None, json!({"username": username, "password": PASSWORD})).await;
        assert_eq!(status, 201, "{body}");
        serde_json::from_value(body).unwrap()
    }

    pub async fn login(&self, username: &str) -> TokenPair {
        let (status, body) =
            self.post("/api/auth/login", None, json!({"username": username, "password": PASSWORD})).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }

    /// Registers and logs in.
    pub async fn user(&self, username: &str) -> TestUser {
        let u = self.register(username).await;
        let t = self.login(username).await;
        TestUser { id: u.id, username: u.username, token: t.access_token, refresh: t.refresh_token }
    }

    pub async fn bot(&self, owner: &TestUser, body: Value) -> BotView {
        let (status, body) = self.post("/api/bots", Some(&owner.token), body).await;
        assert_eq!(status, 201, "{body}");
        serde_json::from_value(body).unwrap()
    }

    pub async fn echo_bot(&self, owner: &TestUser) -> BotView {
        self.bot(owner, json!({"name": "Echo", "engine": {"kind": "echo"}})).await
    }

    pub fn ws_url(&self, bot_id: &str, query: &str) -> String {
        format!("ws://{}/api/ws/chat/{bot_id}?{query}", self.addr)
    }

    /// Opens a socket with `?token=` plus `extra` query parameters.
    pub async fn ws(&self, bot_id: Uuid, token: &str, extra: &str) -> WsClient {
        WsClient::connect(&self.ws_url(&bot_id.to_string(), &format!("token={token}{extra}"))).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

async fn respond(req: reqwest::RequestBuilder) -> (u16, Value) {
    let res = req.send().await.expect("request sent");
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
    (status, body)
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct WsClient {
    pub ws: Socket,
}

/// What came next from the server.
#[derive(Debug)]
pub enum Next {
    Frame(ServerFrame),
    Close(u16, String),
}

impl WsClient {
    pub async fn connect(url: &str) -> WsClient {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade accepted");
        WsClient { ws }
    }

    /// Connects with a tiny TCP receive buffer, so a client that stops reading backs the
    /// server up quickly (loopback buffers otherwise grow to tens of MB).
    pub async fn connect_small_buffer(url: &str, addr: SocketAddr) -> WsClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8 * 1024).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.expect("upgrade accepted");
        WsClient { ws }
    }

    pub async fn connect_with(req: tokio_tungstenite::tungstenite::handshake::client::Request) -> WsClient {
        let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("upgrade accepted");
        WsClient { ws }
    }

    /// The next frame or close, skipping WebSocket pings. Panics after 5 s of silence.
    pub async fn next(&mut self) -> Next {
        self.next_within(Duration::from_secs(5)).await.expect("a frame within 5 s")
    }

    pub async fn next_within(&mut self, d: Duration) -> Option<Next> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return Some(Next::Frame(serde_json::from_str(&t).unwrap_or_else(|e| panic!("bad frame {t}: {e}"))))
                }
                Some(Ok(Message::Close(Some(c)))) => return Some(Next::Close(u16::from(c.code), c.reason.to_string())),
                Some(Ok(Message::Close(None))) => return Some(Next::Close(1005, String::new())),
                Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
                Some(Err(e)) => return Some(Next::Close(1006, format!("error: {e}"))),
                None => return Some(Next::Close(1006, "stream ended".into())),
            }
        }
    }

    pub async fn frame(&mut self) -> ServerFrame {
        match self.next().await {
            Next::Frame(f) => f,
            Next::Close(c, r) => panic!("expected a frame, got close {c} {r}"),
        }
    }

    pub async fn close_code(&mut self) -> (u16, String) {
        loop {
            match self.next().await {
                Next::Close(c, r) => return (c, r),
                Next::Frame(_) => continue,
            }
        }
    }

    /// Expects `connection_established` and returns it.
    pub async fn established(&mut self) -> ServerFrame {
        match self.frame().await {
            f @ ServerFrame::ConnectionEstablished { .. } => f,
            other => panic!("expected connection_established, got {other:?}"),
        }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::Text(t.to_string().into())).await.unwrap();
    }

    pub async fn say(&mut self, client_id: &str, content: &str) {
        self.send_json(json!({"type": "message", "client_id": client_id, "content": content})).await;
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: TCloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
        // Drain until the server answers the close.
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = self.ws.next().await {} })
            .await;
    }
}

/// The seq of an ack or message frame.
pub fn seq_of(f: &ServerFrame) -> Option<i64> {
    match f {
        ServerFrame::Ack { message, .. } | ServerFrame::Message { message } => Some(message.seq),
        _ => None,
    }
}

static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every log line of this test process (nextest runs one test per process).
pub fn capture_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        tracing_subscriber::fmt()
            .with_env_filter("debug,sqlx=warn,hyper=warn,tungstenite=warn,tokio_tungstenite=warn")
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .init();
    });
}

/// Everything logged so far.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

/// An HS256 token for `user` that expired a minute ago, signed with the server's own secret.
pub fn expired_token(app: &TestApp, user: Uuid) -> String {
    let secret = hex::decode(std::fs::read_to_string(app.dir.path().join("jwt-secret")).unwrap().trim()).unwrap();
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": user, "name": "x", "iat": now - 120, "exp": now - 60});
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(&secret))
        .unwrap()
}

/// Waits until `done` holds, checking every 20 ms; fails naming `what` after 10 s. For the
/// waits on the real server that must take real time (its sockets, store and tasks run as
/// they do in production): as long as the condition takes, instead of a guessed sleep.
pub async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
