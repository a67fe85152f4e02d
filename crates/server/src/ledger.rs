//! The connection ledger writer: sessions hand it rows, a background task writes them to the
//! store in batches, so the socket path never waits on the database. It also prunes old rows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use natter_proto::api::{ConnectionRecord, TransportKind};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::store::Store;

/// How long and how many ledger rows are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_age: Duration,
    pub max_rows: u64,
    /// Rows per second (and burst) stored for attempts that named no user: refusals anyone
    /// can cause without an account. Beyond it they are counted
    /// (`natter_ledger_anonymous_rows_skipped_total`), not stored.
    pub anonymous_per_second: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { max_age: Duration::from_secs(7 * 24 * 3600), max_rows: 100_000, anonymous_per_second: 20 }
    }
}

/// The most bytes of one request header a ledger row keeps; longer values are cut to this
/// (on a character boundary) and end with [`CUT_MARK`].
pub const HEADER_BYTES: usize = 256;
pub const CUT_MARK: &str = "…[cut]";

/// A header value as the ledger keeps it: at most [`HEADER_BYTES`] bytes and the mark.
fn bounded(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= HEADER_BYTES {
        return s.into();
    }
    let mut end = HEADER_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARK}", &s[..end]).into()
}

/// Cuts every request header of a row (user agent, origin, forwarded-for ...): the one place
/// that bounds what a client can make the ledger store.
fn bound_headers(rec: &mut ConnectionRecord) {
    for f in [
        &mut rec.remote_addr,
        &mut rec.user_agent,
        &mut rec.origin,
        &mut rec.upgrade,
        &mut rec.connection,
        &mut rec.sec_websocket_version,
        &mut rec.forwarded_for,
        &mut rec.close_reason,
    ] {
        if let Some(s) = f.as_mut() {
            if s.len() > HEADER_BYTES {
                *s = bounded(s).into_owned();
            }
        }
    }
}

