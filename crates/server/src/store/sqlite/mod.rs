//! The SQLite store: one file in the data dir, WAL mode. Messages are written by the appender's
//! connection, every other write by a pool of one connection, and reads use a separate pool.
//! The two writers take SQLite's write lock before they read what they decide on (`BEGIN
//! IMMEDIATE`, [`Dialect::BEGIN_WRITE`]) and wait for it up to the busy timeout, so seq
//! allocation is serialised without retry loops.
//!
//! Messages are stored by group commit: [`append_message`](super::Store::append_message) queues the
//! message for the appender, a thread with a write connection of its own, which takes every
//! message waiting and stores them all in one transaction — one hand-off and one WAL commit
//! per batch instead of per message (`append.rs`). Under load a batch holds hundreds of
//! messages; alone, a message is a batch of one and waits for nothing.

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqlitePool};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::rows::parse_id;
use super::sql::{Dialect, Pools, RowsAffected, SqlStore};
use super::{StoreError, StoreResult};
use append::Job;

mod append;
mod coordination;
#[cfg(test)]
mod tests;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The newest schema this binary knows: the highest version in `migrations/sqlite`. A database
/// at a higher one was written by a newer natter (`natter restore` refuses it).
pub fn schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Ids are stored as text, flags as integers.
impl Dialect for Sqlite {
    fn id(row: &SqliteRow, col: &str) -> StoreResult<Uuid> {
        parse_id(&row.try_get::<String, _>(col)?, col)
    }
    fn opt_id(row: &SqliteRow, col: &str) -> StoreResult<Option<Uuid>> {
        row.try_get::<Option<String>, _>(col)?.map(|s| parse_id(&s, col)).transpose()
    }
    fn flag(row: &SqliteRow, col: &str) -> StoreResult<bool> {
        Ok(row.try_get::<i64, _>(col)? != 0)
    }

    type Id = String;
    fn id_param(id: Uuid) -> String {
        id.to_string()
    }
    type Flag = i64;
    fn flag_param(flag: bool) -> i64 {
        flag as i64
    }
    type Code = i64;
    fn code_param(code: u16) -> i64 {
        code.into()
    }
    /// A JSON array of ids as text.
    type Ids = String;
    fn ids_param(ids: &[Uuid]) -> String {
        serde_json::to_string(&ids.iter().map(Uuid::to_string).collect::<Vec<_>>()).expect("ids serialize")
    }
    fn in_ids(param: &str) -> String {
        format!("IN (SELECT value FROM json_each({param}))")
    }

    const FOR_UPDATE: &'static str = "";
    const LOCK_USER: Option<&'static str> = None;
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
}

impl RowsAffected for SqliteQueryResult {
    fn rows_affected(&self) -> u64 {
        self.rows_affected()
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    health: SqlitePool,
    appender: mpsc::Sender<Job>,
    /// The temporary directory a [`SqliteStore::temporary`] database lives in, removed with
    /// the last clone.
    #[cfg(test)]
    _dir: Option<std::sync::Arc<tempfile::TempDir>>,
}

/// Pragmas every connection is opened with, the appender's too:
/// - hot pages stay in SQLite's own cache (64 MiB per connection, not the default 2 MiB) and the
///   rest are mapped, not copied in with a read() per page: the message indexes are walked on
///   every append;
/// - checkpoint (copy the WAL into the database file, with an fsync) every 64 MiB of WAL
///   instead of every 4 MiB: a page rewritten by many batches is copied once.
const TUNING: [(&str, &str); 3] =
    [("cache_size", "-65536"), ("mmap_size", "268435456"), ("wal_autocheckpoint", "16384")];

impl SqliteStore {
    /// Opens (creating if missing) the database file, applies migrations and starts the
    /// appender thread.
    pub async fn open(path: &std::path::Path) -> StoreResult<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(append::BUSY_TIMEOUT)
            .foreign_keys(true);
        let opts = TUNING.iter().fold(opts, |opts, (name, value)| opts.pragma(*name, *value));
        let write = SqlitePoolOptions::new().max_connections(1).connect_with(opts.clone()).await?;
        MIGRATOR.run(&write).await.map_err(|e| StoreError::Backend(format!("migrations failed: {e}")))?;
        let opts = opts.read_only(true);
        let read = SqlitePoolOptions::new().max_connections(4).connect_with(opts.clone()).await?;
        let health = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await?;
        let appender = append::start(path)?;
        Ok(SqliteStore {
            write,
            read,
            health,
            appender,
            #[cfg(test)]
            _dir: None,
        })
    }

    /// A database in a temporary directory, removed when the last clone of the store is
    /// dropped: for the conformance tests, a fresh file per case.
    #[cfg(test)]
    pub async fn temporary() -> StoreResult<Self> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Backend(e.to_string()))?;
        let store = Self::open(&dir.path().join("natter.db")).await?;
        Ok(SqliteStore { _dir: Some(std::sync::Arc::new(dir)), ..store })
    }
}

impl SqlStore for SqliteStore {
    type Db = Sqlite;
    fn pools(&self) -> Pools<'_, Sqlite> {
        Pools { read: &self.read, write: &self.write, health: &self.health }
    }
}
