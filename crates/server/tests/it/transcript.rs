//! Property: whatever random mix of sends, resends, abrupt disconnects and resumes a client
//! goes through, it ends up with exactly the stored transcript — every message once, in seq
//! order — and every message it sent is stored exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use natter_proto::{MessageRole, ServerFrame, WireMessage};
use proptest::prelude::*;
use uuid::Uuid;

use crate::helpers::*;

#[derive(Debug, Clone)]
enum Op {
    /// Send a new message.
    Send,
    /// Send a new message and drop the socket at once, without reading the ack.
    SendAndDrop,
    /// Drop the socket without a close frame and reconnect with `after_seq`.
    Reconnect,
    /// Read whatever has arrived.
    Read,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![4 => Just(Op::Send), 2 => Just(Op::SendAndDrop), 2 => Just(Op::Reconnect), 2 => Just(Op::Read)]
}

/// The client's view: what it has seen, and what it sent that is not yet acked.
struct Client {
    seen: BTreeMap<i64, WireMessage>,
    outbox: BTreeMap<String, String>,
    sent: BTreeSet<String>,
    ws: Option<WsClient>,
    next: usize,
}

impl Client {
    fn last_seq(&self) -> i64 {
        self.seen.keys().next_back().copied().unwrap_or(0)
    }

    fn take(&mut self, f: ServerFrame) {
        let m = match f {
            ServerFrame::Ack { client_id, message, .. } => {
                self.outbox.remove(&client_id);
                message
            }
            ServerFrame::Message { message } => message,
            ServerFrame::ConnectionEstablished { .. } | ServerFrame::Pong { .. } | ServerFrame::MessageDelta { .. } => {
                return
            }
            ServerFrame::Error { code, message, .. } => panic!("unexpected error {code:?}: {message}"),
        };
        if let Some(prev) = self.seen.insert(m.seq, m.clone()) {
            // An ack repeated for a resend is the same message; a `message` frame never repeats.
            assert_eq!(prev, m, "seq {} delivered with different content", m.seq);
        }
    }

    async fn drain(&mut self, wait: Duration) {
        if let Some(ws) = self.ws.as_mut() {
            let mut frames = Vec::new();
            while let Some(next) = ws.next_within(wait).await {
                match next {
                    Next::Frame(f) => frames.push(f),
                    Next::Close(c, r) => panic!("closed {c} {r}"),
                }
            }
            for f in frames {
                self.take(f);
            }
        }
    }

    async fn connect(&mut self, app: &TestApp, bot: Uuid, token: &str) {
        let after = self.last_seq();
        let mut ws = app.ws(bot, token, &format!("&after_seq={after}")).await;
        ws.established().await;
        // Resend what was never acked, with the same client_id.
        for (id, text) in self.outbox.clone() {
            ws.say(&id, &text).await;
        }
        self.ws = Some(ws);
    }
}

async fn run(ops: Vec<Op>) {
    let app = TestApp::spawn_with(|c| {
        c.limits.messages_per_second = 10_000;
        c.limits.message_burst = 10_000;
        c.limits.user_messages_per_second = 10_000;
        c.limits.user_message_burst = 10_000;
        c.limits.frames_per_second = 10_000;
        c.limits.frame_burst = 10_000;
    })
    .await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut c = Client { seen: BTreeMap::new(), outbox: BTreeMap::new(), sent: BTreeSet::new(), ws: None, next: 0 };
    c.connect(&app, bot.id, &alice.token).await;
    for op in ops {
        match op {
            Op::Send | Op::SendAndDrop => {
                let id = format!("m{}", c.next);
                let text = format!("text {}", c.next);
                c.next += 1;
                c.outbox.insert(id.clone(), text.clone());
                c.sent.insert(id.clone());
                c.ws.as_mut().unwrap().say(&id, &text).await;
                if matches!(op, Op::SendAndDrop) {
                    drop(c.ws.take());
                    c.connect(&app, bot.id, &alice.token).await;
                }
            }
            Op::Reconnect => {
                c.drain(Duration::from_millis(5)).await;
                drop(c.ws.take());
                c.connect(&app, bot.id, &alice.token).await;
            }
            Op::Read => c.drain(Duration::from_millis(20)).await,
        }
    }
    // Settle: read until every message is acked and every user message has its reply.
    let conv = app.state.store.conversation(alice.id, bot.id).await.unwrap().id;
    let mut stored = Vec::new();
    for _ in 0..100 {
        c.drain(Duration::from_millis(30)).await;
        stored = app.state.store.messages_after(conv, 0, 10_000).await.unwrap();
        let users = stored.iter().filter(|m| m.role == MessageRole::User).count();
        let bots = stored.iter().filter(|m| m.role == MessageRole::Bot).count();
        if c.outbox.is_empty() && users == bots && c.seen.len() == stored.len() {
            break;
        }
    }
    assert!(c.outbox.is_empty(), "unacked: {:?}", c.outbox.keys());
    let users = stored.iter().filter(|m| m.role == MessageRole::User).count();
    let bots = stored.iter().filter(|m| m.role == MessageRole::Bot).count();
    assert_eq!(users, bots, "every stored user message has its reply");
    let mine: Vec<&WireMessage> = c.seen.values().collect();
    let truth: Vec<&WireMessage> = stored.iter().collect();
    assert_eq!(mine, truth, "the client's transcript is the stored transcript");
    assert_eq!(stored.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=stored.len() as i64).collect::<Vec<_>>());
    let user_ids: Vec<&str> = stored.iter().filter_map(|m| m.client_id.as_deref()).collect();
    assert_eq!(user_ids.len(), c.sent.len(), "each sent message stored once");
    assert_eq!(user_ids.iter().copied().collect::<BTreeSet<_>>(), c.sent.iter().map(String::as_str).collect());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 20, ..ProptestConfig::default() })]

    #[test]
    fn random_sends_disconnects_and_resumes_leave_the_stored_transcript(ops in proptest::collection::vec(op(), 1..30)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(ops));
    }
}
