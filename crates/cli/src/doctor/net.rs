//! The network edge of the doctor: the parsed target, TCP and TLS connections (with the
//! certificate kept for inspection), and a certificate's expiry read straight from its DER.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Where the server is, as the user gave it: scheme, host, port and an optional path prefix
/// (for a natter mounted under `/chat` behind a proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub secure: bool,
    /// The host without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// `""` or a path like `/chat`, without a trailing slash.
    pub prefix: String,
    /// Notes about how the input was read ("assumed http://", "dropped /api").
    pub notes: Vec<String>,
}

impl Target {
    pub fn parse(input: &str) -> Result<Target, String> {
        let input = input.trim();
        if input.is_empty() {
            return Err("the base URL is empty".into());
        }
        let mut notes = Vec::new();
        let with_scheme = if input.contains("://") {
            input.to_owned()
        } else {
            notes.push("no scheme given; assumed http://".to_owned());
            format!("http://{input}")
        };
        let url = reqwest::Url::parse(&with_scheme).map_err(|e| format!("{input:?} is not a URL: {e}"))?;
        let secure = match url.scheme() {
            "http" | "ws" => false,
            "https" | "wss" => true,
            other => return Err(format!("unsupported scheme {other}:// (use http://, https://, ws:// or wss://)")),
        };
        let host = match url.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
            _ => return Err(format!("{input:?} has no host")),
        };
        let port = url.port_or_known_default().unwrap_or(if secure { 443 } else { 80 });
        let mut prefix = url.path().trim_end_matches('/').to_owned();
        for tail in ["/api/ws/chat", "/api"] {
            if let Some(p) = prefix.strip_suffix(tail) {
                notes.push(format!("dropped {tail} from the path: give the URL the browser opens, natter adds /api"));
                prefix = p.to_owned();
                break;
            }
        }
        if url.query().is_some() {
            notes.push("ignored the query string".to_owned());
        }
        Ok(Target { secure, host, port, prefix, notes })
    }

    fn default_port(&self) -> u16 {
        if self.secure {
            443
        } else {
            80
        }
    }

    /// `host`, `host:port`, `[::1]:port`: what goes into `Host:` and URLs.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == self.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    pub fn http_base(&self) -> String {
        format!("{}://{}{}", if self.secure { "https" } else { "http" }, self.authority(), self.prefix)
    }

    pub fn ws_base(&self) -> String {
        format!("{}://{}{}", if self.secure { "wss" } else { "ws" }, self.authority(), self.prefix)
    }

    /// The full URL of an API path (`/health` → `http://host/api/health`).
    pub fn api(&self, path: &str) -> String {
        format!("{}/api{path}", self.http_base())
    }

    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<std::net::IpAddr>().map(|a| a.is_loopback()).unwrap_or(false)
    }
}

/// A byte stream the doctor speaks HTTP or WebSocket over: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct BoxIo(pub Box<dyn Io>);

impl AsyncRead for BoxIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoxIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// Connects to the first address that answers within `timeout`; returns the address and the
/// last error when none does.
pub async fn tcp_connect(
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), (SocketAddr, io::Error)> {
    let mut last = None;
    for &addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok((s, addr));
            }
            Ok(Err(e)) => last = Some((addr, e)),
            Err(_) => {
                last = Some((
                    addr,
                    io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {} s", timeout.as_secs())),
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| (SocketAddr::from(([0, 0, 0, 0], 0)), io::Error::other("no address to connect to"))))
}

/// The TLS settings shared by the TLS step, the socket and the REST client, so all three
/// trust the same roots. The verifier keeps the server's certificate for the expiry check,
/// even when verification fails.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    pub leaf: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    leaf: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.leaf.lock().expect("leaf lock") = Some(end_entity.clone().into_owned());
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl Tls {
    /// Trusts the Mozilla roots (webpki-roots) plus the PEM certificates in `extra_ca`.
    pub fn new(extra_ca: Option<&[u8]>) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(pem) = extra_ca {
            use rustls::pki_types::pem::PemObject;
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("--ca-file: {e}"))?;
                roots.add(cert).map_err(|e| format!("--ca-file: {e}"))?;
                added += 1;
            }
            if added == 0 {
                return Err("--ca-file holds no PEM certificate".into());
            }
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let leaf = Arc::new(Mutex::new(None));
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(RecordingVerifier { inner, leaf: leaf.clone() }))
            .with_no_client_auth();
        Ok(Tls { config: Arc::new(config), leaf })
    }

    pub async fn connect(&self, host: &str, tcp: TcpStream) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_owned()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp).await
    }

    pub fn last_leaf(&self) -> Option<CertificateDer<'static>> {
        self.leaf.lock().expect("leaf lock").clone()
    }
}

