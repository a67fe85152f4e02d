//! The session core: one connection's state and its loop, whatever the transport.
//!
//! One task per connection: the session reads client frames, bus events and its timer,
//! decides what to send, and writes it itself. Frames wait in a bounded queue ([`Conn`]) that
//! the loop hands to the transport when it is writable, up to `WRITE_BATCH` frames per flush
//! (one syscall): once the loop has nothing else ready, or at once when [`WRITE_SOON`] frames
//! wait (a steady stream of client frames or bus events does not hold replies back). A client
//! that stops reading fills the queue and, if it stays full for [`SLOW_CONSUMER_WAIT`], is
//! closed with 4409 instead of growing memory.
//!
//! Delivery invariant: `delivered` is the highest seq this connection has been sent, and
//! every seq below it has been sent too, exactly once. Any gap (bus lag, events published
//! out of order by different writers) is filled from the store, which holds every message
//! before it is announced (`delivery.rs`). Client frames are handled in `inbound.rs`.

use std::future::poll_fn;
use std::time::Duration;

use natter_proto::api::{BotRef, UserRef};
use natter_proto::frames::Limits as WireLimits;
use natter_proto::{Close, CloseCode, ServerFrame};
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::admission::REVOKED_REASON;
use super::delivery::Replies;
use super::hub::TokenBucket;
use super::outbox::{Conn, Io, WRITE_SOON};
use super::timers::{Due, Timers};
use super::transport::{End, Out, Transport};
use crate::bots::EngineSpec;
use crate::bus::{ConvEvent, Received, Subscription};
use crate::cluster::DEPENDENCY_RETRY_MS;
use crate::metrics::DirectionLabel;
use crate::state::AppState;

/// How long a full outbound queue may stay full before the client counts as a slow consumer.
pub const SLOW_CONSUMER_WAIT: Duration = Duration::from_secs(5);
/// How often coalesced deltas are retried while the queue is full.
const DELTA_FLUSH_EVERY: Duration = Duration::from_millis(50);

