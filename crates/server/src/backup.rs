//! Backups of the SQLite store (`natter backup`, `natter restore`) and the lock that tells a
//! restore a server is using the database.
//!
//! A backup is `VACUUM INTO` on a read-only connection: one read transaction, so it sees one
//! consistent snapshot while the server's writer carries on (WAL mode: readers never block the
//! writer, and the writer never blocks readers). It is written to a temp file next to the
//! target, checked (`PRAGMA integrity_check`), made a self-contained file (journal mode
//! `DELETE`: no `-wal` beside it), synced and renamed into place.
//!
//! A restore copies the backup next to the database, checks the copy (a SQLite file, intact, a
//! natter schema no newer than this binary's), sets the database it replaces aside with its
//! `-wal`/`-shm` (nothing stored is lost), and renames the copy into place — all while holding
//! the database's lock exclusively, which every `natter serve` on it holds shared.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};

use crate::store::sqlite::schema_version;

/// Why a backup or restore did not happen: one line naming the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Refused(String),
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Sqlite { path: PathBuf, message: String },
}

type Result<T> = std::result::Result<T, BackupError>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BackupError + 'a {
    move |source| BackupError::Io { what, path: path.to_path_buf(), source }
}

/// The error of a statement on the SQLite file at `path`, in words a user can act on.
fn sqlite(path: &Path) -> impl Fn(sqlx::Error) -> BackupError + '_ {
    move |e| {
        let message = match e.as_database_error().and_then(|d| d.code()).as_deref() {
            // SQLITE_NOTADB
            Some("26") => "not a SQLite database".to_owned(),
            // SQLITE_CORRUPT
            Some("11") => format!("the SQLite file is damaged ({e})"),
            _ => e.to_string(),
        };
        BackupError::Sqlite { path: path.to_path_buf(), message }
    }
}

/// The lock file of the SQLite database at `db`: `natter.db.lock` beside `natter.db`.
pub fn lock_path(db: &Path) -> PathBuf {
    with_suffix(db, ".lock")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// An advisory lock (`flock`) on a database's lock file, released when dropped (or when the
/// process dies, however it dies). `natter serve` holds it shared — the two processes of a
/// hand-over restart both hold it — and `natter restore` exclusively.
#[derive(Debug)]
pub struct DbLock {
    _file: File,
}

impl DbLock {
    /// Held by a server for as long as it runs; refused while a restore replaces the database.
    pub fn shared(db: &Path) -> Result<DbLock> {
        Self::take(db, false)
    }

    /// Held by a restore; refused while any server (or backup) uses the database.
    pub fn exclusive(db: &Path) -> Result<DbLock> {
        Self::take(db, true)
    }

    fn take(db: &Path, exclusive: bool) -> Result<DbLock> {
        let path = lock_path(db);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("cannot create the data dir", dir))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("cannot open the lock file", &path))?;
        let taken = if exclusive { file.try_lock() } else { file.try_lock_shared() };
        match taken {
            Ok(()) => Ok(DbLock { _file: file }),
            Err(TryLockError::WouldBlock) if exclusive => Err(BackupError::Refused(format!(
                "a natter server is running on {} (it holds {}): stop it first",
                db.display(),
                path.display()
            ))),
            Err(TryLockError::WouldBlock) => Err(BackupError::Refused(format!(
                "a restore is replacing {} (it holds {}): wait for it to finish",
                db.display(),
                path.display()
            ))),
            Err(TryLockError::Error(e)) => Err(io("cannot lock", &path)(e)),
        }
    }
}

/// What a checked database file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The highest migration applied (`_sqlx_migrations`).
    pub schema_version: i64,
    pub users: i64,
    pub messages: i64,
    pub bytes: u64,
}

/// What `backup` did.
#[derive(Debug)]
pub struct BackedUp {
    pub summary: Summary,
    pub millis: u128,
}

