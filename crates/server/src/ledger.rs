//! The connection ledger writer: sessions hand it rows, a background task writes them to the
//! store in batches, so the socket path never waits on the database. It also prunes old rows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use natter_proto::api::ConnectionRecord;
use tokio::sync::{mpsc, oneshot};

use crate::store::Store;

/// How long and how many ledger rows are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_age: Duration,
    pub max_rows: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { max_age: Duration::from_secs(7 * 24 * 3600), max_rows: 100_000 }
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
}

/// Rows queued before new ones are dropped (and counted) rather than slowing sockets down.
const QUEUE: usize = 8192;
/// Rows written per transaction at most.
const BATCH: usize = 512;
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Ledger {
    pub fn spawn(store: Arc<dyn Store>, retention: Retention) -> Ledger {
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
        Ledger { tx, dropped: Arc::default() }
    }

    /// Queues a row (insert or replace by connection id). Never waits.
    pub fn record(&self, row: ConnectionRecord) {
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
