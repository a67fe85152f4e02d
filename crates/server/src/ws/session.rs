//! One chat connection, from accepted upgrade to close.
//!
//! Two tasks per socket: this session task reads client frames, bus events and timers and
//! decides what to send; a writer task drains a bounded queue into the socket. A client that
//! stops reading fills the queue and is closed with 4409 instead of growing memory.
//!
//! Delivery invariant: `delivered` is the highest seq this connection has been sent, and
//! every seq below it has been sent too, exactly once. Any gap (bus lag, events published
//! out of order by different writers) is filled from the store, which holds every message
//! before it is announced.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use natter_proto::api::{BotRef, ClosedBy, ConnectionRecord};
use natter_proto::frames::Limits as WireLimits;
use natter_proto::{ClientFrame, CloseCode, ErrorCode, MessageRole, MessageStatus, ServerFrame, WireMessage};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::hub::{Full, HubGuard};
use super::{admit, close_reason, Admitted, ConnectRequest, Mode};
use crate::app::AppState;
use crate::bus::{ConvEvent, Received, Subscription};
use crate::metrics::{DirectionLabel, OutcomeLabel};
use crate::store::NewMessage;

/// Messages read from the store per query while catching up.
const CATCH_UP_PAGE: u32 = 500;
/// How long a closing socket waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How long a full outbound queue may stay full before the client counts as a slow consumer.
const SLOW_CONSUMER_WAIT: Duration = Duration::from_secs(5);
/// How long a closing socket waits for its close frame to be written.
const CLOSE_WRITE_WAIT: Duration = Duration::from_secs(10);

/// A frame for the writer.
enum Out {
    /// A JSON text frame (a `String` turns into the frame's bytes without a copy).
    Text(String),
    Ping,
    Close(u16, String),
}

/// What the outbound queue carries: one pointer. tokio allocates a queue's slots 32 at a time,
/// the first 32 with the queue: 32 × 8 bytes rather than 32 × 40 (~1 KiB less per idle
/// socket), for one small allocation per frame.
type Queued = Box<Out>;

/// Why the session loop ended.
#[derive(Debug)]
enum End {
    /// The server closes with this code and reason.
    Close(CloseCode, String),
    /// The client sent a close frame (with its code, if any).
    ClientClosed(Option<u16>),
    /// The socket broke without a close frame.
    Network(String),
}

struct Writer {
    tx: mpsc::Sender<Queued>,
    urgent: Option<oneshot::Sender<(u16, String)>>,
    /// Ends with the number of frames it never wrote.
    task: tokio::task::JoinHandle<usize>,
}

/// At most this many queued frames are written with one flush (the urgent close is checked
/// between batches).
const WRITE_BATCH: usize = 32;

/// The WebSocket message for a queued frame, and whether it is the last (a close).
fn frame_of(out: Out) -> (Message, bool) {
    match out {
        Out::Text(t) => (Message::Text(t.into()), false),
        Out::Ping => (Message::Ping(Default::default()), false),
        Out::Close(code, reason) => (Message::Close(Some(CloseFrame { code, reason: reason.into() })), true),
    }
}

impl Writer {
    fn spawn(mut sink: SplitSink<WebSocket, Message>, queue: usize) -> Self {
        let (tx, mut rx) = mpsc::channel::<Queued>(queue);
        let (urgent_tx, mut urgent_rx) = oneshot::channel::<(u16, String)>();
        let task = tokio::spawn(async move {
            loop {
                let out = tokio::select! {
                    biased;
                    urgent = &mut urgent_rx => match urgent {
                        Ok((code, reason)) => Box::new(Out::Close(code, reason)),
                        Err(_) => match rx.recv().await { Some(o) => o, None => break },
                    },
                    out = rx.recv() => match out { Some(o) => o, None => break },
                };
                let (msg, mut last) = frame_of(*out);
                if sink.feed(msg).await.is_err() {
                    break;
                }
                // What else is queued already (an ack's bot reply, a replay) goes out in the
                // same write: one syscall instead of one per frame.
                let mut broken = false;
                for _ in 1..WRITE_BATCH {
                    if last {
                        break;
                    }
                    let Ok(out) = rx.try_recv() else { break };
                    let (msg, close) = frame_of(*out);
                    last = close;
                    if sink.feed(msg).await.is_err() {
                        broken = true;
                        break;
                    }
                }
                if broken || sink.flush().await.is_err() || last {
                    break;
                }
            }
            rx.len()
        });
        Writer { tx, urgent: Some(urgent_tx), task }
    }

