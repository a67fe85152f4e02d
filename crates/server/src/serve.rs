//! The HTTP transport: the accept loop and each connection's HTTP/1.1 handling, with the
//! limits a client meets before any handler runs (issue 14: silent sockets used to stay open
//! for ever, and with a low open-file limit they made `/api/health` unanswerable).
//!
//! - **Header timeout** (`--http-header-timeout-ms`): hyper's `header_read_timeout`, which
//!   only works with a timer (axum::serve sets none, so it was off). Its clock runs whenever
//!   hyper waits for a request head: a new connection, and between the requests of a
//!   kept-alive one — so it is also the keep-alive idle timeout.
//! - **Idle timeout** (`--http-idle-timeout-ms`): no byte either way for this long closes the
//!   connection — a stalled request body, a client that stops reading its response. A
//!   connection upgraded to a WebSocket leaves this task (hyper hands the socket to the
//!   session, which has its heartbeat), so sockets are never cut by it.
//! - **Connection bound** (`--max-http-connections`): the loop takes a permit before it
//!   accepts; at the bound it stops accepting and the kernel's backlog holds new connections
//!   until one closes (a client sees a slow connect, not an error). Upgraded WebSockets give
//!   their permit back (`--max-connections` bounds those).
//! - **Accept errors** (EMFILE, ENFILE, ENOBUFS…): logged once per episode, then the loop
//!   backs off (5 ms doubling to 500 ms) while open connections go on being served; the
//!   first accept that works again ends the episode with one line saying how many failed.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// The limits of [`serve`] (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Transport {
    pub fn from_limits(limits: &crate::config::Limits) -> Self {
        Transport {
            header_timeout: limits.http_header_timeout,
            idle_timeout: limits.http_idle_timeout,
            max_connections: limits.max_http_connections,
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Serves `app` on `listener` until `stop` is cancelled: then drops the listener at once
/// (with `--reuse-port` a new process takes every new connection), asks each HTTP connection
/// to finish its request in flight and close, and returns when they have.
pub async fn serve(listener: TcpListener, app: Router, transport: Transport, stop: CancellationToken) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(transport.header_timeout);
    let http = Arc::new(http);
    let permits = Arc::new(Semaphore::new(transport.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut backoff = BACKOFF_MIN;
    let mut failed: u64 = 0;
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stop.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => break,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            // The peer gave up before we accepted: nothing to do, nothing is wrong here.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if failed == 0 {
                    tracing::error!(error = %e, "cannot accept connections; backing off, open connections are still served");
                }
                failed += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if failed > 0 {
            tracing::warn!(failed_accepts = failed, "accepting connections again");
            failed = 0;
            backoff = BACKOFF_MIN;
        }
        // No Nagle: an ack and its bot reply are two small writes; with Nagle the second waits
        // for the client's delayed ACK (~40 ms on Linux) — docs/performance.md.
        let _ = tcp.set_nodelay(true);
        let (http, app, stop) = (http.clone(), app.clone(), stop.clone());
        connections.spawn(async move {
            connection(&http, tcp, remote, app, transport.idle_timeout, stop).await;
            drop(permit);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// One HTTP connection, until it closes or is upgraded.
async fn connection(
    http: &hyper::server::conn::http1::Builder,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    app: Router,
    idle_timeout: Duration,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let last_io = Arc::new(AtomicU64::new(0));
    let io = Tracked { inner: tcp, started, last_io: last_io.clone() };
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(remote));
        let mut app = app.clone();
        async move { Ok::<_, Infallible>(app.call(req).await.unwrap_or_else(|e| match e {})) }
    });
    let mut conn = pin!(http.serve_connection(TokioIo::new(io), service).with_upgrades());
    let mut idle = pin!(tokio::time::sleep(idle_timeout));
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %remote, "HTTP connection ended");
                }
                return;
            }
            _ = stop.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = idle.as_mut() => {
                let last = started + Duration::from_millis(last_io.load(Ordering::Relaxed));
                let quiet = last.elapsed();
                if quiet >= idle_timeout {
                    tracing::debug!(%remote, idle_ms = quiet.as_millis() as u64, "closing an idle HTTP connection");
                    return;
                }
                idle.as_mut().reset(last + idle_timeout);
            }
        }
    }
}

/// A TCP stream that notes when a byte last moved (milliseconds since `started`), for the
/// idle timeout. It stays under an upgraded WebSocket, where nothing reads the note.
struct Tracked {
    inner: tokio::net::TcpStream,
    started: Instant,
    last_io: Arc<AtomicU64>,
}

impl Tracked {
    fn touch(&self) {
        self.last_io.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Errors about one connection that went away before it was accepted, not about the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}
