//! The steps on the HTTP streaming transport (SSE), which natter's clients fall back to when a
//! WebSocket cannot pass: `sse_stream` opens the event stream as a client does (`GET
//! /api/sse/chat/{bot}`, the first events: `connection_established`, `stream`) and judges its
//! headers (an event stream, not compressed, not held back by a buffering proxy); `sse_ping`
//! sends pings by `POST …/frames?stream=` and times the pongs. docs/protocol.md, "The SSE
//! binding".

use std::time::{Duration, Instant};

use natter_proto::{ClientFrame, ServerFrame};
use serde_json::json;

use super::account::{BotChoice, Identity};
use super::handshake;
use super::http::{Api, Resp};
use super::report::{human, min_median_max, Step};
use super::socket::{closed, judge_first_frame};
use super::{DoctorArgs, Registry};
use crate::sse_events::{self, CloseEvent, Event, StreamEvent};

const PING_SAMPLES: u64 = 5;

/// What fixes a proxy that holds an event stream back.
const BUFFERING_FIX: &str = "\
turn response buffering and compression off for /api/sse/ in the proxy; nginx:
  proxy_buffering off;   (natter sends X-Accel-Buffering: no, which nginx honours unless it is told to ignore it)
  gzip off;
Other proxies: pass text/event-stream unbuffered and uncompressed.";

/// The open event stream, after connection_established and the `stream` event.
pub(super) struct OpenStream {
    /// Held so that the stream (the server's session) stays open while the POSTs run.
    _res: reqwest::Response,
    /// Where the stream's frames go: a path under `/api`, with `?stream=`.
    post: String,
}

/// What the sse_stream step hands on: the open stream, or why the sse_ping step is skipped.
pub(super) struct Opened {
    pub stream: Result<OpenStream, String>,
    /// The stream's single-use ticket, when one was used. Never printed.
    pub ticket: Option<String>,
}

/// Why reading the next event failed.
enum Broken {
    Timeout,
    Ended,
    Read(String),
}

/// Reads the next event, skipping comments (keep-alives), until `deadline`.
async fn next_event(
    res: &mut reqwest::Response,
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) -> Result<Event, Broken> {
    loop {
        if let Some(e) = sse_events::take(buf) {
            return Ok(e);
        }
        match tokio::time::timeout_at(deadline, res.chunk()).await {
            Err(_) => return Err(Broken::Timeout),
            Ok(Ok(None)) => return Err(Broken::Ended),
            Ok(Ok(Some(bytes))) => buf.extend(String::from_utf8_lossy(&bytes).replace("\r\n", "\n").bytes()),
            Ok(Err(e)) => return Err(Broken::Read(e.without_url().to_string())),
        }
    }
}

