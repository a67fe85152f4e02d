//! `natter user`: creating users and admins on the store, without a server.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn natter(data: &std::path::Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_natter"))
        .arg("user")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env_remove("NATTER_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test]
async fn create_promote_and_demote() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let o = natter(&data, &["create", "root", "--admin"], "a-long-password\n");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("created root, an admin"));
    assert!(!text(&o).contains("a-long-password"), "the password is never printed");
    let o = natter(&data, &["create", "carol"], "another-password\n");
    assert!(o.status.success(), "{}", text(&o));

    // Errors are one clear line and a non-zero exit.
    let o = natter(&data, &["create", "carol"], "another-password\n");
    assert!(!o.status.success());
    assert!(text(&o).contains("a user named \"carol\" already exists"), "{}", text(&o));
    let o = natter(&data, &["create", "dave"], "short\n");
    assert!(!o.status.success());
    assert!(text(&o).contains("at least 8 characters"), "{}", text(&o));
    let o = natter(&data, &["create", "Bad Name"], "long-enough-pw\n");
    assert!(!o.status.success());
    let o = natter(&data, &["promote", "nobody"], "");
    assert!(!o.status.success());
    assert!(text(&o).contains("no user named \"nobody\""));

    let o = natter(&data, &["promote", "carol"], "");
    assert!(o.status.success(), "{}", text(&o));
    let config = natter_server::Config::new(data.clone());
    let store = natter_server::app::open_store(&config).await.unwrap();
    assert!(store.user_by_username("root").await.unwrap().unwrap().is_admin);
    assert!(store.user_by_username("carol").await.unwrap().unwrap().is_admin);
    drop(store);
    let o = natter(&data, &["demote", "carol"], "");
    assert!(o.status.success());
    let store = natter_server::app::open_store(&config).await.unwrap();
    assert!(!store.user_by_username("carol").await.unwrap().unwrap().is_admin);
    // The password works: it was hashed like any other.
    let root = store.user_by_username("root").await.unwrap().unwrap();
    assert!(natter_server::auth::verify_password("a-long-password", &root.password_hash));
}
