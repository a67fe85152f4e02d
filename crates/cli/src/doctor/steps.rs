//! The steps up to the WebSocket upgrade: URL, DNS, TCP, TLS, the HTTP API, CORS, the token,
//! the bot and the raw handshake; and the ledger at the end. Each returns one [`Step`].

use std::error::Error as _;
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use natter_proto::api::{BotView, Health, Preflight, Ready, TokenPair, UserView};
use serde_json::{json, Value};
use uuid::Uuid;

use super::handshake::{self, PROXY_FIX};
use super::net::{self, BoxIo, Target};
use super::report::{human, relative, Status, Step};
use super::{jwt, Doctor, Registry};

/// An HTTP answer, read whole.
pub(super) struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    pub took: Duration,
}

impl Resp {
    fn json<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_str(&self.body).ok()
    }

    /// The `error.code` of a natter error body.
    fn error_code(&self) -> Option<String> {
        self.json::<Value>()?.pointer("/error/code")?.as_str().map(str::to_owned)
    }

    fn error_message(&self) -> String {
        self.json::<Value>().and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_owned)).unwrap_or_default()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// What the body is, in a few words (for answers that are not natter's).
    fn describe(&self) -> String {
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

fn kind_of(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut => "timeout",
        _ => "other",
    }
}

impl Doctor {
    pub(super) async fn run_step(&mut self, name: &str) -> Step {
        let name: &'static str = super::STEPS.iter().find(|s| **s == name).copied().unwrap_or("url");
        if let Some(why) = &self.blocked {
            if name != "url" {
                return Step::skipped(name, why.clone());
            }
        }
        match name {
            "url" => self.url(),
            "dns" => self.dns().await,
            "tcp" => self.tcp().await,
            "tls" => self.tls_step().await,
            "health" => self.health().await,
            "cors" => self.cors().await,
            "token" => self.token_step().await,
            "bot" => self.bot().await,
            "handshake" => self.handshake().await,
            "established" => self.established().await,
            "ping" => self.ping().await,
            "watch" => self.watch().await,
            "send" => self.send().await,
            _ => self.ledger().await,
        }
    }

    fn target(&self) -> &Target {
        self.target.as_ref().expect("the url step passed")
    }

    pub(super) async fn get(&self, path: &str, bearer: bool, origin: Option<&str>) -> Result<Resp, String> {
        self.request(reqwest::Method::GET, path, bearer, origin, None).await
    }

