//! The request side of the egress policy: [`CheckedResolver`] hands the HTTP client only the
//! addresses the policy allows, [`Egress`] holds the clients (one per kind of owner) and checks
//! literal addresses, and the helpers that read a failed request and the text that came back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use uuid::Uuid;

use super::{literal_ip, Policy, Refused};
use crate::store::Store;

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
    use std::net::IpAddr;

    use super::*;

    fn policy(allow: &[&str]) -> Policy {
        Policy::new(allow.iter().map(|a| a.parse().unwrap()).collect())
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
