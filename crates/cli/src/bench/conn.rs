//! One bench connection: a TCP socket bound to a chosen loopback source address, the WebSocket
//! handshake (or the SSE binding's event stream, `sse.rs`), `connection_established`, and the
//! few frames the scenarios read.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::ValueEnum;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

use super::sse::SseConn;

pub type Ws = WebSocketStream<TcpStream>;

/// How a bench client chats: one WebSocket, or the SSE binding (an event stream down, POSTs up).
#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Transport {
    /// One WebSocket per connection (`/api/ws/chat/{bot}`).
    #[default]
    Ws,
    /// HTTP streaming: an event stream per connection (`GET /api/sse/chat/{bot}`), the client's
    /// frames by POST on a second, kept-alive HTTP connection, opened at the first POST.
    Sse,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// An open chat connection of either transport.
pub enum Conn {
    Ws(Ws),
    Sse(SseConn),
}

/// Where the sockets go.
#[derive(Clone, Debug)]
pub struct Target {
    /// `ws://host:port` (no path).
    pub ws_base: String,
    /// `host:port`, the Host header of HTTP requests.
    pub authority: String,
    pub transport: Transport,
    pub addr: SocketAddr,
    /// How many 127.0.0.x source addresses to spread connections over (loopback targets only).
    pub source_ips: u8,
}

impl Target {
    /// The source address for connection `i`: 127.0.0.(1 + i % source_ips) on loopback, so
    /// tens of thousands of connections don't run out of ephemeral ports on one address.
    pub fn source(&self, i: usize) -> Option<IpAddr> {
        if !self.addr.ip().is_loopback() || !self.addr.is_ipv4() || self.source_ips == 0 {
            return None;
        }
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % self.source_ips as usize) as u8)))
    }
}

/// Who a connection speaks as, and with which bot: one conversation.
#[derive(Clone, Debug)]
pub struct Ident {
    pub token: String,
    pub bot_id: Uuid,
}

/// Why a connection attempt or a conversation step failed; the key it is counted under.
#[derive(Debug)]
pub enum Failure {
    /// TCP connect failed (refused, reset, out of ports).
    Connect(String),
    /// The HTTP upgrade was refused or broke.
    Handshake(String),
    /// The server closed the socket, with this code (`None`: without a close frame).
    Closed(Option<u16>),
    /// The server closed with 1012 (restarting), with the `retry_after_ms` its reason carries.
    Restarting(Option<u64>),
    /// No answer in time.
    Timeout,
    /// An answer, but the wrong one: a fast wrong answer is a failure.
    Wrong(String),
    /// An `error` frame, by its code.
    ErrorFrame(String),
    /// SSE: a POST of a client frame got no frame back (`HTTP 429`, a broken connection).
    Post(String),
}

impl Failure {
    /// The error key in the report: `close 4429`, `wrong reply`, …
    pub fn key(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {e}"),
            Failure::Handshake(e) => format!("handshake: {e}"),
            Failure::Closed(Some(c)) => format!("close {c}"),
            Failure::Closed(None) => "close 1006 (no close frame)".into(),
            Failure::Restarting(_) => "close 1012".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Wrong(what) => format!("wrong reply: {what}"),
            Failure::ErrorFrame(code) => format!("error frame {code}"),
            Failure::Post(e) => format!("post: {e}"),
        }
    }
}

/// The fields of server frames the bench checks. Decoded leniently (unknown fields ignored) so
/// the same client drives natter and the peers in `bench/peers/`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    ConnectionEstablished {
        last_seq: i64,
        /// The server's heartbeat: an SSE client posts a ping at least this often.
        #[serde(default)]
        heartbeat_interval_ms: Option<u64>,
    },
    Ack {
        client_id: String,
        message: Msg,
        #[serde(default)]
        duplicate: bool,
    },
    Message {
        message: Msg,
    },
    MessageDelta {},
    Pong {},
    Error {
        code: String,
    },
}

#[derive(Debug, Deserialize)]
pub struct Msg {
    pub id: String,
    pub seq: i64,
    pub role: String,
    pub content: String,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub in_reply_to: Option<String>,
}

/// Small buffers on the client side too: the load generator holds as many sockets as the server.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Opens connection `i` for `ident` and waits for `connection_established`; returns the
/// connection and the conversation's `last_seq`.
pub async fn open(
    target: &Target,
    i: usize,
    ident: &Ident,
    after_seq: Option<i64>,
    timeout: Duration,
) -> Result<(Conn, i64), Failure> {
    let opening = async {
        match target.transport {
            Transport::Ws => open_ws(target, i, ident, after_seq).await.map(|(ws, seq)| (Conn::Ws(ws), seq)),
            Transport::Sse => SseConn::open(target, i, ident, after_seq).await.map(|(c, seq)| (Conn::Sse(c), seq)),
        }
    };
    tokio::time::timeout(timeout, opening).await.unwrap_or(Err(Failure::Timeout))
}

