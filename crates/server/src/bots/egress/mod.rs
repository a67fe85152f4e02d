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
//!
//! Here: the operator's allow-list ([`EgressAllow`]) and the [`Policy`]; `class.rs` classifies
//! addresses, `connect.rs` applies the policy to requests.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use reqwest::Url;

use natter_proto::ErrorCode;

use crate::domain::Invalid;

mod class;
mod connect;

use class::METADATA_NAMES;
pub use class::{classify, Class};
pub use connect::{for_log, owner_is_admin, refusal, sanitize, user_is_admin, CheckedResolver, Egress};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
