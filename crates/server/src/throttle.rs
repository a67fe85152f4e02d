//! Login throttling: failed logins slow further attempts down exponentially, per username
//! and client address, without letting an attacker lock the real user out.
//!
//! Three tables count failures (never successes), each entry with the time of its last one:
//! - per (username, address): after `free` failures, each next attempt waits
//!   `base × 2^(failures − free)` (at most `max_delay`) after the last failure;
//! - per address (any username): the same after `4 × free` failures (one address trying
//!   many usernames);
//! - per username (any address): the same after `2 × free` failures, but applied only to
//!   addresses that have failures of their own. A botnet spreading guesses over many
//!   addresses gets one guess per address; the real user, from an address with no failures,
//!   still logs in while the username is under attack.
//!
//! Unknown usernames are counted exactly like known ones (the key is the name as typed), so
//! the answers and their timing say nothing about whether an account exists. An attempt is
//! counted before its password is checked (concurrent guesses can't slip through together)
//! and taken back if it succeeds or never gets checked. Each table holds at most
//! `max_entries`; entries idle for `forget_after` go first, then the oldest.
//!
//! The client address is the TCP peer's. Behind a reverse proxy every client has the
//! proxy's address, so the per-address limits apply to everyone together (docs: see the
//! deployment notes); IPv6 addresses count per /64, since one client usually has a whole /64.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The throttle's settings.
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// Failures per (username, address) before attempts are delayed; per address it is 4×,
    /// per username 2×. 0 turns the throttle off.
    pub free_failures: u32,
    /// The first delay; each further failure doubles it.
    pub base_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
    /// An entry with no failure for this long is forgotten.
    pub forget_after: Duration,
    /// Entries per table (three tables).
    pub max_entries: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            free_failures: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(15 * 60),
            forget_after: Duration::from_secs(60 * 60),
            max_entries: 50_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    failures: u32,
    last: Instant,
}

struct Table<K> {
    map: HashMap<K, Counter>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new() -> Self {
        Table { map: HashMap::new() }
    }

    fn failures(&self, k: &K) -> u32 {
        self.map.get(k).map_or(0, |c| c.failures)
    }

    /// How long the next attempt must still wait, if at all.
    fn wait(&self, k: &K, free: u32, cfg: &ThrottleConfig, now: Instant) -> Option<Duration> {
        let c = self.map.get(k)?;
        if c.failures < free {
            return None;
        }
        let doublings = (c.failures - free).min(30);
        let delay = cfg.base_delay.saturating_mul(1u32 << doublings).min(cfg.max_delay);
        (c.last + delay).checked_duration_since(now).filter(|d| !d.is_zero())
    }

    fn fail(&mut self, k: &K, cfg: &ThrottleConfig, now: Instant) {
        if let Some(c) = self.map.get_mut(k) {
            c.failures = c.failures.saturating_add(1);
            c.last = now;
            return;
        }
        if self.map.len() >= cfg.max_entries {
            self.evict(cfg, now);
        }
        self.map.insert(k.clone(), Counter { failures: 1, last: now });
    }

    /// Takes back one counted failure.
    fn undo(&mut self, k: &K) {
        if let Some(c) = self.map.get_mut(k) {
            c.failures = c.failures.saturating_sub(1);
            if c.failures == 0 {
                self.map.remove(k);
            }
        }
    }

    /// Forgets idle entries; if that is not enough, the oldest eighth (amortised O(1)).
    fn evict(&mut self, cfg: &ThrottleConfig, now: Instant) {
        self.map.retain(|_, c| now.saturating_duration_since(c.last) < cfg.forget_after);
        if self.map.len() < cfg.max_entries {
            return;
        }
        let mut lasts: Vec<Instant> = self.map.values().map(|c| c.last).collect();
        let nth = lasts.len() / 8;
        let (_, cutoff, _) = lasts.select_nth_unstable(nth);
        let cutoff = *cutoff;
        self.map.retain(|_, c| c.last > cutoff);
    }
}

struct Tables {
    pair: Table<(String, IpAddr)>,
    addr: Table<IpAddr>,
    user: Table<String>,
}

/// Counts failed logins and says how long the next attempt must wait.
pub struct LoginThrottle {
    cfg: ThrottleConfig,
    /// Plain mutex: a few map operations, never held across an await.
    tables: Mutex<Tables>,
}

/// One counted attempt: call [`Attempt::failed`] or [`Attempt::succeeded`]; dropped without
/// either (the pool was busy, the store failed, the client went away) it is taken back.
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    user: String,
    addr: IpAddr,
    done: bool,
}

impl Attempt<'_> {
    /// A wrong password (or unknown user): the failure stays counted.
    pub fn failed(mut self) {
        self.done = true;
    }

    /// The right password: the pair's failures are forgotten and this attempt taken back.
    pub fn succeeded(mut self) {
        self.done = true;
        let mut t = self.throttle.lock();
        t.pair.map.remove(&(self.user.clone(), self.addr));
        t.addr.undo(&self.addr);
        t.user.undo(&self.user);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done && self.throttle.cfg.free_failures > 0 {
            let mut t = self.throttle.lock();
            t.pair.undo(&(self.user.clone(), self.addr));
            t.addr.undo(&self.addr);
            t.user.undo(&self.user);
        }
    }
}

