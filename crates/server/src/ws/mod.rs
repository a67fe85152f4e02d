//! The WebSocket binding of the chat: `GET /api/ws/chat/{bot_id}`.
//!
//! The upgrade is always accepted; the checks run afterwards (`crate::chat::admit`), so that
//! a refusal reaches the browser as a close code and a reason instead of a bare 1006. This
//! module only frames: [`WsTransport`] turns the socket into the session core's
//! [`Transport`] (client frames in, queued frames out, the close), and maps read errors to
//! their RFC 6455 close codes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use natter_proto::{Close, CloseCode};

use crate::chat::{ConnectRequest, End, Inbound, Out, Transport, WriteFailed};
use crate::state::AppState;

/// tungstenite's read buffer per socket, allocated at the upgrade and kept (see `chat`).
const READ_BUFFER_BYTES: usize = 512;

/// `GET /api/ws/chat/{bot_id}`: the chat socket. See `docs/protocol.md`.
pub async fn chat(
    State(state): State<AppState>,
    Path(bot_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return not_upgradable(&rejection),
    };
    let req = ConnectRequest::from_parts(bot_id, query, &headers, Some(remote));
    let max_frame_bytes = state.config.limits.max_frame_bytes;
    let tracker = state.tasks.clone();
    // Memory per idle socket (issue 10): tungstenite allocates its read buffer up front and
    // keeps it, so it is small; a larger frame reserves what it needs and is read in chunks of
    // this size. The request is boxed: the upgrade task keeps its callback's room for its life.
    let req = Box::new(req);
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(4 * 1024)
        .max_frame_size(max_frame_bytes)
        .max_message_size(max_frame_bytes)
        .on_upgrade(move |socket| {
            let transport = WsTransport { ws: socket, max_frame_bytes };
            tracker.track_future(crate::chat::run(state, transport, *req, uuid::Uuid::new_v4()))
        })
}

/// A request to the socket's URL that is not a WebSocket handshake. Most often a proxy in
/// between dropped `Upgrade` and `Connection` (they are hop-by-hop headers, so a proxy passes
/// them only when told to): the answer says so in natter's JSON error shape, with 426 Upgrade
/// Required when those headers are what is missing, so `natter doctor` and a curious `curl`
/// can tell. Browsers only see a failed handshake; the client falls back to the SSE binding.
fn not_upgradable(rejection: &WebSocketUpgradeRejection) -> Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let (status, message) = match rejection {
        WebSocketUpgradeRejection::InvalidConnectionHeader(_) | WebSocketUpgradeRejection::InvalidUpgradeHeader(_) => (
            StatusCode::UPGRADE_REQUIRED,
            "this URL is a WebSocket endpoint, but the request came without the Upgrade: websocket and \
             Connection: upgrade headers: a proxy in between drops them (nginx needs proxy_http_version 1.1; \
             proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"). Where the path \
             cannot carry a WebSocket, chat over GET /api/sse/chat/{bot_id} (docs/protocol.md)"
                .to_owned(),
        ),
        other => (StatusCode::BAD_REQUEST, format!("not a WebSocket handshake: {other}")),
    };
    let body = natter_proto::api::ErrorBody::new(natter_proto::ErrorCode::BadRequest, message);
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UPGRADE_REQUIRED {
        response.headers_mut().insert(header::UPGRADE, header::HeaderValue::from_static("websocket"));
    }
    response
}

/// A WebSocket as the session core's transport.
pub struct WsTransport {
    ws: WebSocket,
    /// For the reason of a 1009 close.
    max_frame_bytes: usize,
}

impl Transport for WsTransport {
    type Text = Utf8Bytes;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Inbound<Utf8Bytes>, End>> {
        self.ws.poll_next_unpin(cx).map(|frame| match frame {
            None => Err(End::Network("connection dropped without a close frame".into())),
            Some(Err(e)) => Err(read_error_end(e, self.max_frame_bytes)),
            Some(Ok(Message::Text(t))) => Ok(Inbound::Text(t)),
            Some(Ok(Message::Binary(b))) => Ok(Inbound::Binary(b.len())),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(Inbound::Control),
            Some(Ok(Message::Close(c))) => Ok(Inbound::Close(c.map(|c| c.code))),
        })
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        self.ws.poll_ready_unpin(cx).map_err(|_| WriteFailed)
    }

    fn start_send(&mut self, out: Out) -> Result<(), WriteFailed> {
        let msg = match out {
            Out::Text(t) => Message::Text(t.into()),
            Out::Ping => Message::Ping(Default::default()),
            Out::Close(Close { code, reason }) => {
                Message::Close(Some(CloseFrame { code: code.code(), reason: reason.into() }))
            }
        };
        self.ws.start_send_unpin(msg).map_err(|_| WriteFailed)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        self.ws.poll_flush_unpin(cx).map_err(|_| WriteFailed)
    }
}

/// How a failed read ends the socket. RFC 6455 §7.4.1: a text frame that is not UTF-8 is
/// closed 1007, a frame that breaks the framing rules 1002, one over the size limit 1009 —
/// each with a reason, instead of a bare TCP close (the client saw 1006). tungstenite keeps
/// its write side usable after such a read error, so the close frame goes out as usual.
fn read_error_end(e: axum::Error, max_frame_bytes: usize) -> End {
    use tungstenite::error::{Error as WsError, ProtocolError};
    let e = e.into_inner();
    let close = |code, reason: String| End::Close(Close::new(code, reason));
    match e.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => {
            close(CloseCode::FrameTooLarge, format!("frame larger than {max_frame_bytes} bytes"))
        }
        Some(WsError::Utf8(_)) => close(CloseCode::InvalidPayload, "a text frame is not valid UTF-8".into()),
        Some(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
            End::Network("connection dropped without a close frame".into())
        }
        Some(WsError::Protocol(p)) => close(CloseCode::ProtocolError, format!("protocol error: {p}")),
        _ => End::Network(format!("read error: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn output_size<A, B, C, D, R>(_: impl Fn(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Memory per idle socket (issue 10). A socket's task holds its future at the size of its
    /// largest state for the socket's whole life. With admission and the close inline, that
    /// was 7.9 KiB (release); boxed, the task is what an idle socket needs: the loop's state
    /// (`Live`, with the session owning the socket, and the `select!`), about 1.7 KiB in debug
    /// and release (rustc 1.9x). 2 KiB catches anything big that moves back inline.
    #[test]
    fn idle_socket_futures_stay_small() {
        let task = output_size(crate::chat::run::<WsTransport>);
        assert!(task <= 2 * 1024, "a socket's future is {task} bytes");
        // A queued frame is a `String` and a tag: the queue is only as long as the backlog.
        assert!(std::mem::size_of::<Out>() <= 32);
    }
}
