//! One chat connection, from accepted upgrade to close.
//!
//! One task per socket: the session reads client frames, bus events and timers, decides what
//! to send, and writes it itself. Frames wait in a bounded queue ([`Conn`]) that the loop
//! hands to the socket when it is writable, up to [`WRITE_BATCH`] frames per flush (one
//! syscall): once the loop has nothing else ready, or at once when [`WRITE_SOON`] frames wait
//! (a steady stream of client frames or bus events does not hold replies back). A client that
//! stops reading fills the queue and, if it stays full for
//! [`SLOW_CONSUMER_WAIT`], is closed with 4409 instead of growing memory.
//!
//! Delivery invariant: `delivered` is the highest seq this connection has been sent, and
//! every seq below it has been sent too, exactly once. Any gap (bus lag, events published
//! out of order by different writers) is filled from the store, which holds every message
//! before it is announced.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use natter_proto::api::{BotRef, ClosedBy, ConnectionRecord, UserRef};
use natter_proto::frames::Limits as WireLimits;
use natter_proto::{ClientFrame, CloseCode, ErrorCode, MessageRole, MessageStatus, ServerFrame, WireMessage};
use tokio::time::{Instant, Sleep};
use tracing::Instrument;
use uuid::Uuid;

use super::hub::{Full, HubGuard, TokenBucket};
use super::{admit, close_reason, Admitted, ConnectRequest, Mode};
use crate::app::AppState;
use crate::bots::EngineSpec;
use crate::bus::{ConvEvent, Received, Subscription};
use crate::ledger::OpenRow;
use crate::logsafe::Untrusted;
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
/// How long a server close waits for room behind the queued frames before it drops them.
const CLOSE_QUEUE_WAIT: Duration = Duration::from_secs(1);

/// A frame waiting for the socket.
enum Out {
    /// A JSON text frame (a `String` turns into the frame's bytes without a copy).
    Text(String),
    Ping,
    Close(u16, String),
}

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

/// At most this many queued frames are written with one flush.
const WRITE_BATCH: usize = 32;

/// With this many frames queued the loop writes before it reads anything else: the bound on
/// how long a busy socket's replies wait (issue 15, item 6).
const WRITE_SOON: usize = 16;

/// The WebSocket message for a queued frame, and whether it is the last (a close).
fn frame_of(out: Out) -> (Message, bool) {
    match out {
        Out::Text(t) => (Message::Text(t.into()), false),
        Out::Ping => (Message::Ping(Default::default()), false),
        Out::Close(code, reason) => (Message::Close(Some(CloseFrame { code, reason: reason.into() })), true),
    }
}

/// What the socket had for the session loop.
enum Io {
    Read(Option<Result<Message, axum::Error>>),
    WriteFailed,
}

/// The socket and the frames waiting for it. Owned by the session: no second task, no
/// channel, no split lock. At most `cap` frames wait here; what is handed to the socket sits
/// in tungstenite's write buffer until it is flushed.
struct Conn {
    ws: WebSocket,
    queue: VecDeque<Out>,
    cap: usize,
    /// Frames were handed to the socket since its last flush.
    unflushed: bool,
    /// A close frame was handed to the socket: nothing is written after it.
    closed: bool,
    /// The last write stopped at a full socket: the loop writes on as soon as it is writable.
    blocked: bool,
}

impl Conn {
    fn new(ws: WebSocket, cap: usize) -> Self {
        Conn { ws, queue: VecDeque::new(), cap: cap.max(1), unflushed: false, closed: false, blocked: false }
    }

    fn is_full(&self) -> bool {
        self.queue.len() >= self.cap
    }

    /// Frames wait to be written or flushed.
    fn has_output(&self) -> bool {
        !self.queue.is_empty() || self.unflushed
    }

