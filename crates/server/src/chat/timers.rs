//! The session's one timer: heartbeat pings, the idle close and delta retries share it, so an
//! idle connection holds one timer entry rather than three.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pub struct Timers {
    pub heartbeat: Duration,
    next_ping: Instant,
    /// The last frame from the client.
    pub heard: Instant,
    /// When coalesced deltas are retried (only while some wait).
    pub next_flush: Option<Instant>,
    /// The deadline the timer is set to.
    pub armed: Instant,
}

/// What the timer found due.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    Ping,
    Idle,
    Flush,
}

impl Timers {
    pub fn new(heartbeat: Duration) -> Self {
        let now = Instant::now();
        Timers { heartbeat, next_ping: now + heartbeat, heard: now, next_flush: None, armed: now + heartbeat }
    }

    /// How long the client may stay silent: two heartbeats.
    pub fn idle_limit(&self) -> Duration {
        self.heartbeat * 2
    }

    fn idle_deadline(&self) -> Instant {
        self.heard + self.idle_limit()
    }

    fn deadline(&self) -> Instant {
        let d = self.next_ping.min(self.idle_deadline());
        self.next_flush.map_or(d, |f| d.min(f))
    }

    /// Sets the timer to the earliest deadline (a no-op when it already is).
    pub fn arm(&mut self, sleep: Pin<&mut Sleep>) {
        let d = self.deadline();
        if d != self.armed || sleep.is_elapsed() {
            self.armed = d;
            sleep.reset(d);
        }
    }

    /// What is due now, if anything (the timer may fire for a deadline that moved later).
    pub fn due(&mut self) -> Option<Due> {
        let now = Instant::now();
        if now >= self.idle_deadline() {
            Some(Due::Idle)
        } else if now >= self.next_ping {
            // Like `MissedTickBehavior::Delay`: the next ping is a whole interval away.
            self.next_ping = now + self.heartbeat;
            Some(Due::Ping)
        } else if self.next_flush.is_some_and(|f| now >= f) {
            self.next_flush = None;
            Some(Due::Flush)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pings_every_heartbeat_and_closes_after_two_silent_ones() {
        let hb = Duration::from_secs(10);
        let mut t = Timers::new(hb);
        assert_eq!(t.due(), None, "nothing is due at once");
        tokio::time::advance(hb).await;
        assert_eq!(t.due(), Some(Due::Ping));
        assert_eq!(t.due(), None, "one ping per heartbeat");
        // The client speaks: the idle deadline moves, the pings go on.
        t.heard = Instant::now();
        tokio::time::advance(hb).await;
        assert_eq!(t.due(), Some(Due::Ping));
        t.next_flush = Some(Instant::now() + Duration::from_millis(50));
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(t.due(), Some(Due::Flush));
        assert_eq!(t.next_flush, None, "a flush is due once");
        tokio::time::advance(hb).await;
        assert_eq!(t.due(), Some(Due::Idle), "two heartbeats without a word from the client");
    }
}
