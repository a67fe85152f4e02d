//! `natter doctor` against the real server on port 0, healthy and with the faults people
//! meet: no server, the wrong port, bad tokens, bots they may not use, and proxies that do
//! not pass WebSockets or cut idle connections. Each case runs the real binary with `--json`
//! and checks the step that fails and the cause it names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use natter_server::{Config, Server};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASSWORD: &str = "correct-horse-battery";

struct App {
    addr: SocketAddr,
    base: String,
    dir: tempfile::TempDir,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl App {
    async fn spawn() -> App {
        Self::spawn_with(|_| {}).await
    }

    async fn spawn_with(f: impl FnOnce(&mut Config)) -> App {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_tests(dir.path().to_path_buf());
        f(&mut config);
        let server = Server::build(config).await.expect("server starts");
        let addr = server.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.run_until_stopped(async move {
            let _ = rx.await;
        }));
        App {
            addr,
            base: format!("http://{addr}"),
            dir,
            http: reqwest::Client::new(),
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.handle.take().unwrap()).await;
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Value {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        assert!(res.status().is_success(), "{path}: {}", res.status());
        res.json().await.unwrap()
    }

    /// Registers and logs in; returns (user id, access token).
    async fn user(&self, name: &str) -> (String, String) {
        let u = self.post("/api/auth/register", None, json!({"username": name, "password": PASSWORD})).await;
        let t = self.post("/api/auth/login", None, json!({"username": name, "password": PASSWORD})).await;
        (u["id"].as_str().unwrap().to_owned(), t["access_token"].as_str().unwrap().to_owned())
    }

    async fn echo_bot(&self, token: &str) -> String {
        let b = self.post("/api/bots", Some(token), json!({"name": "Echo", "engine": {"kind": "echo"}})).await;
        b["id"].as_str().unwrap().to_owned()
    }

    /// A token signed with this server's secret, with the given `exp` offset from now.
    fn token_expiring_in(&self, user_id: &str, secs: i64) -> String {
        let secret = hex::decode(std::fs::read_to_string(self.dir.path().join("jwt-secret")).unwrap().trim()).unwrap();
        sign(&secret, user_id, secs)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

fn sign(secret: &[u8], user_id: &str, exp_in: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": user_id, "name": "alice", "iat": now - 900, "exp": now + exp_in});
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(secret))
        .unwrap()
}

/// Runs `natter doctor <args>`; returns the exit code and stdout.
async fn run(args: Vec<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_natter"))
            .arg("doctor")
            .args(&args)
            .output()
            .expect("natter runs");
        (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap())
    })
    .await
    .unwrap()
}

/// Runs `natter doctor <args> --json --timeout 5`; returns the exit code and the parsed report.
async fn doctor(args: &[&str]) -> (i32, Value) {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(["--json".into(), "--timeout".into(), "5".into()]);
    let (code, out) = run(all).await;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("--json output does not parse ({e}):\n{out}"));
    assert_eq!(v["ok"], code == 0, "ok matches the exit code: {v:#}");
    let names: Vec<&str> = v["steps"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "url",
            "dns",
            "tcp",
            "tls",
            "health",
            "cors",
            "token",
            "bot",
            "handshake",
            "established",
            "ping",
            "watch",
            "send",
            "sse_stream",
            "sse_ping",
            "ledger"
        ]
    );
    let verdict = match code {
        0 => "ok",
        3 => "websocket_blocked",
        _ => "fail",
    };
    assert_eq!(v["verdict"], verdict, "the verdict matches the exit code: {v:#}");
    for s in v["steps"].as_array().unwrap() {
        let status = s["status"].as_str().unwrap();
        assert!(["ok", "warn", "fail", "skipped"].contains(&status), "{s}");
        if status == "fail" {
            assert!(s["cause"].is_string() && s["fix"].is_string(), "a failure names a cause and a fix: {s}");
        }
    }
    (code, v)
}

fn step<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()
}

