//! The bench's SSE client (`--transport sse`), as a client that fell back to HTTP streaming
//! does: the event stream (`GET /api/sse/chat/{bot}`) on one HTTP/1.1 connection, and the
//! client's frames by `POST …/frames?stream=` on a second, kept alive, opened at the first
//! POST (from the same source address). A POST's answer (the ack, an error, the pong) is the
//! connection's next frame; the stream's echo of this client's own acked message is skipped,
//! so a chat round trip reads as on a WebSocket: ack, then the bot's reply.

use std::collections::VecDeque;
use std::time::Duration;

use super::conn::{self, Failure, Frame, Ident, Target};
use crate::sse_events::{self, CloseEvent, Event, StreamEvent};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;

type Sender = SendRequest<Full<Bytes>>;

/// One SSE chat connection.
pub struct SseConn {
    /// The stream's connection; held so that it stays open.
    _get: Sender,
    body: Incoming,
    buf: Vec<u8>,
    /// The POST connection, once there was a POST.
    post: Option<Sender>,
    /// `/api/sse/chat/{bot}/frames?stream=…`, from the `stream` event.
    post_path: String,
    target: Target,
    /// Which connection this is (its source address).
    i: usize,
    bearer: String,
    /// POST answers not read yet: the next frames.
    answers: VecDeque<Frame>,
    /// Seqs of this client's acked messages whose echo on the stream is still to come.
    echoes: Vec<i64>,
    heartbeat: Duration,
    pings: u64,
}

fn request(method: &str, path: &str, target: &Target) -> hyper::http::request::Builder {
    Request::builder().method(method).uri(path).header(HOST, &target.authority)
}

/// An HTTP/1.1 connection for connection `i`; its driver runs as a task until it closes.
async fn connect(target: &Target, i: usize) -> Result<Sender, Failure> {
    let tcp = conn::tcp(target, i).await?;
    let (sender, driver) =
        http1::handshake(TokioIo::new(tcp)).await.map_err(|e| Failure::Handshake(format!("http: {e}")))?;
    tokio::spawn(driver);
    Ok(sender)
}

impl SseConn {
    /// Opens the stream and reads `connection_established` and the `stream` event; returns the
    /// conversation's `last_seq`.
    pub async fn open(
        target: &Target,
        i: usize,
        ident: &Ident,
        after_seq: Option<i64>,
    ) -> Result<(SseConn, i64), Failure> {
        let mut get = connect(target, i).await?;
        let mut path = format!("/api/sse/chat/{}?token={}", ident.bot_id, ident.token);
        if let Some(s) = after_seq {
            path.push_str(&format!("&after_seq={s}"));
        }
        let req = request("GET", &path, target)
            .header(ACCEPT, "text/event-stream")
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        let res = get.send_request(req).await.map_err(|e| Failure::Handshake(format!("http: {e}")))?;
        if res.status() != 200 {
            return Err(Failure::Handshake(format!("HTTP {}", res.status().as_u16())));
        }
        let mut c = SseConn {
            _get: get,
            body: res.into_body(),
            buf: Vec::with_capacity(1024),
            post: None,
            post_path: String::new(),
            target: target.clone(),
            i,
            bearer: format!("Bearer {}", ident.token),
            answers: VecDeque::new(),
            echoes: Vec::new(),
            heartbeat: Duration::from_secs(25),
            pings: 0,
        };
        let last_seq = match c.next_frame().await? {
            Frame::ConnectionEstablished { last_seq, heartbeat_interval_ms } => {
                if let Some(ms) = heartbeat_interval_ms {
                    c.heartbeat = Duration::from_millis(ms.max(100));
                }
                last_seq
            }
            other => {
                return Err(Failure::Wrong(format!(
                    "expected connection_established, got {}",
                    conn::frame_name(&other)
                )))
            }
        };
        let stream = c.event().await?;
        match serde_json::from_slice::<StreamEvent>(&stream.data) {
            Ok(s) if stream.name == "stream" => c.post_path = s.post,
            _ => return Err(Failure::Wrong(format!("expected the stream event, got {:?}", stream.name))),
        }
        Ok((c, last_seq))
    }

