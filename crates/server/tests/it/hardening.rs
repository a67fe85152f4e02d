//! Issue 14, transport and gateway: HTTP timeouts and the connection bound, the frame rate and
//! ping ids, the per-user message budget (one node here, two in `multinode.rs`), and malformed
//! WebSocket frames closed with 1007/1002 instead of a bare TCP close.

use std::time::{Duration, Instant};

use natter_proto::{ErrorCode, ServerFrame};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// Reads until the server closes the connection (EOF or reset); returns how long that took,
/// or `None` if it was still open after `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => continue,
            }
        }
    })
    .await
    .ok()
}

/// Reads one HTTP response head and its `Content-Length` body.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before a whole response: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0usize);
            if got.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn half_a_request_line_is_closed_after_the_header_timeout() {
    let app = TestApp::spawn_with(|c| c.limits.http_header_timeout = Duration::from_millis(300)).await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(b"GET /api/hea").await.unwrap();
    let took = closed_within(&mut tcp, Duration::from_secs(5)).await.expect("closed, not left open");
    assert!(took >= Duration::from_millis(250), "not before the timeout: {took:?}");
    // Nothing at all is the same.
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await.is_some());
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let app = TestApp::spawn_with(|c| c.limits.http_header_timeout = Duration::from_millis(400)).await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    for _ in 0..2 {
        // Kept alive between requests that come in time...
        tcp.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(read_response(&mut tcp).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // ...and closed when the next one does not come.
    let took = closed_within(&mut tcp, Duration::from_secs(5)).await.expect("an idle connection is closed");
    assert!(took >= Duration::from_millis(200), "{took:?}");
}

#[tokio::test]
async fn a_stalled_body_is_closed_after_the_idle_timeout() {
    let app = TestApp::spawn_with(|c| {
        c.limits.http_header_timeout = Duration::from_secs(30);
        c.limits.http_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(
        b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user",
    )
    .await
    .unwrap();
    let took = closed_within(&mut tcp, Duration::from_secs(5)).await.expect("a stalled upload is closed");
    assert!(took >= Duration::from_millis(250), "{took:?}");
}

#[tokio::test]
async fn sockets_outlive_the_http_timeouts() {
    let mut app = TestApp::spawn_with(|c| {
        c.limits.http_header_timeout = Duration::from_millis(200);
        c.limits.http_idle_timeout = Duration::from_millis(200);
    })
    .await;
    // A new connection per request: a pooled one may be reused just as the server closes it
    // for idling (the keep-alive race every HTTP client has; here with a 200 ms timeout).
    app.http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    ws.send_json(json!({"type": "ping", "id": 1})).await;
    assert!(matches!(ws.frame().await, ServerFrame::Pong { .. }), "an upgraded socket is not an idle HTTP connection");
}

#[tokio::test]
async fn connections_over_the_bound_wait_for_a_free_one() {
    let app = TestApp::spawn_with(|c| c.limits.max_http_connections = 1).await;
    let mut first = TcpStream::connect(app.addr).await.unwrap();
    first.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(read_response(&mut first).await.starts_with("HTTP/1.1 200"));
    // The first connection is kept alive: a second one is not served meanwhile...
    let mut second = TcpStream::connect(app.addr).await.unwrap();
    second.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await.is_err(),
        "over the bound, nothing is accepted"
    );
    // ...and is as soon as the first one closes.
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut second)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn pings_count_against_the_frame_rate() {
    let app = TestApp::spawn_with(|c| {
        c.limits.frames_per_second = 1;
        c.limits.frame_burst = 3;
    })
    .await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    for i in 0..6 {
        ws.send_json(json!({"type": "ping", "id": i})).await;
    }
    let (mut pongs, mut limited) = (0, Vec::new());
    for _ in 0..6 {
        match ws.frame().await {
            ServerFrame::Pong { .. } => pongs += 1,
            ServerFrame::Error { code: ErrorCode::RateLimited, retry_after_ms, message, .. } => {
                assert!(message.contains("too many frames"), "{message}");
                limited.push(retry_after_ms.expect("a retry hint"));
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(pongs == 3 || pongs == 4, "the burst, and at most one refill: {pongs}");
    assert_eq!(limited.len(), 6 - pongs);
    assert!(limited.iter().all(|&ms| ms > 0 && ms <= 1001), "{limited:?}");
    tokio::time::sleep(Duration::from_millis(limited[0])).await;
    ws.send_json(json!({"type": "ping", "id": "again"})).await;
    assert!(matches!(ws.frame().await, ServerFrame::Pong { .. }), "answered again after the hint");
}

#[tokio::test]
async fn a_long_ping_id_is_refused_naming_the_field() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    ws.established().await;
    ws.send_json(json!({"type": "ping", "id": "x".repeat(30_000)})).await;
    match ws.frame().await {
        ServerFrame::Error { code: ErrorCode::InvalidFrame, message, .. } => {
            assert!(message.contains("`id`") && message.contains("64"), "{message}");
            assert!(message.len() < 200, "the id is not echoed in the error");
        }
        other => panic!("{other:?}"),
    }
    ws.send_json(json!({"type": "ping", "id": "x".repeat(64)})).await;
    assert!(matches!(ws.frame().await, ServerFrame::Pong { .. }), "the socket stays up");
}

/// Sends `per_socket` messages on each socket at once; returns (acks, user-budget refusals).
pub async fn flood(sockets: &mut [WsClient], per_socket: usize) -> (usize, usize) {
    for (s, ws) in sockets.iter_mut().enumerate() {
        for i in 0..per_socket {
            ws.say(&format!("s{s}-{i}"), "hi").await;
        }
    }
    let (mut acks, mut refused) = (0, 0);
    for ws in sockets.iter_mut() {
        let mut answered = 0;
        while answered < per_socket {
            match ws.frame().await {
                ServerFrame::Ack { .. } => {
                    acks += 1;
                    answered += 1;
                }
                ServerFrame::Error { code: ErrorCode::RateLimited, message, retry_after_ms, .. } => {
                    assert!(message.contains("this user on all connections"), "{message}");
                    assert!(retry_after_ms.is_some_and(|ms| ms > 0));
                    refused += 1;
                    answered += 1;
                }
                _ => {}
            }
        }
    }
    (acks, refused)
}

#[tokio::test]
async fn one_users_sockets_share_a_message_budget() {
    let app = TestApp::spawn_with(|c| {
        c.limits.messages_per_second = 100;
        c.limits.message_burst = 100;
        c.limits.user_messages_per_second = 1;
        c.limits.user_message_burst = 4;
    })
    .await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut sockets = Vec::new();
    for _ in 0..4 {
        let mut ws = app.ws(bot.id, &alice.token, "").await;
        ws.established().await;
        sockets.push(ws);
    }
    let (acks, refused) = flood(&mut sockets, 4).await;
    assert!((4..=5).contains(&acks), "the user's burst (and a refill at most), not 4 sockets' worth: {acks}");
    assert_eq!(acks + refused, 16);
    // Another user has a budget of their own.
    let bob = app.user("bob").await;
    let bob_bot = app.echo_bot(&bob).await;
    let mut ws = app.ws(bob_bot.id, &bob.token, "").await;
    ws.established().await;
    ws.say("b1", "hi").await;
    assert!(matches!(ws.frame().await, ServerFrame::Ack { .. }));
}

/// A WebSocket client written by hand, to send what a real client library refuses to.
struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    async fn connect(app: &TestApp, bot: uuid::Uuid, token: &str) -> RawWs {
        let mut tcp = TcpStream::connect(app.addr).await.unwrap();
        let req = format!(
            "GET /api/ws/chat/{bot}?token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nUser-Agent: raw-test\r\n\r\n",
            app.addr
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut ws = RawWs { tcp, buf: Vec::new() };
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            ws.fill().await;
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        ws.buf.drain(..end);
        ws
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), self.tcp.read(&mut chunk))
            .await
            .expect("the server answers within 5 s")
            .unwrap_or(0);
        assert!(n > 0, "the connection ended without a close frame");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next server frame: (opcode, payload).
    async fn frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let (len, head) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    n @ 0..=125 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= head + len {
                    let payload = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    return (op, payload);
                }
            }
            self.fill().await;
        }
    }

    /// The server's close frame, skipping what comes before: (code, reason).
    async fn close(&mut self) -> (u16, String) {
        loop {
            let (op, payload) = self.frame().await;
            if op == 8 {
                assert!(payload.len() >= 2, "a close frame with a code");
                return (u16::from_be_bytes([payload[0], payload[1]]), String::from_utf8_lossy(&payload[2..]).into());
            }
        }
    }
}

