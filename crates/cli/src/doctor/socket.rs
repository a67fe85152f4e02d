//! The chat socket: step `established` (the first frame after the upgrade opens the
//! [`Socket`]), reading the socket's events, and what the socket steps (in `traffic`) share.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use natter_proto::{ServerFrame, PROTOCOL_VERSION};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::account::{BotChoice, Identity};
use super::handshake::Upgraded;
use super::http::Api;
use super::net::BoxIo;
use super::report::{human, Step};
use super::{DoctorArgs, Registry};

/// What came next on the socket.
pub(super) enum Event {
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

pub(super) async fn next_event(ws: &mut WebSocketStream<BoxIo>, deadline: tokio::time::Instant) -> Event {
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

/// The open chat socket, after connection_established.
pub(super) struct OpenSocket {
    pub ws: WebSocketStream<BoxIo>,
    /// The server's heartbeat interval, from connection_established.
    pub heartbeat: Duration,
}

/// The chat socket as a step leaves it: open, or why the socket steps after it are skipped.
pub(super) type Socket = Result<OpenSocket, String>;

/// Why the socket steps are skipped when the established step did not open the socket.
const NO_SOCKET: &str = "no open chat socket (the established step did not pass)";

/// A step that lost the socket, and why the socket steps after it are skipped.
pub(super) fn lost(step: Step, why: impl Into<String>) -> (Step, Socket) {
    (step, Err(why.into()))
}

/// A socket step skipped for want of a socket, for the reason the socket is gone.
pub(super) fn no_socket(name: &'static str, why: String) -> (Step, Socket) {
    (Step::skipped(name, why.clone()), Err(why))
}

/// A close code, explained from the server's registry.
pub(super) fn closed(registry: &Registry, name: &'static str, code: u16, reason: &str, when: &str) -> (Step, Socket) {
    let (mut cause, mut fix) = registry.explain_close(code, reason);
    if code == 1008 {
        fix = format!("{fix} (natter serve --allowed-origin ORIGIN)");
    }
    if code == 1005 {
        cause = "the server closed without a code, which natter never does: something in between closed it".into();
        fix = "check the proxies between this machine and natter".into();
    }
    let source = if registry.from_server { "" } else { " (explained from this doctor's copy of the registry)" };
    let step =
        Step::fail(name, format!("closed {when} with {}: {reason}{source}", registry.close_name(code)), cause, fix);
    lost(step, format!("the socket was closed with {code} during {name}"))
}

pub(super) async fn established(
    api: &Api,
    args: &DoctorArgs,
    registry: &Registry,
    user: &Identity,
    bot: &BotChoice,
    upgraded: Option<Upgraded>,
) -> (Step, Socket) {
    let skip = |why: &str| (Step::skipped("established", why), Err(NO_SOCKET.to_owned()));
    let Some(Upgraded { io, leftover }) = upgraded else {
        return skip("the WebSocket upgrade did not succeed (handshake step)");
    };
    let Some(token) = user.token() else {
        return skip("needs a user (--token or --username/--password); without one the server closes with 4401");
    };
    let Some(bot_id) = bot.id else {
        return skip(if args.bot.is_some() { "--bot is not a bot id" } else { "no bot to chat with (pass --bot ID)" });
    };
    let started = Instant::now();
    let mut ws = WebSocketStream::from_partially_read(io, leftover, Role::Client, None).await;
    let deadline = tokio::time::Instant::now() + api.timeout;
    let event = loop {
        match next_event(&mut ws, deadline).await {
            Event::Ping => continue,
            other => break other,
        }
    };
    let took = started.elapsed();
    match event {
        Event::Frame(f) => first_frame(*f, ws, took),
        Event::Unknown(t) => lost(
            Step::fail(
                "established",
                format!("the first frame is not a natter frame: {t:?}"),
                "protocol mismatch: this WebSocket endpoint is not natter's chat socket",
                "check that the base URL points at natter",
            ),
            "the socket did not start with connection_established",
        ),
        Event::Close(code, reason) => closed(registry, "established", code, &reason, &format!("after {}", human(took))),
        Event::Dropped(e) => {
            let cause = dropped_cause(api, registry, token, bot_id, args.origin.as_deref()).await;
            let detail = format!("no connection_established; {e} after {}", human(took));
            let step = Step::fail("established", detail, cause, super::handshake::PROXY_FIX);
            lost(step, "the socket dropped before connection_established")
        }
        Event::Ping | Event::Timeout => lost(
            Step::fail(
                "established",
                format!("no frame within {} s of the upgrade", api.timeout.as_secs()),
                "the upgrade succeeded but nothing arrived: a proxy in between buffers the socket, or the server is stuck",
                "turn off response buffering for /api/ws/ (nginx: proxy_buffering off) and check the server's log",
            ),
            "no connection_established",
        ),
    }
}

/// The established step's verdict on the socket's first frame.
fn first_frame(frame: ServerFrame, ws: WebSocketStream<BoxIo>, took: Duration) -> (Step, Socket) {
    match judge_first_frame("established", frame, took) {
        Ok((step, heartbeat)) => (step, Ok(OpenSocket { ws, heartbeat })),
        Err(step) => lost(step, "the socket did not start with connection_established"),
    }
}

/// Step `name`'s verdict on a transport's first frame, `took` after it was asked for: the
/// passed (or warned) step and the server's heartbeat interval, or the failed step.
pub(super) fn judge_first_frame(
    name: &'static str,
    frame: ServerFrame,
    took: Duration,
) -> Result<(Step, Duration), Step> {
    let ServerFrame::ConnectionEstablished {
        connection_id,
        protocol_version,
        user,
        bot,
        last_seq,
        heartbeat_interval_ms,
        limits,
        ..
    } = frame
    else {
        return Err(Step::fail(
            name,
            format!("the first frame was {:?}, not connection_established", frame_type(&frame)),
            "protocol mismatch: the server is not natter v1, or something in between injects frames",
            "check that the base URL points at natter",
        ));
    };
    let heartbeat = Duration::from_millis(heartbeat_interval_ms);
    let detail = format!(
        "connection_established in {}: connection {connection_id}, {} → bot {}, protocol v{protocol_version}, last_seq {last_seq}, heartbeat every {}, limits {} msg/s (burst {}), {} sockets per user",
        human(took),
        user.username,
        bot.name,
        human(heartbeat),
        limits.messages_per_second,
        limits.message_burst,
        limits.max_connections_per_user
    );
    let step = if protocol_version != PROTOCOL_VERSION {
        Step::warn(
            name,
            detail,
            format!("the server speaks protocol v{protocol_version}, this doctor v{PROTOCOL_VERSION}"),
            "use a natter doctor of the server's version",
        )
    } else {
        Step::ok(name, detail)
    };
    Ok((step, heartbeat))
}

/// Why the socket dropped before connection_established: the server's preflight says what it
/// would have said.
async fn dropped_cause(api: &Api, registry: &Registry, token: &str, bot: uuid::Uuid, origin: Option<&str>) -> String {
    let verdict = api
        .get(&format!("/ws/preflight/{bot}"), Some(token), origin)
        .await
        .ok()
        .and_then(|r| r.json::<natter_proto::api::Preflight>());
    match verdict {
        Some(p) if !p.ok => {
            let code = p.close_code.unwrap_or(0);
            let (why, _) = registry.explain_close(code, p.reason.as_deref().unwrap_or(""));
            format!("the connection dropped without a close frame (a browser shows 1006); the server's preflight says it would close with {}: {why}", registry.close_name(code))
        }
        _ => "the connection dropped without a close frame (a browser shows 1006), although the server's preflight accepts this connection: something in between cut it".into(),
    }
}

/// Closes the socket politely (1000), so the server records a normal end.
pub(super) async fn close(socket: Socket) {
    if let Ok(OpenSocket { mut ws, .. }) = socket {
        let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "natter doctor done".into() })).await;
        let _ =
            tokio::time::timeout(Duration::from_secs(1), async { while let Some(Ok(_)) = ws.next().await {} }).await;
    }
}
