//! Several nodes sharing PostgreSQL and NATS, driven by real WebSocket clients: fan-out and
//! resume across nodes, concurrent writers, the per-user limit across nodes, losing NATS or
//! PostgreSQL (through a TCP proxy the test cuts) and recovering, and nginx in front of two
//! nodes configured as docs/deploy.md says.
//!
//! Needs `NATTER_TEST_DATABASE_URL` and `NATTER_TEST_NATS_URL` (`make test` sets them when the
//! services answer); without them each test prints a SKIPPED line and passes (fails in CI).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natter_proto::{ServerFrame, WireMessage};
use natter_server::config::{BusConfig, Database};
use natter_server::store::postgres::TestSchema;
use natter_server::Config;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// PostgreSQL (a schema of this test's own) and NATS, from the environment.
pub struct Services {
    pub schema: TestSchema,
    pub nats: String,
}

impl Services {
    pub async fn from_env(test: &str) -> Option<Services> {
        let nats = natter_server::testenv::service_url("NATTER_TEST_NATS_URL", test, "NATS")?;
        let schema = TestSchema::from_env(test).await?;
        Some(Services { schema, nats })
    }

    /// A node on a loopback port, on these services, with the signing secret of `first` (all
    /// nodes must share it) or a new one.
    pub async fn node(&self, first: Option<&TestApp>, f: impl FnOnce(&mut Config)) -> TestApp {
        let db = self.schema.url.clone();
        let nats = self.nats.clone();
        self.node_via(first, db, nats, f).await
    }

    /// Like [`Services::node`] with explicit database and NATS URLs (through a proxy).
    pub async fn node_via(
        &self,
        first: Option<&TestApp>,
        db: String,
        nats: String,
        f: impl FnOnce(&mut Config),
    ) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        if let Some(first) = first {
            std::fs::copy(first.dir.path().join("jwt-secret"), dir.path().join("jwt-secret")).unwrap();
        }
        TestApp::spawn_in(dir, move |c| {
            c.database = Database::Postgres(db);
            c.bus = BusConfig::Nats(nats);
            c.node_lease = Duration::from_millis(1500);
            c.limits.messages_per_second = 1000;
            c.limits.message_burst = 1000;
            c.limits.user_messages_per_second = 1000;
            c.limits.user_message_burst = 1000;
            c.limits.frames_per_second = 1000;
            c.limits.frame_burst = 1000;
            f(c);
        })
        .await
    }
}

/// Reads frames until one carries `seq` (an ack or a message); returns the seqs of acks and
/// messages seen on the way, in order. Deltas are skipped.
pub async fn seqs_until(ws: &mut WsClient, seq: i64) -> Vec<i64> {
    let mut seen = Vec::new();
    loop {
        let f = ws.frame().await;
        match seq_of(&f) {
            Some(s) => {
                seen.push(s);
                if s >= seq {
                    return seen;
                }
            }
            None => match f {
                ServerFrame::MessageDelta { .. } => {}
                other => panic!("unexpected {other:?}"),
            },
        }
    }
}

/// Sends a ping and expects its pong as the very next frame: nothing else was queued.
pub async fn nothing_more(ws: &mut WsClient) {
    ws.send_json(json!({"type": "ping", "id": 99})).await;
    match ws.frame().await {
        ServerFrame::Pong { .. } => {}
        other => panic!("expected only the pong, got {other:?}"),
    }
}

