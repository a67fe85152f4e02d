//! The SQLite and PostgreSQL stores, written once: [`Store`](super::Store) (`store.rs`) and
//! [`Coordination`](super::Coordination) (`coordination.rs`) are implemented here for every
//! [`SqlAppend`] and [`SqlCoordination`] store, over either sqlx backend.
//!
//! The SQL is written once too, with numbered parameters (`$1`), which both backends read
//! (sqlx binds SQLite's `$N` by its number). What differs is supplied by each backend:
//! - how a row holds and a query binds an id, a flag, a close code, a list of ids, and the few
//!   SQL fragments only one dialect has: its [`Dialect`];
//! - its pools: [`SqlStore`];
//! - storing a message (SQLite's group commit, PostgreSQL's row lock): [`SqlAppend`];
//! - the sweeps, whose algorithm differs (recovering replies, taking over owed ones) and
//!   PostgreSQL's shared rate window: [`SqlCoordination`].

use std::future::Future;

use async_trait::async_trait;
use sqlx::{Database, Encode, Executor, IntoArguments, Pool, Transaction, Type};
use uuid::Uuid;

use super::rows::Columns;
use super::{Appended, AppendedPair, NewMessage, StoreResult};

mod coordination;
mod store;

pub(super) use coordination::{OwedSweep, SqlCoordination};

/// How a SQL backend stores what has no common SQL type (reading it from a row, and the value
/// to bind for it), and the SQL only one backend has.
///
/// The supertraits are what generic code needs of a backend that sqlx states for each backend by
/// name: its arguments run a query, its rows are read through [`Columns`], its connection and
/// pool run queries ([`Executors`]), its results count rows ([`RowsAffected`]).
pub(super) trait Dialect:
    Database<Row: Columns, Connection: Executors<Self>, QueryResult: RowsAffected>
    + for<'q> Database<Arguments<'q>: IntoArguments<'q, Self>>
{
    fn id(row: &Self::Row, col: &str) -> StoreResult<Uuid>;
    fn opt_id(row: &Self::Row, col: &str) -> StoreResult<Option<Uuid>>;
    fn flag(row: &Self::Row, col: &str) -> StoreResult<bool>;

    /// An id as a parameter.
    type Id: for<'q> Encode<'q, Self> + Type<Self> + Send;
    fn id_param(id: Uuid) -> Self::Id;
    /// A flag as a parameter.
    type Flag: for<'q> Encode<'q, Self> + Type<Self> + Send;
    fn flag_param(flag: bool) -> Self::Flag;
    /// A close code as a parameter (PostgreSQL's column is an `INTEGER`).
    type Code: for<'q> Encode<'q, Self> + Type<Self> + Send;
    fn code_param(code: u16) -> Self::Code;
    /// A list of ids as one parameter, matched by [`Self::in_ids`].
    type Ids: for<'q> Encode<'q, Self> + Type<Self> + Send;
    fn ids_param(ids: &[Uuid]) -> Self::Ids;
    /// `IN` the list of ids bound as `param` (`"$3"`): a condition on the column before it.
    fn in_ids(param: &str) -> String;

    /// Ends a `SELECT` that locks the rows it reads until the transaction ends (PostgreSQL;
    /// on SQLite a write transaction holds the file's one write lock from its start).
    const FOR_UPDATE: &'static str;
    /// Run first by a transaction claiming one of a user's slots, `$1` the user id: serialises
    /// the nodes claiming for one user at once (PostgreSQL; none on SQLite, whose write lock
    /// already serialises the transactions).
    const LOCK_USER: Option<&'static str>;
    /// Begins a write transaction. On SQLite `BEGIN IMMEDIATE`, which takes the write lock (or
    /// waits for it) before anything is read: there are two writers of the file (the pool and
    /// the appender thread), and a deferred transaction that reads, then writes after the other
    /// committed, would fail at once with `SQLITE_BUSY` instead of waiting.
    const BEGIN_WRITE: &'static str;
}