/// A client frame: FIN and opcode byte, masked with a zero key (so the payload is as given).
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn malformed_frames_close_1007_or_1002_with_a_reason_and_a_ledger_row() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let ping = br#"{"type":"ping"}"#;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("invalid UTF-8 in a text frame", masked(0x81, &[b'h', 0xff, 0xfe]), 1007),
        ("invalid UTF-8 across fragments", [masked(0x01, &[b'h', 0xe2]), masked(0x80, &[0x28, 0xa1])].concat(), 1007),
        ("an unmasked client frame", [vec![0x81, ping.len() as u8], ping.to_vec()].concat(), 1002),
        ("an oversized control frame", masked(0x89, &[7u8; 126]), 1002),
        ("a fragmented control frame", masked(0x09, b"x"), 1002),
        ("a reserved data opcode", masked(0x83, b"x"), 1002),
        ("a reserved control opcode", masked(0x8b, b"x"), 1002),
        ("an RSV bit", masked(0xc1, ping), 1002),
        ("an orphan continuation", masked(0x80, ping), 1002),
        ("a new message inside a fragmented one", [masked(0x01, b"{"), masked(0x81, ping)].concat(), 1002),
    ];
    for (what, bytes, want) in &cases {
        let mut ws = RawWs::connect(&app, bot.id, &alice.token).await;
        let (op, established) = ws.frame().await;
        assert_eq!(op, 1);
        assert!(String::from_utf8_lossy(&established).contains("connection_established"));
        ws.tcp.write_all(bytes).await.unwrap();
        let (code, reason) = ws.close().await;
        assert_eq!(code, *want, "{what}: {reason}");
        assert!(!reason.is_empty(), "{what}: the close says why");
    }
    // Each is in the ledger: closed by the server, with its code.
    app.state.ledger.flush().await;
    let (status, rows) = app.get("/api/connections?limit=50", Some(&alice.token)).await;
    assert_eq!(status, 200, "{rows}");
    let rows = rows.as_array().unwrap();
    for want in [1002, 1007] {
        let n = rows.iter().filter(|r| r["close_code"] == want && r["closed_by"] == "server").count();
        let expected = cases.iter().filter(|c| c.2 == want).count();
        assert_eq!(n, expected, "ledger rows with {want}: {rows:?}");
        assert!(rows.iter().any(|r| r["close_code"] == want && !r["close_reason"].as_str().unwrap_or("").is_empty()));
    }
}
