//! Tests of SQLite: the whole conformance suite on one file, and reopening a file.

use super::super::{NewUser, Store};
use super::*;

/// Every case in one run on one file (the per-case tests, `store::conformance::cases`, give
/// each case a fresh file of its own).
#[tokio::test]
async fn conformance_on_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("natter.db")).await.unwrap();
    super::super::conformance::run_all(std::sync::Arc::new(store)).await;
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("natter.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.create_user(NewUser { username: "keep".into(), password_hash: "h".into(), is_admin: false }).await.unwrap();
    drop(store);
    let again = SqliteStore::open(&path).await.unwrap();
    assert!(again.user_by_username("keep").await.unwrap().is_some());
}

/// `ping` (the node's dependency check, and `/api/ready`) has a connection of its own: a
/// reconnect storm that keeps every reader busy is load, not a lost database. When ping waited
/// behind the readers, a 2 s check timed out under a storm, the node declared the database
/// lost and closed every socket with 1013, and the reconnects that followed kept it so
/// (`bench/compare.py`'s cold-restart storm, 2026-12-07: 2 345 messages timed out).
#[tokio::test]
async fn ping_answers_while_every_reader_is_busy() {
    let store = SqliteStore::temporary().await.unwrap();
    let mut held = Vec::new();
    while let Ok(Ok(conn)) = tokio::time::timeout(std::time::Duration::from_millis(200), store.read.acquire()).await {
        held.push(conn);
    }
    assert!(!held.is_empty());
    let pinged = tokio::time::timeout(std::time::Duration::from_secs(1), store.ping()).await;
    assert!(matches!(pinged, Ok(Ok(()))), "ping waited for a reader: {pinged:?}");
}
