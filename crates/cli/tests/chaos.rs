//! The fault test (issue 15): clients chat, reconnect and resend while a random schedule of
//! faults hits the servers — SIGKILLed nodes, NATS and PostgreSQL cut away from a node
//! (through TCP proxies in the test), and on SQLite a single node SIGKILLed and restarted.
//! Afterwards:
//! - every conversation's seqs in the store run 1..n, none missing or doubled;
//! - every acked message is stored once and has exactly one outcome (a bot message in reply);
//! - every client's transcript (what its sockets delivered, over all its connections) equals
//!   the store's, and no socket delivered a seq twice or out of order;
//! - no user is left over the per-user connection limit.
//!
//! The schedule and the clients' choices come from one seed, printed first; replay with
//! `NATTER_CHAOS_SEED=<seed> cargo nextest run -p natter --test chaos --no-capture` (timing is
//! real, so a replay follows the same schedule, not the same interleaving). The test prints
//! what recovery took (the figures in docs/deploy.md). The cluster half needs
//! `NATTER_TEST_DATABASE_URL` and `NATTER_TEST_NATS_URL` (else it prints SKIPPED).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{history, host_port, post, via, Node, Proxy, NO_RATE_LIMITS};
use futures_util::{SinkExt, StreamExt};
use natter_proto::{MessageRole, ServerFrame, WireMessage};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Connections per user allowed by the servers under test.
const PER_USER: usize = 4;
const LEASE_MS: &str = "1500";

/// xorshift64*: the seeded choices of the schedule and of each client.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn seed() -> u64 {
    let seed = match std::env::var("NATTER_CHAOS_SEED") {
        Ok(s) => s.parse().expect("NATTER_CHAOS_SEED is a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    eprintln!(
        "chaos seed: {seed} (replay: NATTER_CHAOS_SEED={seed} cargo nextest run -p natter --test chaos --no-capture)"
    );
    seed
}

/// The addresses of the nodes that are up (`None`: killed), for clients to pick from.
#[derive(Default)]
struct Nodes(Mutex<Vec<Option<SocketAddr>>>);

impl Nodes {
    fn pick(&self, rng: &mut Rng) -> Option<SocketAddr> {
        let up: Vec<SocketAddr> = self.0.lock().unwrap().iter().flatten().copied().collect();
        (!up.is_empty()).then(|| up[rng.below(up.len() as u64) as usize])
    }
    fn set(&self, i: usize, addr: Option<SocketAddr>) {
        let mut v = self.0.lock().unwrap();
        if v.len() <= i {
            v.resize(i + 1, None);
        }
        v[i] = addr;
    }
}

/// One user's conversation with one bot, driven by one client.
#[derive(Clone)]
struct Conv {
    name: String,
    user: usize,
    token: String,
    bot: String,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Phase {
    /// Send new messages, reconnect now and then.
    Chat,
    /// Send nothing new; resend what is not acked yet.
    Settle,
    /// Catch up once more to the store's last seq, then stop.
    Final,
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Every message its sockets delivered (or acked), by seq, with when it arrived.
    transcript: BTreeMap<i64, (WireMessage, Instant)>,
    /// Acked messages by client id, with when the ack came.
    acked: HashMap<String, (WireMessage, Instant)>,
    /// Sent, not acked yet: resent on every connection.
    outbox: BTreeMap<String, String>,
    /// When each ack came (for recovery times).
    ack_times: Vec<Instant>,
    problems: Vec<String>,
    sent: usize,
    connections: usize,
}

impl Seen {
    /// The highest seq with every seq up to it delivered.
    fn prefix(&self) -> i64 {
        let mut n = 0;
        for s in self.transcript.keys() {
            if *s != n + 1 {
                break;
            }
            n = *s;
        }
        n
    }

