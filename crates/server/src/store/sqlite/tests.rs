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