    /// Queues a close after everything already queued; jumps the queue if it is full.
    async fn close(&mut self, code: u16, reason: String, urgent: bool) {
        if !urgent {
            match tokio::time::timeout(Duration::from_secs(1), self.tx.send(Box::new(Out::Close(code, reason.clone()))))
                .await
            {
                Ok(Ok(())) => return,
                Ok(Err(_)) => return, // writer gone: the socket is already broken
                Err(_) => {}
            }
        }
        if let Some(u) = self.urgent.take() {
            let _ = u.send((code, reason));
        }
    }
}

/// Runs one accepted socket to its end.
///
/// A socket spends its life waiting in [`Session::run`], and a future is as large as its largest
/// state, so everything before and after that loop (admission, the close) runs in futures of
/// their own on the heap, which exist only while they run. Not an `async fn` either: that
/// would keep its arguments (the socket, the request) for the socket's whole life. See
/// `idle_socket_futures_stay_small`.
pub fn run(state: AppState, socket: WebSocket, req: ConnectRequest) -> impl Future<Output = ()> + Send {
    let connection_id = Uuid::new_v4();
    let span = tracing::info_span!("ws", %connection_id, bot_id = %req.bot_id, user_id = tracing::field::Empty);
    let open = Box::pin(open(state, socket, req, connection_id));
    async move {
        let Some(mut live) = open.await else { return };
        let end = live.session.run(&mut live.stream).await;
        Box::pin(live.close(end)).await
    }
    .instrument(span)
}

/// An established connection, between its admission and its close.
struct Live {
    state: AppState,
    started: Instant,
    rec: ConnectionRecord,
    writer: Writer,
    stream: SplitStream<WebSocket>,
    slot: HubGuard,
    session: Session,
}

/// Admits the socket and starts its session; `None` if it was refused (and is closed).
async fn open(state: AppState, socket: WebSocket, req: ConnectRequest, connection_id: Uuid) -> Option<Live> {
    let started = Instant::now();
    let mut rec = ConnectionRecord {
        attempt_id: req.attempt_id.as_deref().and_then(|a| Uuid::parse_str(a).ok()).unwrap_or(connection_id),
        connection_id,
        user_id: None,
        bot_id: Uuid::parse_str(&req.bot_id).ok(),
        remote_addr: req.remote.map(|r| r.to_string()),
        user_agent: req.user_agent.clone(),
        origin: req.origin.clone(),
        upgrade: req.upgrade.clone(),
        connection: req.connection.clone(),
        sec_websocket_version: req.ws_version.clone(),
        forwarded_for: req.forwarded_for.clone(),
        started_at: chrono::Utc::now(),
        established: false,
        ended_at: None,
        close_code: None,
        close_reason: None,
        closed_by: None,
        msgs_in: 0,
        msgs_out: 0,
        bytes_in: 0,
        bytes_out: 0,
    };
    let (sink, mut stream) = socket.split();
    let writer = Writer::spawn(sink, state.config.limits.outbound_queue);
    let metrics = &state.metrics;

    let refused = |rec: &mut ConnectionRecord, code: CloseCode, reason: &str| {
        tracing::info!(close_code = code.code(), close_reason = %reason, remote = ?req.remote, "connection refused");
        metrics.attempts.get_or_create(&OutcomeLabel { outcome: "refused" }).inc();
        rec.close_code = Some(code.code());
        rec.close_reason = Some(close_reason(reason));
        rec.closed_by = Some(ClosedBy::Server);
    };

    let admitted = match admit(&state, &req, Mode::Connect).await {
        Ok(a) => a,
        Err(refusal) => {
            if let Some(u) = refusal.user_id {
                tracing::Span::current().record("user_id", tracing::field::display(u));
            }
            // An attempt is its user's as soon as its credentials name them, whatever failed.
            rec.user_id = refusal.user_id.or_else(|| {
                let token = req.token.as_deref()?;
                state.keys.identify(token)
            });
            refused(&mut rec, refusal.code, &refusal.reason);
            conclude(&state, rec, Some(refusal.code.code()), "server");
            let dropped = finish(writer, &mut stream, End::Close(refusal.code, refusal.reason)).await;
            state.metrics.frames_dropped.inc_by(dropped as u64);
            return None;
        }
    };
    tracing::Span::current().record("user_id", tracing::field::display(admitted.user.id));
    rec.user_id = Some(admitted.user.id);

    let limits = &state.config.limits;
    let slot = match state.hub.try_register(
        connection_id,
        admitted.user.id,
        admitted.bot.id,
        limits.max_connections_per_user,
        limits.max_connections,
    ) {
        Ok(slot) => slot,
        Err(full) => {
            let (code, reason) = match full {
                Full::User => (
                    CloseCode::TooManyConnections,
                    format!("this user already has {} open connections", limits.max_connections_per_user),
                ),
                Full::Server => (
                    CloseCode::TryAgainLater,
                    format!("server is at its connection limit; retry_after_ms={}", super::OVERLOAD_RETRY_MS),
                ),
            };
            refused(&mut rec, code, &reason);
            conclude(&state, rec, Some(code.code()), "server");
            let dropped = finish(writer, &mut stream, End::Close(code, reason)).await;
            state.metrics.frames_dropped.inc_by(dropped as u64);
            return None;
        }
    };

    let session = match Session::start(&state, admitted, connection_id, &writer).await {
        Ok(s) => s,
        Err(end) => {
            drop(slot);
            let (code, reason, by) = end.describe();
            if let Some(c) = code.and_then(CloseCode::from_code) {
                refused(&mut rec, c, &reason);
            }
            conclude(&state, rec, code, by);
            let dropped = finish(writer, &mut stream, end).await;
            state.metrics.frames_dropped.inc_by(dropped as u64);
            return None;
        }
    };
    metrics.attempts.get_or_create(&OutcomeLabel { outcome: "established" }).inc();
    metrics.handshake_seconds.observe(started.elapsed().as_secs_f64());
    metrics.connections_active.inc();
    rec.established = true;
    // Visible in the ledger while it is open, not only once it has ended.
    state.ledger.record(rec.clone());
    tracing::info!(remote = ?req.remote, resume_from = ?session.admitted.after_seq, "connection established");
    Some(Live { state, started, rec, writer, stream, slot, session })
}