    fn record(&mut self, m: WireMessage, conv: &str) {
        if let Some((had, _)) = self.transcript.get(&m.seq) {
            if (had.id, &had.content, had.status) != (m.id, &m.content, m.status) {
                self.problems.push(format!("{conv}: seq {} delivered as {m:?} and as {had:?}", m.seq));
            }
            return;
        }
        self.transcript.insert(m.seq, (m, Instant::now()));
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Drives one conversation until the `Final` phase has caught up.
async fn client(conv: Conv, nodes: Arc<Nodes>, mut phase: watch::Receiver<Phase>, seen: Arc<Mutex<Seen>>, seed: u64) {
    let mut rng = Rng::new(seed);
    loop {
        let now = *phase.borrow();
        let Some(addr) = nodes.pick(&mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let after = seen.lock().unwrap().prefix();
        let url = format!("ws://{addr}/api/ws/chat/{}?token={}&after_seq={after}", conv.bot, conv.token);
        let Ok(Ok((ws, _))) = tokio::time::timeout(Duration::from_secs(3), tokio_tungstenite::connect_async(url)).await
        else {
            tokio::time::sleep(rng.ms(50, 200)).await;
            continue;
        };
        seen.lock().unwrap().connections += 1;
        let caught_up = connection(&conv, ws, &mut phase, &seen, &mut rng, after).await;
        if now == Phase::Final && caught_up {
            return;
        }
        tokio::time::sleep(rng.ms(20, 200)).await;
    }
}

/// One connection; true when it ended in the `Final` phase with everything up to the
/// connection's `last_seq` delivered.
async fn connection(
    conv: &Conv,
    mut ws: Ws,
    phase: &mut watch::Receiver<Phase>,
    seen: &Mutex<Seen>,
    rng: &mut Rng,
    after: i64,
) -> bool {
    let text = |v: serde_json::Value| Message::Text(v.to_string().into());
    let last_seq = match read(&mut ws).await {
        Some(ServerFrame::ConnectionEstablished { last_seq, .. }) => last_seq,
        _ => return false, // refused (4429 while a dead node's slot lives, 1013, …) or cut
    };
    let resend: Vec<(String, String)> = seen.lock().unwrap().outbox.clone().into_iter().collect();
    for (client_id, content) in resend {
        if ws.send(text(json!({"type": "message", "client_id": client_id, "content": content}))).await.is_err() {
            return false;
        }
    }
    let mut delivered = after;
    let mut act = Box::pin(tokio::time::sleep(rng.ms(30, 250)));
    loop {
        if *phase.borrow() == Phase::Final && seen.lock().unwrap().prefix() >= last_seq {
            let _ = ws.close(None).await;
            return true;
        }
        tokio::select! {
            frame = read(&mut ws) => match frame {
                None => return false,
                Some(ServerFrame::Message { message }) => {
                    let mut s = seen.lock().unwrap();
                    if message.seq <= delivered {
                        s.problems.push(format!("{}: seq {} delivered after seq {delivered} on one connection", conv.name, message.seq));
                    }
                    delivered = delivered.max(message.seq);
                    s.record(message, &conv.name);
                }
                Some(ServerFrame::Ack { client_id, message, .. }) => {
                    let mut s = seen.lock().unwrap();
                    let at = Instant::now();
                    s.outbox.remove(&client_id);
                    s.ack_times.push(at);
                    match s.acked.get(&client_id).map(|(had, _)| had.id) {
                        Some(had) if had != message.id => {
                            s.problems.push(format!("{}: {client_id} acked as {had} and as {}", conv.name, message.id));
                        }
                        Some(_) => {}
                        None => {
                            s.acked.insert(client_id, (message.clone(), at));
                        }
                    }
                    s.record(message, &conv.name);
                }
                Some(_) => {} // deltas, pongs, errors (what was refused stays in the outbox)
            },
            _ = &mut act => {
                act.as_mut().reset(Instant::now() + rng.ms(30, 250));
                if *phase.borrow() != Phase::Chat {
                    continue;
                }
                match rng.below(100) {
                    0..=79 => {
                        let (client_id, content) = {
                            let mut s = seen.lock().unwrap();
                            s.sent += 1;
                            let (id, content) = (format!("{}-{}", conv.name, s.sent), format!("m{}", s.sent));
                            s.outbox.insert(id.clone(), content.clone());
                            (id, content)
                        };
                        let frame = json!({"type": "message", "client_id": client_id, "content": content});
                        if ws.send(text(frame)).await.is_err() {
                            return false;
                        }
                    }
                    // Resend an acked message now and then: a duplicate, answered by its ack.
                    80..=84 => {
                        let again = seen.lock().unwrap().acked.iter().next().map(|(c, (m, _))| (c.clone(), m.content.clone()));
                        if let Some((client_id, content)) = again {
                            let frame = json!({"type": "message", "client_id": client_id, "content": content});
                            if ws.send(text(frame)).await.is_err() {
                                return false;
                            }
                        }
                    }
                    85..=89 => {
                        let _ = ws.close(None).await;
                        return false;
                    }
                    _ => {}
                }
            }
            _ = phase.changed() => {}
        }
    }
}

/// The next server frame; `None` when the connection ended (close, error, 10 s of silence).
async fn read(ws: &mut Ws) -> Option<ServerFrame> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.ok()?? {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("a protocol frame")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// A fault, for the recovery report.
struct Fault {
    kind: &'static str,
    at: Instant,
}

/// Registers `users` users with an echo bot and a streaming bot each.
async fn conversations(addr: SocketAddr, users: usize, provider: &str) -> Vec<Conv> {
    let mut convs = Vec::new();
    for u in 0..users {
        let creds = json!({"username": format!("user{u}"), "password": "correct-horse-battery"});
        post(addr, "/api/auth/register", None, creds.clone()).await;
        let login = post(addr, "/api/auth/login", None, creds).await;
        let token = login["access_token"].as_str().unwrap().to_owned();
        let engine = json!({"kind": "openai", "base_url": provider, "model": "m", "timeout_ms": 30000});
        for (kind, engine) in [("echo", json!({"kind": "echo"})), ("stream", engine)] {
            let bot = post(addr, "/api/bots", Some(&token), json!({"name": kind, "engine": engine})).await;
            let bot = bot["id"].as_str().unwrap().to_owned();
            convs.push(Conv { name: format!("u{u}{kind}"), user: u, token: token.clone(), bot });
        }
    }
    convs
}

/// Lets the clients settle, then checks every promise; returns the problems found and the
/// recovery report.
async fn settle_and_check(
    nodes: &Nodes,
    convs: &[Conv],
    phase: &watch::Sender<Phase>,
    seen: &[Arc<Mutex<Seen>>],
    tasks: Vec<tokio::task::JoinHandle<()>>,
    faults: &[Fault],
) -> (Vec<String>, String) {
    let mut problems = Vec::new();
    phase.send_replace(Phase::Settle);
    let mut rng = Rng::new(1);
    // Every message sent is acked (resent until it is), and every acked message is answered.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stores: Vec<Vec<WireMessage>> = Vec::new();
    loop {
        let unacked: usize = seen.iter().map(|s| s.lock().unwrap().outbox.len()).sum();
        stores.clear();
        let mut owed = 0;
        for conv in convs {
            let addr = nodes.pick(&mut rng).expect("a node is up");
            let Ok(all) = history(addr, &conv.bot, &conv.token).await else { break };
            let users = all.iter().filter(|m| m.role == MessageRole::User).count();
            owed += users.saturating_sub(all.iter().filter(|m| m.role == MessageRole::Bot).count());
            stores.push(all);
        }
        if unacked == 0 && owed == 0 && stores.len() == convs.len() {
            break;
        }
        if Instant::now() > deadline {
            problems.push(format!(
                "not settled 30 s after the faults: {unacked} messages never acked, {owed} acked messages unanswered"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    phase.send_replace(Phase::Final);
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(30), t).await.is_err() {
            problems.push("a client did not catch up within 30 s".into());
        }
    }

    let mut answer_times = Vec::new();
    for ((conv, store), seen) in convs.iter().zip(&stores).zip(seen) {
        let seen = seen.lock().unwrap();
        problems.extend(seen.problems.iter().cloned());
        let seqs: Vec<i64> = store.iter().map(|m| m.seq).collect();
        if seqs != (1..=store.len() as i64).collect::<Vec<_>>() {
            problems.push(format!("{}: stored seqs are not 1..{}: {seqs:?}", conv.name, store.len()));
        }
        let mut by_client_id: HashMap<&str, usize> = HashMap::new();
        let mut outcomes: HashMap<uuid::Uuid, usize> = HashMap::new();
        for m in store {
            if let Some(c) = &m.client_id {
                *by_client_id.entry(c).or_default() += 1;
            }
            if let Some(r) = m.in_reply_to.filter(|_| m.role == MessageRole::Bot) {
                *outcomes.entry(r).or_default() += 1;
            }
        }
        for (client_id, (acked, at)) in &seen.acked {
            if by_client_id.get(client_id.as_str()) != Some(&1) || !store.iter().any(|m| m.id == acked.id) {
                problems.push(format!("{}: acked {client_id} is not stored exactly once", conv.name));
            }
            match outcomes.get(&acked.id) {
                Some(1) => {}
                n => {
                    problems.push(format!("{}: acked {client_id} has {} outcomes", conv.name, n.copied().unwrap_or(0)))
                }
            }
            let reply = seen.transcript.values().find(|(m, _)| m.in_reply_to == Some(acked.id));
            if let Some((_, when)) = reply {
                answer_times.push(when.saturating_duration_since(*at));
            }
        }
        for m in store.iter().filter(|m| m.role == MessageRole::User) {
            if outcomes.get(&m.id) != Some(&1) {
                problems.push(format!(
                    "{}: stored message seq {} has {:?} outcomes",
                    conv.name,
                    m.seq,
                    outcomes.get(&m.id)
                ));
            }
        }
        let transcript: Vec<&WireMessage> = seen.transcript.values().map(|(m, _)| m).collect();
        let same = transcript.len() == store.len()
            && transcript
                .iter()
                .zip(store)
                .all(|(a, b)| (a.seq, a.id, &a.content, a.status) == (b.seq, b.id, &b.content, b.status));
        if !same {
            problems.push(format!(
                "{}: the client's transcript ({} messages, seqs {:?}) differs from the store's ({} messages)",
                conv.name,
                transcript.len(),
                transcript.iter().map(|m| m.seq).collect::<Vec<_>>(),
                store.len()
            ));
        }
    }

    // Nobody is left over the limit: each user opens PER_USER sockets (a dead node's slots
    // expire within a lease).
    let mut users = std::collections::HashSet::new();
    for conv in convs.iter().filter(|c| users.insert(c.user)) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut open = Vec::new();
        while open.len() < PER_USER {
            let addr = nodes.pick(&mut rng).unwrap();
            let url = format!("ws://{addr}/api/ws/chat/{}?token={}&after_seq=0", conv.bot, conv.token);
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            match read(&mut ws).await {
                Some(ServerFrame::ConnectionEstablished { .. }) => open.push(ws),
                // Refused (4429 while a dead node's slot lives): again, until the deadline.
                _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => {
                    problems.push(format!("user{} cannot open {PER_USER} sockets: only {}", conv.user, open.len()));
                    break;
                }
            }
        }
        for mut ws in open {
            let _ = ws.close(None).await;
        }
    }

    let report = report(faults, seen, &mut answer_times);
    (problems, report)
}

/// For each kind of fault, how long from its start until every client was acked again; and
/// how long acked messages waited for their answer.
fn report(faults: &[Fault], seen: &[Arc<Mutex<Seen>>], answers: &mut [Duration]) -> String {
    fn median_max(v: &mut [Duration]) -> String {
        v.sort();
        match v {
            [] => "-".into(),
            v => format!("median {} ms, max {} ms", v[v.len() / 2].as_millis(), v[v.len() - 1].as_millis()),
        }
    }
    let mut by_kind: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut never = 0;
    for f in faults {
        let back = seen
            .iter()
            .map(|s| s.lock().unwrap().ack_times.iter().find(|t| **t > f.at).map(|t| t.duration_since(f.at)))
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max());
        match back {
            Some(d) => by_kind.entry(f.kind).or_default().push(d),
            None => never += 1,
        }
    }
    let mut out = String::new();
    for (kind, times) in &mut by_kind {
        let n = times.len();
        out.push_str(&format!("  {kind:<28} x{n:<2} every client acked again after: {}\n", median_max(times)));
    }
    if never > 0 {
        out.push_str(&format!("  {never} faults after which some client was never acked again\n"));
    }
    out.push_str(&format!("  {} acked messages answered after the ack: {}\n", answers.len(), median_max(answers)));
    out
}

fn start_clients(
    convs: &[Conv],
    nodes: &Arc<Nodes>,
    phase: &watch::Sender<Phase>,
    rng: &mut Rng,
) -> (Vec<Arc<Mutex<Seen>>>, Vec<tokio::task::JoinHandle<()>>) {
    let mut seen = Vec::new();
    let mut tasks = Vec::new();
    for conv in convs {
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push(s.clone());
        tasks.push(tokio::spawn(client(conv.clone(), nodes.clone(), phase.subscribe(), s, rng.next())));
    }
    (seen, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_kills_and_cuts_lose_nothing() {
    const TEST: &str = "chaos::three_nodes_under_kills_and_cuts_lose_nothing";
    const NODES: usize = 3;
    const CHAOS: Duration = Duration::from_secs(40);
    let Some((nats, schema)) = common::shared_services(TEST).await else { return };
    let mut rng = Rng::new(seed());
    let provider = common::streaming_provider(6, Duration::from_millis(40)).await; // replies of ~0.25 s
    let secret = "cd".repeat(32);
    let dirs: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut pg_proxies = Vec::new();
    let mut nats_proxies = Vec::new();
    for _ in 0..NODES {
        pg_proxies.push(Proxy::start(host_port(&schema.url, 5432)).await);
        nats_proxies.push(Proxy::start(host_port(&nats, 4222)).await);
    }
    let per_user = PER_USER.to_string();
    let start = |i: usize| {
        std::fs::write(dirs[i].path().join("jwt-secret"), &secret).unwrap();
        let db = via(&schema.url, pg_proxies[i].addr);
        let bus = via(&nats, nats_proxies[i].addr);
        let mut args = vec!["--database-url", &db, "--bus", &bus, "--node-lease-ms", LEASE_MS];
        args.extend(["--max-connections-per-user", &per_user, "--bot-egress-allow", "127.0.0.1/32"]);
        args.extend(NO_RATE_LIMITS);
        Node::start(dirs[i].path(), &args)
    };
    let nodes = Arc::new(Nodes::default());
    let mut running: Vec<Option<Node>> = Vec::new();
    for i in 0..NODES {
        let node = start(i);
        nodes.set(i, Some(node.addr));
        running.push(Some(node));
    }
    let convs = conversations(running[0].as_ref().unwrap().addr, 3, &provider).await;
    let (phase, _) = watch::channel(Phase::Chat);
    let (seen, tasks) = start_clients(&convs, &nodes, &phase, &mut rng);

    // One fault at a time, each undone before the next.
    let mut faults = Vec::new();
    let end = Instant::now() + CHAOS;
    tokio::time::sleep(Duration::from_secs(2)).await;
    while Instant::now() < end {
        let i = rng.below(NODES as u64) as usize;
        let (kind, lasts) = match rng.below(3) {
            0 => {
                let mut node = running[i].take().unwrap();
                nodes.set(i, None);
                node.kill();
                ("node SIGKILLed (0.5-3 s)", rng.ms(500, 3000))
            }
            1 => {
                nats_proxies[i].cut();
                ("NATS cut (0.2-3 s)", rng.ms(200, 3000))
            }
            _ => {
                pg_proxies[i].cut();
                ("PostgreSQL cut (0.5-4 s)", rng.ms(500, 4000))
            }
        };
        let at = Instant::now();
        eprintln!("{:>6} ms  node {i}: {kind}: {} ms", (at + CHAOS - end).as_millis(), lasts.as_millis());
        tokio::time::sleep(lasts).await;
        nats_proxies[i].restore();
        pg_proxies[i].restore();
        if running[i].is_none() {
            let node = tokio::task::block_in_place(|| start(i));
            nodes.set(i, Some(node.addr));
            running[i] = Some(node);
        }
        faults.push(Fault { kind, at });
        tokio::time::sleep(rng.ms(1000, 3000)).await;
    }

    let (problems, report) = settle_and_check(&nodes, &convs, &phase, &seen, tasks, &faults).await;
    let (sent, acked): (usize, usize) = seen
        .iter()
        .map(|s| s.lock().unwrap())
        .map(|s| (s.sent, s.acked.len()))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let connections: usize = seen.iter().map(|s| s.lock().unwrap().connections).sum();
    eprintln!("cluster: {sent} sent, {acked} acked, {connections} connections, {} faults\n{report}", faults.len());
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    assert!(acked > 100 && faults.len() >= 8, "the test exercised too little: {acked} acked, {} faults", faults.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sqlite_node_killed_again_and_again_loses_nothing() {
    const CHAOS: Duration = Duration::from_secs(20);
    let mut rng = Rng::new(seed());
    let provider = common::streaming_provider(6, Duration::from_millis(40)).await; // replies of ~0.25 s
    let dir = tempfile::tempdir().unwrap();
    let per_user = PER_USER.to_string();
    let start = || {
        let mut args = vec!["--node-lease-ms", LEASE_MS, "--max-connections-per-user", &per_user];
        args.extend(["--bot-egress-allow", "127.0.0.1/32"]);
        args.extend(NO_RATE_LIMITS);
        Node::start(dir.path(), &args)
    };
    let mut node = start();
    let nodes = Arc::new(Nodes::default());
    nodes.set(0, Some(node.addr));
    let convs = conversations(node.addr, 2, &provider).await;
    let (phase, _) = watch::channel(Phase::Chat);
    let (seen, tasks) = start_clients(&convs, &nodes, &phase, &mut rng);

    let mut faults = Vec::new();
    let end = Instant::now() + CHAOS;
    tokio::time::sleep(Duration::from_secs(1)).await;
    while Instant::now() < end {
        let at = Instant::now();
        nodes.set(0, None);
        node.kill();
        let down = rng.ms(0, 1000);
        eprintln!("{:>6} ms  SIGKILL, restart after {} ms", (at + CHAOS - end).as_millis(), down.as_millis());
        tokio::time::sleep(down).await;
        node = tokio::task::block_in_place(start);
        nodes.set(0, Some(node.addr));
        faults.push(Fault { kind: "SIGKILL, restart (0-1 s)", at });
        tokio::time::sleep(rng.ms(1000, 3000)).await;
    }

    let (problems, report) = settle_and_check(&nodes, &convs, &phase, &seen, tasks, &faults).await;
    let acked: usize = seen.iter().map(|s| s.lock().unwrap().acked.len()).sum();
    eprintln!("sqlite: {acked} acked, {} kills\n{report}", faults.len());
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    assert!(acked > 50 && faults.len() >= 5, "the test exercised too little: {acked} acked, {} kills", faults.len());
}
