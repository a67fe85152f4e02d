//! The Server-Sent Events binding of the chat, for networks that cannot carry a WebSocket:
//! `GET /api/sse/chat/{bot_id}` streams the server's frames as events (`text/event-stream`),
//! and the client's frames go up by `POST /api/sse/chat/{bot_id}/frames?stream=<connection
//! id>` (`http::chat::post_frame`, on any node). See docs/protocol.md, "The SSE binding".
//!
//! Like the socket, the stream is accepted before any check, so a refusal reaches the client
//! as a `close` event with its code and reason. [`SseTransport`] is the session core's
//! [`Transport`]: each frame an event named by its type, with `id:` = its seq where it has
//! one (an `EventSource` resumes with `Last-Event-ID`), keep-alives as comments, the close as
//! a `close` event and then the end of the stream. It never reads: the client is heard by
//! its POSTs, which reach the session over the bus.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use natter_proto::Close;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;
use uuid::Uuid;

use crate::chat::{ConnectRequest, End, Inbound, Out, Transport, WriteFailed};
use crate::state::AppState;

/// Events waiting for the HTTP body: few, since the session keeps its own bounded queue.
const BODY_CHUNKS: usize = 8;

/// `GET /api/sse/chat/{bot_id}`: the chat as an event stream.
pub async fn chat(
    State(state): State<AppState>,
    Path(bot_id): Path<String>,
    Query(mut query): Query<HashMap<String, String>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    // An `EventSource` that reconnects by itself sends the last `id:` it saw.
    if let Some(last) = headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        query.entry("after_seq".into()).or_insert_with(|| last.to_owned());
    }
    let req = ConnectRequest {
        transport: natter_proto::api::TransportKind::Sse,
        ..ConnectRequest::from_parts(bot_id, query, &headers, Some(remote))
    };
    let (tx, rx) = mpsc::channel::<Bytes>(BODY_CHUNKS);
    let gone = tx.clone();
    let transport = SseTransport {
        body: PollSender::new(tx),
        gone: Some(Box::pin(async move { gone.closed().await })),
        announced: false,
    };
    state.tasks.spawn(crate::chat::run(state.clone(), transport, req, Uuid::new_v4()));
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    }));
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-transform"));
    // nginx buffers a response unless told not to: the events would wait in it.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// An event stream as the session core's transport.
pub struct SseTransport {
    body: PollSender<Bytes>,
    /// Resolves when the client went away (the HTTP body was dropped); `None` once it has, so
    /// it is not polled again.
    gone: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The `stream` event (where to POST) was sent.
    announced: bool,
}

/// What the transport reads of a frame it writes: its type, its seq if it has one, and for
/// `connection_established` where its POSTs go.
#[derive(Deserialize)]
struct Peek {
    #[serde(rename = "type")]
    kind: String,
    message: Option<PeekMessage>,
    connection_id: Option<Uuid>,
    bot: Option<PeekBot>,
}

#[derive(Deserialize)]
struct PeekMessage {
    seq: i64,
}

#[derive(Deserialize)]
struct PeekBot {
    id: Uuid,
}

/// One event: `event:`, `id:` when there is one, the data on one line (serialized JSON has no
/// raw newline), and the blank line that ends it.
fn event(name: &str, id: Option<i64>, data: &str) -> String {
    let id = id.map(|id| format!("id: {id}\n")).unwrap_or_default();
    format!("event: {name}\n{id}data: {data}\n\n")
}

impl SseTransport {
    fn encode(&mut self, out: Out) -> String {
        let json = match out {
            Out::Ping => return ": keep-alive\n\n".to_owned(),
            Out::Close(Close { code, reason }) => {
                let data = serde_json::json!({ "code": code.code(), "name": code.name(), "reason": reason });
                return event("close", None, &data.to_string());
            }
            Out::Text(json) => json,
        };
        let Ok(peek) = serde_json::from_str::<Peek>(&json) else { return event("message", None, &json) };
        let mut e = event(&peek.kind, peek.message.map(|m| m.seq), &json);
        if let (Some(conn), Some(bot), false) = (peek.connection_id, peek.bot, self.announced) {
            // Where the client's frames go, right after the first frame.
            self.announced = true;
            let post = format!("/api/sse/chat/{}/frames?stream={conn}", bot.id);
            e.push_str(&event("stream", None, &serde_json::json!({ "connection_id": conn, "post": post }).to_string()));
        }
        e
    }
}

impl Transport for SseTransport {
    type Text = String;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Inbound<String>, End>> {
        // The session may ask again after the end (`Conn::buffered_close`): it stays ended.
        if let Some(gone) = &mut self.gone {
            std::task::ready!(gone.as_mut().poll(cx));
            self.gone = None;
        }
        Poll::Ready(Err(End::Network("the client closed the event stream".into())))
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        self.body.poll_reserve(cx).map_err(|_| WriteFailed)
    }

    fn start_send(&mut self, out: Out) -> Result<(), WriteFailed> {
        let chunk = Bytes::from(self.encode(out));
        self.body.send_item(chunk).map_err(|_| WriteFailed)
    }

    fn poll_flush(&mut self, _: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        // Each event is a chunk of its own; hyper writes it as soon as it has it.
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The session asks again after the end (`Conn::buffered_close` after a failed write): a
    /// stream whose client left stays ended, and its future is not polled again.
    #[tokio::test]
    async fn a_stream_whose_client_left_stays_ended() {
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let gone = tx.clone();
        let mut t = SseTransport {
            body: PollSender::new(tx),
            gone: Some(Box::pin(async move { gone.closed().await })),
            announced: false,
        };
        drop(rx);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..2 {
            assert!(matches!(t.poll_recv(&mut cx), Poll::Ready(Err(End::Network(_)))));
        }
    }

    #[test]
    fn events_carry_their_type_and_seq() {
        assert_eq!(event("ack", Some(7), "{}"), "event: ack\nid: 7\ndata: {}\n\n");
        assert_eq!(event("pong", None, "{}"), "event: pong\ndata: {}\n\n");
    }
}