impl Live {
    /// Ends an established connection: hub, ledger, metrics, close handshake.
    async fn close(self, end: End) {
        let Live { state, started, mut rec, writer, mut stream, slot, mut session } = self;
        let metrics = &state.metrics;
        let c = session.counters;
        if let Some(slot) = session.shared_slot.take() {
            state.cluster.release(slot).await;
        }
        drop(session);
        // The connection is over for the hub now, even while its close frame is on its way.
        drop(slot);
        metrics.connections_active.dec();
        let (code, reason, closed_by) = end.describe();
        (rec.msgs_in, rec.msgs_out, rec.bytes_in, rec.bytes_out) = (c.msgs_in, c.msgs_out, c.bytes_in, c.bytes_out);
        rec.close_code = code;
        rec.close_reason = Some(close_reason(&reason));
        rec.closed_by = ClosedBy::parse(closed_by);
        conclude(&state, rec, code, closed_by);
        let dropped = finish(writer, &mut stream, end).await;
        state.metrics.frames_dropped.inc_by(dropped as u64);
        tracing::info!(
            duration_ms = started.elapsed().as_millis() as u64,
            close_code = ?code,
            close_reason = %reason,
            closed_by,
            msgs_in = c.msgs_in,
            msgs_out = c.msgs_out,
            "connection closed"
        );
    }
}

/// The last word on an attempt, as soon as its end is decided (before the close handshake,
/// which can take seconds with a slow client): its ledger row and the close metrics.
fn conclude(state: &AppState, mut rec: ConnectionRecord, code: Option<u16>, initiator: &'static str) {
    rec.ended_at = Some(chrono::Utc::now());
    state.metrics.close(code, initiator);
    state.ledger.record(rec);
}

impl End {
    /// (close code, reason, who closed) for logs, ledger and metrics.
    fn describe(&self) -> (Option<u16>, String, &'static str) {
        match self {
            End::Close(c, r) => (Some(c.code()), r.clone(), "server"),
            End::ClientClosed(c) => (*c, String::new(), "client"),
            End::Network(e) => (None, e.clone(), "network"),
        }
    }
}

