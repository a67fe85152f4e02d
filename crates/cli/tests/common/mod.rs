//! Shared by the tests that run real `natter serve` processes: start one (and SIGKILL it), talk
//! REST to it, read a whole conversation, and a TCP proxy the test can cut.
#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use natter_proto::WireMessage;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The NATS URL and a fresh PostgreSQL schema for a test of several nodes, or None after a
/// loud SKIPPED line naming `test` when either is not configured (a failure when `CI` is set).
pub async fn shared_services(test: &str) -> Option<(String, natter_server::store::postgres::TestSchema)> {
    let nats = natter_server::testenv::service_url("NATTER_TEST_NATS_URL", test, "NATS")?;
    let schema = natter_server::store::postgres::TestSchema::from_env(test).await?;
    Some((nats, schema))
}

/// Flags that lift the per-connection and per-user rates: these tests' clients send in bursts.
pub const NO_RATE_LIMITS: &[&str] = &[
    "--messages-per-second",
    "100000",
    "--message-burst",
    "100000",
    "--frames-per-second",
    "100000",
    "--frame-burst",
    "100000",
    "--user-messages-per-second",
    "100000",
    "--user-message-burst",
    "100000",
];

/// A `natter serve` child process on a loopback port, killed (SIGKILL) on drop.
pub struct Node {
    pub child: Child,
    pub addr: SocketAddr,
    /// Kept open: a server stopped with SIGTERM prints a last line.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Node {
    /// Starts `natter serve` with its data in `dir` and `args`; returns once it listens.
    pub fn start(dir: &Path, args: &[&str]) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_natter"))
            .arg("serve")
            .args(["--bind", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(["--log-format", "json"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("natter serve starts");
        // The first line says where it listens.
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .parse()
            .unwrap();
        Node { child, addr, _stdout: stdout }
    }

    /// SIGTERM (a graceful stop), and wait until the process has exited; it must exit cleanly.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "natter serve exits cleanly on SIGTERM: {status}");
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// POSTs JSON and expects a 2xx; returns the body.
pub async fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: Value) -> Value {
    let mut req = reqwest::Client::new().post(format!("http://{addr}{path}")).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    assert!(res.status().is_success(), "{path}: {}", res.status());
    res.json().await.unwrap()
}

/// The whole conversation of the token's user with `bot`, through the REST history, in pages.
pub async fn history(addr: SocketAddr, bot: &str, token: &str) -> Result<Vec<WireMessage>, reqwest::Error> {
    let mut all: Vec<WireMessage> = Vec::new();
    loop {
        let after = all.last().map_or(0, |m| m.seq);
        let page: Value = reqwest::Client::new()
            .get(format!("http://{addr}/api/bots/{bot}/messages?after_seq={after}&limit=500"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let msgs: Vec<WireMessage> = serde_json::from_value(page["messages"].clone()).unwrap();
        let more = page["has_more"].as_bool().unwrap() && !msgs.is_empty();
        all.extend(msgs);
        if !more {
            return Ok(all);
        }
    }
}

/// Reads one HTTP request (headers, then as much body as `Content-Length` says) from a fake
/// provider's socket; false if the connection ended first.
pub async fn read_request(sock: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    loop {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .map_or(0, |v| v.parse::<usize>().unwrap());
            if got.len() >= end + 4 + len {
                return true;
            }
        }
    }
}

/// A fake OpenAI-compatible provider on a raw socket: answers every request with an SSE stream
/// of `words` words ("w0 ", "w1 ", …), one every `every`, then `[DONE]`. Returns its base URL.
pub async fn streaming_provider(words: usize, every: std::time::Duration) -> String {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !read_request(&mut sock).await {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for i in 0..words {
                    let chunk = serde_json::json!({"choices": [{"index": 0, "delta": {"content": format!("w{i} ")}}]});
                    if sock.write_all(format!("data: {chunk}\n\n").as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
                let _ = sock.write_all(b"data: [DONE]\n\n").await;
            });
        }
    });
    format!("http://{addr}/v1")
}

/// A TCP proxy the test can cut (every connection dropped, new ones refused) and restore.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<Mutex<watch::Sender<bool>>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _) = watch::channel(true);
        let up = Arc::new(Mutex::new(tx));
        let state = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                let mut rx = state.lock().unwrap().subscribe();
                if !*rx.borrow_and_update() {
                    continue; // cut: drop the connection
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy { addr, up }
    }

    pub fn cut(&self) {
        self.up.lock().unwrap().send_replace(false);
    }

    pub fn restore(&self) {
        self.up.lock().unwrap().send_replace(true);
    }
}

/// The address a service URL (`postgres://…`, `nats://…`) points at.
pub fn host_port(url: &str, default_port: u16) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split(['/', '?']).next().unwrap();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:{default_port}") };
    hostport.replace("localhost", "127.0.0.1").to_socket_addrs().unwrap().next().unwrap()
}

/// `url` with its host and port replaced by `proxy`'s.
pub fn via(url: &str, proxy: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let authority = rest.split(['/', '?']).next().unwrap();
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@")).unwrap_or_default();
    format!("{scheme}://{userinfo}{proxy}{}", &rest[authority.len()..])
}