async fn established_last_seq(ws: &mut WsClient) -> i64 {
    match ws.established().await {
        ServerFrame::ConnectionEstablished { last_seq, .. } => last_seq,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn a_tab_on_each_node_sees_every_message_and_the_bot_reply() {
    let Some(svc) = Services::from_env("multinode::a_tab_on_each_node_sees_every_message_and_the_bot_reply").await
    else {
        return;
    };
    let a = svc.node(None, |_| {}).await;
    let b = svc.node(Some(&a), |_| {}).await;
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;
    let mut on_a = a.ws(bot.id, &alice.token, "").await;
    let mut on_b = b.ws(bot.id, &alice.token, "").await;
    on_a.established().await;
    on_b.established().await;

    on_a.say("c1", "hello from A").await;
    assert_eq!(seqs_until(&mut on_a, 2).await, vec![1, 2], "ack, then the bot reply made on A");
    assert_eq!(seqs_until(&mut on_b, 2).await, vec![1, 2], "B sees the message and the reply");
    on_b.say("c2", "hello from B").await;
    assert_eq!(seqs_until(&mut on_b, 4).await, vec![3, 4]);
    assert_eq!(seqs_until(&mut on_a, 4).await, vec![3, 4], "and the other way round");
    nothing_more(&mut on_a).await;
    nothing_more(&mut on_b).await;
}

#[tokio::test]
async fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
    let Some(svc) = Services::from_env("multinode::a_client_resumes_on_another_node_with_exactly_what_it_missed").await
    else {
        return;
    };
    let a = svc.node(None, |_| {}).await;
    let b = svc.node(Some(&a), |_| {}).await;
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;
    let mut first = a.ws(bot.id, &alice.token, "").await;
    first.established().await;
    first.say("c1", "one").await;
    assert_eq!(seqs_until(&mut first, 2).await, vec![1, 2]);
    first.close().await;

    // While it is away, another tab on A goes on.
    let mut other = a.ws(bot.id, &alice.token, "").await;
    other.established().await;
    for i in 2..=3 {
        other.say(&format!("c{i}"), "more").await;
    }
    seqs_until(&mut other, 6).await;

    let mut resumed = b.ws(bot.id, &alice.token, "&after_seq=2").await;
    assert_eq!(established_last_seq(&mut resumed).await, 6);
    let replayed: Vec<WireMessage> = {
        let mut v = Vec::new();
        while v.len() < 4 {
            match resumed.frame().await {
                ServerFrame::Message { message } => v.push(message),
                other => panic!("unexpected {other:?}"),
            }
        }
        v
    };
    assert_eq!(replayed.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
    nothing_more(&mut resumed).await;
}

#[tokio::test]
async fn concurrent_writers_on_two_nodes_get_gap_free_unique_seqs() {
    let Some(svc) = Services::from_env("multinode::concurrent_writers_on_two_nodes_get_gap_free_unique_seqs").await
    else {
        return;
    };
    let roomy = |c: &mut Config| c.limits.bot_queue = 1000;
    let a = svc.node(None, roomy).await;
    let b = svc.node(Some(&a), roomy).await;
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;
    let (mut on_a, mut on_b) = (a.ws(bot.id, &alice.token, "").await, b.ws(bot.id, &alice.token, "").await);
    on_a.established().await;
    on_b.established().await;
    const EACH: usize = 40;
    // Each user message gets an echo: 4 × EACH messages in all, written by both nodes at once.
    let total = 4 * EACH as i64;
    let run = |mut ws: WsClient, tag: &'static str| async move {
        for i in 0..EACH {
            ws.say(&format!("{tag}{i}"), "x").await;
        }
        let seen = seqs_until(&mut ws, total).await;
        (ws, seen)
    };
    let ((mut on_a, seen_a), (mut on_b, seen_b)) = tokio::join!(run(on_a, "a"), run(on_b, "b"));
    let every: Vec<i64> = (1..=total).collect();
    assert_eq!(seen_a, every, "tab on A: every seq once, in order");
    assert_eq!(seen_b, every, "tab on B: every seq once, in order");
    nothing_more(&mut on_a).await;
    nothing_more(&mut on_b).await;

    let (status, body) = a.get(&format!("/api/bots/{}/messages?limit=500", bot.id), Some(&alice.token)).await;
    assert_eq!(status, 200, "{body}");
    let msgs: Vec<WireMessage> = serde_json::from_value(body["messages"].clone()).unwrap();
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), every, "stored gap-free and unique");
    let mut client_ids: Vec<_> = msgs.iter().filter_map(|m| m.client_id.clone()).collect();
    client_ids.sort();
    client_ids.dedup();
    assert_eq!(client_ids.len(), 2 * EACH, "every user message once");
}