/// Sends the close (if the server is the one closing) and waits for it to be written — a
/// slow client first has to read what is already buffered — then waits briefly for the
/// client's answer, so the close frame is not lost to a TCP reset. Returns how many queued
/// frames were never written.
async fn finish(mut writer: Writer, stream: &mut SplitStream<WebSocket>, end: End) -> usize {
    match &end {
        End::Close(code, reason) => {
            let urgent = *code == CloseCode::SlowConsumer;
            writer.close(code.code(), close_reason(reason), urgent).await;
            let dropped = match tokio::time::timeout(CLOSE_WRITE_WAIT, &mut writer.task).await {
                Ok(r) => r.unwrap_or(0),
                Err(_) => {
                    tracing::debug!("close frame not written in time; dropping the socket");
                    writer.task.abort();
                    return writer.tx.max_capacity() - writer.tx.capacity();
                }
            };
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                while let Some(Ok(msg)) = stream.next().await {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
            dropped
        }
        End::ClientClosed(_) => {
            // Reading on lets the WebSocket layer send its reply to the client's close.
            let _ = tokio::time::timeout(CLOSE_WAIT, stream.next()).await;
            drop(writer.tx);
            tokio::time::timeout(CLOSE_WAIT, &mut writer.task).await.ok().and_then(Result::ok).unwrap_or(0)
        }
        End::Network(_) => {
            writer.task.abort();
            writer.tx.max_capacity() - writer.tx.capacity()
        }
    }
}

/// What a session counted, for the ledger.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    msgs_in: u64,
    msgs_out: u64,
    bytes_in: u64,
    bytes_out: u64,
}

struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        TokenBucket { tokens: burst as f64, rate: rate as f64, burst: burst as f64, last: Instant::now() }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

struct Session {
    state: AppState,
    admitted: Admitted,
    out: mpsc::Sender<Queued>,
    sub: Subscription,
    /// This socket's place in the per-user count shared by every node.
    shared_slot: Option<crate::cluster::Slot>,
    /// Highest seq sent; every seq below it has been sent too.
    delivered: i64,
    bucket: TokenBucket,
    /// Bot replies being streamed to this socket.
    streams: HashMap<Uuid, Stream>,
    /// The latest bot replies delivered whole, so a late delta for them is ignored.
    finished: VecDeque<Uuid>,
    counters: Counters,
}

/// One bot reply being streamed to this socket.
struct Stream {
    in_reply_to: Uuid,
    /// Bytes of the reply's text this socket has been sent or has waiting in `pending`.
    have: usize,
    /// Text not yet sent because the outbound queue was full: it goes out as one coalesced
    /// delta when there is room, so a slow reader gets fewer, larger frames instead of a close.
    pending: String,
}

/// How many finished replies a socket remembers.
const FINISHED_MEMORY: usize = 64;
/// How often coalesced deltas are retried while the queue is full.
const DELTA_FLUSH_EVERY: Duration = Duration::from_millis(50);