fn first_failure(v: &Value) -> &Value {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["status"] == "fail")
        .unwrap_or_else(|| panic!("no failing step: {v:#}"))
}

/// Asserts that `name` is the first failing step and that its cause mentions `cause`.
#[track_caller]
fn assert_fails_at(v: &Value, name: &str, cause: &str) {
    let f = first_failure(v);
    assert_eq!(f["name"], name, "first failure: {v:#}");
    let text = f["cause"].as_str().unwrap();
    assert!(text.to_lowercase().contains(&cause.to_lowercase()), "cause {text:?} should mention {cause:?}");
}

fn status<'a>(v: &'a Value, name: &str) -> &'a str {
    step(v, name)["status"].as_str().unwrap()
}

/// What a test proxy in front of the server does wrong.
#[derive(Clone, Copy)]
enum Fault {
    /// Drops the `Upgrade` header of every request, as a proxy without WebSocket settings does.
    StripUpgrade,
    /// Answers WebSocket upgrades itself with nginx's HTML 502 page; passes everything else.
    Html502OnUpgrade,
    /// Answers WebSocket upgrades itself with a plain 400, as some load balancers and
    /// corporate proxies do; passes everything else.
    Status400OnUpgrade,
    /// Closes a connection when nothing has passed either way for this long.
    CutIdleAfter(Duration),
    /// Buffers event streams, as nginx with `proxy_buffering on` and `proxy_ignore_headers
    /// X-Accel-Buffering` does: their headers pass, their events never. Other answers pass
    /// with `Connection: close`, so that every request comes on a connection of its own.
    BufferEventStreams,
    /// Not natter at all: an HTML 404 for every request (the wrong port).
    NotNatter,
    /// A proxy whose upstream is down: an HTML 502 for every request.
    UpstreamDown,
}

const HTML_502: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n";
const HTML_404: &str =
    "<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>It works, but not here.</body></html>";