/// The rustls error inside an IO error from a TLS handshake, if that is what it is.
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Reads one DER element: (tag, content, rest).
fn der(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize), &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn der_time(tag: u8, content: &[u8]) -> Option<DateTime<Utc>> {
    let s = std::str::from_utf8(content).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        // UTCTime: YYMMDDHHMMSS; years 50–99 are 19xx.
        0x17 => {
            let yy: i32 = s.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        // GeneralizedTime: YYYYMMDDHHMMSS.
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| rest.get(r).and_then(|x| x.parse::<u32>().ok());
    let date = NaiveDate::from_ymd_opt(year, num(0..2)?, num(2..4)?)?;
    Some(date.and_hms_opt(num(4..6)?, num(6..8)?, num(8..10)?)?.and_utc())
}

/// The `notAfter` of an X.509 certificate: Certificate → tbsCertificate → validity.
pub fn cert_not_after(cert: &[u8]) -> Option<DateTime<Utc>> {
    let (0x30, cert, _) = der(cert)? else { return None };
    let (0x30, tbs, _) = der(cert)? else { return None };
    let mut rest = tbs;
    // Optional explicit version [0].
    if rest.first() == Some(&0xa0) {
        rest = der(rest)?.2;
    }
    let rest = der(rest)?.2; // serialNumber
    let rest = der(rest)?.2; // signature algorithm
    let rest = der(rest)?.2; // issuer
    let (0x30, validity, _) = der(rest)? else { return None };
    let (_, _, after) = der(validity)?; // notBefore
    let (tag, content, _) = der(after)?;
    der_time(tag, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_base_urls_of_every_shape() {
        let t = Target::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!((t.secure, t.host.as_str(), t.port, t.prefix.as_str()), (false, "127.0.0.1", 8000, ""));
        assert_eq!(t.api("/health"), "http://127.0.0.1:8000/api/health");
        assert_eq!(t.ws_base(), "ws://127.0.0.1:8000");
        let t = Target::parse("wss://chat.example.com/natter/").unwrap();
        assert_eq!((t.secure, t.port, t.prefix.as_str()), (true, 443, "/natter"));
        assert_eq!(t.api("/ws/codes"), "https://chat.example.com/natter/api/ws/codes");
        assert_eq!(t.authority(), "chat.example.com");
        let t = Target::parse("localhost:9000").unwrap();
        assert_eq!((t.secure, t.port), (false, 9000));
        assert!(t.notes[0].contains("assumed http://"));
        assert!(t.is_loopback());
        let t = Target::parse("https://example.com/api").unwrap();
        assert_eq!(t.prefix, "");
        assert!(t.notes[0].contains("dropped /api"));
        let t = Target::parse("http://[::1]:8000/").unwrap();
        assert_eq!((t.host.as_str(), t.authority().as_str()), ("::1", "[::1]:8000"));
        assert!(Target::parse("ftp://example.com").unwrap_err().contains("unsupported scheme"));
        assert!(Target::parse("http://").is_err());
        assert!(Target::parse("").is_err());
    }

    /// DER of one element.
    fn el(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if content.len() < 0x80 {
            v.push(content.len() as u8);
        } else {
            v.extend([0x82, (content.len() >> 8) as u8, content.len() as u8]);
        }
        v.extend_from_slice(content);
        v
    }

    fn cert(version: bool, not_after: (u8, &str)) -> Vec<u8> {
        let mut tbs = Vec::new();
        if version {
            tbs.extend(el(0xa0, &el(0x02, &[2])));
        }
        tbs.extend(el(0x02, &[0x01, 0x02]));
        tbs.extend(el(0x30, &el(0x06, &[0x2a, 0x86])));
        tbs.extend(el(0x30, &[0u8; 200])); // a long issuer, for the multi-byte length form
        let mut validity = el(0x17, b"250101000000Z");
        validity.extend(el(not_after.0, not_after.1.as_bytes()));
        tbs.extend(el(0x30, &validity));
        tbs.extend(el(0x30, &[]));
        el(0x30, &[el(0x30, &tbs), el(0x30, &[]), el(0x03, &[0])].concat())
    }

    #[test]
    fn reads_a_certificates_expiry() {
        let when = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(cert_not_after(&cert(true, (0x17, "270315123456Z"))), Some(when("2027-03-15T12:34:56Z")));
        assert_eq!(cert_not_after(&cert(false, (0x18, "20991231235959Z"))), Some(when("2099-12-31T23:59:59Z")));
        assert_eq!(cert_not_after(&cert(true, (0x17, "991231235959Z"))), Some(when("1999-12-31T23:59:59Z")));
        assert_eq!(cert_not_after(&cert(true, (0x17, "garbage"))), None);
        assert_eq!(cert_not_after(b"\x30\x05\x01"), None);
        assert_eq!(cert_not_after(&[]), None);
    }
}