impl Session {
    async fn start(
        state: &AppState,
        mut admitted: Admitted,
        connection_id: Uuid,
        writer: &Writer,
    ) -> Result<Session, End> {
        let conv_id = admitted.conversation.id;
        // Parsed into `admitted.engine`; the socket has no use for the JSON (~0.6 KiB).
        admitted.bot.engine = serde_json::Value::Null;
        // The per-user limit across every node (the hub counts this node's sockets only).
        let max = state.config.limits.max_connections_per_user;
        let shared_slot =
            state.cluster.claim_slot(connection_id, admitted.user.id, max).await.map_err(|(c, r)| End::Close(c, r))?;
        // Subscribe before reading last_seq: whatever is committed after this is on the bus.
        let sub = state.bus.subscribe(conv_id).await.map_err(|e| {
            tracing::warn!(error = %e, "bus unavailable");
            End::Close(CloseCode::TryAgainLater, "message bus unavailable; retry_after_ms=5000".into())
        })?;
        let last_seq = state
            .store
            .conversation(admitted.user.id, admitted.bot.id)
            .await
            .map_err(|e| internal_end("reading the conversation", e))?
            .last_seq;
        let limits = &state.config.limits;
        let mut session = Session {
            state: state.clone(),
            delivered: admitted.after_seq.unwrap_or(last_seq),
            out: writer.tx.clone(),
            sub,
            shared_slot: Some(shared_slot),
            bucket: TokenBucket::new(limits.messages_per_second, limits.message_burst),
            streams: HashMap::new(),
            finished: VecDeque::new(),
            counters: Counters::default(),
            admitted,
        };
        session
            .send(&ServerFrame::ConnectionEstablished {
                connection_id,
                protocol_version: natter_proto::PROTOCOL_VERSION,
                user: session.admitted.user.clone(),
                bot: BotRef { id: session.admitted.bot.id, name: session.admitted.bot.name.clone() },
                conversation_id: conv_id,
                last_seq,
                heartbeat_interval_ms: state.config.heartbeat_interval.as_millis() as u64,
                server_time: chrono::Utc::now(),
                limits: WireLimits {
                    max_frame_bytes: limits.max_frame_bytes,
                    max_content_chars: limits.max_content_chars,
                    max_connections_per_user: limits.max_connections_per_user,
                    messages_per_second: limits.messages_per_second,
                    message_burst: limits.message_burst,
                },
            })
            .await?;
        if session.admitted.after_seq.is_some() {
            session.fill_to(i64::MAX).await?;
        }
        // Replies being generated right now: what exists so far, then the rest live.
        for p in state.replier.in_progress(conv_id) {
            if p.text.is_empty() || session.finished.contains(&p.message_id) {
                continue;
            }
            let have = p.text.len();
            session.streams.insert(p.message_id, Stream { in_reply_to: p.in_reply_to, have, pending: p.text });
        }
        session.flush_deltas()?;
        Ok(session)
    }

