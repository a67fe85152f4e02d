//! `natter backup` and `natter restore`: the SQLite database to a file and back
//! (`natter_server::backup` does the work). PostgreSQL is backed up with `pg_dump`.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use natter_server::config::Database;

use crate::user::StoreArgs;

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The backup file to write (a SQLite database). Refused if it exists, unless --force.
    #[arg(long, value_name = "FILE")]
    to: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The backup file to restore (made by `natter backup`).
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

/// The data dir and SQLite file of the server's settings, or why there is none to back up or
/// restore.
fn sqlite_file(store: StoreArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    let config = store.resolve()?;
    match config.database {
        Database::SqliteFile(path) => Ok((config.data_dir, path)),
        Database::Postgres(_) => {
            bail!("the database is PostgreSQL: back it up with pg_dump and restore it with pg_restore (docs/deploy.md, Backups)")
        }
        Database::Memory => {
            bail!("the database is memory: (nothing is kept, so there is nothing to back up or restore)")
        }
    }
}

fn size(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn holds(s: &natter_server::backup::Summary) -> String {
    format!("schema version {}, {} users, {} messages, {}", s.schema_version, s.users, s.messages, size(s.bytes))
}

pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let (_, db) = sqlite_file(args.store)?;
    let done = natter_server::backup::backup(&db, &args.to, args.force).await?;
    println!("backed up {} to {} in {} ms: {}", db.display(), args.to.display(), done.millis, holds(&done.summary));
    Ok(())
}

pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let (data_dir, db) = sqlite_file(args.store)?;
    let done = natter_server::backup::restore(&args.from, &db).await?;
    println!("restored {} to {}: {}", args.from.display(), db.display(), holds(&done.summary));
    match done.set_aside {
        Some(side) => println!("the database it replaced is kept as {}", side.display()),
        None => println!("there was no database to replace"),
    }
    if !data_dir.join("jwt-secret").exists() {
        println!("no jwt-secret beside it: the server makes a new one, so clients log in (or refresh) again");
    }
    Ok(())
}
