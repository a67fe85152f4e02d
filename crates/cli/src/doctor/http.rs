//! natter's HTTP API as the steps after tls reach it ([`Api`]), and the steps that check the
//! API itself: `health` (is this natter, is it ready, what is its code registry and its
//! clock — the [`Server`]) and `cors` (is the web page's origin allowed).

use std::error::Error as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use natter_proto::api::{Health, Preflight, Ready};
use serde_json::Value;
use uuid::Uuid;

use super::handshake;
use super::net::{Target, Tls};
use super::pipeline::{pass, stop, Gate};
use super::report::{human, Step};
use super::Registry;

/// The server as the steps after tls reach it.
pub(super) struct Api {
    pub target: Target,
    pub addrs: Vec<SocketAddr>,
    pub http: reqwest::Client,
    /// Set for https:// (the tls step stops the run when it cannot be).
    pub tls: Option<Tls>,
    pub timeout: Duration,
}

/// What the health step learned about the server.
pub(super) struct Server {
    pub version: String,
    /// Server clock minus local clock, in seconds (from the Date header).
    pub skew: Option<f64>,
    /// The server's code registry, or this doctor's copy when it serves none.
    pub registry: Registry,
}

/// An HTTP answer, read whole.
pub(super) struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    pub took: Duration,
}

impl Resp {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_str(&self.body).ok()
    }

    /// The `error.code` of a natter error body.
    pub fn error_code(&self) -> Option<String> {
        self.json::<Value>()?.pointer("/error/code")?.as_str().map(str::to_owned)
    }

    pub fn error_message(&self) -> String {
        self.json::<Value>().and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_owned)).unwrap_or_default()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// What the body is, in a few words (for answers that are not natter's).
    pub fn describe(&self) -> String {
        let head = handshake::Head {
            version: "HTTP/1.1".into(),
            status: self.status,
            reason: String::new(),
            headers: self
                .header("content-type")
                .map(|c| vec![("content-type".to_owned(), c.to_owned())])
                .unwrap_or_default(),
        };
        handshake::describe_body(&head, &self.body).unwrap_or_else(|| "an empty body".into())
    }
}

/// A reqwest error as a sentence, without the URL (which may carry a token).
fn http_error(e: reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {} s", timeout.as_secs());
    }
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

impl Api {
    /// `GET /api{path}`, with the token as a bearer when one is given.
    pub async fn get(&self, path: &str, bearer: Option<&str>, origin: Option<&str>) -> Result<Resp, String> {
        self.request(reqwest::Method::GET, path, bearer, origin, None).await
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
        origin: Option<&str>,
        body: Option<Value>,
    ) -> Result<Resp, String> {
        let mut req = self.http.request(method, self.target.api(path));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let started = Instant::now();
        let res = req.send().await.map_err(|e| http_error(e, self.timeout))?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.text().await.map_err(|e| http_error(e, self.timeout))?;
        Ok(Resp { status, headers, body, took: started.elapsed() })
    }
}

pub(super) async fn health(api: &Api) -> Gate<Server> {
    let prefix = &api.target.prefix;
    let sent_at = Utc::now();
    let res = match api.get("/health", None, None).await {
        Ok(r) => r,
        Err(e) => {
            let step = Step::fail(
                "health",
                format!("GET {prefix}/api/health: {e}"),
                "the server accepted the connection but the HTTP request failed",
                "check the server's log; if a proxy is in front, check its upstream settings",
            );
            return stop(step, "the HTTP API does not answer (health failed)");
        }
    };
    let midpoint = sent_at + chrono::Duration::from_std(res.took / 2).unwrap_or_default();
    let date = res.header("date").and_then(|d| DateTime::parse_from_rfc2822(d).ok()).map(|d| d.with_timezone(&Utc));
    let skew = date.map(|d| (d - midpoint).num_milliseconds() as f64 / 1000.0);
    let Some(health) = res.json::<Health>().filter(|_| res.status == 200) else {
        return stop(not_natter(&res, prefix), "the HTTP API does not answer as natter (health failed)");
    };
    let mut detail = format!("natter {} answered 200 in {}", health.version, human(res.took));
    match skew {
        Some(s) => detail.push_str(&format!("; server clock {s:+.1} s from this machine's")),
        None => detail.push_str("; no Date header"),
    }
    let ready = ready(api).await;
    let registry = match served_registry(api).await {
        Some(reg) => {
            detail.push_str(&format!("; code registry: {} close codes", reg.close_codes.len()));
            reg
        }
        None => {
            detail.push_str("; no code registry at /api/ws/codes, using this doctor's copy");
            Registry::builtin()
        }
    };
    let step = match ready {
        Err(e) => Step::fail(
            "health",
            format!("{detail}\n{e}"),
            "natter is up but not ready: a dependency (the store) is unavailable",
            "check the server's log and its database (disk space, permissions of the data dir)",
        ),
        Ok(r) if skew.is_some_and(|s| s.abs() > 30.0) => Step::warn(
            "health",
            format!("{detail}; {r}"),
            format!(
                "this machine's clock and the server's differ by {:.0} s, so token times look wrong",
                skew.unwrap_or(0.0)
            ),
            "synchronise both clocks with NTP (e.g. `timedatectl set-ntp true`)",
        ),
        Ok(r) => Step::ok("health", format!("{detail}; {r}")),
    };
    pass(step, Server { version: health.version, skew, registry })
}

