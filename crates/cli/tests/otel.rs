//! OpenTelemetry (issue 20): `natter serve --otlp-endpoint` exports a chat's spans over
//! OTLP/HTTP to a real receiver (an axum route here decoding the protobuf requests), and the
//! test checks their names, parent links and attributes: the REST request under the client's
//! `traceparent`, the connection under the upgrade's, and a message's journey — stored,
//! announced, delivered to each socket (on another node too, when PostgreSQL and NATS are
//! there), the bot's first token, the reply stored — in one trace.
//!
//! Each server is a child process: the tracer provider is process-global, and the flag is what
//! is tested. The spans are read after SIGTERM, when the server has flushed them.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use natter_proto::ServerFrame;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A span as received, with the node id of the resource that sent it.
#[derive(Debug, Clone)]
struct Got {
    node: String,
    resource: HashMap<String, String>,
    span: Span,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

impl Got {
    fn attr(&self, key: &str) -> Option<String> {
        attrs(&self.span.attributes).remove(key)
    }
    fn trace(&self) -> String {
        hex::encode(&self.span.trace_id)
    }
    fn id(&self) -> String {
        hex::encode(&self.span.span_id)
    }
    fn parent(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }
}

/// An OTLP/HTTP receiver on loopback: every span it is sent.
async fn receiver() -> (String, Arc<Mutex<Vec<Got>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
                let mut sink = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let resource = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
                    let node = resource.get("natter.node_id").cloned().unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            sink.push(Got { node: node.clone(), resource: resource.clone(), span });
                        }
                    }
                }
                ([("content-type", "application/x-protobuf")], ExportTraceServiceResponse::default().encode_to_vec())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

/// A client's trace context: a W3C `traceparent` and its trace and span ids.
struct ClientTrace {
    trace_id: String,
    span_id: String,
}

