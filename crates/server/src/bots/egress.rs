//! Where bot engines may connect: the egress policy for `openai` and `webhook` URLs.
//!
//! A bot's URL is chosen by its owner, and any registered user may own a bot, so without a
//! policy the server would fetch whatever address a user names (server-side request forgery):
//! the cloud metadata service, an intranet admin page, a database port on loopback. Every
//! address is put in a [`Class`]:
//!
//! - public: allowed;
//! - internal (loopback, private networks, carrier-grade NAT, unique-local IPv6): allowed when
//!   the bot's owner is a site admin, or when the operator lists it (`--bot-egress-allow`);
//! - metadata (link-local, and the cloud metadata endpoints): only when the operator lists it;
//! - never (unspecified, multicast, broadcast, documentation, reserved): refused always.
//!
//! The policy is applied twice: when a bot is saved ([`Policy::check_url`], a `400 invalid_bot`
//! naming the field), and on every request ([`Egress::post`]): a literal IP is checked before
//! sending, and a host name is resolved by [`CheckedResolver`], which hands the HTTP client only
//! the addresses it checked — the client connects to exactly those, so a name that resolves to
//! something else a second later (DNS rebinding) gains nothing. Redirects are not followed and
//! no proxy is used, so the checked address is the one connected to.
//!
//! At request time the owner's *current* role counts: a demoted admin's bot loses its access
//! to internal addresses at its next reply.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use uuid::Uuid;

use natter_proto::ErrorCode;

use crate::domain::Invalid;
use crate::store::Store;

/// One `--bot-egress-allow` entry: a network (`10.0.0.0/8`, or one address) or a host name
/// (`localhost`, `llm.intranet`), whose addresses are then allowed whatever they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressAllow {
    Net(IpNet),
    Host(String),
}

impl FromStr for EgressAllow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.contains('/') {
            let net: IpNet = s.parse().map_err(|_| format!("{s:?} is not a network like 10.0.0.0/8 or fd00::/8"))?;
            return Ok(EgressAllow::Net(net.trunc()));
        }
        if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(EgressAllow::Net(IpNet::from(ip)));
        }
        let host = normal_host(s);
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(format!("{s:?} is neither a network (10.0.0.0/8), an address nor a host name"));
        }
        Ok(EgressAllow::Host(host))
    }
}

impl fmt::Display for EgressAllow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgressAllow::Net(n) => write!(f, "{n}"),
            EgressAllow::Host(h) => f.write_str(h),
        }
    }
}