    async fn run(&mut self, stream: &mut SplitStream<WebSocket>) -> End {
        let heartbeat = self.state.config.heartbeat_interval;
        let shutdown = self.state.shutdown.clone();
        let cluster = self.state.cluster.clone();
        let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let idle = tokio::time::sleep(heartbeat * 2);
        tokio::pin!(idle);
        let mut flush = tokio::time::interval(DELTA_FLUSH_EVERY);
        loop {
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Err(End::Close(CloseCode::ServiceRestart, "server restarting; reconnect with backoff".into())),
                reason = cluster.lost() => Err(End::Close(CloseCode::TryAgainLater, reason)),
                frame = stream.next() => {
                    idle.as_mut().reset(Instant::now() + heartbeat * 2);
                    Box::pin(self.on_frame(frame)).await
                }
                event = self.sub.recv() => Box::pin(self.on_event(event)).await,
                _ = ping.tick() => Box::pin(self.push(Out::Ping)).await,
                _ = flush.tick(), if self.streams.values().any(|s| !s.pending.is_empty()) => self.flush_deltas(),
                _ = &mut idle => Err(End::Close(
                    CloseCode::HeartbeatTimeout,
                    format!("no traffic from the client for {} ms", (heartbeat * 2).as_millis()),
                )),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Queues a frame for the writer. A full queue gets [`SLOW_CONSUMER_WAIT`] to make room
    /// (a burst or a replay is fine); a client that reads nothing in that time is closed 4409.
    async fn push(&mut self, out: Out) -> Result<(), End> {
        self.state.metrics.outbound_queue_depth.observe((self.out.max_capacity() - self.out.capacity()) as f64);
        let out = match self.out.try_send(Box::new(out)) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::Network("socket write failed".into())),
            Err(mpsc::error::TrySendError::Full(out)) => out,
        };
        match tokio::time::timeout(SLOW_CONSUMER_WAIT, self.out.send(out)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Network("socket write failed".into())),
            Err(_) => Err(End::Close(
                CloseCode::SlowConsumer,
                "outbound queue full: the client is not reading; reconnect with after_seq".into(),
            )),
        }
    }

    async fn send(&mut self, frame: &ServerFrame) -> Result<(), End> {
        let json = frame.to_json();
        self.counters.msgs_out += 1;
        self.counters.bytes_out += json.len() as u64;
        if matches!(frame, ServerFrame::Message { .. }) {
            self.state.metrics.messages.get_or_create(&DirectionLabel { direction: "out" }).inc();
        }
        self.push(Out::Text(json)).await
    }

    /// Sends every stored message with `delivered < seq <= upto`.
    async fn fill_to(&mut self, upto: i64) -> Result<(), End> {
        let conv = self.admitted.conversation.id;
        while self.delivered < upto {
            let page = self
                .state
                .store
                .messages_after(conv, self.delivered, CATCH_UP_PAGE)
                .await
                .map_err(|e| internal_end("catching up from the store", e))?;
            let full = page.len() == CATCH_UP_PAGE as usize;
            for m in page.into_iter().take_while(|m| m.seq <= upto) {
                self.delivered = m.seq;
                self.send_message(m).await?;
            }
            if !full {
                break;
            }
        }
        Ok(())
    }

    async fn deliver(&mut self, m: &WireMessage) -> Result<(), End> {
        if m.seq <= self.delivered {
            return Ok(());
        }
        self.fill_to(m.seq - 1).await?;
        self.delivered = m.seq;
        self.send_message(m.clone()).await
    }

    async fn send_message(&mut self, m: WireMessage) -> Result<(), End> {
        if m.role == MessageRole::Bot {
            // The whole reply supersedes whatever deltas of it are still pending.
            self.streams.remove(&m.id);
            if self.finished.len() == FINISHED_MEMORY {
                self.finished.pop_front();
            }
            self.finished.push_back(m.id);
        }
        self.send(&ServerFrame::Message { message: m }).await
    }

    /// Takes a piece of a streamed reply, dropping what this socket already has and filling
    /// what it missed (a lagging bus) from the reply's text so far.
    fn on_delta(&mut self, message_id: Uuid, in_reply_to: Uuid, offset: usize, delta: &str) -> Result<(), End> {
        if self.finished.contains(&message_id) {
            return Ok(());
        }
        let stream = self.streams.entry(message_id).or_insert(Stream { in_reply_to, have: 0, pending: String::new() });
        let end = offset + delta.len();
        if end <= stream.have {
            return Ok(());
        }
        if offset > stream.have {
            match self.state.replier.text_so_far(message_id) {
                Some(text) if text.len() >= end && text.is_char_boundary(stream.have) && text.is_char_boundary(end) => {
                    stream.pending.push_str(&text[stream.have..end]);
                }
                // The reply is already over; its final message is on the way.
                _ => return Ok(()),
            }
        } else if delta.is_char_boundary(stream.have - offset) {
            stream.pending.push_str(&delta[stream.have - offset..]);
        } else {
            return Ok(());
        }
        stream.have = end;
        self.flush_deltas()
    }

    /// Sends pending deltas while the queue has room; what does not fit waits, coalesced.
    fn flush_deltas(&mut self) -> Result<(), End> {
        for (id, stream) in self.streams.iter_mut() {
            if stream.pending.is_empty() {
                continue;
            }
            let frame = ServerFrame::MessageDelta {
                message_id: *id,
                in_reply_to: stream.in_reply_to,
                delta: std::mem::take(&mut stream.pending),
            };
            let json = frame.to_json();
            let len = json.len() as u64;
            match self.out.try_send(Box::new(Out::Text(json))) {
                Ok(()) => {
                    self.counters.msgs_out += 1;
                    self.counters.bytes_out += len;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let ServerFrame::MessageDelta { delta, .. } = frame else { unreachable!() };
                    stream.pending = delta;
                    self.state.metrics.deltas_coalesced.inc();
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::Network("socket write failed".into())),
            }
        }
        Ok(())
    }

    async fn on_event(&mut self, event: Received) -> Result<(), End> {
        match event {
            Received::Event(e) => match &*e {
                ConvEvent::Message(m) => self.deliver(m).await,
                ConvEvent::Delta { message_id, in_reply_to, offset, delta } => {
                    self.on_delta(*message_id, *in_reply_to, *offset, delta)
                }
                ConvEvent::BotChanged => self.recheck_bot().await,
                // For the node generating that reply (its `Replier`), not for sockets.
                ConvEvent::Cancel { .. } => Ok(()),
                ConvEvent::BotError { code, message, in_reply_to } => {
                    self.send(&ServerFrame::Error {
                        code: *code,
                        message: message.clone(),
                        client_id: None,
                        in_reply_to: Some(*in_reply_to),
                        retry_after_ms: None,
                    })
                    .await
                }
            },
            Received::Lagged(n) => {
                tracing::debug!(missed = n, "bus lagged; catching up from the store");
                self.fill_to(i64::MAX).await
            }
            Received::Closed => {
                Err(End::Close(CloseCode::ServiceRestart, "server restarting; reconnect with backoff".into()))
            }
        }
    }

    /// The bot changed: is this socket still allowed, and with which engine?
    async fn recheck_bot(&mut self) -> Result<(), End> {
        let store = &self.state.store;
        let bot = match store.bot(self.admitted.bot.id).await.map_err(|e| internal_end("re-reading the bot", e))? {
            Some(b) => b,
            None => return Err(End::Close(CloseCode::BotNotFound, "this bot was deleted".into())),
        };
        let role =
            store.bot_role(&bot, self.admitted.user.id).await.map_err(|e| internal_end("re-reading access", e))?;
        if role.is_none() {
            return Err(End::Close(CloseCode::Forbidden, "access to this bot was revoked".into()));
        }
        match crate::bots::EngineSpec::parse(&bot.engine) {
            Ok(engine) => self.admitted.engine = engine,
            Err(e) => return Err(internal_end("reloading the bot's engine", e.message)),
        }
        self.admitted.bot = crate::store::Bot { engine: serde_json::Value::Null, ..bot };
        Ok(())
    }

    async fn on_frame(&mut self, frame: Option<Result<Message, axum::Error>>) -> Result<(), End> {
        let msg = match frame {
            None => return Err(End::Network("connection dropped without a close frame".into())),
            Some(Err(e)) => {
                let text = e.to_string();
                // tungstenite's capacity error: "Space limit exceeded: Message too long: …".
                if text.contains("Space limit exceeded") || text.contains("too long") {
                    return Err(End::Close(
                        CloseCode::FrameTooLarge,
                        format!("frame larger than {} bytes", self.state.config.limits.max_frame_bytes),
                    ));
                }
                return Err(End::Network(format!("read error: {text}")));
            }
            Some(Ok(m)) => m,
        };
        self.counters.msgs_in += 1;
        self.counters.bytes_in += match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        } as u64;
        match msg {
            Message::Text(t) => match ClientFrame::parse(t.as_str()) {
                Ok(frame) => self.on_client_frame(frame).await,
                Err(e) => self.send(&ServerFrame::error(e.code, e.message)).await,
            },
            Message::Binary(_) => {
                self.send(&ServerFrame::error(
                    ErrorCode::BinaryNotSupported,
                    "binary frames are not part of the protocol; send JSON text frames",
                ))
                .await
            }
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(c) => Err(End::ClientClosed(c.map(|c| c.code))),
        }
    }

    /// Asks the node generating this reply (another one) to stop it. False if no node is.
    async fn cancel_elsewhere(&self, message_id: Uuid) -> bool {
        let conv = self.admitted.conversation.id;
        match self.state.store.generation_in_progress(conv, message_id).await {
            Ok(true) => self.state.bus.publish(conv, ConvEvent::Cancel { message_id }).await.is_ok(),
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, "looking up a reply to cancel failed");
                false
            }
        }
    }

    async fn on_client_frame(&mut self, frame: ClientFrame) -> Result<(), End> {
        match frame {
            ClientFrame::Ping { id } => self.send(&ServerFrame::Pong { id, server_time: chrono::Utc::now() }).await,
            ClientFrame::Cancel { message_id }
                if self.state.replier.cancel(self.admitted.conversation.id, message_id) =>
            {
                Ok(())
            }
            ClientFrame::Cancel { message_id } if self.cancel_elsewhere(message_id).await => Ok(()),
            ClientFrame::Cancel { message_id } => {
                self.send(&ServerFrame::Error {
                    code: ErrorCode::UnknownMessage,
                    message: format!("no reply in progress has message_id {message_id}"),
                    client_id: None,
                    in_reply_to: None,
                    retry_after_ms: None,
                })
                .await
            }
            ClientFrame::Message { client_id, content } => self.on_message(client_id, content).await,
        }
    }

    async fn reject(
        &mut self,
        code: ErrorCode,
        message: String,
        client_id: &str,
        retry_after_ms: Option<u64>,
    ) -> Result<(), End> {
        self.send(&ServerFrame::Error {
            code,
            message,
            client_id: Some(client_id.to_owned()),
            in_reply_to: None,
            retry_after_ms,
        })
        .await
    }

    async fn on_message(&mut self, client_id: String, content: String) -> Result<(), End> {
        let received = Instant::now();
        self.state.metrics.messages.get_or_create(&DirectionLabel { direction: "in" }).inc();
        let limits = &self.state.config.limits;
        let id_len = client_id.chars().count();
        if !(1..=64).contains(&id_len) {
            return self
                .reject(
                    ErrorCode::InvalidClientId,
                    format!("client_id must be 1 to 64 characters, got {id_len}"),
                    &client_id,
                    None,
                )
                .await;
        }
        if content.trim().is_empty() {
            return self.reject(ErrorCode::EmptyContent, "content is empty".into(), &client_id, None).await;
        }
        let chars = content.chars().count();
        if chars > limits.max_content_chars {
            let max = limits.max_content_chars;
            return self
                .reject(
                    ErrorCode::ContentTooLong,
                    format!("content is {chars} characters; the limit is {max}"),
                    &client_id,
                    None,
                )
                .await;
        }
        if let Err(wait) = self.bucket.take() {
            let ms = wait.as_millis() as u64 + 1;
            return self
                .reject(
                    ErrorCode::RateLimited,
                    format!("too many messages; wait {ms} ms before sending again"),
                    &client_id,
                    Some(ms),
                )
                .await;
        }
        let conv = self.admitted.conversation.id;
        let appended = self
            .state
            .store
            .append_message(NewMessage {
                id: Uuid::now_v7(), // time-ordered, as bot replies are (bots::Replier::run)
                conversation_id: conv,
                role: MessageRole::User,
                content,
                client_id: Some(client_id.clone()),
                in_reply_to: None,
                status: MessageStatus::Complete,
            })
            .await
            .map_err(|e| internal_end("storing a message", e))?;
        let seq = appended.message.seq;
        if seq > self.delivered {
            self.fill_to(seq - 1).await?;
            self.delivered = seq;
        }
        self.send(&ServerFrame::Ack { client_id, message: appended.message.clone(), duplicate: appended.duplicate })
            .await?;
        self.state.metrics.ack_seconds.observe(received.elapsed().as_secs_f64());
        if !appended.duplicate {
            let message = appended.message;
            if let Err(e) = self.state.bus.publish(conv, ConvEvent::Message(message.clone())).await {
                tracing::warn!(error = %e, "publishing a message failed; other tabs will catch up on reconnect");
            }
            let bot = &self.admitted.bot;
            self.state.replier.spawn_reply(&self.admitted.engine, bot.id, &bot.name, message, received).await;
        }
        Ok(())
    }
}

