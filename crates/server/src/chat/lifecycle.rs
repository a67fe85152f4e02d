//! A connection from its accepted transport to its close: admission ([`super::admit`]), the
//! ledger row and metrics of the attempt, the session's loop, and the close handshake.

use std::future::Future;
use std::time::Duration;

use natter_proto::api::{ClosedBy, ConnectionRecord};
use natter_proto::CloseCode;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::admission::{admit, Admission, ConnectRequest, Rejected};
use super::hub::HubGuard;
use super::outbox::Conn;
use super::session::{Peer, Session};
use super::transport::{End, Out, Transport};
use crate::cluster::Slot;
use crate::ledger::OpenRow;
use crate::logsafe::Untrusted;
use crate::metrics::OutcomeLabel;
use crate::state::AppState;

/// How long a closing connection waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How long a closing connection waits for its close frame to be written.
const CLOSE_WRITE_WAIT: Duration = Duration::from_secs(10);
/// How long a server close waits for room behind the queued frames before it drops them.
const CLOSE_QUEUE_WAIT: Duration = Duration::from_secs(1);

/// Runs one accepted connection to its end.
///
/// A connection spends its life waiting in [`Session::run`], and a future is as large as its
/// largest state, so everything before and after that loop (admission, the close) runs in
/// futures of their own on the heap, which exist only while they run. Not an `async fn`
/// either: that would keep its arguments (the transport, the request) for the connection's
/// whole life. See `idle_socket_futures_stay_small`.
pub fn run<T: Transport>(
    state: AppState,
    transport: T,
    req: ConnectRequest,
    connection_id: Uuid,
) -> impl Future<Output = ()> + Send {
    let span = tracing::info_span!(
        "ws",
        %connection_id,
        bot_id = %Untrusted(&req.bot_id),
        user_id = tracing::field::Empty,
        close_code = tracing::field::Empty,
        closed_by = tracing::field::Empty,
    );
    // A child of the request's span, in the client's trace if it sent a `traceparent`.
    crate::telemetry::set_parent(&span, req.traceparent.as_deref());
    let open = Box::pin(open(state, transport, req, connection_id));
    async move {
        let Some(mut live) = open.await else { return };
        let end = live.session.run().await;
        Box::pin(live.close(end)).await
    }
    .instrument(span)
}

/// An established connection, between its admission and its close.
struct Live<T> {
    started: Instant,
    /// Its ledger row as written at establishment; the close rewrites it with the outcome.
    row: OpenRow,
    hub: HubGuard,
    slot: Slot,
    session: Session<T>,
}

/// The ledger row of an attempt, from its request.
fn record(req: &ConnectRequest, connection_id: Uuid) -> ConnectionRecord {
    ConnectionRecord {
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
        transport: req.transport,
    }
}

/// Admits the connection and starts its session; `None` if it was refused (and is closed).
async fn open<T: Transport>(
    state: AppState,
    transport: T,
    req: ConnectRequest,
    connection_id: Uuid,
) -> Option<Live<T>> {
    let started = Instant::now();
    let mut rec = record(&req, connection_id);
    let conn = Conn::new(transport, state.config.limits.outbound_queue);
    // Every check and hold; its verdict is `admitted` or the close code's name.
    let admission = tracing::info_span!(
        target: crate::telemetry::TRACE,
        "admission",
        verdict = tracing::field::Empty,
        close_code = tracing::field::Empty
    );
    let admitted = match admit(&state, &req, connection_id).instrument(admission.clone()).await {
        Ok(a) => a,
        Err(Rejected { refusal, user_id }) => {
            if let Some(u) = user_id {
                tracing::Span::current().record("user_id", tracing::field::display(u));
            }
            // An attempt is its user's as soon as its credentials name them, whatever failed.
            rec.user_id = user_id.or_else(|| state.keys.identify(req.token.as_deref()?));
            let end = End::Close(refusal.close());
            refused(&state, &admission, &req, rec, &end);
            finish_counted(&state, conn, end).await;
            return None;
        }
    };
    admission.record("verdict", "admitted");
    tracing::Span::current().record("user_id", tracing::field::display(admitted.user.id));
    rec.user_id = Some(admitted.user.id);
    let Admission {
        user, family, bot_id, bot_name, engine, conversation_id, last_seq, after_seq, hub, slot, sub, ..
    } = admitted;
    let peer = Peer { connection_id, user_id: user.id, bot_id, conversation_id, bot_name, engine, family };
    let mut session = Session::new(&state, peer, sub, conn, after_seq.unwrap_or(last_seq));
    if let Err(end) = session.begin(connection_id, user, last_seq, after_seq.is_some()).await {
        state.cluster.release(slot).await;
        drop(hub);
        refused(&state, &admission, &req, rec, &end);
        finish_counted(&state, session.io, end).await;
        return None;
    }
    let metrics = &state.metrics;
    metrics.attempts.get_or_create(&OutcomeLabel { outcome: "established", transport: req.transport.as_str() }).inc();
    metrics.handshake_seconds.observe(started.elapsed().as_secs_f64());
    metrics.connections_active.inc();
    rec.established = true;
    let row = OpenRow::new(&rec);
    // Visible in the ledger while it is open, not only once it has ended.
    state.ledger.record(rec);
    tracing::info!(remote = ?req.remote, resume_from = ?after_seq, "connection established");
    Some(Live { started, row, hub, slot, session })
}