/// Starts a proxy with a fault in front of `upstream`; returns its address.
async fn proxy(upstream: SocketAddr, fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(relay(client, upstream, fault));
        }
    });
    addr
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, fault: Fault) {
    // The first request's head; the rest of the connection is piped as is.
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let is_upgrade = head.to_ascii_lowercase().contains("\r\nupgrade: websocket");
    let answer = |status: &str, body: &str| {
        format!("HTTP/1.1 {status}\r\nServer: nginx/1.24.0\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
    };
    let head = match fault {
        Fault::NotNatter => {
            let _ = client.write_all(answer("404 Not Found", HTML_404).as_bytes()).await;
            return;
        }
        Fault::UpstreamDown => {
            let _ = client.write_all(answer("502 Bad Gateway", HTML_502).as_bytes()).await;
            return;
        }
        Fault::Html502OnUpgrade if is_upgrade => {
            let _ = client.write_all(answer("502 Bad Gateway", HTML_502).as_bytes()).await;
            return;
        }
        Fault::Status400OnUpgrade if is_upgrade => {
            let _ = client.write_all(answer("400 Bad Request", "WebSocket upgrades are not allowed").as_bytes()).await;
            return;
        }
        Fault::StripUpgrade => head
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("upgrade:"))
            .collect::<Vec<_>>()
            .join("\r\n"),
        _ => head,
    };
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    if server.write_all(head.as_bytes()).await.is_err() || server.write_all(&buf[end..]).await.is_err() {
        return;
    }
    match fault {
        Fault::BufferEventStreams => {
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
            let mut buf = Vec::new();
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                match sr.read(&mut chunk).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            if head.to_ascii_lowercase().contains("content-type: text/event-stream") {
                // The head goes on; the events stay in the buffer until the stream ends.
                let _ = cw.write_all(head.as_bytes()).await;
                let mut held = buf[end..].to_vec();
                let _ = sr.read_to_end(&mut held).await;
                return;
            }
            let head = head.replacen("\r\n", "\r\nConnection: close\r\n", 1);
            if cw.write_all(head.as_bytes()).await.is_ok() && cw.write_all(&buf[end..]).await.is_ok() {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            }
        }
        Fault::CutIdleAfter(idle) => {
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let (mut a, mut b) = ([0u8; 8192], [0u8; 8192]);
            loop {
                tokio::select! {
                    n = cr.read(&mut a) => match n { Ok(n) if n > 0 => { if sw.write_all(&a[..n]).await.is_err() { return } } _ => return },
                    n = sr.read(&mut b) => match n { Ok(n) if n > 0 => { if cw.write_all(&b[..n]).await.is_err() { return } } _ => return },
                    // Nothing either way for `idle`: drop both connections, as an idle timeout does.
                    _ = tokio::time::sleep(idle) => return,
                }
            }
        }
        _ => {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_green_against_the_real_server_with_send_and_watch() {
    // A short heartbeat, so that the watch sees pings and proves the doctor answers them
    // (without pongs the server would close with 4408 after 2 s).
    let app = App::spawn_with(|c| {
        c.heartbeat_interval = Duration::from_millis(700);
        c.allowed_origins = vec!["http://localhost:5173".into()];
    })
    .await;
    let (_, token) = app.user("alice").await;
    let bot = app.echo_bot(&token).await;
    let (code, v) = doctor(&[
        &app.base,
        "--token",
        &token,
        "--bot",
        &bot,
        "--send",
        "--watch",
        "2",
        "--origin",
        "http://localhost:5173",
    ])
    .await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["ok"], true);
    // Every step passes, over both transports (the sse steps too), but tls on plain http://.
    for s in v["steps"].as_array().unwrap().iter().filter(|s| s["name"] != "tls") {
        assert_eq!(s["status"], "ok", "{s}: {v:#}");
    }
    assert_eq!(v["verdict"], "ok");
    // Both transports: the event stream opened, and pings went up by POST.
    let stream = step(&v, "sse_stream")["detail"].as_str().unwrap();
    for part in
        ["200 text/event-stream", "connection_established in", "frames go to POST /api/sse/chat/", "single-use ticket"]
    {
        assert!(stream.contains(part), "{part}: {stream}");
    }
    assert!(step(&v, "sse_ping")["detail"].as_str().unwrap().starts_with("5 pings by POST: min"), "{v:#}");
    assert_eq!(status(&v, "tls"), "skipped");
    assert!(step(&v, "cors")["detail"].as_str().unwrap().contains("API allows it"), "{v:#}");
    let handshake = step(&v, "handshake")["detail"].as_str().unwrap();
    assert!(handshake.contains("101 Switching Protocols") && handshake.contains("single-use ticket"), "{handshake}");
    assert!(step(&v, "established")["detail"].as_str().unwrap().contains("connection_established"));
    let ping = step(&v, "ping")["detail"].as_str().unwrap();
    assert!(ping.contains("min") && ping.contains("median") && ping.contains("max"), "{ping}");
    let watch = step(&v, "watch")["detail"].as_str().unwrap();
    assert!(watch.contains("still open") && !watch.contains(" 0 server pings"), "{watch}");
    assert!(step(&v, "send")["detail"].as_str().unwrap().contains("bot reply"));
    // The ledger is another issue: either the server has none yet, or it lists attempts.
    let ledger = step(&v, "ledger");
    match ledger["status"].as_str().unwrap() {
        "skipped" => {
            assert!(ledger["detail"].as_str().unwrap().contains("server has no connection ledger"), "{ledger}")
        }
        s => assert_eq!(s, "ok", "{ledger}"),
    }
    // Never print the token.
    let text = v.to_string();
    assert!(!text.contains(&token) && !text.contains("eyJ"), "the token leaked: {text}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_report_after_a_login_shows_symbols_and_never_the_password_or_token() {
    let app = App::spawn().await;
    let (_, token) = app.user("carol").await;
    app.echo_bot(&token).await;
    let (code, out) =
        run(vec![app.base.clone(), "--username".into(), "carol".into(), "--password".into(), PASSWORD.into()]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("✓ token") && out.contains("user carol"), "{out}");
    assert!(out.contains("✓ established"), "{out}");
    assert!(out.contains("– send") && out.contains("pass --send"), "{out}");
    assert!(out.contains("All checks passed"), "{out}");
    assert!(!out.contains('\x1b'), "no colour when stdout is not a terminal: {out}");
    assert!(!out.contains(PASSWORD) && !out.contains("eyJ"), "a secret leaked: {out}");

    // A wrong password is the token step's failure, and the password stays out of the output.
    let wrong = "not-the-password-123";
    let (code, v) = doctor(&[&app.base, "--username", "carol", "--password", wrong]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "token", "wrong username or password");
    assert!(!v.to_string().contains(wrong));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_not_running_is_a_refused_tcp_connection() {
    let app = App::spawn().await;
    let base = app.base.clone();
    app.stop().await;
    let (code, v) = doctor(&[&base, "--token", "x.y.z"]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "tcp", "connection refused: nothing listens on");
    assert!(step(&v, "tcp")["fix"].as_str().unwrap().contains("natter serve"));
    for name in ["health", "token", "handshake", "ledger"] {
        assert_eq!(status(&v, name), "skipped", "{name}");
        assert!(step(&v, name)["detail"].as_str().unwrap().contains("tcp failed"), "{name} says why");
    }
    // The text report says the same, with the summary naming the layer.
    let (code, out) = run(vec![base.clone()]).await;
    assert_eq!(code, 1);
    assert!(out.contains("✗ tcp") && out.contains("cause: connection refused"), "{out}");
    assert!(out.contains("– health") && out.contains("First failing layer: the network (TCP connect)"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_port_answers_but_is_not_natter() {
    // Something else listens there: a web server that answers every request with a 404 page.
    let other = proxy("127.0.0.1:9".parse().unwrap(), Fault::NotNatter).await;
    let (code, v) = doctor(&[&format!("http://{other}")]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "health", "not natter's API");
    let detail = step(&v, "health")["detail"].as_str().unwrap();
    assert!(detail.contains("404") && detail.contains("HTML page titled \"404 Not Found\""), "{detail}");

    // A proxy that answers, but whose natter is down.
    let proxy_only = proxy("127.0.0.1:9".parse().unwrap(), Fault::UpstreamDown).await;
    let (code, v) = doctor(&[&format!("http://{proxy_only}")]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "health", "a proxy in front answers, but cannot reach natter (502)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_expired_and_malformed_tokens_name_what_is_wrong() {
    let app = App::spawn().await;
    let (id, token) = app.user("alice").await;
    let bot = app.echo_bot(&token).await;

    let (code, v) = doctor(&[&app.base, "--token", &sign(b"some-other-servers-secret", &id, 600), "--bot", &bot]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "token", "does not accept the token's signature");
    // The socket says the same, explained from the server's code registry.
    assert_eq!(status(&v, "handshake"), "ok");
    let est = step(&v, "established");
    assert_eq!(est["status"], "fail");
    assert!(est["detail"].as_str().unwrap().contains("4401 unauthorized"), "{est}");

    let expired = app.token_expiring_in(&id, -120);
    let (code, v) = doctor(&[&app.base, "--token", &expired, "--bot", &bot]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "token", "the access token expired");
    assert!(step(&v, "token")["cause"].as_str().unwrap().contains(" ago"));
    assert!(step(&v, "token")["fix"].as_str().unwrap().contains("/api/auth/refresh"));
    assert!(!v.to_string().contains(&expired));

    let (code, v) = doctor(&[&app.base, "--token", "not-a-jwt", "--bot", &bot]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "token", "malformed: it has 1 dot-separated part");
    assert_eq!(status(&v, "bot"), "skipped");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_bot_and_bot_without_permission_fail_at_the_bot_step() {
    let app = App::spawn().await;
    let (_, alice) = app.user("alice").await;
    let (_, bob) = app.user("bob").await;
    let private = app.echo_bot(&alice).await;

    let unknown = uuid::Uuid::new_v4().to_string();
    let (code, v) = doctor(&[&app.base, "--token", &alice, "--bot", &unknown]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "bot", "No bot has this id");
    assert!(step(&v, "bot")["detail"].as_str().unwrap().contains("4404 bot_not_found"));
    assert!(step(&v, "established")["detail"].as_str().unwrap().contains("4404"));

    let (code, v) = doctor(&[&app.base, "--token", &bob, "--bot", &private]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "bot", "not allowed to chat with this bot");
    let bot = step(&v, "bot");
    assert!(bot["cause"].as_str().unwrap().contains("private and not shared with you"), "{bot}");
    assert!(bot["fix"].as_str().unwrap().contains("owner can share it with POST /api/bots/"), "{bot}");
    assert_eq!(status(&v, "ping"), "skipped");

    // An origin the server does not allow: CORS fails, and the socket closes with 1008.
    let (code, v) =
        doctor(&[&app.base, "--token", &alice, "--bot", &private, "--origin", "https://evil.example"]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "cors", "not allowed");
    assert!(step(&v, "established")["detail"].as_str().unwrap().contains("1008 origin_not_allowed"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_strips_upgrade_is_named_with_the_nginx_and_caddy_fix_and_sse_still_chats() {
    let app = App::spawn().await;
    let (_, token) = app.user("alice").await;
    let bot = app.echo_bot(&token).await;
    let via = proxy(app.addr, Fault::StripUpgrade).await;
    let (code, v) = doctor(&[&format!("http://{via}"), "--token", &token, "--bot", &bot]).await;
    assert_eq!(code, 3, "the WebSocket is blocked, but chat works over SSE: {v:#}");
    assert_eq!(v["verdict"], "websocket_blocked");
    assert_eq!(status(&v, "health"), "ok", "plain requests pass the proxy");
    assert_eq!(status(&v, "bot"), "ok");
    assert_fails_at(&v, "handshake", "a proxy in between does not pass WebSockets");
    let fix = step(&v, "handshake")["fix"].as_str().unwrap();
    for line in [
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection \"upgrade\";",
        "Caddy",
    ] {
        assert!(fix.contains(line), "{fix}");
    }
    assert_eq!(status(&v, "established"), "skipped");
    assert_eq!((status(&v, "sse_stream"), status(&v, "sse_ping")), ("ok", "ok"), "{v:#}");
    app.stop().await;
}

/// A proxy that holds event streams back: the WebSocket works, the fallback would not. The
/// sse_stream step names the buffering and its fix, and the run fails (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_buffers_event_streams_is_named_with_the_fix() {
    let app = App::spawn().await;
    let (_, token) = app.user("alice").await;
    let bot = app.echo_bot(&token).await;
    let via = proxy(app.addr, Fault::BufferEventStreams).await;
    let (code, v) = doctor(&[&format!("http://{via}"), "--token", &token, "--bot", &bot]).await;
    assert_eq!((code, v["verdict"].as_str()), (1, Some("fail")), "{v:#}");
    for name in ["health", "token", "bot", "handshake", "established", "ping"] {
        assert_eq!(status(&v, name), "ok", "{name}: {v:#}");
    }
    assert_fails_at(&v, "sse_stream", "buffers the response");
    let sse = step(&v, "sse_stream");
    assert!(sse["detail"].as_str().unwrap().contains("200 text/event-stream"), "{sse}");
    assert!(sse["fix"].as_str().unwrap().contains("proxy_buffering off;"), "{sse}");
    assert_eq!(status(&v, "sse_ping"), "skipped");
    app.stop().await;
}

/// A proxy that answers every WebSocket upgrade with 400 and passes the rest: the doctor says
/// the WebSocket is blocked but HTTP streaming works, what to fix, and exits 3 — not 1, which
/// is for a path where chat does not work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_upgrades_leaves_chat_over_sse_and_says_so() {
    let app = App::spawn().await;
    let (_, token) = app.user("alice").await;
    let bot = app.echo_bot(&token).await;
    let base = format!("http://{}", proxy(app.addr, Fault::Status400OnUpgrade).await);
    let (code, out) = run(vec![base.clone(), "--token".into(), token.clone(), "--bot".into(), bot.clone()]).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("✗ handshake") && out.contains("400 Bad Request instead of 101"), "{out}");
    assert!(out.contains("✓ sse_stream") && out.contains("✓ sse_ping"), "{out}");
    let summary = &out[out.find("WebSocket blocked").unwrap_or_else(|| panic!("no verdict: {out}"))..];
    assert!(summary.starts_with("WebSocket blocked — HTTP streaming (SSE) works."), "{summary}");
    for part in [
        "fall back to HTTP streaming by themselves",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection \"upgrade\";",
    ] {
        assert!(summary.contains(part), "{part}: {summary}");
    }
    assert!(!out.contains("First failing layer"), "{out}");

    let (code, v) = doctor(&[&base, "--token", &token, "--bot", &bot]).await;
    assert_eq!((code, v["verdict"].as_str()), (3, Some("websocket_blocked")), "{v:#}");
    assert_fails_at(&v, "handshake", "a proxy in between does not pass WebSockets");
    // Nothing but the WebSocket failed.
    let failed: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "fail")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["handshake"], "{v:#}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_502_answer_to_the_upgrade_is_named() {
    let app = App::spawn().await;
    let (_, token) = app.user("alice").await;
    let bot = app.echo_bot(&token).await;
    let via = proxy(app.addr, Fault::Html502OnUpgrade).await;
    let (code, v) = doctor(&[&format!("http://{via}"), "--token", &token, "--bot", &bot]).await;
    assert_eq!(code, 3, "only the WebSocket is blocked: {v:#}");
    assert_fails_at(&v, "handshake", "a proxy in between does not pass WebSockets");
    let detail = step(&v, "handshake")["detail"].as_str().unwrap();
    assert!(detail.contains("502 Bad Gateway instead of 101"), "{detail}");
    assert!(detail.contains("an HTML page titled \"502 Bad Gateway\""), "{detail}");
    assert!(step(&v, "handshake")["fix"].as_str().unwrap().contains("proxy_read_timeout 3600s;"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_cuts_idle_connections_is_found_by_watch() {
    let app = App::spawn().await;
    let (_, token) = app.user("alice").await;
    let bot = app.echo_bot(&token).await;
    let via = proxy(app.addr, Fault::CutIdleAfter(Duration::from_secs(2))).await;
    let (code, v) =
        doctor(&[&format!("http://{via}"), "--token", &token, "--bot", &bot, "--watch", "5", "--send"]).await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(status(&v, "ping"), "ok");
    assert_fails_at(&v, "watch", "closes idle connections after about 2 s");
    let watch = step(&v, "watch");
    assert!(watch["detail"].as_str().unwrap().contains("without a close frame"), "{watch}");
    let fix = watch["fix"].as_str().unwrap();
    assert!(fix.contains("--heartbeat-interval-ms") && fix.contains("proxy_read_timeout"), "{fix}");
    assert_eq!(status(&v, "send"), "skipped");
    assert!(step(&v, "send")["detail"].as_str().unwrap().contains("died"));
    app.stop().await;
}

#[tokio::test]
async fn bad_usage_exits_2() {
    let (code, _) =
        run(vec!["http://127.0.0.1:1".into(), "--token".into(), "t".into(), "--username".into(), "u".into()]).await;
    assert_eq!(code, 2);
    let (code, _) = run(vec![]).await;
    assert_eq!(code, 2);
    let (code, _) = run(vec!["http://127.0.0.1:1".into(), "--username".into(), "u".into()]).await;
    assert_eq!(code, 2, "--username needs --password");
}

/// A test CA and a certificate for `localhost` it signed, expiring on `not_after` (y, m, d).
struct TestPki {
    ca_pem: String,
    server: Arc<tokio_rustls::rustls::ServerConfig>,
}

fn pki(not_after: Option<(i32, u8, u8)>) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use tokio_rustls::rustls;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "natter doctor test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    if let Some((y, m, d)) = not_after {
        leaf.not_after = rcgen::date_time_ymd(y, m, d);
    }
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca_cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap();
    TestPki { ca_pem: ca_cert.pem(), server: Arc::new(server) }
}

/// A TLS-terminating proxy in front of `upstream`, as a real deployment has.
async fn tls_proxy(upstream: SocketAddr, config: Arc<tokio_rustls::rustls::ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(client).await else { return };
                let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_works_end_to_end_and_warns_about_a_certificate_expiring_soon() {
    let app = App::spawn().await;
    let (_, token) = app.user("alice").await;
    let bot = app.echo_bot(&token).await;
    let soon = chrono::Utc::now().date_naive() + chrono::Days::new(10);
    use chrono::Datelike;
    let pki = pki(Some((soon.year(), soon.month() as u8, soon.day() as u8)));
    let ca = app.dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let via = tls_proxy(app.addr, pki.server.clone()).await;
    let url = format!("wss://localhost:{}", via.port());
    let (code, v) =
        doctor(&[&url, "--token", &token, "--bot", &bot, "--send", "--ca-file", ca.to_str().unwrap()]).await;
    assert_eq!(code, 0, "warnings do not fail: {v:#}");
    let tls = step(&v, "tls");
    assert_eq!(tls["status"], "warn", "{tls}");
    assert!(tls["detail"].as_str().unwrap().contains("chain trusted"), "{tls}");
    assert!(tls["cause"].as_str().unwrap().contains("expires in"), "{tls}");
    for name in ["health", "token", "bot", "handshake", "established", "ping", "send", "sse_stream", "sse_ping"] {
        assert_eq!(status(&v, name), "ok", "{name} over TLS: {v:#}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_faults_untrusted_wrong_name_expired_and_plain_http() {
    let app = App::spawn().await;
    let good = pki(None);
    let ca = app.dir.path().join("ca.pem");
    std::fs::write(&ca, &good.ca_pem).unwrap();
    let via = tls_proxy(app.addr, good.server.clone()).await;

    // A private CA the doctor was not told about.
    let (code, v) = doctor(&[&format!("https://localhost:{}", via.port())]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "tls", "does not lead to a trusted root");
    assert!(step(&v, "tls")["fix"].as_str().unwrap().contains("--ca-file"));
    assert!(step(&v, "health")["detail"].as_str().unwrap().contains("TLS failed"));

    // Trusted, but the URL names a host the certificate is not for.
    let (code, v) = doctor(&[&format!("https://127.0.0.1:{}", via.port()), "--ca-file", ca.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "tls", "not valid for the name 127.0.0.1");

    // Expired.
    let old = pki(Some((2020, 1, 1)));
    let old_ca = app.dir.path().join("old-ca.pem");
    std::fs::write(&old_ca, &old.ca_pem).unwrap();
    let via_old = tls_proxy(app.addr, old.server.clone()).await;
    let (code, v) =
        doctor(&[&format!("https://localhost:{}", via_old.port()), "--ca-file", old_ca.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "tls", "has expired");
    assert!(step(&v, "tls")["detail"].as_str().unwrap().contains("expired 2020-01-01"), "{v:#}");

    // https:// to a port that speaks plain HTTP.
    let (code, v) = doctor(&[&format!("https://127.0.0.1:{}", app.addr.port())]).await;
    assert_eq!(code, 1);
    assert_fails_at(&v, "tls", "did not answer with TLS");
    app.stop().await;
}