    /// The next event of the stream; a `close` event is the end, with its code.
    async fn event(&mut self) -> Result<Event, Failure> {
        loop {
            if let Some(e) = sse_events::take(&mut self.buf) {
                if e.name == "close" {
                    let code = serde_json::from_slice::<CloseEvent>(&e.data).ok().map(|c| c.code);
                    return Err(Failure::Closed(code));
                }
                return Ok(e);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(bytes) = frame.into_data() {
                        self.buf.extend_from_slice(&bytes);
                    }
                }
                Some(Err(_)) | None => return Err(Failure::Closed(None)),
            }
        }
    }

    pub async fn next_frame(&mut self) -> Result<Frame, Failure> {
        if let Some(f) = self.answers.pop_front() {
            return Ok(f);
        }
        loop {
            let e = self.event().await?;
            let f = serde_json::from_slice::<Frame>(&e.data)
                .map_err(|err| Failure::Wrong(format!("undecodable {} event: {err}", e.name)))?;
            if let Frame::Message { message } = &f {
                if let Some(k) = self.echoes.iter().position(|&s| s == message.seq && message.role == "user") {
                    self.echoes.swap_remove(k);
                    continue;
                }
            }
            return Ok(f);
        }
    }

    /// POSTs a client frame; returns the frame it was answered with.
    async fn post(&mut self, body: String) -> Result<Frame, Failure> {
        // A kept-alive connection the server closed meanwhile is opened again, once.
        for attempt in 0..2 {
            let sender = match &mut self.post {
                Some(s) if !s.is_closed() => s,
                _ => self.post.insert(connect(&self.target, self.i).await?),
            };
            let req = request("POST", &self.post_path, &self.target)
                .header(AUTHORIZATION, &self.bearer)
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.clone())))
                .expect("a valid request");
            let res = match sender.send_request(req).await {
                Ok(res) => res,
                Err(e) if attempt == 0 && (e.is_canceled() || e.is_closed()) => {
                    self.post = None;
                    continue;
                }
                Err(e) => return Err(Failure::Post(format!("http: {e}"))),
            };
            let status = res.status().as_u16();
            let bytes = res.into_body().collect().await.map_err(|e| Failure::Post(format!("http: {e}")))?.to_bytes();
            if status != 200 {
                return Err(Failure::Post(format!("HTTP {status}")));
            }
            return serde_json::from_slice::<Frame>(&bytes)
                .map_err(|e| Failure::Wrong(format!("undecodable POST answer: {e}")));
        }
        Err(Failure::Post("the connection closed twice".into()))
    }

    /// Sends a message by POST; its answer is the next frame, and an ack's echo on the stream
    /// is skipped.
    pub async fn send_message(&mut self, frame: String) -> Result<(), Failure> {
        let answer = self.post(frame).await?;
        if let Frame::Ack { message, duplicate: false, .. } = &answer {
            self.echoes.push(message.seq);
        }
        self.answers.push_back(answer);
        Ok(())
    }

    /// An idle connection: a ping by POST each heartbeat (the server closes a stream that
    /// hears nothing for two), until something arrives on the stream.
    pub async fn hold(&mut self) -> Result<Frame, Failure> {
        loop {
            let heartbeat = tokio::time::sleep(self.heartbeat);
            tokio::select! {
                f = self.next_frame() => return f,
                _ = heartbeat => {
                    self.pings += 1;
                    let ping = serde_json::json!({"type": "ping", "id": self.pings}).to_string();
                    match self.post(ping).await? {
                        Frame::Pong {} => {}
                        other => return Ok(other),
                    }
                }
            }
        }
    }
}
