//! Step `handshake`: the WebSocket upgrade done by hand over TCP or TLS, so the doctor sees
//! the raw answer a proxy gives (a browser only shows 1006). natter accepts every upgrade
//! and refuses afterwards with a close code, so anything but a proper 101 came from, or was
//! caused by, something in between.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use serde_json::json;
use uuid::Uuid;

use super::account::{BotChoice, Identity};
use super::http::{urlencode, Api};
use super::net::{self, BoxIo};
use super::report::{human, Status, Step};

/// What fixes a proxy that does not pass WebSockets.
pub const PROXY_FIX: &str = "\
nginx, in the location that proxies natter:
  proxy_http_version 1.1;
  proxy_set_header Upgrade $http_upgrade;
  proxy_set_header Connection \"upgrade\";
  proxy_read_timeout 3600s;
Caddy 2 passes WebSockets by itself with a plain `reverse_proxy 127.0.0.1:8000`;
  remove any `header_up` lines that drop or rewrite Upgrade or Connection.
Other proxies and load balancers: enable WebSocket (HTTP/1.1 Upgrade) support for /api/ws/.";

/// The status line and headers of an HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of a header, joined with ", " (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> =
            self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    pub fn status_line(&self) -> String {
        format!("{} {} {}", self.version, self.status, self.reason).trim_end().to_owned()
    }
}

/// Where the response head ends (the index after `\r\n\r\n`).
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

pub fn parse_head(bytes: &[u8]) -> Result<Head, String> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("").to_owned();
    if !version.starts_with("HTTP/") {
        let shown: String = status_line.chars().take(40).collect();
        return Err(format!("the answer is not HTTP (it starts with {shown:?})"));
    }
    let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or("").to_owned();
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':').map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned())))
        .collect();
    Ok(Head { version, status, reason, headers })
}