/// An attempt that ends before it is established: logged, counted, in the ledger.
fn refused(state: &AppState, admission: &tracing::Span, req: &ConnectRequest, mut rec: ConnectionRecord, end: &End) {
    if let End::Close(c) = end {
        admission.record("verdict", c.code.name()).record("close_code", c.code.code());
        tracing::info!(close_code = c.code.code(), close_reason = %Untrusted(&c.reason), remote = ?req.remote, "connection refused");
        state
            .metrics
            .attempts
            .get_or_create(&OutcomeLabel { outcome: "refused", transport: req.transport.as_str() })
            .inc();
    }
    rec.close_code = end.code();
    rec.close_reason = Some(natter_proto::codes::cut_reason(end.reason()));
    rec.closed_by = Some(end.closed_by());
    conclude(state, rec, end);
}

impl<T: Transport> Live<T> {
    /// Ends an established connection: hub, ledger, metrics, close handshake.
    async fn close(self, end: End) {
        let Live { started, row, hub, slot, session } = self;
        let state = session.state.clone();
        let c = session.counters;
        state.cluster.release(slot).await;
        let mut conn = session.io;
        // A write that failed because the client had closed: its close may be here, unread.
        let end = match end {
            End::Network(e) => conn.buffered_close().map_or(End::Network(e), End::ClientClosed),
            end => end,
        };
        // The connection is over for the hub now, even while its close frame is on its way.
        drop(hub);
        state.metrics.connections_active.dec();
        let mut rec = row.row();
        (rec.msgs_in, rec.msgs_out, rec.bytes_in, rec.bytes_out) = (c.msgs_in, c.msgs_out, c.bytes_in, c.bytes_out);
        rec.close_code = end.code();
        rec.close_reason = Some(natter_proto::codes::cut_reason(end.reason()));
        rec.closed_by = Some(end.closed_by());
        conclude(&state, rec, &end);
        let (code, reason, closed_by) = (end.code(), end.reason().to_owned(), end.closed_by());
        finish_counted(&state, conn, end).await;
        tracing::info!(
            duration_ms = started.elapsed().as_millis() as u64,
            close_code = ?code,
            close_reason = %Untrusted(&reason),
            closed_by = closed_by.as_str(),
            msgs_in = c.msgs_in,
            msgs_out = c.msgs_out,
            "connection closed"
        );
    }
}

/// The last word on an attempt, as soon as its end is decided (before the close handshake,
/// which can take seconds with a slow client): its ledger row and the close metrics.
fn conclude(state: &AppState, mut rec: ConnectionRecord, end: &End) {
    let closed_by: ClosedBy = end.closed_by();
    if crate::telemetry::enabled() {
        // On the connection's span for its trace (the log has them in "connection closed").
        let span = tracing::Span::current();
        if let Some(c) = end.code() {
            span.record("close_code", c);
        }
        span.record("closed_by", closed_by.as_str());
    }
    rec.ended_at = Some(chrono::Utc::now());
    state.metrics.close(end.code(), closed_by);
    state.ledger.record(rec);
}

/// [`finish`], counting the frames it never wrote.
async fn finish_counted<T: Transport>(state: &AppState, conn: Conn<T>, end: End) {
    let dropped = finish(conn, end).await;
    state.metrics.frames_dropped.inc_by(dropped as u64);
}

/// Sends the close (if the server is the one closing) after what is queued and waits for it
/// to be written — a slow client first has to read what is already buffered — then waits
/// briefly for the client's answer, so the close frame is not lost to a TCP reset. A slow
/// consumer's close, or one that finds the queue full for [`CLOSE_QUEUE_WAIT`], goes ahead of
/// the queued frames. Returns how many queued frames were never written.
async fn finish<T: Transport>(mut conn: Conn<T>, end: End) -> usize {
    let close = match end {
        End::Close(close) => close,
        End::ClientClosed(_) => {
            // Reading on lets the transport answer the client's close; what is still queued
            // cannot be sent after it.
            let _ = tokio::time::timeout(CLOSE_WAIT, conn.read_one()).await;
            return conn.queue.len();
        }
        End::Network(_) => return conn.queue.len(),
    };
    let mut dropped = 0;
    let urgent = close.code == CloseCode::SlowConsumer
        || (conn.is_full() && !matches!(tokio::time::timeout(CLOSE_QUEUE_WAIT, conn.room()).await, Ok(Ok(()))));
    if urgent {
        dropped = conn.queue.len();
        conn.queue.clear();
    }
    let wire = natter_proto::Close { reason: close.wire_reason(), ..close };
    conn.queue.push_back(Out::Close(wire));
    match tokio::time::timeout(CLOSE_WRITE_WAIT, conn.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return dropped + conn.queue.len().saturating_sub(1),
        Err(_) => {
            tracing::debug!("close frame not written in time; dropping the connection");
            return dropped + conn.queue.len().saturating_sub(1);
        }
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, conn.until_client_close()).await;
    dropped
}
