//! One bench connection: a TCP socket bound to a chosen loopback source address, the WebSocket
//! handshake, `connection_established`, and the few frames the scenarios read.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

pub type Ws = WebSocketStream<TcpStream>;

/// Where the sockets go.
#[derive(Clone, Debug)]
pub struct Target {
    /// `ws://host:port` (no path).
    pub ws_base: String,
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
    /// No answer in time.
    Timeout,
    /// An answer, but the wrong one: a fast wrong answer is a failure.
    Wrong(String),
    /// An `error` frame, by its code.
    ErrorFrame(String),
}

impl Failure {
    /// The error key in the report: `close 4429`, `wrong reply`, …
    pub fn key(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {e}"),
            Failure::Handshake(e) => format!("handshake: {e}"),
            Failure::Closed(Some(c)) => format!("close {c}"),
            Failure::Closed(None) => "close 1006 (no close frame)".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Wrong(what) => format!("wrong reply: {what}"),
            Failure::ErrorFrame(code) => format!("error frame {code}"),
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

/// Opens connection `i` for `ident` and waits for `connection_established`; returns the socket
/// and the conversation's `last_seq`.
pub async fn open(
    target: &Target,
    i: usize,
    ident: &Ident,
    after_seq: Option<i64>,
    timeout: Duration,
) -> Result<(Ws, i64), Failure> {
    tokio::time::timeout(timeout, open_inner(target, i, ident, after_seq)).await.unwrap_or(Err(Failure::Timeout))
}

async fn open_inner(target: &Target, i: usize, ident: &Ident, after_seq: Option<i64>) -> Result<(Ws, i64), Failure> {
    let socket = if target.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(|e| Failure::Connect(io_kind(&e)))?;
    if let Some(src) = target.source(i) {
        socket.bind(SocketAddr::new(src, 0)).map_err(|e| Failure::Connect(io_kind(&e)))?;
    }
    let _ = socket.set_nodelay(true);
    let stream = socket.connect(target.addr).await.map_err(|e| Failure::Connect(io_kind(&e)))?;
    let mut url = format!("{}/api/ws/chat/{}?token={}", target.ws_base, ident.bot_id, ident.token);
    if let Some(s) = after_seq {
        url.push_str(&format!("&after_seq={s}"));
    }
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
        .await
        .map_err(|e| Failure::Handshake(handshake_kind(&e)))?;
    match next_frame(&mut ws).await? {
        Frame::ConnectionEstablished { last_seq } => Ok((ws, last_seq)),
        other => Err(Failure::Wrong(format!("expected connection_established, got {}", frame_name(&other)))),
    }
}

/// Reads the next JSON frame, answering WebSocket pings on the way (tungstenite queues the pong).
pub async fn next_frame(ws: &mut Ws) -> Result<Frame, Failure> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str::<Frame>(&t).map_err(|e| Failure::Wrong(format!("undecodable frame: {e}")))
            }
            Some(Ok(Message::Close(c))) => return Err(Failure::Closed(c.map(|c| u16::from(c.code)))),
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

pub async fn send_message(ws: &mut Ws, client_id: &str, content: &str) -> Result<(), Failure> {
    let frame = serde_json::json!({"type": "message", "client_id": client_id, "content": content}).to_string();
    ws.send(Message::text(frame)).await.map_err(|_| Failure::Closed(None))
}

/// A normal close: send 1000 and wait (briefly) for the server's echo, so its per-user slot is
/// free before the next attempt.
pub async fn close(mut ws: Ws) {
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

fn io_kind(e: &std::io::Error) -> String {
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
