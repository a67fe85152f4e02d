//! The frames waiting for a client ([`Conn`]): a bounded queue in front of the transport,
//! written in batches by the session's own task — no second task, no channel, no split lock.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{ready, Context, Poll};

use super::transport::{End, Inbound, Out, Transport, WriteFailed};

/// At most this many queued frames are written with one flush.
pub const WRITE_BATCH: usize = 32;

/// With this many frames queued the loop writes before it reads anything else: the bound on
/// how long a busy connection's replies wait (issue 15, item 6).
pub const WRITE_SOON: usize = 16;

/// The transport and the frames waiting for it. At most `cap` frames wait here; what is
/// handed to the transport sits in its write buffer until it is flushed.
pub struct Conn<T> {
    pub transport: T,
    pub queue: VecDeque<Out>,
    cap: usize,
    /// Frames were handed to the transport since its last flush.
    unflushed: bool,
    /// A close frame was handed to the transport: nothing is written after it.
    closed: bool,
    /// The last write stopped at a full transport: the loop writes on as soon as it is writable.
    pub blocked: bool,
}

/// What the transport had for the session loop.
pub enum Io<X> {
    Read(Result<Inbound<X>, End>),
    WriteFailed,
}

impl<T: Transport> Conn<T> {
    pub fn new(transport: T, cap: usize) -> Self {
        Conn { transport, queue: VecDeque::new(), cap: cap.max(1), unflushed: false, closed: false, blocked: false }
    }

    pub fn is_full(&self) -> bool {
        self.queue.len() >= self.cap
    }

    /// Frames wait to be written or flushed.
    pub fn has_output(&self) -> bool {
        !self.queue.is_empty() || self.unflushed
    }

    /// Hands queued frames to the transport, [`WRITE_BATCH`] per flush, until the queue is
    /// empty and flushed (`Ready(Ok)`) or the transport takes no more for now (`Pending`).
    pub fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        let r = self.poll_write_inner(cx);
        self.blocked = r.is_pending();
        r
    }

    fn poll_write_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        loop {
            let mut fed = 0;
            while fed < WRITE_BATCH && !self.closed && !self.queue.is_empty() {
                ready!(self.transport.poll_ready(cx))?;
                let Some(out) = self.queue.pop_front() else { break };
                let close = matches!(out, Out::Close(_));
                self.transport.start_send(out)?;
                self.unflushed = true;
                self.closed = close;
                fed += 1;
            }
            if self.unflushed {
                ready!(self.transport.poll_flush(cx))?;
                self.unflushed = false;
            }
            if self.queue.is_empty() || self.closed {
                // An idle connection keeps no queue (an allocation per batch written).
                if self.queue.is_empty() {
                    self.queue = VecDeque::new();
                }
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// The session loop's view of the transport: reads, and goes on writing if the last write
    /// found it full. (Otherwise the loop writes once nothing else is ready, as a writer task
    /// would: an ack and the bot reply behind it go out in one write.)
    pub fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Io<T::Text>> {
        if self.blocked && matches!(self.poll_write(cx), Poll::Ready(Err(_))) {
            return Poll::Ready(Io::WriteFailed);
        }
        self.transport.poll_recv(cx).map(Io::Read)
    }

    /// Writes for as long as the transport takes frames without waiting.
    pub async fn write_now(&mut self) -> Result<(), End> {
        poll_fn(|cx| match self.poll_write(cx) {
            Poll::Ready(Err(_)) => Poll::Ready(Err(End::Network("socket write failed".into()))),
            _ => Poll::Ready(Ok(())),
        })
        .await
    }

    /// Writes until the queue has room.
    pub async fn room(&mut self) -> Result<(), WriteFailed> {
        poll_fn(|cx| match self.poll_write(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending if !self.is_full() => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        })
        .await
    }

    /// A close the client already sent (waiting unread in a buffer), with its code: after a
    /// failed write it tells that the client ended the connection, not the network.
    pub fn buffered_close(&mut self) -> Option<Option<u16>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            match self.transport.poll_recv(&mut cx) {
                Poll::Ready(Ok(Inbound::Close(c))) => return Some(c),
                Poll::Ready(Ok(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Reads until the client's close (or the end of the connection): frames after a close
    /// are not the session's any more.
    pub async fn until_client_close(&mut self) {
        while let Ok(frame) = poll_fn(|cx| self.transport.poll_recv(cx)).await {
            if matches!(frame, Inbound::Close(_)) {
                break;
            }
        }
    }

    /// Reads one frame and drops it: lets the transport answer a client's close.
    pub async fn read_one(&mut self) {
        let _ = poll_fn(|cx| self.transport.poll_recv(cx)).await;
    }

    /// Writes until everything queued is written and flushed.
    pub async fn drain(&mut self) -> Result<(), WriteFailed> {
        poll_fn(|cx| self.poll_write(cx)).await
    }
}