/// How many rows a statement changed (sqlx has it on each backend's result by name).
pub(super) trait RowsAffected {
    fn rows_affected(&self) -> u64;
}

/// `&Pool` and `&mut` a connection as executors. sqlx implements `Executor` for them backend by
/// backend, which generic code cannot see; a [`Dialect`]'s connection hands them out instead.
pub(super) trait Executors<D: Database> {
    fn pool(pool: &Pool<D>) -> impl Executor<'_, Database = D>;
    fn conn(conn: &mut Self) -> impl Executor<'_, Database = D>;
}

impl<D, C> Executors<D> for C
where
    D: Database<Connection = C>,
    for<'c> &'c mut C: Executor<'c, Database = D>,
{
    fn pool(pool: &Pool<D>) -> impl Executor<'_, Database = D> {
        pool
    }
    fn conn(conn: &mut C) -> impl Executor<'_, Database = D> {
        conn
    }
}

/// The transaction's connection, to run a query in it.
pub(super) fn in_tx<'t, D: Dialect>(tx: &'t mut Transaction<'static, D>) -> impl Executor<'t, Database = D> {
    D::Connection::conn(tx)
}

/// A SQL store: its backend and its pools.
pub(super) trait SqlStore: Send + Sync + 'static {
    type Db: Dialect;
    fn pools(&self) -> Pools<'_, Self::Db>;

    /// Where reads go (SQLite: read-only connections beside the one writer).
    fn read_pool(&self) -> &Pool<Self::Db> {
        self.pools().read
    }
    /// Where writes go, and reads that must see them.
    fn write_pool(&self) -> &Pool<Self::Db> {
        self.pools().write
    }
    fn reader(&self) -> impl Executor<'_, Database = Self::Db> {
        <Self::Db as Database>::Connection::pool(self.read_pool())
    }
    /// One connection of its own for `ping`: the dependency check asks whether the database
    /// answers, not whether a pool busy with a reconnect storm has a connection free.
    fn health_pool(&self) -> &Pool<Self::Db> {
        self.pools().health
    }
    fn pinger(&self) -> impl Executor<'_, Database = Self::Db> {
        <Self::Db as Database>::Connection::pool(self.health_pool())
    }
    fn writer(&self) -> impl Executor<'_, Database = Self::Db> {
        <Self::Db as Database>::Connection::pool(self.write_pool())
    }
    /// A write transaction that holds the write lock from its start ([`Dialect::BEGIN_WRITE`]).
    fn begin_write(&self) -> impl Future<Output = Result<Transaction<'static, Self::Db>, sqlx::Error>> + Send + '_ {
        self.write_pool().begin_with(Self::Db::BEGIN_WRITE)
    }
}

/// A SQL store's pools: on PostgreSQL one pool serves reads and writes; `health` is a pool of
/// one connection for `ping`.
pub(super) struct Pools<'a, D: Database> {
    pub read: &'a Pool<D>,
    pub write: &'a Pool<D>,
    pub health: &'a Pool<D>,
}

/// How a SQL store stores a message (SQLite: group commit; PostgreSQL: under the conversation's
/// row lock).
#[async_trait]
pub(super) trait SqlAppend: SqlStore {
    /// [`Store::append_message`](super::Store::append_message).
    async fn append_message(&self, msg: NewMessage) -> StoreResult<Appended>;
    /// [`Store::append_answered`](super::Store::append_answered): both in one transaction.
    async fn append_answered(&self, msg: NewMessage, reply: NewMessage) -> StoreResult<AppendedPair>;
    /// Stops whatever stores messages beside the pools (SQLite's appender thread): called first
    /// by [`Store::close`](super::Store::close). Later appends fail.
    async fn close_appender(&self) {}
    /// False once that appender has stopped (its thread died): `ping`, and `/api/ready` with it,
    /// then fail instead of a ready node whose every message fails.
    fn appending(&self) -> bool {
        true
    }
}
