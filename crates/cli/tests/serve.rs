//! `natter serve` start-up failures: one line on stderr naming what to fix, said once.

use std::process::Command;

#[test]
fn a_taken_address_is_one_line_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_natter"))
        .args(["serve", "--bind", &addr, "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with(&format!("natter: cannot listen on {addr}: ")), "{stderr}");
    assert_eq!(lines[0].matches("in use").count(), 1, "the cause is said once: {stderr}");
}
