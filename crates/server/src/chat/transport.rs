//! What the session core needs of a transport, and no more: receive the client's next frame,
//! and send frames (text, a keep-alive, the close) with backpressure. The WebSocket binding
//! (`crate::ws`) implements it; the core never sees a socket.

use std::task::{Context, Poll};

use natter_proto::api::ClosedBy;
use natter_proto::Close;

/// A frame for the client, as the transport will write it.
pub enum Out {
    /// A JSON text frame (a `String` turns into the frame's bytes without a copy).
    Text(String),
    /// A keep-alive the client need not answer (the WebSocket's ping).
    Ping,
    /// The last frame: the close, its reason already cut to what the transport can carry.
    Close(Close),
}

/// What the client sent.
pub enum Inbound<T> {
    /// A text frame: one client frame of the protocol (JSON).
    Text(T),
    /// A binary frame of this many bytes (not part of the protocol: answered with an error).
    Binary(usize),
    /// A transport-level frame the transport answers itself (a WebSocket ping or pong).
    Control,
    /// The client closes, with its code if it gave one.
    Close(Option<u16>),
}

/// A write failed: the connection is gone.
#[derive(Debug)]
pub struct WriteFailed;

/// Why a session ended: the one value logs, the ledger, metrics and the close handshake read.
#[derive(Debug)]
pub enum End {
    /// The server closes with this code and reason.
    Close(Close),
    /// The client sent a close frame (with its code, if any).
    ClientClosed(Option<u16>),
    /// The connection broke without a close frame.
    Network(String),
}

impl End {
    /// The close code of the ledger and metrics, if there was one.
    pub fn code(&self) -> Option<u16> {
        match self {
            End::Close(c) => Some(c.code.code()),
            End::ClientClosed(c) => *c,
            End::Network(_) => None,
        }
    }

    /// The reason for logs and the ledger (empty for a client's close).
    pub fn reason(&self) -> &str {
        match self {
            End::Close(c) => &c.reason,
            End::ClientClosed(_) => "",
            End::Network(e) => e,
        }
    }

    pub fn closed_by(&self) -> ClosedBy {
        match self {
            End::Close(_) => ClosedBy::Server,
            End::ClientClosed(_) => ClosedBy::Client,
            End::Network(_) => ClosedBy::Network,
        }
    }
}

/// A bidirectional channel of frames to one client. Writing is split like a `Sink` (ready,
/// start, flush) so that the core can hand a batch of frames over and flush them with one
/// write.
pub trait Transport: Send + Unpin + 'static {
    /// The text of a received frame, as the transport holds it (no copy).
    type Text: std::ops::Deref<Target = str> + Send;

    /// The client's next frame. `Err` ends the connection: a broken framing rule, a frame
    /// over the size limit (as a close with its code), or a connection that dropped.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Inbound<Self::Text>, End>>;

    /// Whether a frame can be handed over now.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>>;

    /// Hands a frame over (after `poll_ready` said `Ready(Ok)`).
    fn start_send(&mut self, out: Out) -> Result<(), WriteFailed>;

    /// Writes out what was handed over.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>>;
}
