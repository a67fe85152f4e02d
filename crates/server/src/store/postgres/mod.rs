//! The PostgreSQL store, for several natter nodes sharing one database.
//!
//! Seq allocation takes the conversation's row lock (`UPDATE conversations SET last_seq =
//! last_seq + 1 … RETURNING`) inside the transaction that inserts the message, so writers on
//! different nodes are serialised per conversation and seqs stay gap-free and unique; the
//! `client_id` duplicate check runs after that lock, so two nodes racing with the same
//! `client_id` store it once. Ids are native UUIDs; times are Unix milliseconds, as on SQLite.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgQueryResult, PgRow};
use sqlx::{PgPool, Postgres, Row};
use uuid::Uuid;

use super::sql::{Dialect, Pools, RowsAffected, SqlStore};
use super::{StoreError, StoreResult};

mod coordination;
mod messages;
mod test_schema;

pub use test_schema::TestSchema;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Ids and flags have native types.
impl Dialect for Postgres {
    fn id(row: &PgRow, col: &str) -> StoreResult<Uuid> {
        Ok(row.try_get(col)?)
    }
    fn opt_id(row: &PgRow, col: &str) -> StoreResult<Option<Uuid>> {
        Ok(row.try_get(col)?)
    }
    fn flag(row: &PgRow, col: &str) -> StoreResult<bool> {
        Ok(row.try_get(col)?)
    }

    type Id = Uuid;
    fn id_param(id: Uuid) -> Uuid {
        id
    }
    type Flag = bool;
    fn flag_param(flag: bool) -> bool {
        flag
    }
    type Code = i32;
    fn code_param(code: u16) -> i32 {
        code.into()
    }
    /// An array.
    type Ids = Vec<Uuid>;
    fn ids_param(ids: &[Uuid]) -> Vec<Uuid> {
        ids.to_vec()
    }
    fn in_ids(param: &str) -> String {
        format!("= ANY({param})")
    }

    const FOR_UPDATE: &'static str = " FOR UPDATE";
    /// A transaction-scoped advisory lock on the user, so count-then-insert cannot overshoot
    /// when two nodes admit at once.
    const LOCK_USER: Option<&'static str> = Some("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))");
    const BEGIN_WRITE: &'static str = "BEGIN";
}

impl RowsAffected for PgQueryResult {
    fn rows_affected(&self) -> u64 {
        self.rows_affected()
    }
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    health: PgPool,
}

impl PostgresStore {
    /// Connects (`postgres://user@host:port/db`, any libpq-style URL sqlx accepts) and applies
    /// migrations. Several nodes may start at once: sqlx serialises migrations with an
    /// advisory lock.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let opts: PgConnectOptions = url.parse().map_err(|e| StoreError::Backend(format!("bad database url: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            // A database that went away must fail requests (and `/api/ready`) quickly rather
            // than queue them.
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(opts.clone())
            .await?;
        MIGRATOR.run(&pool).await.map_err(|e| StoreError::Backend(format!("migrations failed: {e}")))?;
        let health =
            PgPoolOptions::new().max_connections(1).acquire_timeout(Duration::from_secs(3)).connect_with(opts).await?;
        Ok(PostgresStore { pool, health })
    }
}

impl SqlStore for PostgresStore {
    type Db = Postgres;
    fn pools(&self) -> Pools<'_, Postgres> {
        Pools { read: &self.pool, write: &self.pool, health: &self.health }
    }
}
