//! The scenarios: connect, idle, chat, fanout and storm. Each worker keeps its own tally (no
//! shared locks on the hot path); tallies are merged into the report at the end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout};

use super::conn::{self, Conn, Failure, Frame, Ident, Msg};
use super::report::{Errors, Report, StormReport, Tally};
use super::server;
use super::{identities, spread, Ctx, Scenario};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    match ctx.scenario {
        Scenario::Connect => connect(ctx).await,
        Scenario::Idle => idle(ctx).await,
        Scenario::Chat => chat(ctx, 1).await,
        Scenario::Fanout => chat(ctx, ctx.args.tabs).await,
        Scenario::Storm => storm(ctx).await,
    }
}

/// The report's common part; `idents`: the conversations the scenario used.
fn base_report(ctx: &Ctx, name: &str, idents: &[Ident]) -> Report {
    let (users, bots) = spread(idents);
    Report {
        scenario: name.into(),
        url: ctx.url.clone(),
        transport: ctx.args.transport.name().into(),
        connections: ctx.args.connections,
        users,
        bots,
        ..Default::default()
    }
}

fn finish(report: &mut Report, tally: &Tally, ops_name: &str, secs: f64) {
    report.ops = Some(tally.ops);
    report.ops_per_s = Some(tally.ops as f64 / secs);
    report.ops_name = Some(ops_name.into());
    report.latency_ms = tally.latency.summary();
    report.ack_latency_ms = tally.ack_latency.summary();
    report.errors = tally.errors.0.clone();
    report.error_total = tally.errors.total();
}