/// The key of a username as typed: lower-cased and cut to 64 bytes, so that one key stands
/// for what could be one account and a huge name costs no more memory than a short one.
fn user_key(username: &str) -> String {
    let mut s = username.trim().to_lowercase();
    if s.len() > 64 {
        let mut end = 64;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// IPv4 as is (and IPv4-mapped IPv6 as IPv4); IPv6 by its /64.
fn addr_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl LoginThrottle {
    pub fn new(cfg: ThrottleConfig) -> Self {
        LoginThrottle { cfg, tables: Mutex::new(Tables { pair: Table::new(), addr: Table::new(), user: Table::new() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an attempt, or says how long to wait before the next one (rounded up to
    /// whole seconds by the caller for `Retry-After`).
    pub fn begin(&self, username: &str, ip: IpAddr) -> Result<Attempt<'_>, Duration> {
        let (user, addr) = (user_key(username), addr_key(ip));
        let free = self.cfg.free_failures;
        let attempt = Attempt { throttle: self, user, addr, done: free == 0 };
        if free == 0 {
            return Ok(attempt);
        }
        let now = Instant::now();
        let mut t = self.lock();
        let pair = (attempt.user.clone(), addr);
        let wait = [
            t.pair.wait(&pair, free, &self.cfg, now),
            t.addr.wait(&addr, free.saturating_mul(4), &self.cfg, now),
            // The username's own limit binds only addresses that have failed before.
            if t.addr.failures(&addr) > 0 {
                t.user.wait(&attempt.user, free.saturating_mul(2), &self.cfg, now)
            } else {
                None
            },
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(wait) = wait {
            // Not an attempt: nothing to take back.
            drop(t);
            let mut attempt = attempt;
            attempt.done = true;
            return Err(wait);
        }
        t.pair.fail(&pair, &self.cfg, now);
        t.addr.fail(&addr, &self.cfg, now);
        t.user.fail(&attempt.user, &self.cfg, now);
        drop(t);
        Ok(attempt)
    }

    /// Entries in the three tables (for tests and metrics).
    pub fn len(&self) -> usize {
        let t = self.lock();
        t.pair.map.len() + t.addr.map.len() + t.user.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_and_success_resets_the_pair() {
        let t = LoginThrottle::new(ThrottleConfig { free_failures: 3, ..Default::default() });
        let a = ip("10.0.0.1");
        for _ in 0..3 {
            t.begin("alice", a).unwrap().failed();
        }
        assert_eq!(t.begin("alice", a).err(), Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        t.begin("Alice", a).unwrap().failed();
        assert_eq!(t.begin("alice", a).err(), Some(Duration::from_secs(2)), "doubled, case-insensitively");
        tokio::time::advance(Duration::from_secs(2)).await;
        t.begin("alice", a).unwrap().succeeded();
        t.begin("alice", a).unwrap().failed();
        t.begin("alice", a).unwrap().failed();
    }

    #[tokio::test(start_paused = true)]
    async fn an_attacked_username_stays_open_to_clean_addresses() {
        let t = LoginThrottle::new(ThrottleConfig { free_failures: 2, ..Default::default() });
        // Many attacking addresses, two guesses each: the username's count passes 2×free.
        for i in 0..5 {
            let a = ip(&format!("10.0.1.{i}"));
            t.begin("alice", a).unwrap().failed();
            let second = t.begin("alice", a);
            if i < 2 {
                second.unwrap().failed();
            } else {
                assert!(second.is_err(), "address {i} with a failure meets the username's limit");
            }
        }
        // The real user, from an address with no failures, is let through, every time.
        t.begin("alice", ip("192.168.1.9")).unwrap().succeeded();
        t.begin("alice", ip("192.168.1.9")).unwrap().succeeded();
        // An attempt dropped unchecked is taken back.
        drop(t.begin("bob", ip("10.0.2.1")).unwrap());
        assert_eq!(t.lock().user.failures(&"bob".to_owned()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn tables_are_bounded_and_ipv6_counts_per_64() {
        let t = LoginThrottle::new(ThrottleConfig { free_failures: 1, max_entries: 16, ..Default::default() });
        for i in 0..100 {
            t.begin(&format!("user{i}"), ip(&format!("10.1.{}.{}", i / 200, i % 200))).unwrap().failed();
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(t.len() <= 3 * 16, "{} entries", t.len());
        let t = LoginThrottle::new(ThrottleConfig { free_failures: 1, ..Default::default() });
        t.begin("carol", ip("2001:db8::1")).unwrap().failed();
        assert!(t.begin("carol", ip("2001:db8::ffff:2")).is_err(), "same /64");
        t.begin("carol", ip("2001:db8:0:1::1")).unwrap().failed();
    }
}