/// Copies the database at `db` (a server may be running on it) to `to`, consistently.
/// Refuses an existing `to` unless `force`.
pub async fn backup(db: &Path, to: &Path, force: bool) -> Result<BackedUp> {
    let started = Instant::now();
    if !db.is_file() {
        return Err(BackupError::Refused(format!(
            "no database at {}: give the server's --data-dir (or --database-url)",
            db.display()
        )));
    }
    if to.is_dir() {
        return Err(BackupError::Refused(format!("{} is a directory: name the backup file", to.display())));
    }
    if to.exists() && !force {
        return Err(BackupError::Refused(format!("{} already exists: pass --force to replace it", to.display())));
    }
    let name = to.file_name().ok_or_else(|| BackupError::Refused(format!("{} names no file", to.display())))?;
    let dir = match to.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(BackupError::Refused(format!("no directory {} to write the backup in", dir.display())));
    }
    // A restore in progress would hand us half a swap.
    let _lock = DbLock::shared(db)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = write_checked(db, &tmp).await;
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, to).map_err(io("cannot move the backup into place at", to))?;
    sync_dir(&dir);
    Ok(BackedUp { summary, millis: started.elapsed().as_millis() })
}

async fn write_checked(db: &Path, tmp: &Path) -> Result<Summary> {
    let _ = std::fs::remove_file(tmp);
    let mut source = open(db, true).await?;
    // Not a natter database: say so before copying it.
    summarise(&mut source, db).await?;
    // One read transaction: the writer goes on meanwhile; the copy is the snapshot it began with.
    sqlx::query("VACUUM INTO ?")
        .bind(tmp.to_string_lossy().into_owned())
        .execute(&mut source)
        .await
        .map_err(sqlite(db))?;
    source.close().await.map_err(sqlite(db))?;
    let mut copy = open(tmp, false).await?;
    let summary = check(&mut copy, tmp, "integrity_check").await?;
    copy.close().await.map_err(sqlite(tmp))?;
    File::open(tmp).and_then(|f| f.sync_all()).map_err(io("cannot sync", tmp))?;
    Ok(Summary { bytes: std::fs::metadata(tmp).map_err(io("cannot read", tmp))?.len(), ..summary })
}

/// What `restore` did.
#[derive(Debug)]
pub struct Restored {
    pub summary: Summary,
    /// Where the database it replaced now is (with its `-wal`/`-shm`), if there was one.
    pub set_aside: Option<PathBuf>,
}

/// Puts the backup `from` in place of the database at `db`. No server may be running on it.
pub async fn restore(from: &Path, db: &Path) -> Result<Restored> {
    if !from.exists() {
        return Err(BackupError::Refused(format!("no backup at {}", from.display())));
    }
    if !from.is_file() {
        return Err(BackupError::Refused(format!("{} is not a file", from.display())));
    }
    let _lock = DbLock::exclusive(db)?;
    let incoming = with_suffix(db, ".restoring");
    remove_if_there(&incoming)?;
    let checked = async {
        std::fs::copy(from, &incoming).map_err(io("cannot copy the backup to", &incoming))?;
        let mut copy = open(&incoming, false).await?;
        let summary = check(&mut copy, from, "quick_check").await?;
        let known = schema_version();
        if summary.schema_version > known {
            return Err(BackupError::Refused(format!(
                "{}: schema version {} is newer than this natter's ({known}); restore it with the natter that made it",
                from.display(),
                summary.schema_version
            )));
        }
        copy.close().await.map_err(sqlite(from))?;
        File::open(&incoming).and_then(|f| f.sync_all()).map_err(io("cannot sync", &incoming))?;
        Ok(summary)
    }
    .await;
    let summary = match checked {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&incoming);
            return Err(e);
        }
    };
    // The replaced database keeps its WAL (committed transactions not yet copied into the file)
    // under the matching names, so the side copy opens as it was.
    let set_aside = if db.exists() {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let side = with_suffix(db, &format!(".before-restore-{stamp}"));
        for suffix in ["-wal", "-shm"] {
            let from = with_suffix(db, suffix);
            if from.exists() {
                let to = with_suffix(&side, suffix);
                std::fs::rename(&from, &to).map_err(io("cannot set aside", &from))?;
            }
        }
        std::fs::rename(db, &side).map_err(io("cannot set aside", db))?;
        Some(side)
    } else {
        None
    };
    // Without their database these belong to nothing; beside the restored one they would be
    // replayed into it.
    for suffix in ["-wal", "-shm", "-journal"] {
        remove_if_there(&with_suffix(db, suffix))?;
    }
    std::fs::rename(&incoming, db).map_err(io("cannot move the restored database into place at", db))?;
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(dir);
    }
    Ok(Restored { summary, set_aside })
}

fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("cannot remove", path)(e)),
        _ => Ok(()),
    }
}

/// A rename is durable once its directory is synced; a failure here loses nothing already written.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

async fn open(path: &Path, read_only: bool) -> Result<SqliteConnection> {
    SqliteConnectOptions::new()
        .filename(path)
        .read_only(read_only)
        .busy_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(sqlite(path))
}

/// Checks a copy (`pragma`: `integrity_check` or `quick_check`), makes it self-contained
/// (journal mode `DELETE`) and says what it holds. `name` is the file the user knows it by.
async fn check(conn: &mut SqliteConnection, name: &Path, pragma: &str) -> Result<Summary> {
    sqlx::query("PRAGMA journal_mode = DELETE").execute(&mut *conn).await.map_err(sqlite(name))?;
    let problems: Vec<String> =
        sqlx::query_scalar(&format!("PRAGMA {pragma}")).fetch_all(&mut *conn).await.map_err(sqlite(name))?;
    if problems != ["ok"] {
        let first: Vec<&str> = problems.iter().take(3).map(String::as_str).collect();
        return Err(BackupError::Sqlite {
            path: name.to_path_buf(),
            message: format!("the SQLite file is damaged ({pragma}: {})", first.join("; ")),
        });
    }
    summarise(conn, name).await
}

async fn summarise(conn: &mut SqliteConnection, name: &Path) -> Result<Summary> {
    let not_natter =
        || BackupError::Refused(format!("{}: not a natter database (no natter schema in it)", name.display()));
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('_sqlx_migrations', 'messages', 'users')",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(sqlite(name))?;
    if tables.len() != 3 {
        return Err(not_natter());
    }
    let (version, failed): (Option<i64>, i64) =
        sqlx::query_as("SELECT MAX(version), COALESCE(SUM(success = 0), 0) FROM _sqlx_migrations")
            .fetch_one(&mut *conn)
            .await
            .map_err(sqlite(name))?;
    if failed > 0 {
        return Err(BackupError::Refused(format!(
            "{}: a migration failed half-way in it; it is not a database natter can open",
            name.display()
        )));
    }
    let schema_version = version.ok_or_else(not_natter)?;
    let users: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&mut *conn).await.map_err(sqlite(name))?;
    let messages: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM messages").fetch_one(&mut *conn).await.map_err(sqlite(name))?;
    Ok(Summary { schema_version, users, messages, bytes: std::fs::metadata(name).map(|m| m.len()).unwrap_or(0) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_share_the_lock_and_a_restore_excludes_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("natter.db");
        let old = DbLock::shared(&db).unwrap();
        let new = DbLock::shared(&db).expect("the two processes of a hand-over restart both hold it");
        let e = DbLock::exclusive(&db).unwrap_err().to_string();
        assert!(e.starts_with("a natter server is running on"), "{e}");
        drop((old, new));
        let restore = DbLock::exclusive(&db).unwrap();
        let e = DbLock::shared(&db).unwrap_err().to_string();
        assert!(e.starts_with("a restore is replacing"), "{e}");
        drop(restore);
        DbLock::shared(&db).unwrap();
    }
}