fn bar(ctx: &Ctx, len: u64, what: &str) -> ProgressBar {
    if !ctx.progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// The server's CPU time (user + system) from `begin` to `end`, when its pid is known.
fn server_cpu_during(ctx: &Ctx, begin: Instant, end: Instant) -> tokio::task::JoinHandle<Option<Duration>> {
    let pid = ctx.server_pid;
    tokio::spawn(async move {
        let pid = pid?;
        sleep_until(begin.into()).await;
        let before = server::cpu_time(pid)?;
        sleep_until(end.into()).await;
        Some(server::cpu_time(pid)?.saturating_sub(before))
    })
}

/// Puts the server's CPU time over the measured window into the report: per operation, and
/// as a share of the window (1.0: one core busy throughout).
async fn finish_cpu(report: &mut Report, cpu: tokio::task::JoinHandle<Option<Duration>>, window: Duration) {
    let Some(cpu) = cpu.await.ok().flatten() else { return };
    report.server_cpu_busy = Some(cpu.as_secs_f64() / window.as_secs_f64());
    if let Some(ops) = report.ops.filter(|&n| n > 0) {
        report.server_cpu_us_per_op = Some(cpu.as_secs_f64() * 1e6 / ops as f64);
    }
}

/// A spinner showing a live counter while the measured phase runs.
fn ticker(ctx: &Ctx, what: &'static str, counter: Arc<AtomicU64>, secs: f64) -> Option<tokio::task::JoinHandle<()>> {
    if !ctx.progress {
        return None;
    }
    let pb = ProgressBar::new((secs * 10.0) as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {elapsed}").expect("valid template").progress_chars("=> "),
    );
    Some(tokio::spawn(async move {
        loop {
            pb.set_message(format!("{what}: {}", counter.load(Ordering::Relaxed)));
            pb.inc(1);
            if pb.position() >= pb.length().unwrap_or(0) {
                pb.finish_and_clear();
                return;
            }
            sleep(Duration::from_millis(100)).await;
        }
    }))
}

/// Opens one socket per identity (`tabs` per conversation), `concurrency` at a time.
async fn open_all(ctx: &Ctx, idents: &[Ident], tabs: usize, errors: &mut Errors) -> Vec<Option<(Conn, i64)>> {
    let n = idents.len() * tabs;
    let pb = bar(ctx, n as u64, "connecting");
    let target = &ctx.target;
    let t = ctx.timeout;
    let results: Vec<Result<(Conn, i64), Failure>> = stream::iter(0..n)
        .map(|i| {
            let pb = pb.clone();
            async move {
                let r = conn::open(target, i, &idents[i / tabs], None, t).await;
                pb.inc(1);
                r
            }
        })
        .buffered(ctx.args.concurrency.max(1))
        .collect()
        .await;
    pb.finish_and_clear();
    results
        .into_iter()
        .map(|r| match r {
            Ok(ws) => Some(ws),
            Err(f) => {
                errors.add(f.key());
                None
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// connect

async fn connect(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let workers = ctx.args.concurrency.max(1);
    // Each worker reuses one conversation; half the per-user cap per user leaves room for
    // sockets the server is still tearing down.
    let per_user = ctx.args.conns_per_user.unwrap_or(if ctx.spawned.is_some() { 1000 } else { 20 });
    let saved = ctx.args.conns_per_user.replace((per_user / 2).max(1));
    let idents = identities(ctx, workers, 1).await?;
    ctx.args.conns_per_user = saved;
    let mut report = base_report(ctx, "connect", &idents);
    let warm = Duration::from_secs_f64(ctx.args.warmup);
    let dur = Duration::from_secs_f64(ctx.args.duration);
    let begin = Instant::now() + warm;
    let end = begin + dur;
    let cpu = server_cpu_during(ctx, begin, end);
    let counter = Arc::new(AtomicU64::new(0));
    let tick = ticker(ctx, "connects", counter.clone(), ctx.args.warmup + ctx.args.duration);
    let mut handles = Vec::new();
    for (w, ident) in idents.into_iter().enumerate() {
        let target = ctx.target.clone();
        let counter = counter.clone();
        let t = ctx.timeout;
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut i = w;
            while Instant::now() < end {
                let t0 = Instant::now();
                match conn::open(&target, i, &ident, None, t).await {
                    Ok((ws, _)) => {
                        let took = t0.elapsed();
                        if t0 >= begin && Instant::now() <= end {
                            tally.ops += 1;
                            tally.latency.record(took);
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        conn::close(ws).await;
                    }
                    Err(f) => {
                        tally.errors.add(f.key());
                        sleep(Duration::from_millis(10)).await;
                    }
                }
                i += workers;
            }
            tally
        }));
    }
    let mut tally = Tally::default();
    for h in handles {
        tally.merge(&h.await?);
    }
    if let Some(t) = tick {
        t.abort();
    }
    report.connections = workers;
    report.connected = workers;
    report.duration_s = dur.as_secs_f64();
    finish(&mut report, &tally, "connects", dur.as_secs_f64());
    finish_cpu(&mut report, cpu, dur).await;
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// idle

pub async fn server_rss(ctx: &Ctx) -> Option<u64> {
    if let Some(pid) = ctx.server_pid {
        return server::rss_kib(pid);
    }
    match &ctx.args.metrics_url {
        Some(u) => server::metrics_rss_kib(u).await,
        None => None,
    }
}

async fn idle(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let n = ctx.args.connections;
    let idents = identities(ctx, n, 1).await?;
    // Let the setup's allocations settle before the baseline.
    sleep(Duration::from_millis(500)).await;
    let before = server_rss(ctx).await;
    let mut errors = Errors::default();
    let sockets = open_all(ctx, &idents, 1, &mut errors).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let alive = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for (mut ws, _) in sockets.into_iter().flatten() {
        let mut stop = stop_rx.clone();
        let alive = alive.clone();
        alive.fetch_add(1, Ordering::Relaxed);
        handles.push(tokio::spawn(async move {
            // Reading answers the server's heartbeat pings.
            let r = tokio::select! {
                f = conn::hold(&mut ws) => Some(f),
                _ = stop.changed() => None,
            };
            match r {
                None => {
                    conn::close(ws).await;
                    None
                }
                Some(Ok(f)) => {
                    alive.fetch_sub(1, Ordering::Relaxed);
                    Some(Failure::Wrong(format!("unexpected {} on an idle socket", conn::frame_name(&f))).key())
                }
                Some(Err(f)) => {
                    alive.fetch_sub(1, Ordering::Relaxed);
                    Some(f.key())
                }
            }
        }));
    }
    let hold = Duration::from_secs_f64(ctx.args.duration.max(1.0));
    let t0 = Instant::now();
    sleep(hold).await;
    let after = server_rss(ctx).await;
    let held = alive.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for h in handles {
        if let Some(k) = h.await? {
            errors.add(k);
        }
    }
    let mut report = base_report(ctx, "idle", &idents);
    report.connected = held;
    report.duration_s = t0.elapsed().as_secs_f64();
    report.server_rss_before_kib = before;
    report.server_rss_after_kib = after;
    if let (Some(b), Some(a)) = (before, after) {
        if held > 0 {
            report.server_kib_per_connection = Some((a as f64 - b as f64) / held as f64);
        }
    }
    report.errors = errors.0.clone();
    report.error_total = errors.total();
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// chat and fanout

/// Content of message `k` of connection `conn`: names itself and carries its send time (µs since
/// the run's epoch) so every tab can time it; padded to `bytes`.
fn payload(conn: usize, k: u64, epoch: Instant, bytes: usize) -> String {
    let mut s = format!("{conn}-{k}|{}|", epoch.elapsed().as_micros());
    while s.len() < bytes {
        s.push('x');
    }
    s
}

fn sent_at(content: &str, epoch: Instant) -> Option<Instant> {
    let us: u64 = content.split('|').nth(1)?.parse().ok()?;
    Some(epoch + Duration::from_micros(us))
}

struct Window {
    epoch: Instant,
    begin: Instant,
    end: Instant,
    timeout: Duration,
}

async fn frame(ws: &mut Conn, t: Duration) -> Result<Frame, Failure> {
    timeout(t, conn::next_frame(ws)).await.unwrap_or(Err(Failure::Timeout))
}

/// The sending socket of a conversation: one message outstanding, every answer checked.
async fn sender(
    mut ws: Conn,
    mut last_seq: i64,
    conn: usize,
    bytes: usize,
    w: Arc<Window>,
    counter: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    let mut k = 0;
    let r: Result<(), Failure> = async {
        while Instant::now() < w.end {
            k += 1;
            let cid = format!("b{conn}-{k}");
            let content = payload(conn, k, w.epoch, bytes);
            let t0 = Instant::now();
            conn::send_message(&mut ws, &cid, &content).await?;
            let ack = match frame(&mut ws, w.timeout).await? {
                Frame::Ack { client_id, message, duplicate } => {
                    if client_id != cid || duplicate {
                        return Err(Failure::Wrong("ack for another client_id or a duplicate".into()));
                    }
                    check(&message, last_seq + 1, "user", &content)?;
                    message
                }
                Frame::Error { code } => return Err(Failure::ErrorFrame(code)),
                other => return Err(Failure::Wrong(format!("expected ack, got {}", conn::frame_name(&other)))),
            };
            let t_ack = t0.elapsed();
            match frame(&mut ws, w.timeout).await? {
                Frame::Message { message } => {
                    check(&message, last_seq + 2, "bot", &content)?;
                    if message.in_reply_to.as_deref() != Some(ack.id.as_str()) {
                        return Err(Failure::Wrong("in_reply_to is not the acked message".into()));
                    }
                }
                Frame::Error { code } => return Err(Failure::ErrorFrame(code)),
                other => {
                    return Err(Failure::Wrong(format!("expected the bot reply, got {}", conn::frame_name(&other))))
                }
            }
            last_seq += 2;
            let now = Instant::now();
            if t0 >= w.begin && now <= w.end {
                tally.ops += 1;
                tally.latency.record(now - t0);
                tally.ack_latency.record(t_ack);
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    .await;
    match r {
        Ok(()) => conn::close(ws).await,
        Err(f) => tally.errors.add(f.key()),
    }
    tally
}

fn check(m: &Msg, seq: i64, role: &str, content: &str) -> Result<(), Failure> {
    if m.seq != seq {
        return Err(Failure::Wrong(format!("seq {} where {seq} was due", m.seq)));
    }
    if m.role != role {
        return Err(Failure::Wrong(format!("role {} where {role} was due", m.role)));
    }
    if m.content != content {
        return Err(Failure::Wrong("content differs from what was sent".into()));
    }
    Ok(())
}

/// A watching tab: every message of the conversation, in seq order, the bot reply equal to the
/// user message it answers. Counts the bot replies it sees.
async fn watcher(mut ws: Conn, mut last_seq: i64, w: Arc<Window>, counter: Arc<AtomicU64>) -> Tally {
    let mut tally = Tally::default();
    let mut pending: Option<(String, String)> = None; // (user message id, content)
    let r: Result<(), Failure> = async {
        loop {
            let f = tokio::select! {
                f = frame(&mut ws, w.timeout) => f?,
                _ = sleep_until(w.end.into()) => return Ok(()),
            };
            let Frame::Message { message: m } = f else {
                return Err(Failure::Wrong(format!("a tab got {}", conn::frame_name(&f))));
            };
            if m.seq != last_seq + 1 {
                return Err(Failure::Wrong(format!("seq {} where {} was due", m.seq, last_seq + 1)));
            }
            last_seq = m.seq;
            match m.role.as_str() {
                "user" => pending = Some((m.id, m.content)),
                "bot" => {
                    let Some((id, content)) = pending.take() else {
                        return Err(Failure::Wrong("a bot reply without a user message".into()));
                    };
                    if m.in_reply_to.as_deref() != Some(id.as_str()) || m.content != content {
                        return Err(Failure::Wrong("a tab's bot reply does not answer the message".into()));
                    }
                    let now = Instant::now();
                    if let Some(t0) = sent_at(&content, w.epoch) {
                        if t0 >= w.begin && now <= w.end {
                            tally.ops += 1;
                            tally.latency.record(now - t0);
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                other => return Err(Failure::Wrong(format!("role {other}"))),
            }
        }
    }
    .await;
    match r {
        Ok(()) => conn::close(ws).await,
        Err(f) => tally.errors.add(f.key()),
    }
    tally
}

async fn chat(ctx: &mut Ctx, tabs: usize) -> anyhow::Result<Report> {
    let n = ctx.args.connections;
    let conversations = (n / tabs).max(1);
    let idents = identities(ctx, conversations, tabs).await?;
    let mut tally = Tally::default();
    let sockets = open_all(ctx, &idents, tabs, &mut tally.errors).await;
    let connected = sockets.iter().filter(|s| s.is_some()).count();
    let now = Instant::now();
    let begin = now + Duration::from_secs_f64(ctx.args.warmup);
    let dur = Duration::from_secs_f64(ctx.args.duration);
    let w = Arc::new(Window { epoch: now, begin, end: begin + dur, timeout: ctx.timeout });
    let cpu = server_cpu_during(ctx, begin, begin + dur);
    let counter = Arc::new(AtomicU64::new(0));
    let name = if tabs == 1 { "round trips" } else { "replies delivered" };
    let tick = ticker(ctx, name, counter.clone(), ctx.args.warmup + ctx.args.duration);
    let mut handles = Vec::new();
    for (i, s) in sockets.into_iter().enumerate() {
        let Some((ws, last_seq)) = s else { continue };
        let (w, c) = (w.clone(), counter.clone());
        handles.push(if i % tabs == 0 {
            tokio::spawn(sender(ws, last_seq, i, ctx.args.message_bytes, w, c))
        } else {
            tokio::spawn(watcher(ws, last_seq, w, c))
        });
    }
    for h in handles {
        tally.merge(&h.await?);
    }
    if let Some(t) = tick {
        t.abort();
    }
    let mut report = base_report(ctx, if tabs == 1 { "chat" } else { "fanout" }, &idents);
    report.connected = connected;
    report.duration_s = dur.as_secs_f64();
    report.message_bytes = Some(ctx.args.message_bytes);
    report.tabs = (tabs > 1).then_some(tabs);
    finish(&mut report, &tally, name, dur.as_secs_f64());
    finish_cpu(&mut report, cpu, dur).await;
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// storm

/// What one storm client saw, checked against what it sent.
#[derive(Default)]
struct Book {
    last_seq: i64,
    /// client_id → content, for every message sent.
    sent: HashMap<String, String>,
    /// client_id → stored user message id.
    stored: HashMap<String, String>,
    /// user message id → its content.
    user_content: HashMap<String, String>,
    /// user message id → bot replies seen.
    replies: HashMap<String, u32>,
    lost: u64,
    doubled: u64,
    wrong: Errors,
}

impl Book {
    /// A frame carrying a stored message. `dup_ack`: an ack with `duplicate: true`, which may
    /// repeat a seq the client has.
    fn accept(&mut self, m: Msg, dup_ack: bool) {
        if m.seq <= self.last_seq {
            if !dup_ack {
                self.doubled += 1;
            }
            return;
        }
        if m.seq > self.last_seq + 1 {
            self.lost += (m.seq - self.last_seq - 1) as u64;
        }
        self.last_seq = m.seq;
        match m.role.as_str() {
            "user" => {
                let cid = m.client_id.clone().unwrap_or_default();
                if self.sent.get(&cid) != Some(&m.content) {
                    self.wrong.add(Failure::Wrong("stored user message differs from what was sent".into()).key());
                }
                if self.stored.insert(cid, m.id.clone()).is_some() {
                    self.doubled += 1;
                }
                self.user_content.insert(m.id, m.content);
            }
            "bot" => {
                let irt = m.in_reply_to.unwrap_or_default();
                if self.user_content.get(&irt) != Some(&m.content) {
                    self.wrong.add(Failure::Wrong("bot reply does not echo its message".into()).key());
                }
                let n = self.replies.entry(irt).or_default();
                *n += 1;
                if *n > 1 {
                    self.doubled += 1;
                }
            }
            other => self.wrong.add(Failure::Wrong(format!("role {other}")).key()),
        }
    }

    fn answered(&self, cid: &str) -> bool {
        self.stored.get(cid).is_some_and(|id| self.replies.contains_key(id))
    }

    /// At the end: sent but never stored, stored but never answered.
    fn settle(&mut self) {
        for cid in self.sent.keys() {
            match self.stored.get(cid) {
                None => self.lost += 1,
                Some(id) if !self.replies.contains_key(id) => self.lost += 1,
                Some(_) => {}
            }
        }
    }
}

struct StormShared {
    epoch: Instant,
    interval: Duration,
    timeout: Duration,
    /// Set when the server is told to stop; clients count as back once they reconnect after it.
    restarted: AtomicU64,
    back: AtomicUsize,
    sent: AtomicU64,
}

struct StormOutcome {
    book: Book,
    back_at: Option<Instant>,
    attempts: u64,
    closes: Errors,
    errors: Errors,
}

/// How long after a 1012 the backoff stays short, as the web client does (`RESTART_BACKOFF`).
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Full-jitter exponential backoff, as the web client does: base 500 ms, cap 30 s, or 2 s while
/// the server is restarting (within [`RESTART_WINDOW`] of its 1012).
fn backoff(attempt: u32, restarting: bool) -> Duration {
    let cap: f64 = if restarting { 2_000.0 } else { 30_000.0 };
    let ceiling = cap.min(500.0 * 2f64.powi(attempt.min(30) as i32));
    Duration::from_millis(rand::rng().random_range(0.0..ceiling) as u64)
}

/// The wait a server's `retry_after_ms` hint asks for, as the web client does: the hint plus up
/// to a tenth of it (at most 1 s) of jitter.
fn after_hint(ms: u64) -> Duration {
    let jitter = rand::rng().random_range(0.0..(ms as f64 / 10.0 + 1.0).min(1_000.0));
    Duration::from_millis(ms + jitter as u64)
}

async fn storm_client(
    target: conn::Target,
    i: usize,
    ident: Ident,
    first: (Conn, i64),
    sh: Arc<StormShared>,
    mut stop: watch::Receiver<bool>,
    give_up: Instant,
) -> StormOutcome {
    let mut out = StormOutcome {
        book: Book::default(),
        back_at: None,
        attempts: 0,
        closes: Errors::default(),
        errors: Errors::default(),
    };
    let (mut ws, last) = first;
    out.book.last_seq = last;
    let mut outstanding: Option<(String, String)> = None;
    let mut k = 0u64;
    let mut reconnected = false;
    // Spread the clients' sends over the interval.
    let mut next_send = Instant::now() + sh.interval.mul_f64(rand::rng().random_range(0.0..1.0));
    loop {
        // One session: until the server closes the socket, or the run ends.
        let ended: Result<(), Failure> = async {
            if let Some((cid, content)) = &outstanding {
                // A resend after reconnecting: same client_id, so nothing is doubled.
                conn::send_message(&mut ws, cid, content).await?;
            }
            loop {
                if reconnected && out.back_at.is_none() && outstanding.is_none() {
                    out.back_at = Some(Instant::now());
                    sh.back.fetch_add(1, Ordering::Relaxed);
                }
                let stopping = *stop.borrow();
                if stopping && outstanding.is_none() {
                    return Ok(());
                }
                if !stopping && outstanding.is_none() && Instant::now() >= next_send {
                    k += 1;
                    let cid = format!("s{i}-{k}");
                    let content = payload(i, k, sh.epoch, 64);
                    out.book.sent.insert(cid.clone(), content.clone());
                    sh.sent.fetch_add(1, Ordering::Relaxed);
                    conn::send_message(&mut ws, &cid, &content).await?;
                    outstanding = Some((cid, content));
                    next_send = Instant::now() + sh.interval;
                }
                let wake = if outstanding.is_some() { Instant::now() + sh.timeout } else { next_send };
                let f = tokio::select! {
                    f = conn::next_frame(&mut ws) => f?,
                    _ = sleep_until(wake.into()) => {
                        if outstanding.is_some() {
                            return Err(Failure::Timeout);
                        }
                        continue;
                    }
                    _ = stop.changed(), if !stopping => continue,
                };
                match f {
                    Frame::Ack { message, duplicate, .. } => out.book.accept(message, duplicate),
                    Frame::Message { message } => out.book.accept(message, false),
                    Frame::Error { code } => return Err(Failure::ErrorFrame(code)),
                    other => return Err(Failure::Wrong(format!("unexpected {}", conn::frame_name(&other)))),
                }
                if outstanding.as_ref().is_some_and(|(cid, _)| out.book.answered(cid)) {
                    outstanding = None;
                }
            }
        }
        .await;
        // A 1012: come back at the server's hint, then with the short backoff while it restarts.
        let mut hint = None;
        let mut restarting_until = None;
        match ended {
            Ok(()) => {
                conn::close(ws).await;
                break;
            }
            Err(f @ (Failure::Closed(_) | Failure::Restarting(_))) => {
                out.closes.add(f.key());
                if let Failure::Restarting(h) = f {
                    hint = h;
                    restarting_until = Some(Instant::now() + RESTART_WINDOW);
                }
            }
            Err(f) => {
                out.errors.add(f.key());
                break;
            }
        }
        // Reconnect with backoff and resume after the last seq seen.
        reconnected = sh.restarted.load(Ordering::Relaxed) > 0;
        let mut attempt = 0;
        loop {
            let restarting = restarting_until.is_some_and(|t| Instant::now() < t);
            sleep(hint.take().map_or_else(|| backoff(attempt, restarting), after_hint)).await;
            out.attempts += 1;
            let after = (out.book.last_seq > 0).then_some(out.book.last_seq);
            match conn::open(&target, i, &ident, after, sh.timeout).await {
                Ok((w, server_last)) => {
                    if server_last < out.book.last_seq {
                        out.book.lost += (out.book.last_seq - server_last) as u64;
                    }
                    ws = w;
                    break;
                }
                Err(f) => {
                    if !matches!(
                        f,
                        Failure::Connect(_)
                            | Failure::Closed(_)
                            | Failure::Restarting(_)
                            | Failure::Handshake(_)
                            | Failure::Timeout
                    ) {
                        out.errors.add(f.key());
                    }
                    if Instant::now() > give_up {
                        out.book.settle();
                        return out;
                    }
                    attempt += 1;
                }
            }
        }
    }
    out.book.settle();
    out
}

async fn storm(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let n = ctx.args.connections;
    let idents = identities(ctx, n, 1).await?;
    let mut errors = Errors::default();
    let sockets = open_all(ctx, &idents, 1, &mut errors).await;
    let connected = sockets.iter().filter(|s| s.is_some()).count();
    let sh = Arc::new(StormShared {
        epoch: Instant::now(),
        interval: Duration::from_millis(ctx.args.storm_interval_ms.max(1)),
        timeout: ctx.timeout,
        restarted: AtomicU64::new(0),
        back: AtomicUsize::new(0),
        sent: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let give_up = Instant::now() + Duration::from_secs_f64(ctx.args.storm_after + ctx.args.storm_timeout);
    let mut handles = Vec::new();
    for (i, s) in sockets.into_iter().enumerate() {
        let Some(first) = s else { continue };
        let (target, ident, sh, stop) = (ctx.target.clone(), idents[i].clone(), sh.clone(), stop_rx.clone());
        handles.push(tokio::spawn(storm_client(target, i, ident, first, sh, stop, give_up)));
    }
    let t0 = Instant::now();
    sleep(Duration::from_secs_f64(ctx.args.storm_after)).await;
    let spawned = ctx.spawned.as_mut().expect("storm runs with --spawn");
    let successor_ready = if ctx.args.storm_handover { Some(spawned.start_successor().await?) } else { None };
    let stopped_at = Instant::now();
    sh.restarted.store(1, Ordering::Relaxed);
    let (stopping, server_down) = if successor_ready.is_some() {
        // The new process has been answering since before the stop signal: nothing refused.
        (spawned.stop_predecessor().await, Duration::ZERO)
    } else {
        (spawned.restart(ctx.args.storm_kill).await?, stopped_at.elapsed())
    };
    let pb = bar(ctx, connected as u64, "back");
    let deadline = stopped_at + Duration::from_secs_f64(ctx.args.storm_timeout);
    while sh.back.load(Ordering::Relaxed) < connected && Instant::now() < deadline {
        pb.set_position(sh.back.load(Ordering::Relaxed) as u64);
        sleep(Duration::from_millis(20)).await;
    }
    pb.finish_and_clear();
    // A little more chat after everyone is back, then stop sending and let replies land.
    sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    let mut closes = Errors::default();
    let (mut lost, mut doubled, mut attempts, mut not_back) = (0, 0, 0, 0);
    let mut last_back: Option<Instant> = None;
    for h in handles {
        let o = h.await?;
        lost += o.book.lost;
        doubled += o.book.doubled;
        attempts += o.attempts;
        closes.merge(&o.closes);
        errors.merge(&o.errors);
        errors.merge(&o.book.wrong);
        match o.back_at {
            Some(b) => last_back = Some(last_back.map_or(b, |l: Instant| l.max(b))),
            None => not_back += 1,
        }
    }
    let mut report = base_report(ctx, "storm", &idents);
    report.connected = connected;
    report.duration_s = t0.elapsed().as_secs_f64();
    report.message_bytes = Some(64);
    report.storm = Some(StormReport {
        clients: connected,
        restarts: 1,
        restart: if ctx.args.storm_handover {
            "hand-over"
        } else if ctx.args.storm_kill {
            "sigkill"
        } else {
            "sigterm"
        },
        successor_ready_ms: successor_ready.map(|d| d.as_secs_f64() * 1000.0),
        server_down_ms: server_down.as_secs_f64() * 1000.0,
        server_stop_ms: stopping.as_secs_f64() * 1000.0,
        all_back_ms: (not_back == 0).then(|| last_back.map_or(0.0, |b| (b - stopped_at).as_secs_f64() * 1000.0)),
        not_back,
        messages_sent: sh.sent.load(Ordering::Relaxed),
        lost,
        doubled,
        reconnect_attempts: attempts,
        closes: closes.0,
    });
    report.errors = errors.0.clone();
    report.error_total = errors.total();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: i64, role: &str, id: &str, content: &str, cid: Option<&str>, irt: Option<&str>) -> Msg {
        Msg {
            id: id.into(),
            seq,
            role: role.into(),
            content: content.into(),
            client_id: cid.map(Into::into),
            in_reply_to: irt.map(Into::into),
        }
    }

    #[test]
    fn the_book_finds_gaps_doubles_and_unanswered_messages() {
        let mut b = Book::default();
        b.sent.insert("a".into(), "hi".into());
        b.sent.insert("b".into(), "yo".into());
        b.sent.insert("c".into(), "never stored".into());
        b.accept(msg(1, "user", "u1", "hi", Some("a"), None), false);
        b.accept(msg(2, "bot", "r1", "hi", None, Some("u1")), false);
        assert!(b.answered("a"));
        // A duplicate ack repeats seq 1: fine. The replay of seq 2 again: doubled.
        b.accept(msg(1, "user", "u1", "hi", Some("a"), None), true);
        b.accept(msg(2, "bot", "r1", "hi", None, Some("u1")), false);
        assert_eq!(b.doubled, 1);
        // Seq 3 is skipped: lost.
        b.accept(msg(4, "user", "u2", "yo", Some("b"), None), false);
        assert_eq!(b.lost, 1);
        assert!(!b.answered("b"));
        b.settle();
        // b unanswered, c never stored.
        assert_eq!(b.lost, 3);
        assert_eq!(b.wrong.total(), 0);
    }

    #[test]
    fn payload_has_its_size_and_send_time() {
        let epoch = Instant::now();
        let p = payload(3, 7, epoch, 64);
        assert_eq!(p.len(), 64);
        assert!(p.starts_with("3-7|"));
        assert!(sent_at(&p, epoch).is_some_and(|t| t >= epoch));
        for a in 0..20 {
            assert!(backoff(a, false) <= Duration::from_secs(30));
            assert!(backoff(a, true) <= Duration::from_secs(2), "short while the server restarts");
        }
        let waited = after_hint(5_000);
        assert!(waited >= Duration::from_millis(5_000) && waited <= Duration::from_millis(5_501), "{waited:?}");
    }
}