/// The upgrade request, as a browser would send it.
pub fn request(authority: &str, path_and_query: &str, key: &str, origin: Option<&str>) -> String {
    let mut r = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: natter-doctor/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(o) = origin {
        r.push_str(&format!("Origin: {o}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// What a body looks like, in a few words: `an HTML page titled "502 Bad Gateway"`.
pub fn describe_body(head: &Head, body: &str) -> Option<String> {
    let trimmed = body.trim_start();
    if trimmed.is_empty() {
        return None;
    }
    let lower = trimmed.to_ascii_lowercase();
    let ctype = head.header("content-type").unwrap_or_default().to_ascii_lowercase();
    if ctype.contains("html")
        || lower.starts_with("<!doctype html")
        || lower.starts_with("<html")
        || lower.contains("<body")
    {
        let title = lower.find("<title>").and_then(|s| {
            let start = s + "<title>".len();
            lower[start..].find("</title>").map(|e| trimmed[start..start + e].trim().to_owned())
        });
        return Some(match title {
            Some(t) if !t.is_empty() => format!("an HTML page titled {t:?}"),
            _ => "an HTML page".to_owned(),
        });
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(trimmed) {
        if let Some(code) = v.pointer("/error/code").and_then(|c| c.as_str()) {
            let msg = v.pointer("/error/message").and_then(|m| m.as_str()).unwrap_or("");
            return Some(format!("a natter error {code}: {msg}"));
        }
        return Some("a JSON body".to_owned());
    }
    let line: String = trimmed.lines().next().unwrap_or("").chars().take(100).collect();
    Some(format!("the text {line:?}"))
}

/// Judges the answer to the upgrade.
pub fn judge(head: &Head, expected_accept: &str, body: &str, took: Duration) -> Step {
    const NAME: &str = "handshake";
    let server = head.header("server").map(|s| format!(", Server: {s}")).unwrap_or_default();
    if head.status == 101 {
        let upgrade = head.header("upgrade");
        let connection = head.header("connection");
        let accept = head.header("sec-websocket-accept");
        let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "(missing)".into());
        let detail = format!(
            "{} in {}; Upgrade: {}, Connection: {}{server}",
            head.status_line(),
            human(took),
            shown(&upgrade),
            shown(&connection)
        );
        if !head.has_token("upgrade", "websocket") || !head.has_token("connection", "upgrade") {
            return Step::fail(
                NAME,
                detail,
                "the 101 answer lacks `Upgrade: websocket` or `Connection: upgrade`: a proxy in between does not pass WebSockets properly (it drops the hop-by-hop headers)",
                PROXY_FIX,
            );
        }
        if accept.as_deref() != Some(expected_accept) {
            return Step::fail(
                NAME,
                format!("{detail}; Sec-WebSocket-Accept: {}", shown(&accept)),
                "Sec-WebSocket-Accept does not match the key sent: something in between rewrote the handshake, and clients will refuse the socket",
                PROXY_FIX,
            );
        }
        return Step::ok(NAME, format!("{detail}, Sec-WebSocket-Accept valid"));
    }
    let what = describe_body(head, body).map(|b| format!(" — {b}")).unwrap_or_default();
    let detail = format!("{} instead of 101 Switching Protocols, in {}{server}{what}", head.status_line(), human(took));
    if (300..400).contains(&head.status) {
        let to = head.header("location").unwrap_or_else(|| "(no Location)".into());
        return Step::fail(
            NAME,
            detail,
            format!("the upgrade was redirected to {to}; WebSocket clients do not follow redirects"),
            "use the URL it redirects to (often https:// instead of http://) as the base URL",
        );
    }
    let natter_error = body.contains("\"error\"") && body.contains("\"code\"");
    if head.status == 404 && natter_error {
        return Step::fail(
            NAME,
            detail,
            "natter answered, but has no chat socket at this path: the base URL's path is not where natter is mounted",
            "give the base URL the browser uses (natter adds /api/ws/chat/…)",
        );
    }
    let lower = body.to_ascii_lowercase();
    let cause = if matches!(head.status, 400 | 426) && (lower.contains("upgrade") || lower.contains("connection")) {
        format!(
            "a proxy in between does not pass WebSockets: the request reached the server without its Upgrade/Connection headers \
             (answered {}), because the proxy drops these hop-by-hop headers",
            head.status
        )
    } else if matches!(head.status, 502..=504) {
        format!(
            "a proxy in between does not pass WebSockets: it answered the upgrade itself with {}",
            head.status_line()
        )
    } else if head.status == 200 {
        "a proxy in between does not pass WebSockets: it answered the upgrade like a plain page request (200)"
            .to_owned()
    } else {
        format!(
            "a proxy in between does not pass WebSockets: natter answers every upgrade with 101 (and refuses with a close code afterwards), so {} came from, or was caused by, something in between",
            head.status
        )
    };
    Step::fail(NAME, detail, cause, PROXY_FIX)
}

/// The raw exchange: the answer's head, the bytes read after it (the first WebSocket frames
/// when it is a 101), and for anything else the start of the body.
pub struct Exchange {
    pub head: Head,
    pub leftover: Vec<u8>,
    pub body: String,
    pub took: Duration,
    pub accept: String,
}

/// Sends the upgrade and reads the answer. The error is a sentence for the report.
pub async fn exchange(
    io: &mut BoxIo,
    authority: &str,
    path_and_query: &str,
    origin: Option<&str>,
    timeout: Duration,
) -> Result<Exchange, String> {
    let key = generate_key();
    let accept = derive_accept_key(key.as_bytes());
    let started = Instant::now();
    let req = request(authority, path_and_query, &key, origin);
    tokio::time::timeout(timeout, io.write_all(req.as_bytes()))
        .await
        .map_err(|_| "could not send the upgrade request within the timeout".to_owned())?
        .map_err(|e| format!("sending the upgrade request failed: {e}"))?;
    let _ = io.flush().await;
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        if buf.len() > 64 * 1024 {
            return Err("the answer's headers are larger than 64 KiB".into());
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Err(_) => return Err(format!("no answer to the upgrade within {} s", timeout.as_secs())),
            Ok(Ok(0)) if buf.is_empty() => {
                return Err("the connection was closed without any answer to the upgrade".into())
            }
            Ok(Ok(0)) => return Err("the connection was closed in the middle of the answer's headers".into()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(format!("reading the answer failed: {e}")),
        }
    };
    let took = started.elapsed();
    let head = parse_head(&buf[..end])?;
    let mut leftover = buf[end..].to_vec();
    let mut body = String::new();
    if head.status != 101 {
        // Read some of the body to tell an HTML error page from natter's JSON.
        let want = head.header("content-length").and_then(|l| l.parse::<usize>().ok()).unwrap_or(8192).min(8192);
        let body_deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        while leftover.len() < want {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(body_deadline, io.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => leftover.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        body = String::from_utf8_lossy(&leftover).into_owned();
        leftover.clear();
    }
    Ok(Exchange { head, leftover, body, took, accept })
}

/// The connection after a good 101, and the bytes read past the answer's head.
pub(super) struct Upgraded {
    pub io: BoxIo,
    pub leftover: Vec<u8>,
}

/// What the handshake step hands on.
pub(super) struct Upgrade {
    /// Set when the answer was a proper 101.
    pub socket: Option<Upgraded>,
    /// The socket's single-use ticket, when one was used. Never printed.
    pub ticket: Option<String>,
}

/// Step `handshake`: upgrades a second connection to the chat socket of the bot.
pub(super) async fn step(
    api: &Api,
    user: &Identity,
    bot: &BotChoice,
    origin: Option<&str>,
    attempt_id: Uuid,
) -> (Step, Upgrade) {
    let (auth_query, ticket, auth) = authenticate(api, user, bot).await;
    let mut upgrade = Upgrade { socket: None, ticket };
    let path = format!(
        "{}/api/ws/chat/{}?attempt_id={attempt_id}{auth_query}",
        api.target.prefix,
        bot.id.unwrap_or(Uuid::nil())
    );
    let mut io = match connect(api).await {
        Ok(io) => io,
        Err(e) => {
            let step = Step::fail(
                "handshake",
                e,
                "could not open a second connection to the server",
                "run the doctor again; check the network",
            );
            return (step, upgrade);
        }
    };
    let step = match exchange(&mut io, &api.target.authority(), &path, origin, api.timeout).await {
        Ok(x) => {
            let mut step = judge(&x.head, &x.accept, &x.body, x.took);
            step.detail.push_str(auth);
            if step.status == Status::Ok {
                upgrade.socket = Some(Upgraded { io, leftover: x.leftover });
            }
            step
        }
        Err(e) => Step::fail(
            "handshake",
            e,
            "the upgrade request got no HTTP answer: something in between (a firewall, a proxy that blocks WebSockets) dropped it, or this port does not speak HTTP",
            PROXY_FIX,
        ),
    };
    (step, upgrade)
}

/// How the upgrade authenticates: the query parameter, the ticket (if one was used) and the
/// words for the report. A single-use ticket keeps the long-lived token out of proxy logs, as
/// browsers should; when the token or the bot is already known to be refused, the token
/// itself lets the socket show the refusal.
pub(super) async fn authenticate(
    api: &Api,
    user: &Identity,
    bot: &BotChoice,
) -> (String, Option<String>, &'static str) {
    let Some(token) = user.token() else {
        return (String::new(), None, "");
    };
    let ticket = match (user.verified() && bot.accepted, bot.id) {
        (true, Some(bot)) => api
            .request(reqwest::Method::POST, "/ws/ticket", Some(token), None, Some(json!({ "bot_id": bot })))
            .await
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| r.json::<natter_proto::api::TicketResponse>()),
        _ => None,
    };
    match ticket {
        Some(tk) => (
            format!("&ticket={}", urlencode(&tk.ticket)),
            Some(tk.ticket),
            "; authenticated with a single-use ticket from POST /api/ws/ticket",
        ),
        None => (format!("&token={}", urlencode(token)), None, "; authenticated with ?token="),
    }
}

/// Opens a fresh connection (TCP, then TLS for https) for the socket.
async fn connect(api: &Api) -> Result<BoxIo, String> {
    let (tcp, _) =
        net::tcp_connect(&api.addrs, api.timeout).await.map_err(|(a, e)| format!("connecting to {a} failed: {e}"))?;
    if !api.target.secure {
        return Ok(BoxIo(Box::new(tcp)));
    }
    let tls = api.tls.as_ref().ok_or("no TLS")?;
    let conn = tokio::time::timeout(api.timeout, tls.connect(&api.target.host, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    Ok(BoxIo(Box::new(conn)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::report::Status;

    fn head(raw: &str) -> Head {
        parse_head(raw.as_bytes()).unwrap()
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    #[test]
    fn accept_key_is_the_rfc_example() {
        assert_eq!(derive_accept_key(KEY.as_bytes()), ACCEPT);
    }

    #[test]
    fn a_proper_101_is_ok() {
        let h = head(&format!("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {ACCEPT}\r\n\r\n"));
        let s = judge(&h, ACCEPT, "", Duration::from_millis(3));
        assert_eq!(s.status, Status::Ok, "{s:?}");
        assert!(s.detail.contains("101 Switching Protocols"));
    }

    #[test]
    fn a_101_without_upgrade_headers_or_with_a_wrong_accept_fails() {
        let h = head(&format!("HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: {ACCEPT}\r\n\r\n"));
        let s = judge(&h, ACCEPT, "", Duration::ZERO);
        assert_eq!(s.status, Status::Fail);
        assert!(s.cause.unwrap().contains("proxy"));
        assert!(s.fix.unwrap().contains("proxy_set_header Upgrade $http_upgrade;"));
        let h = head("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Accept: nope\r\n\r\n");
        assert!(judge(&h, ACCEPT, "", Duration::ZERO).cause.unwrap().contains("rewrote"));
    }

    #[test]
    fn an_html_502_names_the_proxy_and_the_fix() {
        let h = head("HTTP/1.1 502 Bad Gateway\r\nServer: nginx/1.24\r\nContent-Type: text/html\r\n\r\n");
        let body = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>";
        let s = judge(&h, ACCEPT, body, Duration::from_millis(5));
        assert_eq!(s.status, Status::Fail);
        assert!(s.detail.contains("502 Bad Gateway instead of 101"), "{}", s.detail);
        assert!(s.detail.contains("an HTML page titled \"502 Bad Gateway\""), "{}", s.detail);
        assert!(s.detail.contains("Server: nginx/1.24"), "{}", s.detail);
        assert!(s.cause.unwrap().contains("a proxy in between does not pass WebSockets"));
        let fix = s.fix.unwrap();
        for line in [
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"upgrade\";",
            "proxy_read_timeout 3600s;",
            "Caddy",
        ] {
            assert!(fix.contains(line), "{line}");
        }
    }

    #[test]
    fn stripped_upgrade_headers_and_other_statuses_name_a_proxy() {
        let h = head("HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n\r\n");
        let s = judge(&h, ACCEPT, "Connection header did not include 'upgrade'", Duration::ZERO);
        assert!(s.cause.unwrap().contains("without its Upgrade/Connection headers"));
        for status in ["200 OK", "426 Upgrade Required", "403 Forbidden"] {
            let s = judge(&head(&format!("HTTP/1.1 {status}\r\n\r\n")), ACCEPT, "", Duration::ZERO);
            assert_eq!(s.status, Status::Fail);
            assert!(s.cause.unwrap().contains("a proxy in between does not pass WebSockets"), "{status}");
        }
        let s =
            judge(&head("HTTP/1.1 301 Moved Permanently\r\nLocation: https://x/\r\n\r\n"), ACCEPT, "", Duration::ZERO);
        assert!(s.cause.unwrap().contains("redirected to https://x/"));
        let s = judge(
            &head("HTTP/1.1 404 Not Found\r\n\r\n"),
            ACCEPT,
            r#"{"error":{"code":"not_found","message":"no such API endpoint"}}"#,
            Duration::ZERO,
        );
        assert!(s.cause.unwrap().contains("no chat socket at this path"));
    }

    #[test]
    fn parses_heads_and_requests() {
        let h = head("HTTP/1.1 426 Upgrade Required\r\nA: 1\r\na: 2\r\n\r\n");
        assert_eq!((h.status, h.reason.as_str()), (426, "Upgrade Required"));
        assert_eq!(h.header("A").as_deref(), Some("1, 2"));
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").unwrap_err().contains("not HTTP"));
        assert_eq!(head_end(b"HTTP/1.1 101 x\r\n\r\nrest"), Some(18));
        let r = request("h:1", "/api/ws/chat/b?x=1", KEY, Some("http://o"));
        assert!(r.starts_with("GET /api/ws/chat/b?x=1 HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(r.contains("\r\nOrigin: http://o\r\n") && r.ends_with("\r\n\r\n"));
    }
}