#[tokio::test]
async fn the_per_user_connection_limit_holds_across_nodes() {
    let Some(svc) = Services::from_env("multinode::the_per_user_connection_limit_holds_across_nodes").await else {
        return;
    };
    let limit = |c: &mut Config| c.limits.max_connections_per_user = 2;
    let a = svc.node(None, limit).await;
    let b = svc.node(Some(&a), limit).await;
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;
    let mut one = a.ws(bot.id, &alice.token, "").await;
    one.established().await;
    let mut two = b.ws(bot.id, &alice.token, "").await;
    two.established().await;
    for node in [&a, &b] {
        let (_, verdict) = node.get(&format!("/api/ws/preflight/{}?token={}", bot.id, alice.token), None).await;
        assert_eq!(verdict["close_code"], 4429, "the preflight counts every node's sockets: {verdict}");
        let mut third = node.ws(bot.id, &alice.token, "").await;
        let (code, reason) = third.close_code().await;
        assert_eq!(code, 4429, "{reason}");
    }
    // A closed socket frees its place for the other node at once.
    one.close().await;
    let mut again = b.ws(bot.id, &alice.token, "").await;
    again.established().await;
}

/// A TCP proxy the test can cut (every connection dropped, new ones refused) and restore.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(Mutex::new(CancellationToken::new()));
        let state = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                let token = state.lock().unwrap().clone();
                if token.is_cancelled() {
                    continue; // cut: drop the connection
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Proxy { addr, up }
    }

    pub fn cut(&self) {
        self.up.lock().unwrap().cancel();
    }

    pub fn restore(&self) {
        *self.up.lock().unwrap() = CancellationToken::new();
    }
}

fn host_port(url: &str) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split(['/', '?']).next().unwrap();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:5432") };
    use std::net::ToSocketAddrs;
    hostport.replace("localhost", "127.0.0.1").to_socket_addrs().unwrap().next().unwrap()
}

/// `url` with its host and port replaced by `proxy`'s.
fn via(url: &str, proxy: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let authority = rest.split(['/', '?']).next().unwrap();
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@")).unwrap_or_default();
    format!("{scheme}://{userinfo}{proxy}{}", &rest[authority.len()..])
}