/// A token bucket for anonymous rows, shared by every clone of the ledger handle.
struct Budget {
    per_second: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl Budget {
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

enum Cmd {
    Row(Box<ConnectionRecord>),
    Flush(oneshot::Sender<()>),
    Prune(oneshot::Sender<u64>),
}

/// Handle to the ledger task. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Cmd>,
    dropped: Arc<AtomicU64>,
    anonymous: Arc<std::sync::Mutex<Budget>>,
    anonymous_skipped: Counter,
}

/// Rows queued before new ones are dropped (and counted) rather than slowing sockets down.
const QUEUE: usize = 8192;
/// Rows written per transaction at most.
const BATCH: usize = 512;
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Ledger {
    pub fn spawn(store: Arc<dyn Store>, retention: Retention, anonymous_skipped: Counter) -> Ledger {
        let (tx, mut rx) = mpsc::channel::<Cmd>(QUEUE);
        tokio::spawn(async move {
            let mut prune = tokio::time::interval(PRUNE_EVERY);
            let mut batch: Vec<ConnectionRecord> = Vec::with_capacity(BATCH);
            loop {
                let cmd = tokio::select! {
                    cmd = rx.recv() => match cmd { Some(c) => c, None => break },
                    _ = prune.tick() => {
                        run_prune(&*store, retention).await;
                        continue;
                    }
                };
                let mut waiting = Vec::new();
                let mut pruned = None;
                let mut next = Some(cmd);
                // Take whatever else is already queued, up to a batch.
                while let Some(cmd) = next.take() {
                    match cmd {
                        Cmd::Row(r) => batch.push(*r),
                        Cmd::Flush(done) => waiting.push(done),
                        Cmd::Prune(done) => pruned = Some(done),
                    }
                    if batch.len() < BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                if !batch.is_empty() {
                    if let Err(e) = store.record_connections(&batch).await {
                        tracing::warn!(error = %e, rows = batch.len(), "writing the connection ledger failed");
                    }
                    batch.clear();
                }
                if let Some(done) = pruned {
                    let _ = done.send(run_prune(&*store, retention).await);
                }
                for done in waiting {
                    let _ = done.send(());
                }
            }
        });
        let per_second = f64::from(retention.anonymous_per_second);
        let budget = Budget { per_second, tokens: per_second, last: std::time::Instant::now() };
        Ledger { tx, dropped: Arc::default(), anonymous: Arc::new(budget.into()), anonymous_skipped }
    }

    /// Queues a row (insert or replace by connection id), its headers cut to
    /// [`HEADER_BYTES`]; an anonymous one only while the anonymous budget lasts. Never waits.
    pub fn record(&self, mut row: ConnectionRecord) {
        // Rows with a user are that user's own record (and bounded by the per-user limits);
        // rows without one can be made by anyone, as fast as they can connect.
        if row.user_id.is_none() && !self.anonymous.lock().unwrap().take() {
            self.anonymous_skipped.inc();
            return;
        }
        bound_headers(&mut row);
        if self.tx.try_send(Cmd::Row(Box::new(row))).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every row queued so far is written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Prunes now (after writing what is queued); returns how many rows went.
    pub async fn prune(&self) -> u64 {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Prune(tx)).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Rows dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// An open connection's ledger row, kept until its close rewrites the row (the store replaces a
/// row whole): ids and start time inline, the request's seven text fields and the trace id packed into one
/// allocation. A `ConnectionRecord` held for a socket's life costs ~0.4 KiB; this ~0.15.
pub struct OpenRow {
    attempt_id: Uuid,
    connection_id: Uuid,
    user_id: Option<Uuid>,
    bot_id: Option<Uuid>,
    started_at: DateTime<Utc>,
    transport: TransportKind,
    /// `remote_addr` … `forwarded_for`, `trace_id` (each cut as the ledger stores it, so a socket holds no
    /// more of them than its row), each `'\x01'` + the text or empty for `None`, joined by
    /// `'\0'` (header values never hold control characters; a NUL would be replaced).
    text: Box<str>,
}

impl OpenRow {
    pub fn new(rec: &ConnectionRecord) -> OpenRow {
        let fields = [
            &rec.remote_addr,
            &rec.user_agent,
            &rec.origin,
            &rec.upgrade,
            &rec.connection,
            &rec.sec_websocket_version,
            &rec.forwarded_for,
            &rec.trace_id,
        ];
        let mut text = String::with_capacity(fields.iter().map(|f| f.as_ref().map_or(0, |s| s.len() + 1) + 1).sum());
        for (i, f) in fields.into_iter().enumerate() {
            if i > 0 {
                text.push('\0');
            }
            if let Some(s) = f {
                text.push('\x01');
                text.extend(bounded(s).chars().map(|c| if c == '\0' { char::REPLACEMENT_CHARACTER } else { c }));
            }
        }
        OpenRow {
            attempt_id: rec.attempt_id,
            connection_id: rec.connection_id,
            user_id: rec.user_id,
            bot_id: rec.bot_id,
            started_at: rec.started_at,
            transport: rec.transport,
            text: text.into_boxed_str(),
        }
    }

    /// The row as it was when the connection was established.
    pub fn row(&self) -> ConnectionRecord {
        let mut f = self.text.split('\0').map(|s| s.strip_prefix('\x01').map(str::to_owned));
        let mut next = || f.next().flatten();
        ConnectionRecord {
            attempt_id: self.attempt_id,
            connection_id: self.connection_id,
            user_id: self.user_id,
            bot_id: self.bot_id,
            remote_addr: next(),
            user_agent: next(),
            origin: next(),
            upgrade: next(),
            connection: next(),
            sec_websocket_version: next(),
            forwarded_for: next(),
            trace_id: next(),
            transport: self.transport,
            started_at: self.started_at,
            established: true,
            ended_at: None,
            close_code: None,
            close_reason: None,
            closed_by: None,
            msgs_in: 0,
            msgs_out: 0,
            bytes_in: 0,
            bytes_out: 0,
        }
    }
}

async fn run_prune(store: &dyn Store, retention: Retention) -> u64 {
    let cutoff = Utc::now() - chrono::Duration::from_std(retention.max_age).unwrap_or(chrono::Duration::days(7));
    match store.prune_connections(cutoff, retention.max_rows).await {
        Ok(n) => {
            if n > 0 {
                tracing::debug!(rows = n, "pruned the connection ledger");
            }
            n
        }
        Err(e) => {
            tracing::warn!(error = %e, "pruning the connection ledger failed");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_row_gives_back_the_row() {
        let rec = ConnectionRecord {
            attempt_id: Uuid::new_v4(),
            connection_id: Uuid::new_v4(),
            user_id: Some(Uuid::new_v4()),
            bot_id: None,
            remote_addr: Some("127.0.0.1:4000".into()),
            user_agent: Some(String::new()),
            origin: None,
            upgrade: Some("websocket".into()),
            connection: Some("Upgrade".into()),
            sec_websocket_version: None,
            forwarded_for: Some("10.0.0.1, 10.0.0.2".into()),
            started_at: Utc::now(),
            established: true,
            ended_at: None,
            close_code: None,
            close_reason: None,
            closed_by: None,
            msgs_in: 0,
            msgs_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            transport: TransportKind::Sse,
        };
        assert_eq!(OpenRow::new(&rec).row(), rec);
        let none = ConnectionRecord {
            user_agent: None,
            upgrade: None,
            forwarded_for: None,
            remote_addr: None,
            connection: None,
            trace_id: None,
            ..rec.clone()
        };
        assert_eq!(OpenRow::new(&none).row(), none);
        let nul = ConnectionRecord { origin: Some("a\0b".into()), ..rec.clone() };
        assert_eq!(OpenRow::new(&nul).row().origin.as_deref(), Some("a\u{fffd}b"));
        let big = ConnectionRecord { user_agent: Some("é".repeat(200 * 1024)), ..rec };
        let kept = OpenRow::new(&big).row().user_agent.unwrap();
        assert_eq!(kept, "é".repeat(HEADER_BYTES / 2) + CUT_MARK, "a socket holds no more than its row");
    }

    #[test]
    fn headers_are_cut_on_a_character_boundary_and_marked() {
        assert_eq!(bounded("short"), "short");
        let exact = "a".repeat(HEADER_BYTES);
        assert_eq!(bounded(&exact), exact);
        let odd = format!("a{}", "é".repeat(HEADER_BYTES));
        let cut = bounded(&odd);
        assert!(cut.ends_with(CUT_MARK) && cut.len() <= HEADER_BYTES + CUT_MARK.len(), "{cut}");
        assert!(odd.starts_with(cut.strip_suffix(CUT_MARK).unwrap()));
    }

    #[test]
    fn the_anonymous_budget_refills_at_its_rate_up_to_its_burst() {
        let start = std::time::Instant::now();
        let mut b = Budget { per_second: 4.0, tokens: 4.0, last: start };
        assert_eq!((0..10).filter(|_| b.take()).count(), 4);
        // Half a second later: two more, and no more than the burst after a long pause.
        b.last -= Duration::from_millis(500);
        assert_eq!((0..10).filter(|_| b.take()).count(), 2);
        b.last -= Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take()).count(), 4);
        let mut none = Budget { per_second: 0.0, tokens: 0.0, last: start };
        assert!(!none.take());
    }
}
