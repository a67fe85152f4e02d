//! The steps on the open chat socket: `ping` (round trips), `watch` (idling until something
//! cuts the connection) and `send` (a message, its ack and the bot's reply). Each takes the
//! [`Socket`] the step before left and hands it on, or why it is gone.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use natter_proto::{ClientFrame, MessageRole, ServerFrame};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::net::BoxIo;
use super::report::{guess_idle_timeout, human, min_median_max, Step};
use super::socket::{closed, lost, next_event, no_socket, Event, Socket};
use super::Registry;

const PING_SAMPLES: u64 = 5;

/// How waiting for an answer on the socket ended, when the answer did not come.
enum Broken {
    /// Sending failed.
    Send(String),
    Close(u16, String),
    Dropped(String),
    Timeout,
}

pub(super) async fn ping(timeout: Duration, registry: &Registry, socket: Socket) -> (Step, Socket) {
    let mut sock = match socket {
        Ok(s) => s,
        Err(why) => return no_socket("ping", why),
    };
    let mut samples = Vec::new();
    for n in 1..=PING_SAMPLES {
        match ping_once(&mut sock.ws, n, timeout).await {
            Ok(round_trip) => samples.push(round_trip),
            Err(broken) => return ping_failed(broken, n, samples.len(), timeout, registry),
        }
    }
    let (min, median, max) = min_median_max(&samples).expect("samples");
    let detail = format!("{PING_SAMPLES} pings: min {}, median {}, max {}", human(min), human(median), human(max));
    let step = if median > Duration::from_secs(1) {
        Step::warn(
            "ping",
            detail,
            "round trips are slow (median over 1 s)",
            "check the network path and the server's load",
        )
    } else {
        Step::ok("ping", detail)
    };
    (step, Ok(sock))
}