impl ClientTrace {
    fn new() -> Self {
        let t = uuid::Uuid::new_v4().simple().to_string();
        let s = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        ClientTrace { trace_id: t, span_id: s }
    }
    fn header(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

struct Node {
    node: common::Node,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(endpoint: &str, shared: Option<(&str, &str)>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jwt-secret"), "cd".repeat(32)).unwrap();
        let mut args = vec!["--otlp-endpoint", endpoint];
        if let Some((db, nats)) = shared {
            args.extend(["--database-url", db, "--bus", nats]);
        }
        Node { node: common::Node::start(dir.path(), &args), _dir: dir }
    }

    fn addr(&self) -> SocketAddr {
        self.node.addr
    }

    /// SIGTERM, and wait until the process has exported what it buffered and exited.
    fn stop(&mut self) {
        self.node.terminate();
    }

    async fn node_id(&self) -> String {
        let health: Value =
            reqwest::get(format!("http://{}/api/health", self.addr())).await.unwrap().json().await.unwrap();
        health["node_id"].as_str().unwrap().to_owned()
    }

    async fn ws(&self, bot: &str, token: &str, trace: &ClientTrace) -> Ws {
        let mut req = format!("ws://{}/api/ws/chat/{bot}?token={token}", self.addr()).into_client_request().unwrap();
        req.headers_mut().insert("traceparent", trace.header().parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("upgrade accepted");
        assert!(matches!(next(&mut ws).await, ServerFrame::ConnectionEstablished { .. }));
        ws
    }
}

async fn next(ws: &mut Ws) -> ServerFrame {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame within 10 s");
        match msg {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("socket ended: {other:?}"),
        }
    }
}

/// The next `message` frame (skipping deltas).
async fn next_message(ws: &mut Ws) -> natter_proto::WireMessage {
    loop {
        match next(ws).await {
            ServerFrame::Message { message } => return message,
            ServerFrame::MessageDelta { .. } => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Runs one chat: alice on `a` sends, her second tab on `b` receives; the echo bot answers.
/// Returns the client traces of the REST request and of both sockets.
async fn chat(a: &Node, b: &Node) -> [ClientTrace; 3] {
    let base = format!("http://{}", a.addr());
    let http = reqwest::Client::new();
    common::post(a.addr(), "/api/auth/register", None, json!({"username": "alice", "password": "correct-horse"})).await;
    let login =
        common::post(a.addr(), "/api/auth/login", None, json!({"username": "alice", "password": "correct-horse"}))
            .await;
    let token = login["access_token"].as_str().unwrap().to_owned();
    let rest = ClientTrace::new();
    let res = http
        .post(format!("{base}/api/bots"))
        .bearer_auth(&token)
        .header("traceparent", rest.header())
        .json(&json!({"name": "Echo", "engine": {"kind": "echo"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let bot: Value = res.json().await.unwrap();
    let bot = bot["id"].as_str().unwrap().to_owned();

    let (ta, tb) = (ClientTrace::new(), ClientTrace::new());
    let attempt = uuid::Uuid::new_v4();
    let mut on_a = a.ws(&bot, &format!("{token}&attempt_id={attempt}"), &ta).await;
    let mut on_b = b.ws(&bot, &token, &tb).await;
    on_a.send(Message::Text(json!({"type": "message", "client_id": "c1", "content": "hello"}).to_string().into()))
        .await
        .unwrap();
    let ServerFrame::Ack { message, .. } = next(&mut on_a).await else { panic!("expected the ack") };
    assert_eq!(message.seq, 1);
    assert_eq!(next_message(&mut on_a).await.seq, 2, "the echo reply");
    assert_eq!(next_message(&mut on_b).await.seq, 1, "the other tab gets the message");
    assert_eq!(next_message(&mut on_b).await.seq, 2, "and the reply");
    for ws in [&mut on_a, &mut on_b] {
        ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })).await.unwrap();
    }
    // The connection's ledger row carries its trace id: the client's.
    let row = ledger_row(a.addr(), &token, attempt).await;
    assert_eq!(row["trace_id"], ta.trace_id.as_str(), "{row}");
    [rest, ta, tb]
}

fn one<'a>(spans: &'a [Got], what: &str, f: impl Fn(&Got) -> bool) -> &'a Got {
    let found: Vec<&Got> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "exactly one {what}; spans: {:#?}", names(spans));
    found[0]
}

fn names(spans: &[Got]) -> Vec<String> {
    spans.iter().map(|s| format!("{} {} parent {} node {}", s.span.name, s.id(), s.parent(), s.node)).collect()
}

fn children<'a>(spans: &'a [Got], parent: &Got, name: &str) -> Vec<&'a Got> {
    spans.iter().filter(|s| s.span.name == name && s.parent() == parent.id() && s.trace() == parent.trace()).collect()
}

/// Checks a chat's spans; `nodes` are the node ids of the sender's and the other tab's nodes.
fn check(spans: &[Got], traces: &[ClientTrace; 3], sender_node: &str, other_node: &str) {
    let [rest, ta, tb] = traces;
    for s in spans {
        assert_eq!(s.resource.get("service.name").map(String::as_str), Some("natter"));
        assert_eq!(s.resource.get("service.version").map(String::as_str), Some(env!("CARGO_PKG_VERSION")));
    }
    // The REST request joins the client's trace, under the client's span.
    let create = one(spans, "POST /api/bots span", |s| s.span.name == "POST /api/bots");
    assert_eq!((create.trace(), create.parent()), (rest.trace_id.clone(), rest.span_id.clone()));
    assert_eq!(create.attr("http.route").as_deref(), Some("/api/bots"));
    assert_eq!(create.attr("http.response.status_code").as_deref(), Some("201"));
    assert_eq!(create.node, sender_node);

    // Each connection joins its upgrade request's trace, under the upgrade request's span;
    // admission and close are on it.
    let conn_a = one(spans, "connection span of tab A", |s| s.span.name == "ws" && s.trace() == ta.trace_id);
    let conn_b = one(spans, "connection span of tab B", |s| s.span.name == "ws" && s.trace() == tb.trace_id);
    for (conn, client) in [(conn_a, ta), (conn_b, tb)] {
        let upgrade = one(spans, "upgrade request", |s| s.id() == conn.parent());
        assert_eq!(upgrade.span.name, "GET /api/ws/chat/{bot_id}");
        assert_eq!(
            (upgrade.parent(), upgrade.attr("http.response.status_code")),
            (client.span_id.clone(), Some("101".into()))
        );
    }
    assert_eq!((conn_a.node.as_str(), conn_b.node.as_str()), (sender_node, other_node));
    for conn in [conn_a, conn_b] {
        assert_eq!(conn.attr("closed_by").as_deref(), Some("client"), "{conn:?}");
        assert_eq!(conn.attr("close_code").as_deref(), Some("1000"));
        assert!(conn.attr("connection_id").is_some() && conn.attr("user_id").is_some());
        let admission = children(spans, conn, "admission");
        assert_eq!(admission.len(), 1, "{:#?}", names(spans));
        assert_eq!(admission[0].attr("verdict").as_deref(), Some("admitted"));
    }

    // The message's journey, in tab A's trace.
    let msg = children(spans, conn_a, "message");
    assert_eq!(msg.len(), 1, "{:#?}", names(spans));
    let msg = msg[0];
    assert_eq!((msg.attr("seq").as_deref(), msg.attr("client_id").as_deref()), (Some("1"), Some("c1")));
    // An echo bot answers at once: its reply is stored with the message, in one step.
    let stored = children(spans, msg, "store");
    assert_eq!(stored.len(), 1);
    assert_eq!((stored[0].attr("seq").as_deref(), stored[0].attr("reply_seq").as_deref()), (Some("1"), Some("2")));
    let announced = children(spans, msg, "announce");
    assert_eq!(announced.len(), 1);
    // Delivered to each socket of the conversation, on its node, linked to its connection.
    let delivered = children(spans, announced[0], "deliver");
    let linked_to = |d: &Got, conn: &Got| d.span.links.iter().any(|l| hex::encode(&l.span_id) == conn.id());
    let on_b = delivered.iter().find(|d| linked_to(d, conn_b));
    let on_b = on_b.unwrap_or_else(|| panic!("a delivery to tab B: {:#?}", names(spans)));
    assert_eq!((on_b.attr("seq").as_deref(), on_b.node.as_str()), (Some("1"), other_node));
    assert_eq!(on_b.attr("node_id").as_deref(), Some(other_node));

    // The bot's reply: first token, its seq, announced and delivered.
    let reply = children(spans, msg, "reply");
    assert_eq!(reply.len(), 1, "{:#?}", names(spans));
    let reply = reply[0];
    assert_eq!((reply.attr("seq").as_deref(), reply.attr("status").as_deref()), (Some("2"), Some("complete")));
    assert!(reply.attr("first_token_ms").is_some(), "{reply:?}");
    assert!(reply.span.events.iter().any(|e| e.name == "first token"), "{reply:?}");
    assert!(children(spans, reply, "store").is_empty(), "stored with the message");
    let reply_announced = children(spans, reply, "announce");
    assert_eq!(reply_announced.len(), 1);
    let reply_delivered = children(spans, reply_announced[0], "deliver");
    for conn in [conn_a, conn_b] {
        let d = reply_delivered.iter().find(|d| linked_to(d, conn));
        let d = d.unwrap_or_else(|| panic!("the reply delivered on {}: {:#?}", conn.node, names(spans)));
        assert_eq!((d.attr("seq").as_deref(), d.node.as_str()), (Some("2"), conn.node.as_str()));
    }
    // Nothing of the chat is outside the two sockets' traces and the REST requests'.
    for s in
        spans.iter().filter(|s| ["message", "store", "announce", "deliver", "reply"].contains(&s.span.name.as_str()))
    {
        assert_eq!(s.trace(), ta.trace_id, "{} in tab A's trace", s.span.name);
    }
}

fn spans(got: &Mutex<Vec<Got>>) -> Vec<Got> {
    got.lock().unwrap().clone()
}

// Multi-threaded: the receiver answers while the test waits for a server to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_is_one_trace_with_every_step() {
    let (endpoint, got) = receiver().await;
    let mut node = Node::start(&endpoint, None);
    let id = node.node_id().await;
    let traces = chat(&node, &node).await;
    node.stop();
    check(&spans(&got), &traces, &id, &id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_nodes_on_the_bus() {
    const TEST: &str = "otel::a_trace_crosses_nodes_on_the_bus";
    let Some((nats, schema)) = common::shared_services(TEST).await else { return };
    let (endpoint, got) = receiver().await;
    let mut a = Node::start(&endpoint, Some((&schema.url, &nats)));
    let mut b = Node::start(&endpoint, Some((&schema.url, &nats)));
    let (ida, idb) = (a.node_id().await, b.node_id().await);
    assert_ne!(ida, idb);
    let traces = chat(&a, &b).await;
    a.stop();
    b.stop();
    check(&spans(&got), &traces, &ida, &idb);
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_traced_and_no_trace_id_is_kept() {
    // The same chat against a server without --otlp-endpoint: the ledger has no trace id.
    let dir = tempfile::tempdir().unwrap();
    let node = common::Node::start(dir.path(), &[]);
    let addr = node.addr;
    common::post(addr, "/api/auth/register", None, json!({"username": "bob", "password": "correct-horse"})).await;
    let login =
        common::post(addr, "/api/auth/login", None, json!({"username": "bob", "password": "correct-horse"})).await;
    let token = login["access_token"].as_str().unwrap();
    let bot = common::post(addr, "/api/bots", Some(token), json!({"name": "Echo"})).await;
    let bot = bot["id"].as_str().unwrap();
    let attempt = uuid::Uuid::new_v4();
    let mut req =
        format!("ws://{addr}/api/ws/chat/{bot}?token={token}&attempt_id={attempt}").into_client_request().unwrap();
    req.headers_mut().insert("traceparent", ClientTrace::new().header().parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert!(matches!(next(&mut ws).await, ServerFrame::ConnectionEstablished { .. }));
    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })).await.unwrap();
    let row = ledger_row(addr, token, attempt).await;
    assert_eq!(row["trace_id"], Value::Null, "{row}");
}

/// The ledger row of an attempt once it has ended (rows are written in batches).
async fn ledger_row(addr: SocketAddr, token: &str, attempt: uuid::Uuid) -> Value {
    for _ in 0..100 {
        let res = reqwest::Client::new()
            .get(format!("http://{addr}/api/connections/{attempt}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            let row: Value = res.json().await.unwrap();
            if !row["ended_at"].is_null() {
                return row;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no ended ledger row for {attempt}");
}