    /// Hands queued frames to the socket, [`WRITE_BATCH`] per flush, until the queue is empty
    /// and flushed (`Ready(Ok)`) or the socket takes no more for now (`Pending`).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        let r = self.poll_write_inner(cx);
        self.blocked = r.is_pending();
        r
    }

    fn poll_write_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        loop {
            let mut fed = 0;
            while fed < WRITE_BATCH && !self.closed && !self.queue.is_empty() {
                ready!(self.ws.poll_ready_unpin(cx))?;
                let Some(out) = self.queue.pop_front() else { break };
                let (msg, close) = frame_of(out);
                self.ws.start_send_unpin(msg)?;
                self.unflushed = true;
                self.closed = close;
                fed += 1;
            }
            if self.unflushed {
                ready!(self.ws.poll_flush_unpin(cx))?;
                self.unflushed = false;
            }
            if self.queue.is_empty() || self.closed {
                // An idle socket keeps no queue (an allocation per batch written).
                if self.queue.is_empty() {
                    self.queue = VecDeque::new();
                }
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// The session loop's view of the socket: reads, and goes on writing if the last write
    /// found the socket full. (Otherwise the loop writes once nothing else is ready, as a
    /// writer task would: an ack and the bot reply behind it go out in one write.)
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Io> {
        if self.blocked && matches!(self.poll_write(cx), Poll::Ready(Err(_))) {
            return Poll::Ready(Io::WriteFailed);
        }
        self.ws.poll_next_unpin(cx).map(Io::Read)
    }

    /// Writes for as long as the socket takes frames without waiting.
    async fn write_now(&mut self) -> Result<(), End> {
        poll_fn(|cx| match self.poll_write(cx) {
            Poll::Ready(Err(_)) => Poll::Ready(Err(End::Network("socket write failed".into()))),
            _ => Poll::Ready(Ok(())),
        })
        .await
    }

    /// Writes until the queue has room.
    async fn room(&mut self) -> Result<(), axum::Error> {
        poll_fn(|cx| match self.poll_write(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending if !self.is_full() => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        })
        .await
    }

    /// A close frame the client already sent (waiting unread in a buffer), with its code: after a
    /// failed write it tells that the client ended the connection, not the network.
    fn buffered_close(&mut self) -> Option<Option<u16>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            match self.ws.poll_next_unpin(&mut cx) {
                Poll::Ready(Some(Ok(Message::Close(c)))) => return Some(c.map(|c| c.code)),
                Poll::Ready(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    /// Writes until everything queued is written and flushed.
    async fn drain(&mut self) -> Result<(), axum::Error> {
        poll_fn(|cx| self.poll_write(cx)).await
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
    let span = tracing::info_span!(
        "ws",
        %connection_id,
        bot_id = %Untrusted(&req.bot_id),
        user_id = tracing::field::Empty,
        close_code = tracing::field::Empty,
        closed_by = tracing::field::Empty,
    );
    // A child of the upgrade request's span, in the client's trace if it sent a `traceparent`.
    crate::telemetry::set_parent(&span, req.traceparent.as_deref());
    let open = Box::pin(open(state, socket, req, connection_id));
    async move {
        let Some(mut live) = open.await else { return };
        let end = live.session.run().await;
        Box::pin(live.close(end)).await
    }
    .instrument(span)
}

/// An established connection, between its admission and its close.
struct Live {
    started: Instant,
    /// Its ledger row as written at establishment; the close rewrites it with the outcome.
    row: OpenRow,
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
        trace_id: crate::telemetry::current_trace_id(),
    };
    let conn = Conn::new(socket, state.config.limits.outbound_queue);
    let metrics = &state.metrics;
    // Every check up to the hub's count; its verdict is `admitted` or the close code's name.
    let admission = tracing::info_span!(
        target: crate::telemetry::TRACE,
        "admission",
        verdict = tracing::field::Empty,
        close_code = tracing::field::Empty
    );

    let refused = |rec: &mut ConnectionRecord, code: CloseCode, reason: &str| {
        admission.record("verdict", code.name()).record("close_code", code.code());
        tracing::info!(close_code = code.code(), close_reason = %Untrusted(reason), remote = ?req.remote, "connection refused");
        metrics.attempts.get_or_create(&OutcomeLabel { outcome: "refused" }).inc();
        rec.close_code = Some(code.code());
        rec.close_reason = Some(close_reason(reason));
        rec.closed_by = Some(ClosedBy::Server);
    };

    let admitted = match admit(&state, &req, Mode::Connect).instrument(admission.clone()).await {
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
            let dropped = finish(conn, End::Close(refusal.code, refusal.reason)).await;
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
        admitted.family.map(|f| (f, admitted.conversation_id)),
        limits.max_connections_per_user,
        limits.max_connections,
    ) {
        Ok(slot) => {
            admission.record("verdict", "admitted");
            slot
        }
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
            let dropped = finish(conn, End::Close(code, reason)).await;
            state.metrics.frames_dropped.inc_by(dropped as u64);
            return None;
        }
    };

    let resume_from = admitted.after_seq;
    let session = match Session::start(&state, admitted, connection_id, conn).await {
        Ok(s) => s,
        Err((end, conn)) => {
            drop(slot);
            let (code, reason, by) = end.describe();
            if let Some(c) = code.and_then(CloseCode::from_code) {
                refused(&mut rec, c, &reason);
            }
            conclude(&state, rec, code, by);
            let dropped = finish(conn, end).await;
            state.metrics.frames_dropped.inc_by(dropped as u64);
            return None;
        }
    };
    metrics.attempts.get_or_create(&OutcomeLabel { outcome: "established" }).inc();
    metrics.handshake_seconds.observe(started.elapsed().as_secs_f64());
    metrics.connections_active.inc();
    rec.established = true;
    let row = OpenRow::new(&rec);
    // Visible in the ledger while it is open, not only once it has ended.
    state.ledger.record(rec);
    tracing::info!(remote = ?req.remote, ?resume_from, "connection established");
    Some(Live { started, row, slot, session })
}

impl Live {
    /// Ends an established connection: hub, ledger, metrics, close handshake.
    async fn close(self, end: End) {
        let Live { started, row, slot, mut session } = self;
        let state = session.state.clone();
        let metrics = &state.metrics;
        let c = session.counters;
        if let Some(slot) = session.shared_slot.take() {
            state.cluster.release(slot).await;
        }
        let mut conn = session.into_conn();
        // A write that failed because the client had closed: its close frame may be here, unread.
        let end = match end {
            End::Network(e) => conn.buffered_close().map_or(End::Network(e), End::ClientClosed),
            end => end,
        };
        // The connection is over for the hub now, even while its close frame is on its way.
        drop(slot);
        metrics.connections_active.dec();
        let (code, reason, closed_by) = end.describe();
        let mut rec = row.row();
        (rec.msgs_in, rec.msgs_out, rec.bytes_in, rec.bytes_out) = (c.msgs_in, c.msgs_out, c.bytes_in, c.bytes_out);
        rec.close_code = code;
        rec.close_reason = Some(close_reason(&reason));
        rec.closed_by = ClosedBy::parse(closed_by);
        conclude(&state, rec, code, closed_by);
        let dropped = finish(conn, end).await;
        state.metrics.frames_dropped.inc_by(dropped as u64);
        tracing::info!(
            duration_ms = started.elapsed().as_millis() as u64,
            close_code = ?code,
            close_reason = %crate::logsafe::Untrusted(&reason),
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
    if crate::telemetry::enabled() {
        // On the connection's span for its trace (the log has them in "connection closed").
        let span = tracing::Span::current();
        if let Some(c) = code {
            span.record("close_code", c);
        }
        span.record("closed_by", initiator);
    }
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

/// Sends the close (if the server is the one closing) after what is queued and waits for it
/// to be written — a slow client first has to read what is already buffered — then waits
/// briefly for the client's answer, so the close frame is not lost to a TCP reset. A slow
/// consumer's close, or one that finds the queue full for [`CLOSE_QUEUE_WAIT`], goes ahead of
/// the queued frames. Returns how many queued frames were never written.
async fn finish(mut conn: Conn, end: End) -> usize {
    match &end {
        End::Close(code, reason) => {
            let mut dropped = 0;
            let urgent = *code == CloseCode::SlowConsumer
                || (conn.is_full() && !matches!(tokio::time::timeout(CLOSE_QUEUE_WAIT, conn.room()).await, Ok(Ok(()))));
            if urgent {
                dropped = conn.queue.len();
                conn.queue.clear();
            }
            conn.queue.push_back(Out::Close(code.code(), close_reason(reason)));
            match tokio::time::timeout(CLOSE_WRITE_WAIT, conn.drain()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return dropped + conn.queue.len().saturating_sub(1),
                Err(_) => {
                    tracing::debug!("close frame not written in time; dropping the socket");
                    return dropped + conn.queue.len().saturating_sub(1);
                }
            }
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                while let Some(Ok(msg)) = conn.ws.next().await {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
            dropped
        }
        End::ClientClosed(_) => {
            // Reading on lets the WebSocket layer send its reply to the client's close; what is
            // still queued cannot be sent after it.
            let _ = tokio::time::timeout(CLOSE_WAIT, conn.ws.next()).await;
            conn.queue.len()
        }
        End::Network(_) => conn.queue.len(),
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

struct Session {
    state: AppState,
    io: Conn,
    sub: Subscription,
    user_id: Uuid,
    bot_id: Uuid,
    conversation_id: Uuid,
    bot_name: String,
    engine: EngineSpec,
    /// This socket's place in the per-user count shared by every node.
    shared_slot: Option<crate::cluster::Slot>,
    /// Highest seq sent; every seq below it has been sent too.
    delivered: i64,
    bucket: TokenBucket,
    /// Every client data frame (issue 14: pings were free).
    frame_bucket: TokenBucket,
    /// Bot replies streamed to this socket; boxed, and only once there are any.
    replies: Option<Box<Replies>>,
    counters: Counters,
    /// The login this socket's credentials belong to: closed 4401 when it is revoked.
    family: Option<Uuid>,
}

#[derive(Default)]
struct Replies {
    /// Bot replies being streamed to this socket.
    streams: HashMap<Uuid, Stream>,
    /// The latest bot replies delivered whole, so a late delta for them is ignored.
    finished: VecDeque<Uuid>,
}

/// One bot reply being streamed to this socket.
struct Stream {
    in_reply_to: Uuid,
    /// Bytes of the reply's text this socket has been sent or has waiting in `pending`.
    have: usize,
    /// Text not yet sent because the outbound queue was full: it goes out as one coalesced
    /// delta when there is room, so a slow reader gets fewer, larger frames instead of a close.
    pending: String,
    /// A gap in this reply was asked of the node generating it ([`ConvEvent::ReplySync`]) and
    /// not filled yet.
    asked: bool,
}

/// How many finished replies a socket remembers.
const FINISHED_MEMORY: usize = 64;
/// How often coalesced deltas are retried while the queue is full.
const DELTA_FLUSH_EVERY: Duration = Duration::from_millis(50);

/// The session's one timer: heartbeat pings, the idle close and delta retries share it, so an
/// idle socket holds one timer entry rather than three.
struct Timers {
    heartbeat: Duration,
    next_ping: Instant,
    /// The last frame from the client.
    heard: Instant,
    /// When coalesced deltas are retried (only while some wait).
    next_flush: Option<Instant>,
    /// The deadline the timer is set to.
    armed: Instant,
}

/// What the timer found due.
enum Due {
    Ping,
    Idle,
    Flush,
}

impl Timers {
    fn new(heartbeat: Duration) -> Self {
        let now = Instant::now();
        Timers { heartbeat, next_ping: now + heartbeat, heard: now, next_flush: None, armed: now + heartbeat }
    }

    fn idle_deadline(&self) -> Instant {
        self.heard + self.heartbeat * 2
    }

    fn deadline(&self) -> Instant {
        let d = self.next_ping.min(self.idle_deadline());
        self.next_flush.map_or(d, |f| d.min(f))
    }

    /// Sets the timer to the earliest deadline (a no-op when it already is).
    fn arm(&mut self, sleep: Pin<&mut Sleep>) {
        let d = self.deadline();
        if d != self.armed || sleep.is_elapsed() {
            self.armed = d;
            sleep.reset(d);
        }
    }

    /// What is due now, if anything (the timer may fire for a deadline that moved later).
    fn due(&mut self) -> Option<Due> {
        let now = Instant::now();
        if now >= self.idle_deadline() {
            Some(Due::Idle)
        } else if now >= self.next_ping {
            // Like `MissedTickBehavior::Delay`: the next ping is a whole interval away.
            self.next_ping = now + self.heartbeat;
            Some(Due::Ping)
        } else if self.next_flush.is_some_and(|f| now >= f) {
            self.next_flush = None;
            Some(Due::Flush)
        } else {
            None
        }
    }
}

impl Session {
    async fn start(
        state: &AppState,
        admitted: Admitted,
        connection_id: Uuid,
        io: Conn,
    ) -> Result<Session, (End, Conn)> {
        let Admitted { user, bot_id, bot_name, engine, conversation_id: conv_id, after_seq, family } = admitted;
        // The per-user limit across every node (the hub counts this node's sockets only).
        let max = state.config.limits.max_connections_per_user;
        let shared_slot = match state.cluster.claim_slot(connection_id, user.id, max).await {
            Ok(s) => s,
            Err((c, r)) => return Err((End::Close(c, r), io)),
        };
        // Subscribe before reading last_seq: whatever is committed after this is on the bus.
        let sub = match state.bus.subscribe(conv_id).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "bus unavailable");
                let end = End::Close(CloseCode::TryAgainLater, "message bus unavailable; retry_after_ms=5000".into());
                return Err((end, io));
            }
        };
        // A logout racing this connect: either its revocation is in the set now, or it comes
        // after, and then its announcement reaches this (registered, subscribed) socket.
        if family.is_some_and(|f| state.revocations.is_revoked(f)) {
            return Err((End::Close(CloseCode::Unauthorized, super::REVOKED_REASON.into()), io));
        }
        let last_seq = match state.store.conversation(user.id, bot_id).await {
            Ok(c) => c.last_seq,
            Err(e) => return Err((internal_end("reading the conversation", e), io)),
        };
        let limits = &state.config.limits;
        let mut session = Session {
            state: state.clone(),
            io,
            sub,
            user_id: user.id,
            bot_id,
            conversation_id: conv_id,
            bot_name,
            engine,
            delivered: after_seq.unwrap_or(last_seq),
            shared_slot: Some(shared_slot),
            bucket: TokenBucket::new(limits.messages_per_second, limits.message_burst),
            frame_bucket: TokenBucket::new(limits.frames_per_second, limits.frame_burst),
            replies: None,
            counters: Counters::default(),
            family,
        };
        match session.begin(connection_id, user, last_seq, after_seq.is_some()).await {
            Ok(()) => Ok(session),
            Err(end) => Err((end, session.into_conn())),
        }
    }

    /// The socket, for the close handshake.
    fn into_conn(self) -> Conn {
        self.io
    }

    /// `connection_established`, the replay asked for, and the replies in progress.
    async fn begin(&mut self, connection_id: Uuid, user: UserRef, last_seq: i64, resume: bool) -> Result<(), End> {
        let state = self.state.clone();
        let limits = &state.config.limits;
        self.send(&ServerFrame::ConnectionEstablished {
            connection_id,
            protocol_version: natter_proto::PROTOCOL_VERSION,
            user,
            bot: BotRef { id: self.bot_id, name: self.bot_name.clone() },
            conversation_id: self.conversation_id,
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
        if resume {
            self.fill_to(i64::MAX).await?;
        }
        // Replies being generated right now: what exists so far, then the rest live.
        for p in state.replier.in_progress(self.conversation_id) {
            // A reply is stored (and may have just been caught up whole) a moment before it
            // leaves `in_progress`: streaming it again would repeat its text after the message.
            if p.text.is_empty() || self.replies.as_ref().is_some_and(|r| r.finished.contains(&p.message_id)) {
                continue;
            }
            let have = p.text.len();
            self.replies
                .get_or_insert_default()
                .streams
                .insert(p.message_id, Stream { in_reply_to: p.in_reply_to, have, pending: p.text, asked: false });
        }
        // Replies being generated on other nodes: their nodes answer with the text so far.
        if state.bus.shared() {
            let ask = ConvEvent::ReplySync { message_id: None };
            if let Err(e) = state.bus.publish(self.conversation_id, ask).await {
                tracing::debug!(error = %e, "asking for replies in progress failed");
            }
        }
        self.flush_deltas()
    }

    async fn run(&mut self) -> End {
        let shutdown = self.state.shutdown.clone();
        let cluster = self.state.cluster.clone();
        let mut timers = Timers::new(self.state.config.heartbeat_interval);
        let timer = tokio::time::sleep_until(timers.armed);
        tokio::pin!(timer);
        loop {
            timers.next_flush = match timers.next_flush {
                None if self.replies.as_ref().is_some_and(|r| r.streams.values().any(|s| !s.pending.is_empty())) => {
                    Some(Instant::now() + DELTA_FLUSH_EVERY)
                }
                f => f,
            };
            timers.arm(timer.as_mut());
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Err(End::Close(CloseCode::ServiceRestart, "server restarting; reconnect with backoff".into())),
                reason = cluster.lost() => Err(End::Close(CloseCode::TryAgainLater, reason)),
                _ = std::future::ready(()), if self.io.queue.len() >= WRITE_SOON && !self.io.blocked => self.io.write_now().await,
                io = poll_fn(|cx| self.io.poll_io(cx)) => match io {
                    Io::Read(frame) => {
                        timers.heard = Instant::now();
                        Box::pin(self.on_frame(frame)).await
                    }
                    Io::WriteFailed => Err(End::Network("socket write failed".into())),
                },
                event = self.sub.recv() => Box::pin(self.on_event(event)).await,
                _ = &mut timer => match timers.due() {
                    Some(Due::Idle) => Err(End::Close(
                        CloseCode::HeartbeatTimeout,
                        format!("no traffic from the client for {} ms", (timers.heartbeat * 2).as_millis()),
                    )),
                    Some(Due::Ping) => Box::pin(self.push(Out::Ping)).await,
                    Some(Due::Flush) => self.flush_deltas(),
                    None => Ok(()),
                },
                // Last: what is queued is written once nothing else is ready, all in one write.
                _ = std::future::ready(()), if self.io.has_output() && !self.io.blocked => self.io.write_now().await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Queues a frame. A full queue gets [`SLOW_CONSUMER_WAIT`] to make room (a burst or a
    /// replay is fine); a client that reads nothing in that time is closed 4409.
    async fn push(&mut self, out: Out) -> Result<(), End> {
        self.state.metrics.outbound_queue_depth.observe(self.io.queue.len() as f64);
        if self.io.is_full() {
            match tokio::time::timeout(SLOW_CONSUMER_WAIT, self.io.room()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(End::Network("socket write failed".into())),
                Err(_) => {
                    return Err(End::Close(
                        CloseCode::SlowConsumer,
                        "outbound queue full: the client is not reading; reconnect with after_seq".into(),
                    ))
                }
            }
        }
        self.io.queue.push_back(out);
        Ok(())
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
        let conv = self.conversation_id;
        while self.delivered < upto {
            // What is queued goes out while the store is read.
            self.io.write_now().await?;
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
            let r = self.replies.get_or_insert_default();
            r.streams.remove(&m.id);
            if r.finished.len() == FINISHED_MEMORY {
                r.finished.pop_front();
            }
            r.finished.push_back(m.id);
        }
        self.send(&ServerFrame::Message { message: m }).await
    }

    /// Takes a piece of a streamed reply, dropping what this socket already has and filling
    /// what it missed (joined mid-reply, a lagging bus) from the reply's text so far: here when
    /// this node generates it, or asked of the node that does ([`ConvEvent::ReplySync`], whose
    /// answer is a delta at offset 0).
    async fn on_delta(&mut self, message_id: Uuid, in_reply_to: Uuid, offset: usize, delta: &str) -> Result<(), End> {
        let r = self.replies.get_or_insert_default();
        if r.finished.contains(&message_id) {
            return Ok(());
        }
        let stream = r.streams.entry(message_id).or_insert(Stream {
            in_reply_to,
            have: 0,
            pending: String::new(),
            asked: false,
        });
        let end = offset + delta.len();
        if end <= stream.have {
            return Ok(());
        }
        if offset > stream.have {
            match self.state.replier.text_so_far(message_id) {
                Some(text) if text.len() >= end && text.is_char_boundary(stream.have) && text.is_char_boundary(end) => {
                    stream.pending.push_str(&text[stream.have..end]);
                }
                // Generated elsewhere: ask once; the answer fills the gap.
                None if self.state.bus.shared() => {
                    if !std::mem::replace(&mut stream.asked, true) {
                        let ask = ConvEvent::ReplySync { message_id: Some(message_id) };
                        if let Err(e) = self.state.bus.publish(self.conversation_id, ask).await {
                            tracing::debug!(error = %e, "asking for a reply's text failed");
                        }
                    }
                    return Ok(());
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
        stream.asked = false;
        self.flush_deltas()
    }

    /// Sends pending deltas while the queue has room; what does not fit waits, coalesced.
    fn flush_deltas(&mut self) -> Result<(), End> {
        let Some(r) = self.replies.as_mut() else { return Ok(()) };
        for (id, stream) in r.streams.iter_mut() {
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
            if self.io.is_full() {
                let ServerFrame::MessageDelta { delta, .. } = frame else { unreachable!() };
                stream.pending = delta;
                self.state.metrics.deltas_coalesced.inc();
                return Ok(());
            }
            self.io.queue.push_back(Out::Text(json));
            self.counters.msgs_out += 1;
            self.counters.bytes_out += len;
        }
        Ok(())
    }

    async fn on_event(&mut self, event: Received) -> Result<(), End> {
        match event {
            Received::Event(e) => match &*e {
                ConvEvent::Message(m, None) => self.deliver(m).await,
                ConvEvent::Message(m, Some(traceparent)) => {
                    // Only when traces are exported: the message's trace shows each socket's delivery.
                    let span = tracing::info_span!(
                        target: crate::telemetry::TRACE,
                        "deliver",
                        seq = m.seq,
                        role = ?m.role,
                        node_id = %self.state.cluster.node().node_id
                    );
                    crate::telemetry::set_parent(&span, Some(traceparent));
                    // Linked to this socket's own span (and its connection_id).
                    span.follows_from(tracing::Span::current());
                    self.deliver(m).instrument(span).await
                }
                ConvEvent::Delta { message_id, in_reply_to, offset, delta } => {
                    self.on_delta(*message_id, *in_reply_to, *offset, delta).await
                }
                ConvEvent::BotChanged => self.recheck_bot().await,
                // For the node generating that reply (its `Replier`), not for sockets.
                ConvEvent::Cancel { .. } | ConvEvent::ReplySync { .. } => Ok(()),
                ConvEvent::Revoked { family_id } if self.family == Some(*family_id) => {
                    Err(End::Close(CloseCode::Unauthorized, super::REVOKED_REASON.into()))
                }
                ConvEvent::Revoked { .. } => Ok(()),
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
        let bot = match store.bot(self.bot_id).await.map_err(|e| internal_end("re-reading the bot", e))? {
            Some(b) => b,
            None => return Err(End::Close(CloseCode::BotNotFound, "this bot was deleted".into())),
        };
        let role = store.bot_role(&bot, self.user_id).await.map_err(|e| internal_end("re-reading access", e))?;
        if role.is_none() {
            return Err(End::Close(CloseCode::Forbidden, "access to this bot was revoked".into()));
        }
        match crate::bots::EngineSpec::load(&bot.engine) {
            Ok(engine) => self.engine = engine,
            Err(e) => return Err(internal_end("reloading the bot's engine", e.message)),
        }
        self.bot_name = bot.name;
        Ok(())
    }

    async fn on_frame(&mut self, frame: Option<Result<Message, axum::Error>>) -> Result<(), End> {
        let msg = match frame {
            None => return Err(End::Network("connection dropped without a close frame".into())),
            Some(Err(e)) => return Err(read_error_end(e, self.state.config.limits.max_frame_bytes)),
            Some(Ok(m)) => m,
        };
        self.counters.msgs_in += 1;
        self.counters.bytes_in += match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        } as u64;
        // Every data frame takes a token before it is parsed; the WebSocket layer answers
        // control frames itself (one pong pending at most).
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            if let Err(wait) = self.frame_bucket.take() {
                let ms = wait.as_millis() as u64 + 1;
                return self
                    .send(&ServerFrame::Error {
                        code: ErrorCode::RateLimited,
                        message: format!("too many frames; wait {ms} ms before sending again"),
                        client_id: None,
                        in_reply_to: None,
                        retry_after_ms: Some(ms),
                    })
                    .await;
            }
        }
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
    /// (`&mut`: a `&Session` is not `Send`, the socket is not `Sync`.)
    async fn cancel_elsewhere(&mut self, message_id: Uuid) -> bool {
        let (state, conv) = (&self.state, self.conversation_id);
        match state.store.generation_in_progress(conv, message_id).await {
            Ok(true) => state.bus.publish(conv, ConvEvent::Cancel { message_id }).await.is_ok(),
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
            ClientFrame::Cancel { message_id } if self.state.replier.cancel(self.conversation_id, message_id) => Ok(()),
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
        // NUL: PostgreSQL cannot store it, so no store does (`domain::no_nul`).
        if let Err(m) = crate::domain::no_nul("client_id", &client_id) {
            return self.reject(ErrorCode::InvalidClientId, m, &client_id, None).await;
        }
        if let Err(m) = crate::domain::no_nul("content", &content) {
            return self.reject(ErrorCode::InvalidFrame, m, &client_id, None).await;
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
        // The user's budget over all of their sockets, on every node (issue 14: 20 sockets
        // made 20 budgets).
        let (rate, burst) = (limits.user_messages_per_second, limits.user_message_burst);
        let over = match self.state.hub.take_user_message(self.user_id, rate, burst) {
            Err(wait) => Some(wait),
            Ok(()) => self.state.cluster.user_message_over(self.user_id, rate, burst).await,
        };
        if let Some(wait) = over {
            let ms = wait.as_millis() as u64 + 1;
            return self
                .reject(
                    ErrorCode::RateLimited,
                    format!("too many messages from this user on all connections; wait {ms} ms before sending again"),
                    &client_id,
                    Some(ms),
                )
                .await;
        }
        let conv = self.conversation_id;
        // The journey of an accepted message: stored, acked, announced, answered (the reply's
        // spans are children of this one, on whichever node runs it).
        let span = tracing::info_span!(
            target: crate::telemetry::TRACE,
            "message",
            client_id = %Untrusted(&client_id),
            conversation_id = %conv,
            seq = tracing::field::Empty,
            duplicate = tracing::field::Empty
        );
        self.accept_message(client_id, content, received).instrument(span).await
    }

    /// Stores, acks, announces and hands to the bot a message that passed every check.
    async fn accept_message(&mut self, client_id: String, content: String, received: Instant) -> Result<(), End> {
        let conv = self.conversation_id;
        let store_span = tracing::info_span!(target: crate::telemetry::TRACE, "store", seq = tracing::field::Empty);
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
            .instrument(store_span.clone())
            .await
            .map_err(|e| internal_end("storing a message", e))?;
        let seq = appended.message.seq;
        store_span.record("seq", seq);
        drop(store_span);
        tracing::Span::current().record("seq", seq).record("duplicate", appended.duplicate);
        if seq > self.delivered {
            self.fill_to(seq - 1).await?;
            self.delivered = seq;
        }
        self.send(&ServerFrame::Ack { client_id, message: appended.message.clone(), duplicate: appended.duplicate })
            .await?;
        self.state.metrics.ack_seconds.observe(received.elapsed().as_secs_f64());
        if !appended.duplicate {
            let message = appended.message;
            if let Err(e) = crate::bus::announce(&*self.state.bus, conv, message.clone()).await {
                tracing::warn!(error = %e, "publishing a message failed; other tabs will catch up on reconnect");
            }
            self.state.replier.reply(&self.engine, self.bot_id, &self.bot_name, message, received).await;
        }
        Ok(())
    }
}

/// How a failed read ends the socket. RFC 6455 §7.4.1: a text frame that is not UTF-8 is
/// closed 1007, a frame that breaks the framing rules 1002, one over the size limit 1009 —
/// each with a reason, instead of a bare TCP close (the client saw 1006). tungstenite keeps
/// its write side usable after such a read error, so the close frame goes out as usual.
fn read_error_end(e: axum::Error, max_frame_bytes: usize) -> End {
    use tungstenite::error::{Error as WsError, ProtocolError};
    let e = e.into_inner();
    match e.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => {
            End::Close(CloseCode::FrameTooLarge, format!("frame larger than {max_frame_bytes} bytes"))
        }
        Some(WsError::Utf8(_)) => End::Close(CloseCode::InvalidPayload, "a text frame is not valid UTF-8".into()),
        Some(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
            End::Network("connection dropped without a close frame".into())
        }
        Some(WsError::Protocol(p)) => End::Close(CloseCode::ProtocolError, format!("protocol error: {p}")),
        _ => End::Network(format!("read error: {e}")),
    }
}

fn internal_end(what: &str, e: impl std::fmt::Display) -> End {
    let error_id = Uuid::new_v4();
    tracing::error!(%error_id, error = %e, "{what} failed");
    End::Close(CloseCode::InternalError, format!("internal error ({})", crate::telemetry::error_ref(error_id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn output_size<A, B, C, R>(_: impl Fn(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Memory per idle socket (issue 10). A socket's task holds its future at the size of its
    /// largest state for the socket's whole life. With admission and the close inline, that
    /// was 7.9 KiB (release); boxed, the task is what an idle socket needs: the loop's state
    /// (`Live`, with the session owning the socket, and the `select!`), 1720 bytes in debug and
    /// release (rustc 1.9x). 2 KiB catches anything big that moves back inline.
    #[test]
    fn idle_socket_futures_stay_small() {
        let task = output_size(run);
        assert!(task <= 2 * 1024, "a socket's future is {task} bytes");
        // A queued frame is a `String` and a tag: the queue is only as long as the backlog.
        assert!(std::mem::size_of::<Out>() <= 32);
    }
}