/// Host names compare lowercase, without a final dot.
fn normal_host(h: &str) -> String {
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// What kind of place an address is, as far as a bot's request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Public,
    /// Loopback and private networks: site admins' bots, or listed by the operator.
    Internal(&'static str),
    /// Link-local and cloud metadata endpoints: only when listed by the operator.
    Metadata,
    /// Never a server: refused always.
    Never(&'static str),
}

const PRIVATE: &str = "a private-network address";
const LOOPBACK: &str = "a loopback address";
const DOCUMENTATION: &str = "a documentation address";

/// Cloud metadata and platform endpoints outside 169.254.0.0/16 and fe80::/10: Alibaba's
/// metadata service, Azure's WireServer, AWS's IPv6 metadata service.
const METADATA_V4: &[Ipv4Addr] = &[Ipv4Addr::new(100, 100, 100, 200), Ipv4Addr::new(168, 63, 129, 16)];
const METADATA_V6: &[Ipv6Addr] = &[Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)];
/// Names of metadata services (they resolve to link-local addresses, refused anyway when
/// resolved; naming them at save time gives a clear error sooner).
const METADATA_NAMES: &[&str] =
    &["metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"];

/// The class of an address. IPv4 inside IPv6 (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`,
/// 6to4 `2002::/16`) is classified as the IPv4 address it carries.
pub fn classify(ip: IpAddr) -> Class {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    if METADATA_V4.contains(&ip) {
        return Class::Metadata;
    }
    match ip.octets() {
        [169, 254, ..] => Class::Metadata,
        [255, 255, 255, 255] => Class::Never("the broadcast address"),
        [0, ..] => Class::Never("an unspecified (\"this network\") address"),
        [127, ..] => Class::Internal(LOOPBACK),
        [10, ..] | [192, 168, ..] => Class::Internal(PRIVATE),
        [172, b, ..] if (16..32).contains(&b) => Class::Internal(PRIVATE),
        [100, b, ..] if (64..128).contains(&b) => Class::Internal("a shared (carrier-grade NAT) address"),
        [198, 18 | 19, ..] => Class::Internal("a benchmarking-network address"),
        [192, 0, 0, _] => Class::Never("an IETF protocol-assignment address"),
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => Class::Never(DOCUMENTATION),
        [192, 88, 99, _] => Class::Never("a reserved (6to4 relay) address"),
        [224..=239, ..] => Class::Never("a multicast address"),
        [240..=255, ..] => Class::Never("a reserved address"),
        _ => Class::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> Class {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if METADATA_V6.contains(&ip) {
        return Class::Metadata;
    }
    if ip.is_unspecified() {
        return Class::Never("the unspecified address");
    }
    if ip.is_loopback() {
        return Class::Internal(LOOPBACK);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64: the translator connects to the IPv4 address inside.
        return classify_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        // 6to4: the IPv4 address inside is the tunnel's end.
        return match classify_v4(embedded(s[1], s[2])) {
            Class::Public => Class::Public,
            _ => Class::Never("a 6to4 address of a non-public IPv4 address"),
        };
    }
    match s[0] {
        x if x & 0xffc0 == 0xfe80 => Class::Metadata,
        x if x & 0xffc0 == 0xfec0 => Class::Internal("a site-local address"),
        x if x & 0xfe00 == 0xfc00 => Class::Internal("a unique-local address"),
        x if x & 0xff00 == 0xff00 => Class::Never("a multicast address"),
        0x64 if s[1] == 0xff9b && s[2] == 1 => Class::Internal("a local-use NAT64 address"),
        0x2001 if s[1] == 0xdb8 => Class::Never(DOCUMENTATION),
        0x3fff if s[1] < 0x1000 => Class::Never(DOCUMENTATION),
        x if x & 0xe000 == 0x2000 => Class::Public,
        _ => Class::Never("a reserved address"),
    }
}

/// Why a connection was refused: one sentence naming the address and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The operator's allow-list and the rules above.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    allow: Vec<EgressAllow>,
}

impl Policy {
    pub fn new(allow: Vec<EgressAllow>) -> Policy {
        Policy { allow }
    }

    fn listed_ip(&self, ip: IpAddr) -> bool {
        let v4 = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.allow.iter().any(|a| match a {
            EgressAllow::Net(n) => n.contains(&ip) || v4.is_some_and(|v4| n.contains(&v4)),
            EgressAllow::Host(_) => false,
        })
    }

    fn listed_host(&self, host: &str) -> bool {
        let host = normal_host(host);
        self.allow.iter().any(|a| matches!(a, EgressAllow::Host(h) if *h == host))
    }

    /// The verdict for `what` (an address or a name) of this class.
    fn decide(&self, what: &dyn fmt::Display, class: Class, listed: bool, owner_admin: bool) -> Result<(), Refused> {
        match class {
            Class::Public => Ok(()),
            Class::Never(kind) => Err(Refused(format!("{what} is {kind}; natter never connects there"))),
            _ if listed => Ok(()),
            Class::Internal(_) if owner_admin => Ok(()),
            Class::Internal(kind) => Err(Refused(format!(
                "{what} is {kind}; only bots of site admins may connect there, unless the operator lists it in --bot-egress-allow"
            ))),
            Class::Metadata => Err(Refused(format!(
                "{what} is a link-local/cloud metadata address; natter never connects there unless the operator lists it in --bot-egress-allow"
            ))),
        }
    }

    /// Whether a bot of an owner (a site admin or not) may connect to `ip`, reached by the
    /// name `host` if any.
    pub fn check_ip(&self, ip: IpAddr, host: Option<&str>, owner_admin: bool) -> Result<(), Refused> {
        let listed = self.listed_ip(ip) || host.is_some_and(|h| self.listed_host(h));
        self.decide(&ip, classify(ip), listed, owner_admin)
    }

    /// The check when a bot is saved: a literal address (in any spelling the HTTP client
    /// accepts: `http://2852039166/` is 169.254.169.254), a loopback name (`localhost`), or a
    /// metadata service's name. Other names are checked when they are resolved.
    pub fn check_url(&self, url: &str, owner_admin: bool) -> Result<(), Refused> {
        let Ok(url) = Url::parse(url) else { return Ok(()) }; // the spec's validation reports it
        if let Some(ip) = literal_ip(&url) {
            return self.check_ip(ip, None, owner_admin);
        }
        let Some(host) = url.host_str() else { return Ok(()) };
        let name = normal_host(host);
        let class = if name == "localhost" || name.ends_with(".localhost") {
            Class::Internal("a loopback name")
        } else if METADATA_NAMES.contains(&name.as_str()) {
            Class::Metadata
        } else {
            return Ok(());
        };
        self.decide(&name, class, self.listed_host(&name), owner_admin)
    }

    /// [`Policy::check_url`] for a bot's validated engine settings: a refusal is an
    /// `invalid_bot` naming the field.
    pub fn check_engine(&self, engine: &serde_json::Value, owner_admin: bool) -> Result<(), Invalid> {
        for field in ["base_url", "url"] {
            if let Some(url) = engine.get(field).and_then(|v| v.as_str()) {
                self.check_url(url, owner_admin)
                    .map_err(|r| Invalid { code: ErrorCode::InvalidBot, message: format!("engine.{field}: {r}") })?;
            }
        }
        Ok(())
    }
}

/// The address in a URL whose host is one (the HTTP client connects to it without resolving).
/// (The URL parser has already turned every IPv4 spelling into dotted decimal.)
fn literal_ip(url: &Url) -> Option<IpAddr> {
    url.host_str()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Resolves names for the HTTP client and keeps only the addresses the policy allows for
/// this kind of owner; with none left, the connection fails with the [`Refused`] reason.
pub struct CheckedResolver {
    policy: Arc<Policy>,
    owner_admin: bool,
}

impl CheckedResolver {
    pub fn new(policy: Arc<Policy>, owner_admin: bool) -> CheckedResolver {
        CheckedResolver { policy, owner_admin }
    }
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let owner_admin = self.owner_admin;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check_ip(a.ip(), Some(&host), owner_admin) {
                    Ok(()) => true,
                    Err(r) => {
                        refused.get_or_insert(r);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.unwrap_or_else(|| Refused(format!("{host} has no address")));
                return Err(Box::new(why) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The HTTP clients of bot engines: one for bots of site admins, one for everyone else, each
/// resolving through the policy (two clients, so a pooled connection made for one kind of
/// owner never serves the other).
#[derive(Clone)]
pub struct Egress {
    policy: Arc<Policy>,
    store: Arc<dyn Store>,
    admins: reqwest::Client,
    users: reqwest::Client,
}

fn client(policy: &Arc<Policy>, owner_admin: bool) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("natter/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(CheckedResolver::new(policy.clone(), owner_admin)))
        .build()
        .expect("HTTP client")
}

impl Egress {
    pub fn new(policy: Policy, store: Arc<dyn Store>) -> Egress {
        let policy = Arc::new(policy);
        Egress { admins: client(&policy, true), users: client(&policy, false), policy, store }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A POST to `url` on behalf of this bot, under its owner's current policy.
    pub async fn post(&self, bot_id: Uuid, url: &str) -> Result<reqwest::RequestBuilder, Refused> {
        let owner_admin = owner_is_admin(&*self.store, bot_id).await;
        let url = Url::parse(url).map_err(|e| Refused(format!("the bot's URL does not parse: {e}")))?;
        if let Some(ip) = literal_ip(&url) {
            self.policy.check_ip(ip, None, owner_admin)?;
        }
        let client = if owner_admin { &self.admins } else { &self.users };
        Ok(client.post(url))
    }
}

/// Whether the bot's owner is a site admin now. A failure to tell counts as "no".
pub async fn owner_is_admin(store: &dyn Store, bot_id: Uuid) -> bool {
    let owner = match store.bot(bot_id).await {
        Ok(Some(bot)) => bot.owner_id,
        Ok(None) => return false,
        Err(e) => {
            tracing::warn!(%bot_id, error = %e, "reading the bot's owner failed; applying the policy of non-admins");
            return false;
        }
    };
    user_is_admin(store, owner).await
}

/// Whether a user is a site admin now. A failure to tell counts as "no".
pub async fn user_is_admin(store: &dyn Store, user_id: Uuid) -> bool {
    match store.user_by_id(user_id).await {
        Ok(u) => u.is_some_and(|u| u.is_admin),
        Err(e) => {
            tracing::warn!(%user_id, error = %e, "reading a user failed; applying the policy of non-admins");
            false
        }
    }
}

/// The policy refusal behind a failed request, if that is what it was.
pub fn refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// What a chat user may be shown of text that came from elsewhere: control characters
/// dropped, at most `max` characters.
pub fn sanitize(text: &str, max: usize) -> String {
    let clean: String = text.chars().filter(|c| !c.is_control()).collect();
    let clean = clean.trim();
    match clean.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &clean[..cut]),
        None => clean.to_owned(),
    }
}

/// Remote text for the server log: at most 4 KiB, escaped (newlines and terminal escapes
/// cannot forge or colour log lines).
pub fn for_log(text: &str) -> String {
    const MAX: usize = 4096;
    if text.len() <= MAX {
        return format!("{text:?}");
    }
    let mut cut = MAX;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?} (cut, {} bytes in all)", &text[..cut], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Class {
        classify(s.parse().unwrap())
    }

    #[test]
    fn addresses_are_classified() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(class(ip), Class::Public, "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "198.18.0.1",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
        ] {
            assert!(matches!(class(ip), Class::Internal(_)), "{ip}: {:?}", class(ip));
        }
        for ip in [
            "169.254.169.254",
            "169.254.170.2",
            "169.254.0.1",
            "100.100.100.200",
            "168.63.129.16",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert_eq!(class(ip), Class::Metadata, "{ip}");
        }
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.9",
            "192.0.0.8",
            "::",
            "ff02::1",
            "2001:db8::1",
            "::a9fe:a9fe",
            "100::1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "::ffff:0.0.0.0",
            "::ffff:224.0.0.1",
            "4000::1",
        ] {
            assert!(matches!(class(ip), Class::Never(_)), "{ip}: {:?}", class(ip));
        }
    }

    fn policy(allow: &[&str]) -> Policy {
        Policy::new(allow.iter().map(|a| a.parse().unwrap()).collect())
    }

    #[test]
    fn odd_spellings_of_the_metadata_address_are_caught() {
        let p = policy(&[]);
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://2852039166/",
            "http://0xA9FEA9FE/",
            "http://0xa9.0xfe.0xa9.0xfe/",
            "http://0251.0376.0251.0376/",
            "http://169.254.43518/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[fe80::1]/",
            "http://169.254.170.2/v2/credentials",
            "http://[fd00:ec2::254]/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://METADATA.google.internal./",
        ] {
            for admin in [false, true] {
                let e = p.check_url(url, admin).expect_err(url).0;
                assert!(e.contains("link-local/cloud metadata address"), "{url}: {e}");
            }
        }
        let e = p.check_url("http://2852039166/", false).unwrap_err().0;
        assert!(e.starts_with("169.254.169.254 is a link-local/cloud metadata address; natter never connects there unless the operator lists it in --bot-egress-allow"), "{e}");
        // Listed by the operator: allowed.
        assert_eq!(policy(&["169.254.169.254"]).check_url("http://0xA9FEA9FE/", false), Ok(()));
        assert_eq!(policy(&["169.254.0.0/16"]).check_url("http://[::ffff:169.254.169.254]/", false), Ok(()));
        assert_eq!(policy(&["metadata.google.internal"]).check_url("http://metadata.google.internal/", false), Ok(()));
    }

    #[test]
    fn internal_addresses_need_an_admin_owner_or_the_allow_list() {
        let p = policy(&[]);
        for url in [
            "http://127.0.0.1:11434/v1",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::1]/",
            "http://10.0.0.1/",
            "http://172.16.5.4/",
            "http://192.168.0.10/",
            "http://100.64.1.1/",
            "http://[fd00::1]/",
            "http://localhost:11434/v1",
            "http://ollama.localhost/",
        ] {
            let e = p.check_url(url, false).expect_err(url).0;
            assert!(e.contains("only bots of site admins may connect there"), "{url}: {e}");
            assert_eq!(p.check_url(url, true), Ok(()), "{url}");
        }
        let listed = policy(&["127.0.0.1/32", "10.0.0.0/8", "localhost"]);
        for url in ["http://127.0.0.1:11434/v1", "http://2130706433/", "http://10.9.9.9/", "http://localhost/"] {
            assert_eq!(listed.check_url(url, false), Ok(()), "{url}");
        }
        assert!(listed.check_url("http://192.168.0.1/", false).is_err());
        assert!(listed.check_url("http://127.0.0.2/", false).is_err());
        // Never: not even for admins or listed.
        let all = policy(&["0.0.0.0/0", "::/0"]);
        for url in ["http://0.0.0.0/", "http://[::]/", "http://224.0.0.1/", "http://255.255.255.255/"] {
            let e = all.check_url(url, true).expect_err(url).0;
            assert!(e.contains("natter never connects there"), "{url}: {e}");
        }
        // Public addresses and names (checked when resolved) pass.
        for url in ["https://api.openai.com/v1", "http://8.8.8.8/", "http://[2606:4700::1111]/"] {
            assert_eq!(p.check_url(url, false), Ok(()), "{url}");
        }
    }

    #[test]
    fn allow_entries_parse() {
        assert_eq!("10.1.2.3/8".parse::<EgressAllow>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("127.0.0.1".parse::<EgressAllow>().unwrap().to_string(), "127.0.0.1/32");
        assert_eq!("[::1]".parse::<EgressAllow>().unwrap().to_string(), "::1/128");
        assert_eq!("LocalHost.".parse::<EgressAllow>().unwrap(), EgressAllow::Host("localhost".into()));
        for bad in ["", "10.0.0.0/33", "http://x", "a b", "x/y", "a..b"] {
            assert!(bad.parse::<EgressAllow>().is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_resolver_keeps_only_allowed_addresses() {
        // `localhost` resolves from the hosts file: no packet leaves the machine.
        let resolve = |allow: &[&str], admin: bool| {
            CheckedResolver::new(Arc::new(policy(allow)), admin).resolve("localhost".parse().unwrap())
        };
        let err = match resolve(&[], false).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        assert!(refusal(&*err).is_some(), "{err}");
        assert!(err.to_string().contains("is a loopback address; only bots of site admins"), "{err}");
        let addrs: Vec<SocketAddr> = resolve(&[], true).await.unwrap().collect();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        // Listed by name or by network: allowed for everyone; a network lets only its addresses through.
        assert!(resolve(&["localhost"], false).await.is_ok());
        let addrs: Vec<SocketAddr> = resolve(&["127.0.0.1/32"], false).await.unwrap().collect();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip() == IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }

    #[test]
    fn remote_text_is_cleaned_and_cut() {
        assert_eq!(sanitize("a\u{1b}[31mb\nc\u{0}", 10), "a[31mbc");
        assert_eq!(sanitize(&"é".repeat(300), 200).chars().count(), 201);
        assert_eq!(for_log("x\ny\u{1b}"), "\"x\\ny\\u{1b}\"");
        let long = for_log(&"é".repeat(5000));
        assert!(long.len() < 4200 && long.ends_with("(cut, 10000 bytes in all)"), "{}", long.len());
    }
}