fn internal_end(what: &str, e: impl std::fmt::Display) -> End {
    let error_id = Uuid::new_v4();
    tracing::error!(%error_id, error = %e, "{what} failed");
    End::Close(CloseCode::InternalError, format!("internal error (error id {error_id})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_burst_then_rate() {
        let mut b = TokenBucket::new(5, 3);
        for _ in 0..3 {
            assert!(b.take().is_ok());
        }
        let wait = b.take().unwrap_err();
        assert!(wait <= Duration::from_millis(200) && wait > Duration::from_millis(150), "{wait:?}");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(b.take().is_ok());
        assert!(b.take().is_err());
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..3 {
            assert!(b.take().is_ok(), "refills up to the burst, no more");
        }
        assert!(b.take().is_err());
    }

    /// The size of what `f` returns, without calling it.
    fn output_size<A, B, C, R>(_: impl Fn(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Memory per idle socket (issue 10). A socket's task holds its future at the size of its
    /// largest state for the socket's whole life. With admission and the close inline, that
    /// was 7.9 KiB (release; the idle loop itself needs ~1.9: `Live` with the session, and the
    /// loop's `select!`); boxed, the task is what an idle socket needs. 3 KiB leaves room for
    /// compiler versions and debug builds while catching anything big that moves back inline.
    #[test]
    fn idle_socket_futures_stay_small() {
        let task = output_size(run);
        assert!(task <= 3 * 1024, "a socket's future is {task} bytes");
        // The outbound queue allocates 32 slots at a time, the first 32 up front.
        assert_eq!(std::mem::size_of::<Queued>(), std::mem::size_of::<usize>(), "one pointer per queue slot");
    }
}
