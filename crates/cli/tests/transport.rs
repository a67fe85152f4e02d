//! `natter serve` with a low open-file limit under a flood of silent sockets (issue 14): before,
//! 150 sockets that never sent a byte stayed open for ever and `/api/health` went unanswered
//! (`accept error: Too many open files`). Now the header timeout closes them, the accept loop
//! backs off and goes on, and a socket that was already open keeps working meanwhile.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// The open-file limit of the server under test: the process needs ~20 for itself.
const NOFILE: u64 = 64;
const SILENT: usize = 150;

struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(header_timeout_ms: u64) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_natter"));
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--database-url", "memory:", "--http-header-timeout-ms"])
        .arg(header_timeout_ms.to_string())
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only setrlimit (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: NOFILE as libc::rlim_t, rlim_max: NOFILE as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().rsplit("http://").next().unwrap().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{line}");
    Server { child, addr, _dir: dir }
}

/// `GET /api/health` on a new connection: whether it answered 200 within `within`.
async fn health(addr: &str, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.ok()?;
        Some(got.starts_with(b"HTTP/1.1 200"))
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
}

async fn post(http: &reqwest::Client, url: String, token: Option<&str>, body: Value) -> Value {
    let mut req = http.post(url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    res.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_beyond_the_open_file_limit_do_not_take_the_server_down() {
    let mut server = spawn(1_000);
    let addr = server.addr.clone();
    assert!(health(&addr, Duration::from_secs(5)).await);
    // A socket opened before the flood.
    // A new connection per request: none is left open (the server has few files), and none is
    // reused just as the 1 s header timeout closes it.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let base = format!("http://{addr}");
    let creds = json!({"username": "alice", "password": "correct-horse-battery"});
    post(&http, format!("{base}/api/auth/register"), None, creds.clone()).await;
    let token =
        post(&http, format!("{base}/api/auth/login"), None, creds).await["access_token"].as_str().unwrap().to_string();
    let bot =
        post(&http, format!("{base}/api/bots"), Some(&token), json!({"name": "Echo", "engine": {"kind": "echo"}}))
            .await["id"]
            .as_str()
            .unwrap()
            .to_string();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/api/ws/chat/{bot}?token={token}")).await.unwrap();
    let first = ws.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("connection_established"));

    // The flood: more silent sockets than the server has files.
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    // Out of files: a new request waits in the backlog behind the flood...
    assert!(!health(&addr, Duration::from_millis(500)).await, "the flood did not exhaust the server's files");
    // ...while the open socket is served.
    for id in 0..3 {
        ws.send(Message::Text(json!({"type": "ping", "id": id}).to_string().into())).await.unwrap();
        let pong = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.contains("pong") => return t.to_string(),
                    Some(Ok(_)) => continue,
                    other => panic!("the open socket broke: {other:?}"),
                }
            }
        })
        .await
        .expect("the open socket answers during the flood");
        assert!(pong.contains(&format!("\"id\":{id}")), "{pong}");
    }
    // The header timeout frees the files; health answers again while the flood is still open.
    assert!(health(&addr, Duration::from_secs(20)).await, "health answers once the silent sockets are timed out");
    let recovered = started.elapsed();
    eprintln!("{SILENT} silent sockets, RLIMIT_NOFILE {NOFILE}, header timeout 1 s: /api/health answered again after {recovered:?}");
    assert!(server.child.try_wait().unwrap().is_none(), "the server never dies");
    drop(silent);
    drop(ws);

    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let mut log = String::new();
    server.child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    let episodes = log.matches("cannot accept connections").count();
    assert!(episodes >= 1, "the accept errors are logged: {log}");
    assert!(episodes <= 10, "once per episode, not once per failed accept: {episodes} lines");
    assert!(log.contains("accepting connections again"), "{log}");
}
