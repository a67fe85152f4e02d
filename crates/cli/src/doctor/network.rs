//! The network steps: `url` reads the [`Target`], `dns` finds its addresses, `tcp` connects
//! to one, `tls` shakes hands over that connection and builds the HTTP client the later steps
//! use. Each hands the next one what it found, or stops the run.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, CertificateError};

use super::net::{self, Target, Tls};
use super::pipeline::{pass, stop, Gate};
use super::report::{human, Step};

/// What the tls step hands on: the REST client, and for https:// the TLS settings for the
/// socket's own connection.
pub(super) struct Link {
    pub http: reqwest::Client,
    pub tls: Option<Tls>,
}

pub(super) fn url(base_url: &str) -> Gate<Target> {
    match Target::parse(base_url) {
        Ok(t) => {
            let mut detail = format!("API at {}, chat socket at {}/api/ws/chat/{{bot_id}}", t.api(""), t.ws_base());
            for n in &t.notes {
                detail.push_str(&format!("\n({n})"));
            }
            pass(Step::ok("url", detail), t)
        }
        Err(e) => stop(
            Step::fail(
                "url",
                e.clone(),
                format!("the base URL could not be read: {e}"),
                "pass the URL the browser opens, e.g. http://127.0.0.1:8000 or https://chat.example.com",
            ),
            "the base URL could not be read",
        ),
    }
}

pub(super) async fn dns(target: &Target, timeout: Duration) -> Gate<Vec<SocketAddr>> {
    let (host, port) = (target.host.as_str(), target.port);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return pass(Step::ok("dns", format!("{ip} is an address; no lookup needed")), vec![SocketAddr::new(ip, port)]);
    }
    let started = Instant::now();
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => resolved(host, addrs.collect(), started),
        Ok(Err(e)) => stop(
            Step::fail(
                "dns",
                format!("lookup of {host} failed after {}: {e}", human(started.elapsed())),
                format!("the name {host} does not resolve from this machine"),
                format!("check the spelling and the DNS records; `getent hosts {host}` shows what this machine resolves; for a server on this machine use 127.0.0.1"),
            ),
            "DNS failed",
        ),
        Err(_) => stop(
            Step::fail(
                "dns",
                format!("no answer for {host} within {} s", timeout.as_secs()),
                "the DNS resolver does not answer",
                "check the resolver configured on this machine (/etc/resolv.conf) and the network",
            ),
            "DNS failed",
        ),
    }
}

/// The dns step's verdict on what a lookup that answered found.
fn resolved(host: &str, mut addrs: Vec<SocketAddr>, started: Instant) -> Gate<Vec<SocketAddr>> {
    addrs.dedup();
    let took = started.elapsed();
    if addrs.is_empty() {
        return stop(
            Step::fail(
                "dns",
                format!("{host} has no addresses"),
                format!("{host} resolves to nothing"),
                "check the DNS records (A/AAAA) of the name",
            ),
            "DNS found no address",
        );
    }
    let list = addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ");
    let detail = format!("{host} → {list} in {}", human(took));
    if took > Duration::from_secs(2) {
        let step = Step::warn(
            "dns",
            detail,
            "name resolution is slow",
            "check the resolver configured on this machine (/etc/resolv.conf)",
        );
        return pass(step, addrs);
    }
    pass(Step::ok("dns", detail), addrs)
}

pub(super) async fn tcp(addrs: &[SocketAddr], timeout: Duration) -> Gate<TcpStream> {
    let started = Instant::now();
    let (addr, e) = match net::tcp_connect(addrs, timeout).await {
        Ok((stream, addr)) => {
            return pass(Step::ok("tcp", format!("connected to {addr} in {}", human(started.elapsed()))), stream)
        }
        Err(failed) => failed,
    };
    let detail = format!("connecting to {addr} failed after {}: {e}", human(started.elapsed()));
    let step = match e.kind() {
        io::ErrorKind::ConnectionRefused => Step::fail(
            "tcp",
            detail,
            format!("connection refused: nothing listens on {addr} — the server is not running, or it listens on another port or address"),
            "start the server (`natter serve --bind ADDR:PORT`), or correct the port in the URL; a server bound to 127.0.0.1 is reachable only from its own machine",
        ),
        io::ErrorKind::TimedOut => Step::fail(
            "tcp",
            detail,
            format!("no answer from {addr}: a firewall drops the packets, or the host is down"),
            "check that the host is up and that firewalls / security groups allow this port",
        ),
        _ => Step::fail("tcp", detail, format!("cannot connect to {addr}: {e}"), "check the network between this machine and the server"),
    };
    stop(step, "cannot connect (tcp failed)")
}