/// What a session counted, for the ledger.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub msgs_in: u64,
    pub msgs_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Who the session serves, fixed at admission (the bot's name and engine follow its edits).
#[derive(Clone)]
pub struct Peer {
    pub connection_id: Uuid,
    pub user_id: Uuid,
    pub bot_id: Uuid,
    pub conversation_id: Uuid,
    pub bot_name: String,
    pub engine: EngineSpec,
    /// The login this connection's credentials belong to: closed 4401 when it is revoked.
    pub family: Option<Uuid>,
}

pub struct Session<T> {
    pub state: AppState,
    pub io: Conn<T>,
    pub sub: Subscription,
    pub peer: Peer,
    /// Highest seq sent; every seq below it has been sent too.
    pub delivered: i64,
    pub bucket: TokenBucket,
    /// Every client data frame (issue 14: pings were free).
    pub frame_bucket: TokenBucket,
    /// Bot replies streamed to this connection; boxed, and only once there are any.
    pub replies: Option<Box<Replies>>,
    pub counters: Counters,
    /// The client was heard by another way than this transport ([`ConvEvent::Heard`]).
    heard_elsewhere: bool,
}

/// How many reconnects per second a restarted node is assumed to take without a queue: below
/// the ~2 500 authenticated connects/s one core admits on SQLite (docs/performance.md), since a
/// reconnect also resumes with `after_seq` and resends what was outstanding.
const RECONNECTS_PER_SECOND: u64 = 2_000;
/// The reconnect window's bounds: at least 1 s (a few clients come back within a second, as
/// with the first step of the backoff), at most 10 s (so that with the clients' short retries
/// while the server is still down, the last one is back well within 15 s).
const RECONNECT_WINDOW_MS: (u64, u64) = (1_000, 10_000);

/// The window a restarting node spreads its `open` connections' reconnects over, in ms: as long
/// as a new process needs to admit them all at [`RECONNECTS_PER_SECOND`], within
/// [`RECONNECT_WINDOW_MS`].
pub fn reconnect_window_ms(open: usize) -> u64 {
    let (min, max) = RECONNECT_WINDOW_MS;
    (open as u64).saturating_mul(1_000).div_ceil(RECONNECTS_PER_SECOND).clamp(min, max)
}

/// The close of a server that is shutting down: 1012 with a `retry_after_ms` drawn uniformly
/// from the reconnect window for the node's `open` connections, so that they do not all come
/// back at once (and none needs to back off far past the server's return).
pub fn restarting(open: usize) -> End {
    let hint = rand::random_range(0..reconnect_window_ms(open));
    End::Close(Close::restarting(hint))
}

/// Closes with 1011 and an error id that is also logged.
pub fn internal_end(what: &str, e: impl std::fmt::Display) -> End {
    let error_id = Uuid::new_v4();
    tracing::error!(%error_id, error = %e, "{what} failed");
    let reason = format!("internal error ({})", crate::telemetry::error_ref(error_id));
    End::Close(Close::new(CloseCode::InternalError, reason))
}

impl<T: Transport> Session<T> {
    pub fn new(state: &AppState, peer: Peer, sub: Subscription, io: Conn<T>, delivered: i64) -> Self {
        let limits = &state.config.limits;
        Session {
            state: state.clone(),
            io,
            sub,
            peer,
            delivered,
            bucket: TokenBucket::new(limits.messages_per_second, limits.message_burst),
            frame_bucket: TokenBucket::new(limits.frames_per_second, limits.frame_burst),
            replies: None,
            counters: Counters::default(),
            heard_elsewhere: false,
        }
    }

    /// `connection_established`, the replay asked for, and the replies in progress.
    pub async fn begin(&mut self, connection_id: Uuid, user: UserRef, last_seq: i64, resume: bool) -> Result<(), End> {
        let state = self.state.clone();
        let limits = &state.config.limits;
        self.send(&ServerFrame::ConnectionEstablished {
            connection_id,
            protocol_version: natter_proto::PROTOCOL_VERSION,
            user,
            bot: BotRef { id: self.peer.bot_id, name: self.peer.bot_name.clone() },
            conversation_id: self.peer.conversation_id,
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
        self.join_replies_in_progress().await;
        self.flush_deltas()
    }

    /// The loop: client frames, bus events, the timer and writes, until the connection ends.
    pub async fn run(&mut self) -> End {
        let shutdown = self.state.shutdown.clone();
        let cluster = self.state.cluster.clone();
        let mut timers = Timers::new(self.state.config.heartbeat_interval);
        let timer = tokio::time::sleep_until(timers.armed);
        tokio::pin!(timer);
        loop {
            if timers.next_flush.is_none() && self.replies.as_ref().is_some_and(|r| r.has_pending()) {
                timers.next_flush = Some(Instant::now() + DELTA_FLUSH_EVERY);
            }
            timers.arm(timer.as_mut());
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Err(restarting(self.state.hub.open_at_shutdown())),
                why = cluster.lost() => Err(End::Close(Close::try_again_later(&why, DEPENDENCY_RETRY_MS))),
                _ = std::future::ready(()), if self.io.queue.len() >= WRITE_SOON && !self.io.blocked => self.io.write_now().await,
                io = poll_fn(|cx| self.io.poll_io(cx)) => match io {
                    Io::Read(frame) => {
                        timers.heard = Instant::now();
                        Box::pin(self.on_frame(frame)).await
                    }
                    Io::WriteFailed => Err(End::Network("socket write failed".into())),
                },
                event = self.sub.recv() => {
                    let step = Box::pin(self.on_event(event)).await;
                    if std::mem::take(&mut self.heard_elsewhere) {
                        timers.heard = Instant::now();
                    }
                    step
                }
                _ = &mut timer => match timers.due() {
                    Some(Due::Idle) => Err(End::Close(Close::new(
                        CloseCode::HeartbeatTimeout,
                        format!("no traffic from the client for {} ms", timers.idle_limit().as_millis()),
                    ))),
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
    pub async fn push(&mut self, out: Out) -> Result<(), End> {
        self.state.metrics.outbound_queue_depth.observe(self.io.queue.len() as f64);
        if self.io.is_full() {
            match tokio::time::timeout(SLOW_CONSUMER_WAIT, self.io.room()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(End::Network("socket write failed".into())),
                Err(_) => {
                    return Err(End::Close(Close::new(
                        CloseCode::SlowConsumer,
                        "outbound queue full: the client is not reading; reconnect with after_seq",
                    )))
                }
            }
        }
        self.io.queue.push_back(out);
        Ok(())
    }

    pub async fn send(&mut self, frame: &ServerFrame) -> Result<(), End> {
        let json = frame.to_json();
        self.counters.msgs_out += 1;
        self.counters.bytes_out += json.len() as u64;
        if matches!(frame, ServerFrame::Message { .. }) {
            self.state.metrics.messages.get_or_create(&DirectionLabel { direction: "out" }).inc();
        }
        self.push(Out::Text(json)).await
    }

    async fn on_event(&mut self, event: Received) -> Result<(), End> {
        let e = match event {
            Received::Event(e) => e,
            Received::Lagged(n) => {
                tracing::debug!(missed = n, "bus lagged; catching up from the store");
                return self.fill_to(i64::MAX).await;
            }
            Received::Closed => return Err(restarting(self.state.hub.open_at_shutdown())),
        };
        match &*e {
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
                // Linked to this connection's own span (and its connection_id).
                span.follows_from(tracing::Span::current());
                self.deliver(m).instrument(span).await
            }
            ConvEvent::Delta { message_id, in_reply_to, offset, delta } => {
                self.on_delta(*message_id, *in_reply_to, *offset, delta).await
            }
            ConvEvent::BotChanged => self.recheck_bot().await,
            // For the node generating that reply (its `Replier`), not for connections.
            ConvEvent::Cancel { .. } | ConvEvent::ReplySync { .. } => Ok(()),
            ConvEvent::Revoked { family_id } if self.peer.family == Some(*family_id) => {
                Err(End::Close(Close::new(CloseCode::Unauthorized, REVOKED_REASON)))
            }
            ConvEvent::Revoked { .. } => Ok(()),
            ConvEvent::Heard { connection_id, user_id } => {
                self.heard_elsewhere |= *connection_id == self.peer.connection_id && *user_id == self.peer.user_id;
                Ok(())
            }
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
        }
    }

    /// The bot changed: is this connection still allowed, and with which engine?
    async fn recheck_bot(&mut self) -> Result<(), End> {
        let store = &self.state.store;
        let bot = match store.bot(self.peer.bot_id).await.map_err(|e| internal_end("re-reading the bot", e))? {
            Some(b) => b,
            None => return Err(End::Close(Close::new(CloseCode::BotNotFound, "this bot was deleted"))),
        };
        let role = store.bot_role(&bot, self.peer.user_id).await.map_err(|e| internal_end("re-reading access", e))?;
        if role.is_none() {
            return Err(End::Close(Close::new(CloseCode::Forbidden, "access to this bot was revoked")));
        }
        match EngineSpec::load(&bot.engine) {
            Ok(engine) => self.peer.engine = engine,
            Err(e) => return Err(internal_end("reloading the bot's engine", e.message)),
        }
        self.peer.bot_name = bot.name;
        Ok(())
    }
}