/// Step `sse_stream`: opens the event stream and reads its first events.
pub(super) async fn stream(
    api: &Api,
    args: &DoctorArgs,
    registry: &Registry,
    user: &Identity,
    bot: &BotChoice,
) -> (Step, Opened) {
    const NAME: &str = "sse_stream";
    let skip = |why: &str| {
        let step = Step::skipped(NAME, why);
        (step, Opened { stream: Err("no open event stream (the sse_stream step did not pass)".into()), ticket: None })
    };
    if user.token().is_none() {
        return skip("needs a user (--token or --username/--password)");
    }
    let Some(bot_id) = bot.id else {
        return skip(if args.bot.is_some() { "--bot is not a bot id" } else { "no bot to chat with (pass --bot ID)" });
    };
    let (auth_query, ticket, auth) = handshake::authenticate(api, user, bot).await;
    let mut opened = Opened { stream: Err("no open event stream (the sse_stream step did not pass)".into()), ticket };
    let path = format!("/sse/chat/{bot_id}?{}", auth_query.trim_start_matches('&'));
    let shown = format!("GET {}/api/sse/chat/{bot_id}", api.target.prefix);
    // As a browser asks: it accepts compression, which a proxy may then apply.
    let mut req = api
        .http
        .get(api.target.api(&path))
        .header("accept", "text/event-stream")
        .header("accept-encoding", "gzip, deflate, br")
        .header("cache-control", "no-cache")
        // The stream stays open through the sse_ping step; each read below has its own deadline.
        .timeout(Duration::from_secs(3600));
    if let Some(o) = &args.origin {
        req = req.header("origin", o);
    }
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + api.timeout;
    let mut res = match tokio::time::timeout_at(deadline, req.send()).await {
        Err(_) => {
            let step = Step::fail(
                NAME,
                format!("{shown}: no answer within {} s", api.timeout.as_secs()),
                "the event stream got no answer: something in between holds the response back (buffers it) or drops the request",
                BUFFERING_FIX,
            );
            return (step, opened);
        }
        Ok(Err(e)) => {
            let step = Step::fail(
                NAME,
                format!("{shown}: {}", e.without_url()),
                "the request for the event stream failed",
                "check the proxies between this machine and natter",
            );
            return (step, opened);
        }
        Ok(Ok(res)) => res,
    };
    let headers_took = started.elapsed();
    let status = res.status().as_u16();
    let header = |name: &str| res.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = header("content-type").unwrap_or_default();
    let encoding = header("content-encoding").filter(|e| !e.eq_ignore_ascii_case("identity"));
    if status != 200 || !content_type.starts_with("text/event-stream") {
        let headers = res.headers().clone();
        let body = res.text().await.unwrap_or_default();
        let resp = Resp { status, headers, body, took: headers_took };
        if status == 404 && resp.error_code().is_some() {
            let step = Step::skipped(
                NAME,
                format!(
                    "this server has no HTTP streaming transport ({shown} is 404 {}): natter before the SSE binding",
                    resp.error_message()
                ),
            );
            return (step, opened);
        }
        let what = if status == 200 { format!("Content-Type {content_type:?}") } else { format!("HTTP {status}") };
        let step = Step::fail(
            NAME,
            format!("{shown}: {what} instead of 200 text/event-stream, in {} — {}", human(headers_took), resp.describe()),
            "natter answers every event stream with 200 text/event-stream (refusals come as a close event), so this answer came from, or was caused by, something in between",
            "let the proxy pass /api/sse/ to natter like the rest of /api/, unbuffered (nginx: proxy_buffering off)",
        );
        return (step, opened);
    }
    let head = format!("{shown}: 200 {content_type} in {}", human(headers_took));
    if let Some(encoding) = encoding {
        let step = Step::warn(
            NAME,
            format!("{head}; Content-Encoding: {encoding}"),
            format!("the event stream arrives compressed ({encoding}), which natter never does: a proxy compresses it, and a compressor holds events back until its buffer fills"),
            BUFFERING_FIX,
        );
        opened.stream = Err("the event stream is compressed; this doctor does not read it".into());
        return (step, opened);
    }
    let mut buf = Vec::new();
    let first = next_event(&mut res, &mut buf, deadline).await;
    let took = started.elapsed();
    let first = match first {
        Ok(e) => e,
        Err(broken) => {
            let step = match broken {
                Broken::Timeout => Step::fail(
                    NAME,
                    format!("{head}, but no event within {} s", api.timeout.as_secs()),
                    "the stream's headers came but its first event did not: something in between buffers the response",
                    BUFFERING_FIX,
                ),
                Broken::Ended | Broken::Read(_) => Step::fail(
                    NAME,
                    format!("{head}, but the stream ended before its first event{}", match broken {
                        Broken::Read(e) => format!(": {e}"),
                        _ => String::new(),
                    }),
                    "natter starts every stream with connection_established or a close event: something in between cut it",
                    "check the proxies between this machine and natter",
                ),
            };
            return (step, opened);
        }
    };
    if first.name == "close" {
        let Ok(close) = serde_json::from_slice::<CloseEvent>(&first.data) else {
            return (not_natter(NAME, &head, &first), opened);
        };
        let (mut step, _) = closed(registry, NAME, close.code, &close.reason, &format!("after {}", human(took)));
        step.detail = format!("{head}; {}{auth}", step.detail);
        return (step, opened);
    }
    let Ok(frame) = serde_json::from_slice::<ServerFrame>(&first.data) else {
        return (not_natter(NAME, &head, &first), opened);
    };
    let (mut step, heartbeat) = match judge_first_frame(NAME, frame, took) {
        Ok(passed) => passed,
        Err(step) => return (step, opened),
    };
    let post = match next_event(&mut res, &mut buf, deadline).await {
        Ok(e) if e.name == "stream" => serde_json::from_slice::<StreamEvent>(&e.data).ok().map(|s| s.post),
        _ => None,
    };
    let Some(post) = post else {
        let step = Step::fail(
            NAME,
            format!("{head}; {}; but no `stream` event after it", step.detail),
            "natter names where the stream's frames go in a `stream` event right after connection_established: this server or something in between did not pass it",
            "check that the base URL points at natter, and the proxies' buffering",
        );
        return (step, opened);
    };
    step.detail = format!(
        "{head}; {}; keep-alive comments every {}; frames go to POST {post}{auth}",
        step.detail,
        human(heartbeat)
    );
    // The server's path is from its root; the doctor's requests are under the base URL's prefix.
    let post = post.strip_prefix("/api").unwrap_or(&post).to_owned();
    opened.stream = Ok(OpenStream { _res: res, post });
    (step, opened)
}