/// The health step's verdict on an answer that is not natter's health.
fn not_natter(res: &Resp, prefix: &str) -> Step {
    let detail =
        format!("GET {prefix}/api/health answered {} in {} with {}", res.status, human(res.took), res.describe());
    if matches!(res.status, 502..=504) {
        return Step::fail(
            "health",
            detail,
            format!("a proxy in front answers, but cannot reach natter ({})", res.status),
            "check that natter runs and that the proxy forwards to its address (nginx: proxy_pass; Caddy: reverse_proxy)",
        );
    }
    if !prefix.is_empty() && res.body.to_ascii_lowercase().contains("natter") {
        return Step::fail(
            "health",
            detail,
            format!("natter answers at this address, but its API is not under {prefix}/api: the path prefix is wrong"),
            "drop the path from the base URL, or use the prefix the proxy in front of natter really uses",
        );
    }
    Step::fail(
        "health",
        detail,
        "something answers on this address, but it is not natter's API: wrong port, wrong host, or wrong path prefix",
        "use the address natter listens on (`natter serve --bind`) or the URL of the proxy in front of it",
    )
}

/// `ready in 3 ms`, or what `GET /api/ready` says is unavailable.
async fn ready(api: &Api) -> Result<String, String> {
    match api.get("/ready", None, None).await {
        Ok(r) if r.status == 200 => Ok(format!("ready in {}", human(r.took))),
        Ok(r) => {
            let what = r
                .json::<Ready>()
                .map(|x| x.failed.join("; "))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| r.describe());
            Err(format!("GET /api/ready answered {}: {what}", r.status))
        }
        Err(e) => Err(format!("GET /api/ready: {e}")),
    }
}

/// The code registry the server serves at `/api/ws/codes`, when it serves one.
async fn served_registry(api: &Api) -> Option<Registry> {
    let res = api.get("/ws/codes", None, None).await.ok().filter(|r| r.status == 200)?;
    let mut reg = res.json::<Registry>().filter(|reg| !reg.close_codes.is_empty())?;
    reg.from_server = true;
    Some(reg)
}

pub(super) async fn cors(api: &Api, origin: Option<&str>, bot: Option<&str>) -> Step {
    let Some(origin) = origin else {
        return Step::skipped(
            "cors",
            "no --origin given (only browsers send an Origin; pass the web page's origin to check it)",
        );
    };
    let origin = origin.trim_end_matches('/');
    let t = &api.target;
    let own = format!("{}://{}", if t.secure { "https" } else { "http" }, t.authority());
    let api_verdict = if origin.eq_ignore_ascii_case(&own) {
        Ok("same origin as the server: no CORS needed".to_owned())
    } else {
        api_cors(api, origin).await
    };
    let socket = socket_cors(api, origin, bot).await;
    let detail = format!(
        "origin {origin}: {}; {}",
        api_verdict.as_ref().unwrap_or_else(|e| e),
        socket.as_ref().unwrap_or_else(|e| e)
    );
    let which = match (api_verdict.is_ok(), socket.is_ok()) {
        (true, true) => return Step::ok("cors", detail),
        (false, false) => "the API or the socket",
        (false, true) => "the API",
        (true, false) => "the socket",
    };
    Step::fail(
        "cors",
        detail,
        format!("the origin {origin} is not allowed for {which}: browsers on that page are refused (the socket closes with 1008)"),
        format!("start natter with --allowed-origin {origin} (or NATTER_ALLOWED_ORIGIN); behind a proxy, also pass the Host header through unchanged"),
    )
}

/// The API's answer to a CORS preflight, as a browser sends before an authorised fetch.
async fn api_cors(api: &Api, origin: &str) -> Result<String, String> {
    let res = api
        .http
        .request(reqwest::Method::OPTIONS, api.target.api("/auth/me"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "authorization")
        .send()
        .await
        .map_err(|e| format!("API CORS preflight failed: {}", http_error(e, api.timeout)))?;
    let allow = res.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()).map(str::to_owned);
    match allow {
        Some(a) if a == "*" || a.eq_ignore_ascii_case(origin) => {
            Ok(format!("API allows it (Access-Control-Allow-Origin: {a})"))
        }
        Some(a) => Err(format!("API answers Access-Control-Allow-Origin: {a}")),
        None => {
            Err(format!("API's CORS preflight answered {} without Access-Control-Allow-Origin", res.status().as_u16()))
        }
    }
}

/// The socket's verdict on the origin: the server's preflight runs the origin check first.
async fn socket_cors(api: &Api, origin: &str, bot: Option<&str>) -> Result<String, String> {
    let bot = bot.map(str::to_owned).unwrap_or_else(|| Uuid::nil().to_string());
    match api.get(&format!("/ws/preflight/{}", urlencode(&bot)), None, Some(origin)).await {
        Ok(r) => match r.json::<Preflight>() {
            Some(p) if p.close_code == Some(1008) => {
                Err(format!("socket refuses it: {}", p.reason.unwrap_or_default()))
            }
            Some(_) => Ok("socket accepts it".to_owned()),
            None => Err(format!("socket preflight answered {} with {}", r.status, r.describe())),
        },
        Err(e) => Err(format!("socket preflight failed: {e}")),
    }
}

/// Percent-encodes a query value (tokens are base64url with dots, but be safe).
pub(super) fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urlencode_keeps_tokens_readable_and_escapes_the_rest() {
        assert_eq!(urlencode("eyJ.abc-_~"), "eyJ.abc-_~");
        assert_eq!(urlencode("a b&c"), "a%20b%26c");
    }
}