/// A TCP connection for connection `i`, from its source address.
pub async fn tcp(target: &Target, i: usize) -> Result<TcpStream, Failure> {
    let socket = if target.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(|e| Failure::Connect(io_kind(&e)))?;
    if let Some(src) = target.source(i) {
        socket.bind(SocketAddr::new(src, 0)).map_err(|e| Failure::Connect(io_kind(&e)))?;
    }
    let _ = socket.set_nodelay(true);
    socket.connect(target.addr).await.map_err(|e| Failure::Connect(io_kind(&e)))
}

async fn open_ws(target: &Target, i: usize, ident: &Ident, after_seq: Option<i64>) -> Result<(Ws, i64), Failure> {
    let stream = tcp(target, i).await?;
    let mut url = format!("{}/api/ws/chat/{}?token={}", target.ws_base, ident.bot_id, ident.token);
    if let Some(s) = after_seq {
        url.push_str(&format!("&after_seq={s}"));
    }
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
        .await
        .map_err(|e| Failure::Handshake(handshake_kind(&e)))?;
    match ws_frame(&mut ws).await? {
        Frame::ConnectionEstablished { last_seq, .. } => Ok((ws, last_seq)),
        other => Err(Failure::Wrong(format!("expected connection_established, got {}", frame_name(&other)))),
    }
}

/// Reads the next frame: on a WebSocket answering pings on the way (tungstenite queues the
/// pong); on an event stream skipping keep-alives and this client's own messages, which it
/// already has from the POST's ack.
pub async fn next_frame(conn: &mut Conn) -> Result<Frame, Failure> {
    match conn {
        Conn::Ws(ws) => ws_frame(ws).await,
        Conn::Sse(sse) => sse.next_frame().await,
    }
}

/// Waits on an idle connection until something arrives (which an idle connection should not
/// get): a WebSocket answers the server's pings, an event stream posts a ping each heartbeat.
pub async fn hold(conn: &mut Conn) -> Result<Frame, Failure> {
    match conn {
        Conn::Ws(ws) => ws_frame(ws).await,
        Conn::Sse(sse) => sse.hold().await,
    }
}

async fn ws_frame(ws: &mut Ws) -> Result<Frame, Failure> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str::<Frame>(&t).map_err(|e| Failure::Wrong(format!("undecodable frame: {e}")))
            }
            Some(Ok(Message::Close(c))) => return Err(closed(c)),
            Some(Ok(Message::Binary(_))) => return Err(Failure::Wrong("binary frame".into())),
            Some(Ok(_)) => continue,
            Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) | None => {
                return Err(Failure::Closed(None))
            }
            Some(Err(tungstenite::Error::Io(_) | tungstenite::Error::Protocol(_))) => {
                return Err(Failure::Closed(None))
            }
            Some(Err(e)) => return Err(Failure::Wrong(format!("websocket: {e}"))),
        }
    }
}

/// The failure a close frame means: 1012 keeps its reconnect hint.
fn closed(c: Option<tungstenite::protocol::CloseFrame>) -> Failure {
    match c {
        Some(c) if u16::from(c.code) == 1012 => Failure::Restarting(natter_proto::Close::retry_after_ms(&c.reason)),
        c => Failure::Closed(c.map(|c| u16::from(c.code))),
    }
}

/// Sends a message; over SSE it is a POST, whose answer (the ack or an error) is the next frame.
pub async fn send_message(conn: &mut Conn, client_id: &str, content: &str) -> Result<(), Failure> {
    let frame = serde_json::json!({"type": "message", "client_id": client_id, "content": content}).to_string();
    match conn {
        Conn::Ws(ws) => ws.send(Message::text(frame)).await.map_err(|_| Failure::Closed(None)),
        Conn::Sse(sse) => sse.send_message(frame).await,
    }
}

/// A normal close: on a WebSocket send 1000 and wait (briefly) for the server's echo, so its
/// per-user slot is free before the next attempt; an event stream is closed by dropping it.
pub async fn close(conn: Conn) {
    let Conn::Ws(mut ws) = conn else { return };
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

pub fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::ConnectionEstablished { .. } => "connection_established",
        Frame::Ack { .. } => "ack",
        Frame::Message { .. } => "message",
        Frame::MessageDelta {} => "message_delta",
        Frame::Pong {} => "pong",
        Frame::Error { .. } => "error",
    }
}

pub fn io_kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => "no free source port (EADDRNOTAVAIL)".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "too many open files".into(),
        _ => format!("{:?}", e.kind()),
    }
}

fn handshake_kind(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(r) => format!("HTTP {}", r.status().as_u16()),
        tungstenite::Error::Io(io) => io_kind(io),
        other => {
            let s = other.to_string();
            s.chars().take(60).collect()
        }
    }
}