fn not_natter(name: &'static str, head: &str, event: &Event) -> Step {
    let data: String = String::from_utf8_lossy(&event.data).chars().take(100).collect();
    Step::fail(
        name,
        format!("{head}; the first event is {:?}: {data:?}", event.name),
        "protocol mismatch: this event stream is not natter's chat",
        "check that the base URL points at natter",
    )
}

/// Step `sse_ping`: pings by POST on the open stream, each answered with its pong.
pub(super) async fn ping(api: &Api, args: &DoctorArgs, user: &Identity, stream: Result<OpenStream, String>) -> Step {
    const NAME: &str = "sse_ping";
    let stream = match stream {
        Ok(s) => s,
        Err(why) => return Step::skipped(NAME, why),
    };
    let Some(token) = user.token() else {
        return Step::skipped(NAME, "needs a user");
    };
    let mut samples = Vec::new();
    for n in 1..=PING_SAMPLES {
        let frame = serde_json::to_value(ClientFrame::Ping { id: json!(n) }).expect("frames serialize");
        let started = Instant::now();
        let res = match api
            .request(reqwest::Method::POST, &stream.post, Some(token), args.origin.as_deref(), Some(frame))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Step::fail(
                    NAME,
                    format!("POST ping {n}: {e} ({} answered)", samples.len()),
                    "the POST that carries the client's frames failed",
                    "check the proxies between this machine and natter: they must pass POST /api/sse/",
                )
            }
        };
        match (res.status, res.json::<ServerFrame>()) {
            (200, Some(ServerFrame::Pong { id, .. })) if id == json!(n) => samples.push(started.elapsed()),
            (200, Some(ServerFrame::Error { code, message, .. })) => {
                return Step::fail(
                    NAME,
                    format!("POST ping {n} answered error {}: {message}", code.as_str()),
                    "the server refused the ping",
                    "see the error's message",
                )
            }
            (status, _) => {
                let what = res.error_code().map_or_else(|| res.describe(), |c| format!("{c}: {}", res.error_message()));
                let cause = if res.error_code().is_some() {
                    "natter refused the POST (docs/protocol.md, \"The SSE binding\")"
                } else {
                    "natter answers a ping with its pong: this answer came from, or was caused by, something in between"
                };
                return Step::fail(
                    NAME,
                    format!("POST ping {n} answered {status} instead of a pong — {what}"),
                    cause,
                    "let the proxy pass POST /api/sse/ (with its Authorization header) to natter like the rest of /api/",
                );
            }
        }
    }
    let (min, median, max) = min_median_max(&samples).expect("samples");
    let detail =
        format!("{PING_SAMPLES} pings by POST: min {}, median {}, max {}", human(min), human(median), human(max));
    if median > Duration::from_secs(1) {
        return Step::warn(
            NAME,
            detail,
            "round trips are slow (median over 1 s)",
            "check the network path and the server's load",
        );
    }
    Step::ok(NAME, detail)
}