/// Polls `/api/ready` until its status is `want`; returns the body.
async fn ready_becomes(app: &TestApp, want: u16) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = app.get("/api/ready", None).await;
        if status == want {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "/api/ready stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A node that loses a dependency closes its sockets with 1013, says so in /api/ready, and
/// serves again once the dependency is back; the other node is unaffected throughout.
async fn lose_and_recover(test: &str, cut_database: bool) {
    let Some(svc) = Services::from_env(test).await else { return };
    let a = svc.node(None, |_| {}).await;
    let upstream = if cut_database { host_port(&svc.schema.url) } else { host_port(&svc.nats) };
    let proxy = Proxy::start(upstream).await;
    let (db, nats) = if cut_database {
        (via(&svc.schema.url, proxy.addr), svc.nats.clone())
    } else {
        (svc.schema.url.clone(), via(&svc.nats, proxy.addr))
    };
    let b = svc.node_via(Some(&a), db, nats, |_| {}).await;
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;
    let mut on_b = b.ws(bot.id, &alice.token, "").await;
    on_b.established().await;
    assert_eq!(b.get("/api/ready", None).await.0, 200);

    proxy.cut();
    let (code, reason) =
        tokio::time::timeout(Duration::from_secs(10), on_b.close_code()).await.expect("closed in time");
    assert_eq!(code, 1013, "{reason}");
    let hint: u64 = reason.rsplit_once("retry_after_ms=").expect("a retry hint").1.parse().unwrap();
    assert!(hint > 0);
    let body = ready_becomes(&b, 503).await;
    let failed = body["failed"].to_string();
    assert!(failed.contains(if cut_database { "store" } else { "bus" }), "{body}");
    let mut refused = b.ws(bot.id, &alice.token, "").await;
    assert_eq!(refused.close_code().await.0, 1013, "no new sockets either");
    assert_eq!(a.get("/api/ready", None).await.0, 200, "the other node is fine");

    proxy.restore();
    ready_becomes(&b, 200).await;
    // Serving again, and fan-out between the nodes works again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut on_b = loop {
        let mut ws = b.ws(bot.id, &alice.token, "").await;
        match ws.next().await {
            Next::Frame(ServerFrame::ConnectionEstablished { .. }) => break ws,
            other => assert!(tokio::time::Instant::now() < deadline, "not serving again: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut on_a = a.ws(bot.id, &alice.token, "").await;
    on_a.established().await;
    on_a.say("after", "back?").await;
    assert_eq!(seqs_until(&mut on_a, 2).await, vec![1, 2]);
    assert_eq!(seqs_until(&mut on_b, 2).await, vec![1, 2]);
}

#[tokio::test]
async fn a_node_that_loses_nats_closes_with_1013_and_recovers() {
    lose_and_recover("multinode::a_node_that_loses_nats_closes_with_1013_and_recovers", false).await;
}

#[tokio::test]
async fn a_node_that_loses_postgres_closes_with_1013_and_recovers() {
    lose_and_recover("multinode::a_node_that_loses_postgres_closes_with_1013_and_recovers", true).await;
}

/// nginx, run as a child process with a config built from docs/deploy.md; killed on drop.
struct Nginx {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ```nginx block of docs/deploy.md.
fn documented_nginx_config() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/deploy.md")).unwrap();
    let start = doc.find("```nginx\n").expect("docs/deploy.md has an nginx block") + "```nginx\n".len();
    doc[start..][..doc[start..].find("```").unwrap()].to_owned()
}

impl Nginx {
    /// Starts nginx in front of `upstreams` with the documented configuration, changing only
    /// the addresses; None (after a SKIPPED line) when nginx is not installed.
    async fn start(test: &str, upstreams: &[SocketAddr]) -> Option<Nginx> {
        let Some(bin) = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| std::path::Path::new(p).exists())
        else {
            return natter_server::testenv::missing(test, "nginx (apt-get install nginx): not installed");
        };
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let documented = documented_nginx_config();
        let servers: Vec<&str> = documented.lines().filter(|l| l.trim_start().starts_with("server 10.")).collect();
        assert_eq!(servers.len(), 2, "the documented upstream has two nodes");
        let mut conf = documented.replace("listen 80;", &format!("listen {addr};"));
        for (line, up) in servers.iter().zip(upstreams) {
            conf = conf.replace(line, &format!("    server {up};"));
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().display();
        let full = format!(
            "daemon off;\nmaster_process off;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\nevents {{}}\n\
             http {{\n    access_log off;\n    client_body_temp_path {p}/body;\n    proxy_temp_path {p}/proxy;\n\
             fastcgi_temp_path {p}/fastcgi;\n    uwsgi_temp_path {p}/uwsgi;\n    scgi_temp_path {p}/scgi;\n{conf}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), full).unwrap();
        let child = std::process::Command::new(bin)
            .args(["-p", &p.to_string(), "-c", &format!("{p}/nginx.conf")])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("nginx starts");
        let nginx = Nginx { child, addr, _dir: dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "nginx listens within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(nginx)
    }
}

#[tokio::test]
async fn nginx_in_front_of_two_nodes() {
    const TEST: &str = "multinode::nginx_in_front_of_two_nodes";
    let Some(svc) = Services::from_env(TEST).await else { return };
    let a = svc.node(None, |_| {}).await;
    let b = svc.node(Some(&a), |_| {}).await;
    let Some(nginx) = Nginx::start(TEST, &[a.addr, b.addr]).await else { return };
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;

    // Browsers send an Origin; it matches the Host nginx passes on, so natter accepts it.
    let url = format!("ws://{}/api/ws/chat/{}?token={}", nginx.addr, bot.id, alice.token);
    let connect = || async {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut().insert("origin", format!("http://{}", nginx.addr).parse().unwrap());
        let mut ws = WsClient::connect_with(req).await;
        ws.established().await;
        ws
    };
    let mut one = connect().await;
    let mut two = connect().await;
    // nginx spreads the two sockets over both nodes (round robin).
    assert_eq!((a.state.hub.len(), b.state.hub.len()), (1, 1));
    one.say("c1", "through nginx").await;
    assert_eq!(seqs_until(&mut one, 2).await, vec![1, 2]);
    assert_eq!(seqs_until(&mut two, 2).await, vec![1, 2], "across nodes, through the proxy");
    nothing_more(&mut two).await;

    // REST goes through the same proxy.
    let res = reqwest::get(format!("http://{}/api/ready", nginx.addr)).await.unwrap();
    assert_eq!(res.status(), 200);
}

/// An OpenAI-compatible provider that streams a word every 100 ms, for a long while.
async fn slow_provider() -> String {
    use axum::response::IntoResponse;
    async fn completions() -> axum::response::Response {
        let words = futures_util::stream::unfold(0u32, |i| async move {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let chunk = json!({"choices": [{"index": 0, "delta": {"content": format!("w{i} ")}}]});
            (i < 600).then(|| (Ok::<_, std::io::Error>(format!("data: {chunk}\n\n")), i + 1))
        });
        ([("content-type", "text/event-stream")], axum::body::Body::from_stream(words)).into_response()
    }
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(completions));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

/// Two nodes (allowed to reach the loopback provider), alice, and her bot on [`slow_provider`].
async fn slow_bot_on_two_nodes(svc: &Services) -> (TestApp, TestApp, TestUser, natter_proto::api::BotView) {
    let loopback = |c: &mut natter_server::Config| c.bot_egress_allow = vec!["127.0.0.1/32".parse().unwrap()];
    let a = svc.node(None, loopback).await;
    let b = svc.node(Some(&a), loopback).await;
    let alice = a.user("alice").await;
    let provider = slow_provider().await;
    let engine = json!({"kind": "openai", "base_url": provider, "model": "slow", "timeout_ms": 60000});
    let bot = a.bot(&alice, json!({"name": "Slow", "engine": engine})).await;
    (a, b, alice, bot)
}

#[tokio::test]
async fn a_tab_on_another_node_cancels_the_reply() {
    let Some(svc) = Services::from_env("multinode::a_tab_on_another_node_cancels_the_reply").await else { return };
    let (a, b, alice, bot) = slow_bot_on_two_nodes(&svc).await;
    let (mut on_a, mut on_b) = (a.ws(bot.id, &alice.token, "").await, b.ws(bot.id, &alice.token, "").await);
    on_a.established().await;
    on_b.established().await;

    on_a.say("c1", "count").await; // the reply is generated on A
    assert_eq!(seqs_until(&mut on_b, 1).await, vec![1]);
    let ServerFrame::MessageDelta { message_id, .. } = on_b.frame().await else { panic!("expected a delta on B") };
    on_b.send_json(json!({"type": "cancel", "message_id": message_id})).await;
    for ws in [&mut on_b, &mut on_a] {
        let stopped = loop {
            match ws.frame().await {
                ServerFrame::Message { message } => break message,
                ServerFrame::MessageDelta { .. } | ServerFrame::Ack { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!((stopped.id, stopped.seq, stopped.status), (message_id, 2, natter_proto::MessageStatus::Cancelled));
        assert!(stopped.content.starts_with("w0 "), "{:?}", stopped.content);
    }
}

/// Logout on node A ends the login on node B too: B refuses the access token and closes
/// B's socket of that login with 4401 (issue 14).
#[tokio::test]
async fn logout_on_one_node_ends_the_login_on_every_node() {
    let Some(svc) = Services::from_env("multinode::logout_on_one_node_ends_the_login_on_every_node").await else {
        return;
    };
    let a = svc.node(None, |_| {}).await;
    let b = svc.node(Some(&a), |_| {}).await;
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;
    let mut on_b = b.ws(bot.id, &alice.token, "").await;
    on_b.established().await;
    assert_eq!(b.get("/api/auth/me", Some(&alice.token)).await.0, 200);

    let (status, _) = a.post("/api/auth/logout", None, json!({"refresh_token": alice.refresh})).await;
    assert_eq!(status, 204);
    assert_eq!(on_b.close_code().await, (4401, "logged out: this login was ended; log in again".to_owned()));
    // The socket closed because B got the announcement, so B's REST refuses the token too.
    let (status, v) = b.get("/api/auth/me", Some(&alice.token)).await;
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("token_revoked")));
    let mut again = b.ws(bot.id, &alice.token, "").await;
    assert_eq!(again.close_code().await.0, 4401);
    b.state.hub.check_invariants();
}

#[tokio::test]
async fn a_users_message_budget_holds_across_nodes() {
    let Some(svc) = Services::from_env("multinode::a_users_message_budget_holds_across_nodes").await else {
        return;
    };
    // A 3-second window of 3 messages in PostgreSQL; each node's own bucket alone would let
    // 3 through on each node.
    let budget = |c: &mut Config| {
        c.limits.user_messages_per_second = 1;
        c.limits.user_message_burst = 3;
    };
    let a = svc.node(None, budget).await;
    let b = svc.node(Some(&a), budget).await;
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;
    let mut sockets = Vec::new();
    for node in [&a, &b, &a, &b] {
        let mut ws = node.ws(bot.id, &alice.token, "").await;
        ws.established().await;
        sockets.push(ws);
    }
    // Start just after a window begins (the database's clock is this machine's), so all 16
    // sends fall in one window.
    loop {
        let ms = chrono::Utc::now().timestamp_millis().rem_euclid(3000);
        if ms < 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis((3000 - ms as u64).min(50))).await;
    }
    let (acks, refused) = crate::hardening::flood(&mut sockets, 4).await;
    assert_eq!(acks, 3, "one budget for the user on both nodes");
    assert_eq!(refused, 13);
}

/// Issue 15: NATS is away from node B for ~0.3 s while node A stores messages of a conversation
/// whose socket is on B. Core NATS drops what was published meanwhile; B's socket still gets
/// it once the bus is back, without waiting for a later message (and keeps its socket: a
/// blip shorter than the grace closes nothing).
#[tokio::test]
async fn a_nats_blip_hides_no_message_from_an_open_socket() {
    let Some(svc) = Services::from_env("multinode::a_nats_blip_hides_no_message_from_an_open_socket").await else {
        return;
    };
    let a = svc.node(None, |_| {}).await;
    let proxy = Proxy::start(host_port(&svc.nats)).await;
    let b = svc.node_via(Some(&a), svc.schema.url.clone(), via(&svc.nats, proxy.addr), |_| {}).await;
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;
    let mut on_b = b.ws(bot.id, &alice.token, "").await;
    on_b.established().await;
    let mut on_a = a.ws(bot.id, &alice.token, "").await;
    on_a.established().await;

    proxy.cut();
    let cut_at = tokio::time::Instant::now();
    let body = ready_becomes(&b, 503).await;
    assert!(body["failed"].to_string().contains("bus"), "B has lost NATS: {body}");
    on_a.say("gap", "said while B is away").await;
    assert_eq!(seqs_until(&mut on_a, 2).await, vec![1, 2], "stored: the message and its echo");
    tokio::time::sleep_until(cut_at + Duration::from_millis(300)).await;
    proxy.restore();

    // Well under the quiet-conversation resync (10 s): this is the reconnect's resync.
    let got = tokio::time::timeout(Duration::from_secs(5), seqs_until(&mut on_b, 2))
        .await
        .expect("B's socket got what was stored during the blip without a later message");
    assert_eq!(got, vec![1, 2]);
    nothing_more(&mut on_b).await;
}

/// Issue 15: a user's sockets at the per-user limit on node D; D loses PostgreSQL, closes them
/// with 1013 and cannot release their slots. Once the database is back, D renews only the
/// slots of sockets it holds and deletes the others, so the user connects again on either node
/// within the lease (before: D kept the dead slots alive, 4429 everywhere for as long as D ran).
#[tokio::test]
async fn a_postgres_outage_does_not_lock_a_user_out() {
    let Some(svc) = Services::from_env("multinode::a_postgres_outage_does_not_lock_a_user_out").await else {
        return;
    };
    const LEASE: Duration = Duration::from_secs(6);
    let config = |c: &mut Config| {
        c.limits.max_connections_per_user = 4;
        c.node_lease = LEASE;
    };
    let a = svc.node(None, config).await;
    let proxy = Proxy::start(host_port(&svc.schema.url)).await;
    let d = svc.node_via(Some(&a), via(&svc.schema.url, proxy.addr), svc.nats.clone(), config).await;
    let alice = a.user("alice").await;
    let bot = a.echo_bot(&alice).await;
    let mut socks = Vec::new();
    for _ in 0..4 {
        let mut ws = d.ws(bot.id, &alice.token, "").await;
        ws.established().await;
        socks.push(ws);
    }
    assert_eq!(a.ws(bot.id, &alice.token, "").await.close_code().await.0, 4429, "at the limit");

    proxy.cut();
    for ws in &mut socks {
        let (code, reason) = tokio::time::timeout(Duration::from_secs(10), ws.close_code()).await.expect("closed");
        assert_eq!(code, 1013, "{reason}");
    }
    ready_becomes(&d, 503).await;
    proxy.restore();
    let restored = tokio::time::Instant::now();

    for node in [&a, &d] {
        let ws = loop {
            let mut ws = node.ws(bot.id, &alice.token, "").await;
            match ws.next().await {
                Next::Frame(ServerFrame::ConnectionEstablished { .. }) => break ws,
                other => {
                    assert!(restored.elapsed() < LEASE, "still refused a lease after the database came back: {other:?}")
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        ws.close().await;
    }
}

/// Issue 15, item 5: node A streams a reply; a tab opened on node B in the middle of it gets
/// the text so far, then only what follows, as on one node (before: B dropped every delta,
/// having no text of its own to fill the gap, and showed nothing until the whole reply).
#[tokio::test]
async fn a_tab_that_joins_mid_reply_on_another_node_gets_the_text_so_far() {
    let Some(svc) =
        Services::from_env("multinode::a_tab_that_joins_mid_reply_on_another_node_gets_the_text_so_far").await
    else {
        return;
    };
    let (a, b, alice, bot) = slow_bot_on_two_nodes(&svc).await;
    let mut on_a = a.ws(bot.id, &alice.token, "").await;
    on_a.established().await;
    on_a.say("c1", "count").await; // generated on A, a word every 100 ms
    let mut seen_on_a = String::new();
    while !seen_on_a.contains("w3 ") {
        match on_a.frame().await {
            ServerFrame::MessageDelta { delta, .. } => seen_on_a.push_str(&delta),
            ServerFrame::Ack { .. } => {}
            other => panic!("unexpected on A: {other:?}"),
        }
    }

    let mut on_b = b.ws(bot.id, &alice.token, "").await;
    on_b.established().await;
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !text.contains("w6 ") {
        match on_b.next_within(deadline - tokio::time::Instant::now()).await {
            Some(Next::Frame(ServerFrame::MessageDelta { delta, .. })) => text.push_str(&delta),
            Some(other) => panic!("unexpected on B: {other:?}"),
            None => panic!("B got only {text:?} of the reply in 3 s (A had {seen_on_a:?} when B joined)"),
        }
    }
    let words: Vec<String> = (0..text.split_whitespace().count()).map(|i| format!("w{i}")).collect();
    assert_eq!(text, words.join(" ") + " ", "the text so far, then only what follows, in order");
}