    pub(super) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: bool,
        origin: Option<&str>,
        body: Option<Value>,
    ) -> Result<Resp, String> {
        let http = self.http.as_ref().ok_or("no HTTP client")?;
        let mut req = http.request(method, self.target().api(path));
        if bearer {
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
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

    fn url(&mut self) -> Step {
        match Target::parse(&self.args.base_url) {
            Ok(t) => {
                let mut detail = format!("API at {}, chat socket at {}/api/ws/chat/{{bot_id}}", t.api(""), t.ws_base());
                for n in &t.notes {
                    detail.push_str(&format!("\n({n})"));
                }
                self.target = Some(t);
                Step::ok("url", detail)
            }
            Err(e) => {
                self.blocked = Some("the base URL could not be read".into());
                Step::fail(
                    "url",
                    e.clone(),
                    format!("the base URL could not be read: {e}"),
                    "pass the URL the browser opens, e.g. http://127.0.0.1:8000 or https://chat.example.com",
                )
            }
        }
    }

    async fn dns(&mut self) -> Step {
        let (host, port) = (self.target().host.clone(), self.target().port);
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.addrs = vec![std::net::SocketAddr::new(ip, port)];
            return Step::ok("dns", format!("{ip} is an address; no lookup needed"));
        }
        let started = Instant::now();
        let lookup = tokio::time::timeout(self.timeout, tokio::net::lookup_host((host.as_str(), port))).await;
        match lookup {
            Ok(Ok(addrs)) => {
                let mut addrs: Vec<_> = addrs.collect();
                addrs.dedup();
                let took = started.elapsed();
                let list = addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ");
                self.addrs = addrs;
                if self.addrs.is_empty() {
                    self.blocked = Some("DNS found no address".into());
                    return Step::fail(
                        "dns",
                        format!("{host} has no addresses"),
                        format!("{host} resolves to nothing"),
                        "check the DNS records (A/AAAA) of the name",
                    );
                }
                let detail = format!("{host} → {list} in {}", human(took));
                if took > Duration::from_secs(2) {
                    return Step::warn(
                        "dns",
                        detail,
                        "name resolution is slow",
                        "check the resolver configured on this machine (/etc/resolv.conf)",
                    );
                }
                Step::ok("dns", detail)
            }
            Ok(Err(e)) => {
                self.blocked = Some("DNS failed".into());
                Step::fail(
                    "dns",
                    format!("lookup of {host} failed after {}: {e}", human(started.elapsed())),
                    format!("the name {host} does not resolve from this machine"),
                    format!("check the spelling and the DNS records; `getent hosts {host}` shows what this machine resolves; for a server on this machine use 127.0.0.1"),
                )
            }
            Err(_) => {
                self.blocked = Some("DNS failed".into());
                Step::fail(
                    "dns",
                    format!("no answer for {host} within {} s", self.timeout.as_secs()),
                    "the DNS resolver does not answer",
                    "check the resolver configured on this machine (/etc/resolv.conf) and the network",
                )
            }
        }
    }

    async fn tcp(&mut self) -> Step {
        let started = Instant::now();
        match net::tcp_connect(&self.addrs, self.timeout).await {
            Ok((stream, addr)) => {
                let took = started.elapsed();
                self.first_tcp = Some(stream);
                Step::ok("tcp", format!("connected to {addr} in {}", human(took)))
            }
            Err((addr, e)) => {
                self.blocked = Some("cannot connect (tcp failed)".into());
                let detail = format!("connecting to {addr} failed after {}: {e}", human(started.elapsed()));
                match kind_of(&e) {
                    "refused" => Step::fail(
                        "tcp",
                        detail,
                        format!("connection refused: nothing listens on {addr} — the server is not running, or it listens on another port or address"),
                        "start the server (`natter serve --bind ADDR:PORT`), or correct the port in the URL; a server bound to 127.0.0.1 is reachable only from its own machine",
                    ),
                    "timeout" => Step::fail(
                        "tcp",
                        detail,
                        format!("no answer from {addr}: a firewall drops the packets, or the host is down"),
                        "check that the host is up and that firewalls / security groups allow this port",
                    ),
                    _ => Step::fail("tcp", detail, format!("cannot connect to {addr}: {e}"), "check the network between this machine and the server"),
                }
            }
        }
    }

    async fn tls_step(&mut self) -> Step {
        let tcp = self.first_tcp.take();
        let target = self.target().clone();
        // The REST client, built here because it needs the TLS settings.
        let mut builder = reqwest::Client::builder()
            .timeout(self.timeout)
            .no_proxy()
            .user_agent(concat!("natter-doctor/", env!("CARGO_PKG_VERSION")));
        if target.secure {
            if let Some(tls) = &self.tls {
                builder = builder.use_preconfigured_tls((*tls.config).clone());
            }
        }
        match builder.build() {
            Ok(c) => self.http = Some(c),
            Err(e) => {
                self.blocked = Some("no HTTP client".into());
                return Step::fail(
                    "tls",
                    format!("cannot build an HTTP client: {e}"),
                    "internal error of the doctor",
                    "report this bug",
                );
            }
        }
        if !target.secure {
            let mut why = "plain http:// — no TLS".to_owned();
            if !target.is_loopback() {
                why.push_str(" (tokens and messages cross the network unencrypted; serve https:// in production)");
            }
            return Step::skipped("tls", why);
        }
        let Some(tls) = self.tls.clone() else {
            self.blocked = Some("TLS could not be set up".into());
            return Step::fail(
                "tls",
                self.tls_error.clone().unwrap_or_default(),
                "the doctor could not set up TLS",
                "report this bug",
            );
        };
        let Some(tcp) = tcp else {
            return Step::skipped("tls", "no TCP connection");
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, tls.connect(&target.host, tcp)).await;
        let took = started.elapsed();
        let expiry = tls.last_leaf().and_then(|c| net::cert_not_after(&c));
        let days_left = expiry.map(|e| (e - Utc::now()).num_days());
        let expiry_text = match (expiry, days_left) {
            (Some(e), Some(d)) if d >= 0 => format!("expires {} (in {d} days)", e.format("%Y-%m-%d")),
            (Some(e), Some(d)) => format!("expired {} ({} days ago)", e.format("%Y-%m-%d"), -d),
            _ => "expiry unknown".to_owned(),
        };
        match result {
            Ok(Ok(conn)) => {
                let (_, session) = conn.get_ref();
                let version = session
                    .protocol_version()
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_default()
                    .replace('_', ".")
                    .replace("TLSv", "TLS ");
                let suite = session.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
                let detail = format!(
                    "{version} ({suite}) in {}; certificate valid for {}, chain trusted, {expiry_text}",
                    human(took),
                    target.host
                );
                match days_left {
                    Some(d) if d < 14 => Step::warn(
                        "tls",
                        detail,
                        format!("the certificate expires in {d} days"),
                        "renew it now (certbot renew / your ACME client); check that automatic renewal runs",
                    ),
                    _ => Step::ok("tls", detail),
                }
            }
            Ok(Err(e)) => {
                self.blocked = Some("TLS failed".into());
                let detail = format!(
                    "TLS handshake with {} failed after {}: {e}; certificate {expiry_text}",
                    target.host,
                    human(took)
                );
                let (cause, fix) = match net::rustls_error(&e) {
                    Some(tokio_rustls::rustls::Error::InvalidCertificate(c)) => {
                        use tokio_rustls::rustls::CertificateError as C;
                        match c {
                            C::Expired | C::ExpiredContext { .. } => (
                                format!("the server's certificate has expired ({expiry_text})"),
                                "renew the certificate (certbot renew / your ACME client) and reload the proxy".to_owned(),
                            ),
                            C::NotValidForName | C::NotValidForNameContext { .. } => (
                                format!("the certificate is not valid for the name {}", target.host),
                                format!("use a certificate that names {} (or use the name it was issued for in the URL)", target.host),
                            ),
                            C::UnknownIssuer => (
                                "the certificate chain does not lead to a trusted root: the certificate is self-signed, from a private CA, or the server does not send its intermediate certificates".to_owned(),
                                "serve the full chain (fullchain.pem with Let's Encrypt); for a private CA pass --ca-file ca.pem".to_owned(),
                            ),
                            other => (format!("the certificate was refused: {other:?}"), "check the certificate with `openssl s_client -connect host:443 -servername host`".to_owned()),
                        }
                    }
                    Some(tokio_rustls::rustls::Error::InvalidMessage(_)) => (
                        "the server did not answer with TLS: this port probably speaks plain HTTP".to_owned(),
                        "use http:// for this port, or the port where TLS is served (usually 443)".to_owned(),
                    ),
                    _ => (
                        format!("the TLS handshake failed: {e}"),
                        "check the server's or proxy's TLS configuration".to_owned(),
                    ),
                };
                Step::fail("tls", detail, cause, fix)
            }
            Err(_) => {
                self.blocked = Some("TLS failed".into());
                Step::fail(
                    "tls",
                    format!("no TLS answer within {} s", self.timeout.as_secs()),
                    "the server accepted the connection but did not answer the TLS handshake",
                    "check that this port serves TLS (and not plain HTTP or another protocol)",
                )
            }
        }
    }

    async fn health(&mut self) -> Step {
        let sent_at = Utc::now();
        let res = match self.get("/health", false, None).await {
            Ok(r) => r,
            Err(e) => {
                self.blocked = Some("the HTTP API does not answer (health failed)".into());
                return Step::fail(
                    "health",
                    format!("GET {}/api/health: {e}", self.target().prefix),
                    "the server accepted the connection but the HTTP request failed",
                    "check the server's log; if a proxy is in front, check its upstream settings",
                );
            }
        };
        let midpoint = sent_at + chrono::Duration::from_std(res.took / 2).unwrap_or_default();
        let date = res.header("date").and_then(|d| DateTime::parse_from_rfc2822(d).ok()).map(|d| d.with_timezone(&Utc));
        self.skew = date.map(|d| (d - midpoint).num_milliseconds() as f64 / 1000.0);
        let health: Option<Health> = res.json();
        let Some(health) = health.filter(|_| res.status == 200) else {
            self.blocked = Some("the HTTP API does not answer as natter (health failed)".into());
            let detail = format!(
                "GET {}/api/health answered {} in {} with {}",
                self.target().prefix,
                res.status,
                human(res.took),
                res.describe()
            );
            if matches!(res.status, 502..=504) {
                return Step::fail(
                    "health",
                    detail,
                    format!("a proxy in front answers, but cannot reach natter ({})", res.status),
                    "check that natter runs and that the proxy forwards to its address (nginx: proxy_pass; Caddy: reverse_proxy)",
                );
            }
            if !self.target().prefix.is_empty() && res.body.to_ascii_lowercase().contains("natter") {
                return Step::fail(
                    "health",
                    detail,
                    format!(
                        "natter answers at this address, but its API is not under {}/api: the path prefix is wrong",
                        self.target().prefix
                    ),
                    "drop the path from the base URL, or use the prefix the proxy in front of natter really uses",
                );
            }
            return Step::fail(
                "health",
                detail,
                "something answers on this address, but it is not natter's API: wrong port, wrong host, or wrong path prefix",
                "use the address natter listens on (`natter serve --bind`) or the URL of the proxy in front of it",
            );
        };
        self.server_version = Some(health.version.clone());
        let mut detail = format!("natter {} answered 200 in {}", health.version, human(res.took));
        let skew_warning = match self.skew {
            Some(s) => {
                detail.push_str(&format!("; server clock {s:+.1} s from this machine's"));
                s.abs() > 30.0
            }
            None => {
                detail.push_str("; no Date header");
                false
            }
        };
        let ready = match self.get("/ready", false, None).await {
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
        };
        match self
            .get("/ws/codes", false, None)
            .await
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| r.json::<Registry>())
        {
            Some(mut reg) if !reg.close_codes.is_empty() => {
                reg.from_server = true;
                detail.push_str(&format!("; code registry: {} close codes", reg.close_codes.len()));
                self.registry = reg;
            }
            _ => detail.push_str("; no code registry at /api/ws/codes, using this doctor's copy"),
        }
        match ready {
            Ok(r) => detail = format!("{detail}; {r}"),
            Err(e) => {
                return Step::fail(
                    "health",
                    format!("{detail}\n{e}"),
                    "natter is up but not ready: a dependency (the store) is unavailable",
                    "check the server's log and its database (disk space, permissions of the data dir)",
                )
            }
        }
        if skew_warning {
            return Step::warn(
                "health",
                detail,
                format!(
                    "this machine's clock and the server's differ by {:.0} s, so token times look wrong",
                    self.skew.unwrap_or(0.0)
                ),
                "synchronise both clocks with NTP (e.g. `timedatectl set-ntp true`)",
            );
        }
        Step::ok("health", detail)
    }

    async fn cors(&mut self) -> Step {
        let Some(origin) = self.args.origin.clone() else {
            return Step::skipped(
                "cors",
                "no --origin given (only browsers send an Origin; pass the web page's origin to check it)",
            );
        };
        let origin = origin.trim_end_matches('/').to_owned();
        let own = {
            let t = self.target();
            format!("{}://{}", if t.secure { "https" } else { "http" }, t.authority())
        };
        // The API: a CORS preflight, as a browser sends before an authorised fetch.
        let api = if origin.eq_ignore_ascii_case(&own) {
            Ok("same origin as the server: no CORS needed".to_owned())
        } else {
            let http = self.http.as_ref().expect("http client");
            let res = http
                .request(reqwest::Method::OPTIONS, self.target().api("/auth/me"))
                .header("Origin", &origin)
                .header("Access-Control-Request-Method", "GET")
                .header("Access-Control-Request-Headers", "authorization")
                .send()
                .await;
            match res {
                Ok(r) => {
                    let allow =
                        r.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()).map(str::to_owned);
                    match allow {
                        Some(a) if a == "*" || a.eq_ignore_ascii_case(&origin) => {
                            Ok(format!("API allows it (Access-Control-Allow-Origin: {a})"))
                        }
                        Some(a) => Err(format!("API answers Access-Control-Allow-Origin: {a}")),
                        None => Err(format!(
                            "API's CORS preflight answered {} without Access-Control-Allow-Origin",
                            r.status().as_u16()
                        )),
                    }
                }
                Err(e) => Err(format!("API CORS preflight failed: {}", http_error(e, self.timeout))),
            }
        };
        // The socket: the server's preflight runs the origin check first.
        let bot = self.args.bot.clone().unwrap_or_else(|| Uuid::nil().to_string());
        let socket = match self.get(&format!("/ws/preflight/{}", urlencode(&bot)), true, Some(&origin)).await {
            Ok(r) => match r.json::<Preflight>() {
                Some(p) if p.close_code == Some(1008) => {
                    Err(format!("socket refuses it: {}", p.reason.unwrap_or_default()))
                }
                Some(_) => Ok("socket accepts it".to_owned()),
                None => Err(format!("socket preflight answered {} with {}", r.status, r.describe())),
            },
            Err(e) => Err(format!("socket preflight failed: {e}")),
        };
        let detail = format!(
            "origin {origin}: {}; {}",
            api.as_ref().unwrap_or_else(|e| e),
            socket.as_ref().unwrap_or_else(|e| e)
        );
        if api.is_ok() && socket.is_ok() {
            return Step::ok("cors", detail);
        }
        let which = match (api.is_ok(), socket.is_ok()) {
            (false, false) => "the API or the socket",
            (false, true) => "the API",
            _ => "the socket",
        };
        Step::fail(
            "cors",
            detail,
            format!("the origin {origin} is not allowed for {which}: browsers on that page are refused (the socket closes with 1008)"),
            format!("start natter with --allowed-origin {origin} (or NATTER_ALLOWED_ORIGIN); behind a proxy, also pass the Host header through unchanged"),
        )
    }

    async fn token_step(&mut self) -> Step {
        if let (Some(user), Some(password)) = (self.args.username.clone(), self.args.password.clone()) {
            let body = json!({"username": user, "password": password});
            match self.request(reqwest::Method::POST, "/auth/login", false, None, Some(body)).await {
                Ok(r) if r.status == 200 => match r.json::<TokenPair>() {
                    Some(pair) => self.token = Some(pair.access_token),
                    None => return Step::fail("token", "login answered 200 without a token", "this is not natter's login endpoint", "check the base URL"),
                },
                Ok(r) if r.error_code().as_deref() == Some("invalid_credentials") => {
                    return Step::fail(
                        "token",
                        format!("POST /api/auth/login as {user}: {} invalid_credentials", r.status),
                        "the server refused the login: wrong username or password",
                        "check both (usernames are lower-case); create an account with POST /api/auth/register or the web app",
                    )
                }
                Ok(r) => {
                    return Step::fail(
                        "token",
                        format!("POST /api/auth/login as {user}: {} {}", r.status, r.error_code().unwrap_or_else(|| r.describe())),
                        format!("the login failed: {}", r.error_message()),
                        "check the username and password, and the server's log",
                    )
                }
                Err(e) => return Step::fail("token", format!("POST /api/auth/login: {e}"), "the login request failed", "check the server"),
            }
        }
        let Some(token) = self.token.clone().or_else(|| self.args.token.clone()) else {
            return Step::skipped(
                "token",
                "no --token or --username/--password given; the steps that need a user are skipped",
            );
        };
        self.token = Some(token.clone());
        let local = jwt::decode(&token);
        let now = Utc::now().timestamp() + self.skew.unwrap_or(0.0).round() as i64;
        let mut facts = Vec::new();
        if let Ok(info) = &local {
            if let Some(alg) = &info.alg {
                facts.push(format!("alg {alg}"));
            }
            if let Some(iat) = info.iat {
                facts.push(format!("issued {}", relative(iat - now)));
            }
            if let Some(exp) = info.exp {
                let at = DateTime::from_timestamp(exp, 0)
                    .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default();
                let verb = if exp < now { "expired" } else { "expires" };
                facts.push(format!("{verb} {} ({at})", relative(exp - now)));
            }
            if let Some(s) = self.skew {
                facts.push(format!("times by the server's clock ({s:+.1} s from this machine's)"));
            }
        }
        let facts = if facts.is_empty() { String::new() } else { format!("; token: {}", facts.join(", ")) };
        let res = match self.get("/auth/me", true, None).await {
            Ok(r) => r,
            Err(e) => {
                return Step::fail("token", format!("GET /api/auth/me: {e}"), "the request failed", "check the server")
            }
        };
        if res.status == 200 {
            let Some(me) = res.json::<UserView>() else {
                return Step::fail(
                    "token",
                    "GET /api/auth/me answered 200 with something else",
                    "this is not natter's API",
                    "check the base URL",
                );
            };
            self.token_ok = true;
            self.username = Some(me.username.clone());
            let detail = format!("accepted by GET /api/auth/me: user {} ({}){facts}", me.username, me.id);
            if let Ok(jwt::JwtInfo { exp: Some(exp), .. }) = local {
                if exp - now < 60 {
                    return Step::warn(
                        "token",
                        detail,
                        format!(
                            "the token expires {}: a socket opened now cannot reconnect with it",
                            relative(exp - now)
                        ),
                        "refresh it (POST /api/auth/refresh) before connecting",
                    );
                }
            }
            return Step::ok("token", detail);
        }
        let code = res.error_code().unwrap_or_default();
        let detail = format!("GET /api/auth/me answered {} {code}{facts}", res.status);
        match (code.as_str(), &local) {
            ("token_expired", _) => {
                let when = match &local {
                    Ok(jwt::JwtInfo { exp: Some(exp), iat, .. }) => {
                        let life = iat.map(|i| format!("; such tokens live {}", human(Duration::from_secs((exp - i).max(0) as u64)))).unwrap_or_default();
                        format!(" {}{life}", relative(exp - now))
                    }
                    _ => String::new(),
                };
                Step::fail(
                    "token",
                    detail,
                    format!("the access token expired{when}"),
                    "log in again (POST /api/auth/login) or refresh it (POST /api/auth/refresh); clients should refresh before `exp`",
                )
            }
            (_, Err(what)) => Step::fail(
                "token",
                detail,
                format!("the token is malformed: {what}"),
                "pass the whole `access_token` from POST /api/auth/login's answer (three base64url parts joined by dots)",
            ),
            ("invalid_token", Ok(_)) => Step::fail(
                "token",
                detail,
                "the server does not accept the token's signature: it was issued by another natter server, or this server's signing secret (<data-dir>/jwt-secret) changed since",
                format!("log in again against {}", self.target().http_base()),
            ),
            _ => Step::fail("token", detail, format!("the token was refused: {}", res.error_message()), "log in again"),
        }
    }

    async fn bot(&mut self) -> Step {
        if let Some(raw) = self.args.bot.as_deref().filter(|b| Uuid::parse_str(b.trim()).is_err()) {
            return Step::fail(
                "bot",
                format!("{raw:?} is not a bot id"),
                "bot ids are UUIDs; the socket would close with 4400 bad_request",
                "copy the id from GET /api/bots or from the web app's address bar",
            );
        }
        // The socket steps use a given bot id even when this step cannot check it.
        self.bot_id = self.args.bot.as_deref().and_then(|b| Uuid::parse_str(b.trim()).ok());
        if !self.token_ok {
            let why = match self.report.step("token").map(|s| s.status) {
                Some(Status::Skipped) => "needs a user (--token or --username/--password)",
                _ => "needs a valid token (the token step failed)",
            };
            return Step::skipped("bot", why);
        }
        let mut picked = String::new();
        let id = match &self.args.bot {
            Some(raw) => match Uuid::parse_str(raw.trim()) {
                Ok(id) => id,
                Err(_) => {
                    return Step::fail(
                        "bot",
                        format!("{raw:?} is not a bot id"),
                        "bot ids are UUIDs; the socket would close with 4400 bad_request",
                        "copy the id from GET /api/bots or from the web app's address bar",
                    )
                }
            },
            None => match self.get("/bots", true, None).await.ok().and_then(|r| r.json::<Vec<BotView>>()) {
                Some(bots) if !bots.is_empty() => {
                    picked = match bots.len() {
                        1 => "no --bot given; picked this user's only bot: ".to_owned(),
                        n => format!("no --bot given; picked the first of this user's {n} bots: "),
                    };
                    bots[0].id
                }
                _ => return Step::skipped("bot", "no --bot given, and this user has no bot to chat with"),
            },
        };
        self.bot_id = Some(id);
        let view = self
            .get(&format!("/bots/{id}"), true, None)
            .await
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| r.json::<BotView>());
        let about = match &view {
            Some(b) => {
                let engine = b.engine.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
                format!(
                    "{picked}{} ({id}): {engine} engine, {}, you are {}",
                    b.name,
                    b.visibility.as_str(),
                    b.my_role.as_str()
                )
            }
            None => format!("{picked}bot {id}"),
        };
        let verdict = match self.get(&format!("/ws/preflight/{id}"), true, None).await {
            Ok(r) => match r.json::<Preflight>() {
                Some(p) => p,
                None => {
                    return Step::fail(
                        "bot",
                        format!("{about}; GET /api/ws/preflight answered {} with {}", r.status, r.describe()),
                        "the server has no preflight endpoint (not natter, or an old one)",
                        "check the base URL",
                    )
                }
            },
            Err(e) => {
                return Step::fail(
                    "bot",
                    format!("{about}; preflight: {e}"),
                    "the preflight request failed",
                    "check the server",
                )
            }
        };
        if verdict.ok {
            self.bot_ok = true;
            return Step::ok("bot", format!("{about}; preflight: the socket would be accepted"));
        }
        let code = verdict.close_code.unwrap_or(0);
        let reason = verdict.reason.unwrap_or_default();
        let (cause, mut fix) = self.registry.explain_close(code, &reason);
        if code == 4403 {
            if let Some(b) = &view {
                fix = format!("{fix} The owner, {}, can share it: POST /api/bots/{id}/members {{\"username\": \"{}\", \"role\": \"chat\"}}", b.owner.username, self.username.clone().unwrap_or_default());
            } else {
                fix = format!("{fix} The owner can share it with POST /api/bots/{id}/members.");
            }
        }
        Step::fail(
            "bot",
            format!("{about}; preflight: the socket would close with {}: {reason}", self.registry.close_name(code)),
            cause,
            fix,
        )
    }

    /// Opens a fresh connection (TCP, then TLS for https) for the socket.
    async fn connect_io(&self) -> Result<BoxIo, String> {
        let (tcp, _) = net::tcp_connect(&self.addrs, self.timeout)
            .await
            .map_err(|(a, e)| format!("connecting to {a} failed: {e}"))?;
        if !self.target().secure {
            return Ok(BoxIo(Box::new(tcp)));
        }
        let tls = self.tls.as_ref().ok_or("no TLS")?;
        let conn = tokio::time::timeout(self.timeout, tls.connect(&self.target().host, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_owned())?
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        Ok(BoxIo(Box::new(conn)))
    }

    async fn handshake(&mut self) -> Step {
        let bot = self.bot_id.unwrap_or(Uuid::nil());
        let mut query = format!("attempt_id={}", self.attempt_id);
        // A single-use ticket keeps the long-lived token out of proxy logs, as browsers should;
        // when the token or the bot is already known to be refused, the token itself lets the
        // socket show the refusal.
        let mut auth = "";
        if let Some(t) = self.token.clone() {
            let ticket = match (self.token_ok && self.bot_ok, self.bot_id) {
                (true, Some(bot)) => self
                    .request(reqwest::Method::POST, "/ws/ticket", true, None, Some(json!({ "bot_id": bot })))
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
                    .and_then(|r| r.json::<natter_proto::api::TicketResponse>()),
                _ => None,
            };
            match ticket {
                Some(tk) => {
                    query.push_str(&format!("&ticket={}", urlencode(&tk.ticket)));
                    self.ticket = Some(tk.ticket);
                    auth = "; authenticated with a single-use ticket from POST /api/ws/ticket";
                }
                None => {
                    query.push_str(&format!("&token={}", urlencode(&t)));
                    auth = "; authenticated with ?token=";
                }
            }
        }
        let path = format!("{}/api/ws/chat/{bot}?{query}", self.target().prefix);
        let mut io = match self.connect_io().await {
            Ok(io) => io,
            Err(e) => {
                return Step::fail(
                    "handshake",
                    e,
                    "could not open a second connection to the server",
                    "run the doctor again; check the network",
                )
            }
        };
        let authority = self.target().authority();
        match handshake::exchange(&mut io, &authority, &path, self.args.origin.as_deref(), self.timeout).await {
            Ok(x) => {
                let mut step = handshake::judge(&x.head, &x.accept, &x.body, x.took);
                step.detail.push_str(auth);
                if step.status == Status::Ok {
                    self.upgraded = Some((io, x.leftover));
                }
                step
            }
            Err(e) => Step::fail(
                "handshake",
                e,
                "the upgrade request got no HTTP answer: something in between (a firewall, a proxy that blocks WebSockets) dropped it, or this port does not speak HTTP",
                PROXY_FIX,
            ),
        }
    }

    async fn ledger(&mut self) -> Step {
        // Close the socket first, so the ledger shows how this run's attempt ended.
        self.close_socket().await;
        if !self.token_ok {
            return Step::skipped("ledger", "needs a valid token");
        }
        let mut path = "/connections?limit=5".to_owned();
        if let Some(b) = self.bot_id {
            path.push_str(&format!("&bot_id={b}"));
        }
        let res = match self.get(&path, true, None).await {
            Ok(r) => r,
            Err(e) => {
                return Step::warn(
                    "ledger",
                    format!("GET /api/connections: {e}"),
                    "the ledger request failed",
                    "check the server",
                )
            }
        };
        if res.status == 404 {
            let version = self.server_version.clone().unwrap_or_else(|| "?".into());
            return Step::skipped("ledger", format!("server has no connection ledger (natter < the release with GET /api/connections; this one is {version})"));
        }
        if res.status != 200 {
            return Step::warn(
                "ledger",
                format!(
                    "GET /api/connections answered {} {}",
                    res.status,
                    res.error_code().unwrap_or_else(|| res.describe())
                ),
                "the server's connection ledger did not answer",
                "check the server's log",
            );
        }
        let rows = res.json::<Value>().map(|v| ledger_rows(&v)).unwrap_or_default();
        if rows.is_empty() {
            return Step::ok("ledger", "the server recorded no connection attempts of this user (for this bot)");
        }
        let ours = self.attempt_id.to_string();
        let mine = rows.iter().any(|r| r.get("attempt_id").and_then(|a| a.as_str()) == Some(ours.as_str()));
        let what = if rows.len() == 1 { "attempt".to_owned() } else { format!("{} attempts", rows.len()) };
        let mine = if mine { " (this run's is marked)" } else { " (this run's is not among them)" };
        let mut detail = format!("the server's record of this user's last {what}{mine}:");
        for r in &rows {
            detail.push('\n');
            detail.push_str(&ledger_line(r, &self.registry, &ours));
        }
        Step::ok("ledger", detail)
    }
}