pub(super) async fn tls(target: &Target, tcp: TcpStream, setup: &Result<Tls, String>, timeout: Duration) -> Gate<Link> {
    let http = match http_client(target, setup.as_ref().ok(), timeout) {
        Ok(c) => c,
        Err(e) => {
            let step = Step::fail(
                "tls",
                format!("cannot build an HTTP client: {e}"),
                "internal error of the doctor",
                "report this bug",
            );
            return stop(step, "no HTTP client");
        }
    };
    if !target.secure {
        let mut why = "plain http:// — no TLS".to_owned();
        if !target.is_loopback() {
            why.push_str(" (tokens and messages cross the network unencrypted; serve https:// in production)");
        }
        return pass(Step::skipped("tls", why), Link { http, tls: None });
    }
    let tls = match setup {
        Ok(tls) => tls.clone(),
        Err(e) => {
            let step = Step::fail("tls", e.clone(), "the doctor could not set up TLS", "report this bug");
            return stop(step, "TLS could not be set up");
        }
    };
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, tls.connect(&target.host, tcp)).await;
    let took = started.elapsed();
    let expiry = Expiry::of(&tls);
    match result {
        Ok(Ok(conn)) => pass(handshake_passed(&conn, target, took, &expiry), Link { http, tls: Some(tls) }),
        Ok(Err(e)) => {
            let detail = format!(
                "TLS handshake with {} failed after {}: {e}; certificate {}",
                target.host,
                human(took),
                expiry.text
            );
            let (cause, fix) = handshake_failure(&e, target, &expiry.text);
            stop(Step::fail("tls", detail, cause, fix), "TLS failed")
        }
        Err(_) => stop(
            Step::fail(
                "tls",
                format!("no TLS answer within {} s", timeout.as_secs()),
                "the server accepted the connection but did not answer the TLS handshake",
                "check that this port serves TLS (and not plain HTTP or another protocol)",
            ),
            "TLS failed",
        ),
    }
}

/// The REST client, built by the tls step because it needs the TLS settings.
fn http_client(target: &Target, tls: Option<&Tls>, timeout: Duration) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .user_agent(concat!("natter-doctor/", env!("CARGO_PKG_VERSION")));
    if target.secure {
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls((*tls.config).clone());
        }
    }
    builder.build()
}

/// When the server's certificate expires, as far as the handshake showed it.
struct Expiry {
    days_left: Option<i64>,
    /// `expires 2026-01-02 (in 30 days)`, `expired …`, or `expiry unknown`.
    text: String,
}

impl Expiry {
    fn of(tls: &Tls) -> Expiry {
        let expiry = tls.last_leaf().and_then(|c| net::cert_not_after(&c));
        let days_left = expiry.map(|e| (e - Utc::now()).num_days());
        let text = match (expiry, days_left) {
            (Some(e), Some(d)) if d >= 0 => format!("expires {} (in {d} days)", e.format("%Y-%m-%d")),
            (Some(e), Some(d)) => format!("expired {} ({} days ago)", e.format("%Y-%m-%d"), -d),
            _ => "expiry unknown".to_owned(),
        };
        Expiry { days_left, text }
    }
}

fn handshake_passed(conn: &TlsStream<TcpStream>, target: &Target, took: Duration, expiry: &Expiry) -> Step {
    let (_, session) = conn.get_ref();
    let version = session
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default()
        .replace('_', ".")
        .replace("TLSv", "TLS ");
    let suite = session.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
    let detail = format!(
        "{version} ({suite}) in {}; certificate valid for {}, chain trusted, {}",
        human(took),
        target.host,
        expiry.text
    );
    match expiry.days_left {
        Some(d) if d < 14 => Step::warn(
            "tls",
            detail,
            format!("the certificate expires in {d} days"),
            "renew it now (certbot renew / your ACME client); check that automatic renewal runs",
        ),
        _ => Step::ok("tls", detail),
    }
}

/// The cause and the fix of a failed TLS handshake.
fn handshake_failure(e: &io::Error, target: &Target, expiry_text: &str) -> (String, String) {
    match net::rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
                format!("the server's certificate has expired ({expiry_text})"),
                "renew the certificate (certbot renew / your ACME client) and reload the proxy".to_owned(),
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
                format!("the certificate is not valid for the name {}", target.host),
                format!("use a certificate that names {} (or use the name it was issued for in the URL)", target.host),
            ),
            CertificateError::UnknownIssuer => (
                "the certificate chain does not lead to a trusted root: the certificate is self-signed, from a private CA, or the server does not send its intermediate certificates".to_owned(),
                "serve the full chain (fullchain.pem with Let's Encrypt); for a private CA pass --ca-file ca.pem".to_owned(),
            ),
            other => (format!("the certificate was refused: {other:?}"), "check the certificate with `openssl s_client -connect host:443 -servername host`".to_owned()),
        },
        Some(rustls::Error::InvalidMessage(_)) => (
            "the server did not answer with TLS: this port probably speaks plain HTTP".to_owned(),
            "use http:// for this port, or the port where TLS is served (usually 443)".to_owned(),
        ),
        _ => (format!("the TLS handshake failed: {e}"), "check the server's or proxy's TLS configuration".to_owned()),
    }
}
