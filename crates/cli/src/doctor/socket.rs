//! The steps on the open chat socket: `established` (the first frame), `ping` (round trips),
//! `watch` (idling until something cuts the connection) and `send` (a message, its ack and
//! the bot's reply).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use natter_proto::{ClientFrame, MessageRole, ServerFrame, PROTOCOL_VERSION};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::net::BoxIo;
use super::report::{guess_idle_timeout, human, min_median_max, Step};
use super::Doctor;

const PING_SAMPLES: u64 = 5;

/// What came next on the socket.
enum Event {
    Frame(Box<ServerFrame>),
    /// A text frame that is not a known server frame, or a binary frame.
    Unknown(String),
    /// A WebSocket ping from the server (already answered by tungstenite).
    Ping,
    Close(u16, String),
    /// The connection ended without a close frame (what a browser reports as 1006).
    Dropped(String),
    Timeout,
}

async fn next_event(ws: &mut WebSocketStream<BoxIo>, deadline: tokio::time::Instant) -> Event {
    loop {
        return match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => Event::Timeout,
            Ok(None) => Event::Dropped("the connection ended".into()),
            Ok(Some(Err(e))) => Event::Dropped(e.to_string()),
            Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<ServerFrame>(&t) {
                Ok(f) => Event::Frame(Box::new(f)),
                Err(_) => Event::Unknown(t.chars().take(200).collect()),
            },
            Ok(Some(Ok(Message::Ping(_)))) => Event::Ping,
            Ok(Some(Ok(Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Close(Some(c))))) => Event::Close(u16::from(c.code), c.reason.to_string()),
            Ok(Some(Ok(Message::Close(None)))) => Event::Close(1005, String::new()),
            Ok(Some(Ok(_))) => Event::Unknown("a binary frame".into()),
        };
    }
}