/// The rows of a ledger answer: a bare array, or the first array field of an object.
pub(super) fn ledger_rows(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => ["connections", "attempts", "items", "rows"]
            .iter()
            .find_map(|k| o.get(*k).and_then(|x| x.as_array()).cloned())
            .or_else(|| o.values().find_map(|x| x.as_array()).cloned())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// One ledger row for people: `2026-01-02 03:04:05 established, closed 4408 heartbeat_timeout by server: …`.
pub(super) fn ledger_line(r: &Value, registry: &Registry, our_attempt: &str) -> String {
    let s = |k: &str| r.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
    let started = s("started_at").replace('T', " ");
    let started = started.split('.').next().unwrap_or("").trim_end_matches('Z').to_owned();
    let established = match r.get("established").and_then(|x| x.as_bool()) {
        Some(true) => "established",
        Some(false) => "not established",
        None => "",
    };
    let by = s("closed_by");
    let by = if by.is_empty() { String::new() } else { format!(" by {by}") };
    let end = match r.get("close_code").and_then(|c| c.as_u64()) {
        Some(code) => {
            let reason = s("close_reason");
            let reason = if reason.is_empty() { String::new() } else { format!(": {reason}") };
            format!(", closed {}{by}{reason}", registry.close_name(code as u16))
        }
        None if r.get("ended_at").map(|e| e.is_null()).unwrap_or(true) => ", still open".to_owned(),
        None => format!(", ended without a close frame{by}"),
    };
    let mine = s("attempt_id") == our_attempt;
    let mut line =
        format!("  {started} {established}{end}{}", if mine { " ← this run" } else { "" }).trim_end().to_owned();
    if mine {
        // What the server received, which shows what a proxy changed.
        let seen: Vec<String> = [
            ("Upgrade", "upgrade"),
            ("Connection", "connection"),
            ("X-Forwarded-For", "forwarded_for"),
            ("from", "remote_addr"),
        ]
        .iter()
        .filter_map(|(label, key)| r.get(*key).and_then(|v| v.as_str()).map(|v| format!("{label} {v}")))
        .collect();
        if !seen.is_empty() {
            line.push_str(&format!("\n    the server saw: {}", seen.join(", ")));
        }
    }
    line
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
    fn ledger_rows_render_close_codes_with_names() {
        let reg = Registry::builtin();
        let v = json!({"connections": [
            {"attempt_id": "a1", "started_at": "2026-01-02T03:04:05.123Z", "established": false, "ended_at": "2026-01-02T03:04:05Z",
             "close_code": 4401, "close_reason": "token expired: refresh it and reconnect", "closed_by": "server"},
            {"attempt_id": "a2", "started_at": "2026-01-02T03:05:00Z", "established": true, "ended_at": null, "close_code": null}
        ]});
        let rows = ledger_rows(&v);
        assert_eq!(rows.len(), 2);
        let line = ledger_line(&rows[0], &reg, "a1");
        assert_eq!(line, "  2026-01-02 03:04:05 not established, closed 4401 unauthorized by server: token expired: refresh it and reconnect ← this run");
        assert_eq!(ledger_line(&rows[1], &reg, "a1"), "  2026-01-02 03:05:00 established, still open");
        let cut = json!({"attempt_id": "a3", "started_at": "2026-01-02T03:06:00Z", "established": true, "ended_at": "2026-01-02T03:07:00Z",
                         "close_code": null, "closed_by": "network", "upgrade": "websocket", "connection": "upgrade", "remote_addr": "10.0.0.2:5000"});
        assert_eq!(
            ledger_line(&cut, &reg, "a3"),
            "  2026-01-02 03:06:00 established, ended without a close frame by network ← this run\n    the server saw: Upgrade websocket, Connection upgrade, from 10.0.0.2:5000"
        );
        assert_eq!(ledger_rows(&json!([{"a": 1}])).len(), 1);
        assert!(ledger_rows(&json!("x")).is_empty());
    }

    #[test]
    fn urlencode_keeps_tokens_readable_and_escapes_the_rest() {
        assert_eq!(urlencode("eyJ.abc-_~"), "eyJ.abc-_~");
        assert_eq!(urlencode("a b&c"), "a%20b%26c");
    }
}
