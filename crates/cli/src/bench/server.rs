//! The server side of a bench run: a `natter serve` the bench starts itself (`--spawn`, needed
//! by `storm`, which restarts it), and the server's memory (`/proc/PID/status` or a metrics URL).

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Limits a spawned server is started with, so one bench client isn't refused by the per-user
/// connection cap (20), the per-connection rate limits (5 messages/s, 20 frames/s) or the
/// per-user one (10 messages/s): the bench measures the server,
/// not its abuse protection. Flags given with `--server-arg` come after these and win.
pub const RAISED_LIMITS: &[&str] = &[
    "--max-connections-per-user",
    "1000000",
    "--messages-per-second",
    "1000000",
    "--message-burst",
    "1000000",
    "--user-messages-per-second",
    "1000000",
    "--user-message-burst",
    "1000000",
    "--frames-per-second",
    "1000000",
    "--frame-burst",
    "1000000",
    "--access-token-ttl-secs",
    "86400",
];

pub struct Spawned {
    child: Option<Child>,
    /// During a hand-over restart: the old process, still serving until it is stopped.
    predecessor: Option<Child>,
    pub addr: SocketAddr,
    bin: PathBuf,
    args: Vec<String>,
    cpus: Option<String>,
    data_dir: tempfile::TempDir,
}

impl Spawned {
    /// Starts `bin serve` on a free loopback port with a temporary data dir and waits until it
    /// answers `/api/health`.
    pub async fn start(bin: PathBuf, extra: &[String], cpus: Option<String>) -> anyhow::Result<Spawned> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let data_dir = tempfile::Builder::new().prefix("natter-bench-").tempdir()?;
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--bind".into(),
            addr.to_string(),
            "--data-dir".into(),
            data_dir.path().display().to_string(),
            "--log-format".into(),
            "json".into(),
        ];
        args.extend(RAISED_LIMITS.iter().map(|s| s.to_string()));
        args.extend(extra.iter().cloned());
        let mut s = Spawned { child: None, predecessor: None, addr, bin, args, cpus, data_dir };
        s.launch().await?;
        Ok(s)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let log = File::options().create(true).append(true).open(self.data_dir.path().join("server.log"))?;
        let mut cmd = match &self.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(&self.args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            // Access logs for every upgrade would measure the log writer.
            cmd.env("RUST_LOG", "warn");
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(30)).await
    }

    async fn wait_healthy(&mut self, within: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let url = format!("http://{}/api/health", self.addr);
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = client.get(&url).timeout(Duration::from_secs(1)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("the spawned server exited with {st}; see {}", self.log_path().display());
            }
            if Instant::now() > deadline {
                bail!("the spawned server did not become healthy in {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.path().join("server.log")
    }

    /// Stops the server (SIGTERM, or SIGKILL when `hard`) and waits for it to exit.
    pub async fn stop(&mut self, hard: bool) {
        if let Some(child) = self.child.take() {
            terminate(child, hard).await;
        }
    }

    /// Stops and starts the server again on the same port and data dir. Returns how long the
    /// old process took to exit.
    pub async fn restart(&mut self, hard: bool) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        self.stop(hard).await;
        let stopped = t0.elapsed();
        self.launch().await?;
        Ok(stopped)
    }

    /// The first half of a hand-over restart (the server runs with `--reuse-port`): starts a new
    /// process on the same address and data while the old one keeps serving, and waits until
    /// the new one answers `/api/health` with its own node id. Returns how long that took.
    pub async fn start_successor(&mut self) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let old = self.node_id().await.context("the running server has no node_id in /api/health")?;
        self.predecessor = self.child.take();
        self.launch().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        // New connections are spread over both listeners: ask until the new one answers. A
        // failed request (the new process still starting) is no answer from it either.
        loop {
            match self.node_id().await {
                Some(id) if id != old => break,
                _ => {}
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("the new server exited with {st}; see {}", self.log_path().display());
            }
            if Instant::now() > deadline {
                bail!("the new server did not answer on {} within 30 s", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(t0.elapsed())
    }

    /// The second half: SIGTERM to the old process, and wait for it to exit. Returns how long
    /// it took.
    pub async fn stop_predecessor(&mut self) -> Duration {
        let t0 = Instant::now();
        if let Some(child) = self.predecessor.take() {
            terminate(child, false).await;
        }
        t0.elapsed()
    }

    async fn node_id(&self) -> Option<uuid::Uuid> {
        // A new connection per request, so the kernel picks a listener each time.
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().ok()?;
        let url = format!("http://{}/api/health", self.addr);
        let health: natter_proto::api::Health =
            client.get(url).timeout(Duration::from_secs(1)).send().await.ok()?.json().await.ok()?;
        health.node_id
    }
}

/// Signals a server process (SIGTERM, or SIGKILL when `hard`) and waits up to 20 s for it to
/// exit, then kills it.
async fn terminate(mut child: Child, hard: bool) {
    let sig = if hard { libc::SIGKILL } else { libc::SIGTERM };
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        for mut c in self.child.take().into_iter().chain(self.predecessor.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Resident memory of a process, KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    natter_server::metrics::vmrss_kib(&status)
}

/// CPU time a process has used so far, user and system, all threads (`/proc/PID/stat`).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    parse_cpu_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_cpu_time(stat: &str) -> Option<Duration> {
    // The command name, in parentheses, may hold spaces: count fields after it. `utime` and
    // `stime` are fields 14 and 15; the state (field 3) comes first after the name.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Resident memory from a Prometheus endpoint (`process_resident_memory_bytes`), KiB.
pub async fn metrics_rss_kib(url: &str) -> Option<u64> {
    parse_metrics_rss(&reqwest::get(url).await.ok()?.text().await.ok()?)
}

fn parse_metrics_rss(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("process_resident_memory_bytes "))?;
    let bytes: f64 = line.split_whitespace().last()?.parse().ok()?;
    Some((bytes / 1024.0) as u64)
}

/// Raises this process's open-file limit to its hard limit: every socket is a file.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vmrss() {
        use natter_server::metrics::vmrss_kib;
        assert_eq!(vmrss_kib("Name:\tnatter\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\n"), Some(12345));
        assert_eq!(vmrss_kib("Name:\tnatter\n"), None);
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }

    #[test]
    fn reads_cpu_time() {
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_cpu_time(stat), Some(Duration::from_secs_f64(300.0 / hz)));
        assert_eq!(parse_cpu_time("42 (x) S 1"), None);
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(spin.elapsed());
        }
        assert!(cpu_time(std::process::id()).is_some_and(|t| t > Duration::ZERO));
    }

    #[test]
    fn reads_natters_own_metrics() {
        let text = natter_server::metrics::Metrics::default().render();
        let from_metrics = parse_metrics_rss(&text).expect("natter's /metrics has process_resident_memory_bytes");
        let from_proc = rss_kib(std::process::id()).unwrap();
        // Same process, moments apart.
        assert!(from_metrics.abs_diff(from_proc) < from_proc / 2 + 1024, "{from_metrics} vs {from_proc} KiB");
        assert_eq!(parse_metrics_rss("process_resident_memory_bytes 2048\n# EOF\n"), Some(2));
        assert_eq!(parse_metrics_rss("natter_ws_connections_active 3\n"), None);
    }
}