/// The `type` of a server frame.
fn frame_type(f: &ServerFrame) -> String {
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

impl Doctor {
    fn no_socket(&self, name: &'static str) -> Step {
        Step::skipped(
            name,
            self.socket_gone
                .clone()
                .unwrap_or_else(|| "no open chat socket (the established step did not pass)".into()),
        )
    }

    /// A close code, explained from the server's registry.
    fn closed(&mut self, name: &'static str, code: u16, reason: &str, when: &str) -> Step {
        self.socket_gone = Some(format!("the socket was closed with {code} during {name}"));
        let (mut cause, mut fix) = self.registry.explain_close(code, reason);
        if code == 1008 {
            fix = format!("{fix} (natter serve --allowed-origin ORIGIN)");
        }
        if code == 1005 {
            cause = "the server closed without a code, which natter never does: something in between closed it".into();
            fix = "check the proxies between this machine and natter".into();
        }
        let source =
            if self.registry.from_server { "" } else { " (explained from this doctor's copy of the registry)" };
        Step::fail(name, format!("closed {when} with {}: {reason}{source}", self.registry.close_name(code)), cause, fix)
    }

    pub(super) async fn established(&mut self) -> Step {
        let Some((io, leftover)) = self.upgraded.take() else {
            return Step::skipped("established", "the WebSocket upgrade did not succeed (handshake step)");
        };
        if self.token.is_none() {
            return Step::skipped(
                "established",
                "needs a user (--token or --username/--password); without one the server closes with 4401",
            );
        }
        if self.bot_id.is_none() {
            let why =
                if self.args.bot.is_some() { "--bot is not a bot id" } else { "no bot to chat with (pass --bot ID)" };
            return Step::skipped("established", why);
        }
        let started = Instant::now();
        let mut ws = WebSocketStream::from_partially_read(io, leftover, Role::Client, None).await;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let event = loop {
            match next_event(&mut ws, deadline).await {
                Event::Ping => continue,
                other => break other,
            }
        };
        let took = started.elapsed();
        match event {
            Event::Frame(f) => match *f {
                ServerFrame::ConnectionEstablished {
                    connection_id,
                    protocol_version,
                    user,
                    bot,
                    last_seq,
                    heartbeat_interval_ms,
                    limits,
                    ..
                } => {
                    self.heartbeat = Some(Duration::from_millis(heartbeat_interval_ms));
                    self.ws = Some(ws);
                    let detail = format!(
                        "connection_established in {}: connection {connection_id}, {} → bot {}, protocol v{protocol_version}, last_seq {last_seq}, heartbeat every {}, limits {} msg/s (burst {}), {} sockets per user",
                        human(took),
                        user.username,
                        bot.name,
                        human(Duration::from_millis(heartbeat_interval_ms)),
                        limits.messages_per_second,
                        limits.message_burst,
                        limits.max_connections_per_user
                    );
                    if protocol_version != PROTOCOL_VERSION {
                        return Step::warn(
                            "established",
                            detail,
                            format!("the server speaks protocol v{protocol_version}, this doctor v{PROTOCOL_VERSION}"),
                            "use a natter doctor of the server's version",
                        );
                    }
                    Step::ok("established", detail)
                }
                other => {
                    self.socket_gone = Some("the socket did not start with connection_established".into());
                    Step::fail(
                        "established",
                        format!("the first frame was {:?}, not connection_established", frame_type(&other)),
                        "protocol mismatch: the server is not natter v1, or something in between injects frames",
                        "check that the base URL points at natter",
                    )
                }
            },
            Event::Unknown(t) => {
                self.socket_gone = Some("the socket did not start with connection_established".into());
                Step::fail(
                    "established",
                    format!("the first frame is not a natter frame: {t:?}"),
                    "protocol mismatch: this WebSocket endpoint is not natter's chat socket",
                    "check that the base URL points at natter",
                )
            }
            Event::Close(code, reason) => self.closed("established", code, &reason, &format!("after {}", human(took))),
            Event::Dropped(e) => {
                self.socket_gone = Some("the socket dropped before connection_established".into());
                // Ask the server what it would have said.
                let verdict = match self.bot_id {
                    Some(bot) => self
                        .get(&format!("/ws/preflight/{bot}"), true, self.args.origin.as_deref())
                        .await
                        .ok()
                        .and_then(|r| serde_json::from_str::<natter_proto::api::Preflight>(&r.body).ok()),
                    None => None,
                };
                let cause = match verdict {
                    Some(p) if !p.ok => {
                        let code = p.close_code.unwrap_or(0);
                        let (why, _) = self.registry.explain_close(code, p.reason.as_deref().unwrap_or(""));
                        format!("the connection dropped without a close frame (a browser shows 1006); the server's preflight says it would close with {}: {why}", self.registry.close_name(code))
                    }
                    _ => "the connection dropped without a close frame (a browser shows 1006), although the server's preflight accepts this connection: something in between cut it".into(),
                };
                Step::fail(
                    "established",
                    format!("no connection_established; {e} after {}", human(took)),
                    cause,
                    super::handshake::PROXY_FIX,
                )
            }
            Event::Ping | Event::Timeout => {
                self.socket_gone = Some("no connection_established".into());
                Step::fail(
                    "established",
                    format!("no frame within {} s of the upgrade", self.timeout.as_secs()),
                    "the upgrade succeeded but nothing arrived: a proxy in between buffers the socket, or the server is stuck",
                    "turn off response buffering for /api/ws/ (nginx: proxy_buffering off) and check the server's log",
                )
            }
        }
    }

    pub(super) async fn ping(&mut self) -> Step {
        let Some(mut ws) = self.ws.take() else { return self.no_socket("ping") };
        let mut samples = Vec::new();
        for n in 1..=PING_SAMPLES {
            let frame = serde_json::to_string(&ClientFrame::Ping { id: json!(n) }).expect("frames serialize");
            let started = Instant::now();
            if let Err(e) = ws.send(Message::Text(frame.into())).await {
                self.socket_gone = Some("the socket broke during ping".into());
                return Step::fail(
                    "ping",
                    format!("sending ping {n} failed: {e}"),
                    "the connection broke",
                    "run the doctor again with --watch to see when connections die",
                );
            }
            let deadline = tokio::time::Instant::now() + self.timeout;
            loop {
                match next_event(&mut ws, deadline).await {
                    Event::Frame(f) => {
                        if let ServerFrame::Pong { id, .. } = *f {
                            if id == json!(n) {
                                samples.push(started.elapsed());
                                break;
                            }
                        }
                    }
                    Event::Ping | Event::Unknown(_) => {}
                    Event::Close(code, reason) => {
                        return self.closed("ping", code, &reason, &format!("after {} pongs", samples.len()))
                    }
                    Event::Dropped(e) => {
                        self.socket_gone = Some("the socket dropped during ping".into());
                        return Step::fail(
                            "ping",
                            format!("the connection dropped after {} pongs: {e}", samples.len()),
                            "the connection was cut without a close frame (1006): the network or something in between",
                            "run the doctor again with --watch 120 to see when connections die",
                        );
                    }
                    Event::Timeout => {
                        self.socket_gone = Some("the socket stopped answering".into());
                        return Step::fail(
                            "ping",
                            format!(
                                "no pong to ping {n} within {} s ({} answered)",
                                self.timeout.as_secs(),
                                samples.len()
                            ),
                            "the server or something in between stopped passing frames",
                            "check the server's log and the proxies' buffering (nginx: proxy_buffering off)",
                        );
                    }
                }
            }
        }
        self.ws = Some(ws);
        let (min, median, max) = min_median_max(&samples).expect("samples");
        let detail = format!("{PING_SAMPLES} pings: min {}, median {}, max {}", human(min), human(median), human(max));
        if median > Duration::from_secs(1) {
            return Step::warn(
                "ping",
                detail,
                "round trips are slow (median over 1 s)",
                "check the network path and the server's load",
            );
        }
        Step::ok("ping", detail)
    }

    pub(super) async fn watch(&mut self) -> Step {
        let Some(secs) = self.args.watch.filter(|s| *s > 0) else {
            return Step::skipped(
                "watch",
                "pass --watch SECS to hold the socket idle and see whether something cuts it",
            );
        };
        let Some(mut ws) = self.ws.take() else { return self.no_socket("watch") };
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut pings = 0;
        loop {
            match next_event(&mut ws, deadline).await {
                Event::Timeout => break,
                Event::Ping => pings += 1,
                Event::Frame(_) | Event::Unknown(_) => {}
                Event::Close(code, reason) => {
                    return self.closed("watch", code, &reason, &format!("after {} idle", human(started.elapsed())))
                }
                Event::Dropped(e) => {
                    let lasted = started.elapsed();
                    self.socket_gone = Some(format!("the socket died after {} idle (watch step)", human(lasted)));
                    let detail = format!("the connection died after {} idle without a close frame ({e}); {pings} server pings answered before", human(lasted));
                    let hb = self.heartbeat;
                    let hb_text = hb
                        .map(|h| format!("natter pings every {}", human(h)))
                        .unwrap_or_else(|| "natter's heartbeat".into());
                    return match guess_idle_timeout(lasted, hb) {
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
                    };
                }
            }
        }
        self.ws = Some(ws);
        let hb = self.heartbeat.map(|h| format!(" (heartbeat every {})", human(h))).unwrap_or_default();
        Step::ok("watch", format!("idle for {secs} s: still open; {pings} server pings answered{hb}"))
    }

    pub(super) async fn send(&mut self) -> Step {
        if !self.args.send {
            return Step::skipped("send", "pass --send to send a test message and wait for the bot's reply (it stays in the conversation's history)");
        }
        let Some(mut ws) = self.ws.take() else { return self.no_socket("send") };
        let client_id = format!("doctor-{}", uuid::Uuid::new_v4().simple());
        let content =
            format!("natter doctor: round-trip test at {}", chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC"));
        let frame = serde_json::to_string(&ClientFrame::Message { client_id: client_id.clone(), content })
            .expect("frames serialize");
        let started = Instant::now();
        if let Err(e) = ws.send(Message::Text(frame.into())).await {
            self.socket_gone = Some("the socket broke during send".into());
            return Step::fail(
                "send",
                format!("sending the message failed: {e}"),
                "the connection broke",
                "run the doctor again",
            );
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut ack: Option<(uuid::Uuid, i64, Duration)> = None;
        let mut deltas = 0;
        loop {
            match next_event(&mut ws, deadline).await {
                Event::Frame(f) => match *f {
                    ServerFrame::Ack { client_id: c, message, .. } if c == client_id => {
                        ack = Some((message.id, message.seq, started.elapsed()))
                    }
                    ServerFrame::MessageDelta { in_reply_to, .. } if Some(in_reply_to) == ack.map(|a| a.0) => {
                        deltas += 1
                    }
                    ServerFrame::Message { message }
                        if message.role == MessageRole::Bot
                            && message.in_reply_to.is_some()
                            && message.in_reply_to == ack.map(|a| a.0) =>
                    {
                        let (_, seq, ack_took) = ack.expect("ack before reply");
                        self.ws = Some(ws);
                        let streamed =
                            if deltas > 0 { format!(", streamed in {deltas} deltas") } else { String::new() };
                        return Step::ok(
                            "send",
                            format!(
                                "ack (seq {seq}) in {}, bot reply (seq {}, {}) in {}{streamed}",
                                human(ack_took),
                                message.seq,
                                message.status.as_str(),
                                human(started.elapsed())
                            ),
                        );
                    }
                    ServerFrame::Error { code, message, client_id: c, in_reply_to, .. }
                        if c.as_deref() == Some(client_id.as_str())
                            || (in_reply_to.is_some() && in_reply_to == ack.map(|a| a.0)) =>
                    {
                        self.ws = Some(ws);
                        let explained =
                            self.registry.error(code.as_str()).map(|e| e.description.clone()).unwrap_or_default();
                        let stage = if ack.is_some() { "the bot's reply failed" } else { "the message was refused" };
                        return Step::fail(
                            "send",
                            format!("{stage}: error {}: {message}", code.as_str()),
                            format!("{stage}: {explained}"),
                            "see the error's message; for bot errors check the bot's engine settings and the server's log",
                        );
                    }
                    _ => {}
                },
                Event::Ping | Event::Unknown(_) => {}
                Event::Close(code, reason) => {
                    return self.closed("send", code, &reason, "while waiting for the round trip")
                }
                Event::Dropped(e) => {
                    self.socket_gone = Some("the socket dropped during send".into());
                    return Step::fail(
                        "send",
                        format!("the connection dropped while waiting for the round trip: {e}"),
                        "the connection was cut without a close frame",
                        "run the doctor again with --watch to see when connections die",
                    );
                }
                Event::Timeout => {
                    self.ws = Some(ws);
                    return match ack {
                        None => Step::fail(
                            "send",
                            format!("no ack within {} s", self.timeout.as_secs()),
                            "the server did not confirm the message: it may be overloaded or its store slow",
                            "check the server's log and GET /api/ready",
                        ),
                        Some((_, seq, t)) => Step::fail(
                            "send",
                            format!(
                                "ack (seq {seq}) in {}, but no bot reply within {} s",
                                human(t),
                                self.timeout.as_secs()
                            ),
                            "the message is stored, but the bot's engine did not answer",
                            "check the bot's engine settings (PATCH /api/bots/{id}) and the server's log",
                        ),
                    };
                }
            }
        }
    }

    /// Closes the socket politely (1000), so the server records a normal end.
    pub(super) async fn close_socket(&mut self) {
        if let Some(mut ws) = self.ws.take() {
            let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "natter doctor done".into() })).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), async { while let Some(Ok(_)) = ws.next().await {} })
                .await;
        }
    }

    pub(super) async fn finish(&mut self) {
        self.close_socket().await;
    }
}