/// Sends ping `n` and waits for its pong; returns the round trip.
async fn ping_once(ws: &mut WebSocketStream<BoxIo>, n: u64, timeout: Duration) -> Result<Duration, Broken> {
    let frame = serde_json::to_string(&ClientFrame::Ping { id: json!(n) }).expect("frames serialize");
    let started = Instant::now();
    ws.send(Message::Text(frame.into())).await.map_err(|e| Broken::Send(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match next_event(ws, deadline).await {
            Event::Frame(f) => {
                if let ServerFrame::Pong { id, .. } = *f {
                    if id == json!(n) {
                        return Ok(started.elapsed());
                    }
                }
            }
            Event::Ping | Event::Unknown(_) => {}
            Event::Close(code, reason) => return Err(Broken::Close(code, reason)),
            Event::Dropped(e) => return Err(Broken::Dropped(e)),
            Event::Timeout => return Err(Broken::Timeout),
        }
    }
}

/// The ping step's verdict when ping `n` got no pong (`answered` did).
fn ping_failed(broken: Broken, n: u64, answered: usize, timeout: Duration, registry: &Registry) -> (Step, Socket) {
    match broken {
        Broken::Send(e) => lost(
            Step::fail(
                "ping",
                format!("sending ping {n} failed: {e}"),
                "the connection broke",
                "run the doctor again with --watch to see when connections die",
            ),
            "the socket broke during ping",
        ),
        Broken::Close(code, reason) => closed(registry, "ping", code, &reason, &format!("after {answered} pongs")),
        Broken::Dropped(e) => lost(
            Step::fail(
                "ping",
                format!("the connection dropped after {answered} pongs: {e}"),
                "the connection was cut without a close frame (1006): the network or something in between",
                "run the doctor again with --watch 120 to see when connections die",
            ),
            "the socket dropped during ping",
        ),
        Broken::Timeout => lost(
            Step::fail(
                "ping",
                format!("no pong to ping {n} within {} s ({answered} answered)", timeout.as_secs()),
                "the server or something in between stopped passing frames",
                "check the server's log and the proxies' buffering (nginx: proxy_buffering off)",
            ),
            "the socket stopped answering",
        ),
    }
}

pub(super) async fn watch(registry: &Registry, socket: Socket, secs: Option<u64>) -> (Step, Socket) {
    let Some(secs) = secs.filter(|s| *s > 0) else {
        let step =
            Step::skipped("watch", "pass --watch SECS to hold the socket idle and see whether something cuts it");
        return (step, socket);
    };
    let mut sock = match socket {
        Ok(s) => s,
        Err(why) => return no_socket("watch", why),
    };
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut pings = 0;
    loop {
        match next_event(&mut sock.ws, deadline).await {
            Event::Timeout => break,
            Event::Ping => pings += 1,
            Event::Frame(_) | Event::Unknown(_) => {}
            Event::Close(code, reason) => {
                return closed(registry, "watch", code, &reason, &format!("after {} idle", human(started.elapsed())))
            }
            Event::Dropped(e) => {
                let lasted = started.elapsed();
                let why = format!("the socket died after {} idle (watch step)", human(lasted));
                return lost(idle_death(lasted, &e, pings, sock.heartbeat), why);
            }
        }
    }
    let detail = format!(
        "idle for {secs} s: still open; {pings} server pings answered (heartbeat every {})",
        human(sock.heartbeat)
    );
    (Step::ok("watch", detail), Ok(sock))
}

/// The watch step's verdict when the idle socket died without a close frame after `lasted`.
fn idle_death(lasted: Duration, error: &str, pings: u32, heartbeat: Duration) -> Step {
    let detail = format!(
        "the connection died after {} idle without a close frame ({error}); {pings} server pings answered before",
        human(lasted)
    );
    let hb_text = format!("natter pings every {}", human(heartbeat));
    match guess_idle_timeout(lasted, Some(heartbeat)) {
        Some(g) => {
            let round = if g.round { format!(", a common default idle timeout ({} s)", g.timeout_secs) } else { String::new() };
            let suggest_ms = (g.timeout_secs * 1000 / 2).max(500);
            Step::fail(
                "watch",
                detail,
                format!(
                    "a proxy or load balancer in between closes idle connections after about {} s{round}; the server would not close a connection that answers its pings before 2 × its heartbeat interval",
                    g.timeout_secs
                ),
                format!(
                    "make the heartbeat interval shorter than that timeout ({hb_text}; e.g. natter serve --heartbeat-interval-ms {suggest_ms}), or raise the proxy's idle timeout (nginx: proxy_read_timeout 3600s; proxy_send_timeout 3600s)"
                ),
            )
        }
        None => Step::fail(
            "watch",
            detail,
            "the connection was cut without a close frame (a browser shows 1006): the network, a NAT or something in between dropped it",
            format!("check the proxies' idle timeouts against {hb_text}; clients must reconnect and resume with after_seq"),
        ),
    }
}

pub(super) async fn send(timeout: Duration, registry: &Registry, socket: Socket, enabled: bool) -> (Step, Socket) {
    if !enabled {
        return (Step::skipped("send", "pass --send to send a test message and wait for the bot's reply (it stays in the conversation's history)"), socket);
    }
    let mut sock = match socket {
        Ok(s) => s,
        Err(why) => return no_socket("send", why),
    };
    let client_id = format!("doctor-{}", uuid::Uuid::new_v4().simple());
    let content = format!("natter doctor: round-trip test at {}", chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC"));
    let frame = serde_json::to_string(&ClientFrame::Message { client_id: client_id.clone(), content })
        .expect("frames serialize");
    let mut trip = RoundTrip { client_id, started: Instant::now(), ack: None, deltas: 0 };
    if let Err(e) = sock.ws.send(Message::Text(frame.into())).await {
        let step = Step::fail(
            "send",
            format!("sending the message failed: {e}"),
            "the connection broke",
            "run the doctor again",
        );
        return lost(step, "the socket broke during send");
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match next_event(&mut sock.ws, deadline).await {
            Event::Frame(f) => {
                if let Some(step) = trip.on_frame(*f, registry) {
                    return (step, Ok(sock));
                }
            }
            Event::Ping | Event::Unknown(_) => {}
            Event::Close(code, reason) => {
                return closed(registry, "send", code, &reason, "while waiting for the round trip")
            }
            Event::Dropped(e) => {
                let step = Step::fail(
                    "send",
                    format!("the connection dropped while waiting for the round trip: {e}"),
                    "the connection was cut without a close frame",
                    "run the doctor again with --watch to see when connections die",
                );
                return lost(step, "the socket dropped during send");
            }
            Event::Timeout => return (trip.timed_out(timeout), Ok(sock)),
        }
    }
}

/// A test message on its way: sent, acked, answered in deltas, answered.
struct RoundTrip {
    client_id: String,
    started: Instant,
    /// The stored message's id and seq, and when the ack came.
    ack: Option<(uuid::Uuid, i64, Duration)>,
    deltas: u32,
}

impl RoundTrip {
    /// Takes in the next frame; returns the send step's verdict once a frame decides it.
    fn on_frame(&mut self, frame: ServerFrame, registry: &Registry) -> Option<Step> {
        let acked = self.ack.map(|a| a.0);
        match frame {
            ServerFrame::Ack { client_id, message, .. } if client_id == self.client_id => {
                self.ack = Some((message.id, message.seq, self.started.elapsed()))
            }
            ServerFrame::MessageDelta { in_reply_to, .. } if Some(in_reply_to) == acked => self.deltas += 1,
            ServerFrame::Message { message }
                if message.role == MessageRole::Bot
                    && message.in_reply_to.is_some()
                    && message.in_reply_to == acked =>
            {
                let (_, seq, ack_took) = self.ack.expect("ack before reply");
                let streamed =
                    if self.deltas > 0 { format!(", streamed in {} deltas", self.deltas) } else { String::new() };
                return Some(Step::ok(
                    "send",
                    format!(
                        "ack (seq {seq}) in {}, bot reply (seq {}, {}) in {}{streamed}",
                        human(ack_took),
                        message.seq,
                        message.status.as_str(),
                        human(self.started.elapsed())
                    ),
                ));
            }
            ServerFrame::Error { code, message, client_id, in_reply_to, .. }
                if client_id.as_deref() == Some(self.client_id.as_str())
                    || (in_reply_to.is_some() && in_reply_to == acked) =>
            {
                let explained = registry.error(code.as_str()).map(|e| e.description.clone()).unwrap_or_default();
                let stage = if self.ack.is_some() { "the bot's reply failed" } else { "the message was refused" };
                return Some(Step::fail(
                    "send",
                    format!("{stage}: error {}: {message}", code.as_str()),
                    format!("{stage}: {explained}"),
                    "see the error's message; for bot errors check the bot's engine settings and the server's log",
                ));
            }
            _ => {}
        }
        None
    }

    /// The send step's verdict when the round trip did not end in time.
    fn timed_out(&self, timeout: Duration) -> Step {
        match self.ack {
            None => Step::fail(
                "send",
                format!("no ack within {} s", timeout.as_secs()),
                "the server did not confirm the message: it may be overloaded or its store slow",
                "check the server's log and GET /api/ready",
            ),
            Some((_, seq, t)) => Step::fail(
                "send",
                format!("ack (seq {seq}) in {}, but no bot reply within {} s", human(t), timeout.as_secs()),
                "the message is stored, but the bot's engine did not answer",
                "check the bot's engine settings (PATCH /api/bots/{id}) and the server's log",
            ),
        }
    }
}
