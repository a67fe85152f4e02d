//! What a session sends of the conversation: stored messages in seq order, each once (gaps
//! filled from the store), and bot replies streamed as deltas, joined mid-reply.

use std::collections::{HashMap, VecDeque};

use natter_proto::{MessageRole, ServerFrame, WireMessage};
use uuid::Uuid;

use super::session::{internal_end, Session};
use super::transport::{End, Out, Transport};
use crate::bus::ConvEvent;

/// Messages read from the store per query while catching up.
const CATCH_UP_PAGE: u32 = 500;
/// How many finished replies a connection remembers.
const FINISHED_MEMORY: usize = 64;

#[derive(Default)]
pub struct Replies {
    /// Bot replies being streamed to this connection.
    streams: HashMap<Uuid, Stream>,
    /// The latest bot replies delivered whole, so a late delta for them is ignored.
    finished: VecDeque<Uuid>,
}

impl Replies {
    /// Deltas wait for room in the queue.
    pub fn has_pending(&self) -> bool {
        self.streams.values().any(|s| !s.pending.is_empty())
    }
}

/// One bot reply being streamed to this connection.
struct Stream {
    in_reply_to: Uuid,
    /// Bytes of the reply's text this connection has been sent or has waiting in `pending`.
    have: usize,
    /// Text not yet sent because the outbound queue was full: it goes out as one coalesced
    /// delta when there is room, so a slow reader gets fewer, larger frames instead of a close.
    pending: String,
    /// A gap in this reply was asked of the node generating it ([`ConvEvent::ReplySync`]) and
    /// not filled yet.
    asked: bool,
}

impl<T: Transport> Session<T> {
    /// Replies being generated right now: what exists so far, then the rest live — from this
    /// node's `Replier`, or asked of the other nodes (they answer with the text so far).
    pub(super) async fn join_replies_in_progress(&mut self) {
        let state = self.state.clone();
        for p in state.replier.in_progress(self.peer.conversation_id) {
            // A reply is stored (and may have just been caught up whole) a moment before it
            // leaves `in_progress`: streaming it again would repeat its text after the message.
            if p.text.is_empty() || self.replies.as_ref().is_some_and(|r| r.finished.contains(&p.message_id)) {
                continue;
            }
            let have = p.text.len();
            let stream = Stream { in_reply_to: p.in_reply_to, have, pending: p.text, asked: false };
            self.replies.get_or_insert_default().streams.insert(p.message_id, stream);
        }
        if state.bus.shared() {
            let ask = ConvEvent::ReplySync { message_id: None };
            if let Err(e) = state.bus.publish(self.peer.conversation_id, ask).await {
                tracing::debug!(error = %e, "asking for replies in progress failed");
            }
        }
    }

    /// Sends every stored message with `delivered < seq <= upto`.
    pub(super) async fn fill_to(&mut self, upto: i64) -> Result<(), End> {
        let conv = self.peer.conversation_id;
        while self.delivered < upto {
            // What is queued goes out while the store is read.
            self.io.write_now().await?;
            let page = self
                .state
                .store
                .messages_after(conv, self.delivered, CATCH_UP_PAGE)
                .await
                .map_err(|e| internal_end("catching up from the store", e))?;
            let full = page.len() == CATCH_UP_PAGE as usize;
            for m in page.into_iter().take_while(|m| m.seq <= upto) {
                self.delivered = m.seq;
                self.send_message(m).await?;
            }
            if !full {
                break;
            }
        }
        Ok(())
    }

    pub(super) async fn deliver(&mut self, m: &WireMessage) -> Result<(), End> {
        if m.seq <= self.delivered {
            return Ok(());
        }
        self.fill_to(m.seq - 1).await?;
        self.delivered = m.seq;
        self.send_message(m.clone()).await
    }

    async fn send_message(&mut self, m: WireMessage) -> Result<(), End> {
        if m.role == MessageRole::Bot {
            // The whole reply supersedes whatever deltas of it are still pending.
            let r = self.replies.get_or_insert_default();
            r.streams.remove(&m.id);
            if r.finished.len() == FINISHED_MEMORY {
                r.finished.pop_front();
            }
            r.finished.push_back(m.id);
        }
        self.send(&ServerFrame::Message { message: m }).await
    }

    /// Takes a piece of a streamed reply, dropping what this connection already has and
    /// filling what it missed (joined mid-reply, a lagging bus) from the reply's text so far:
    /// here when this node generates it, or asked of the node that does
    /// ([`ConvEvent::ReplySync`], whose answer is a delta at offset 0).
    pub(super) async fn on_delta(
        &mut self,
        message_id: Uuid,
        in_reply_to: Uuid,
        offset: usize,
        delta: &str,
    ) -> Result<(), End> {
        let r = self.replies.get_or_insert_default();
        if r.finished.contains(&message_id) {
            return Ok(());
        }
        let stream = r.streams.entry(message_id).or_insert(Stream {
            in_reply_to,
            have: 0,
            pending: String::new(),
            asked: false,
        });
        let end = offset + delta.len();
        if end <= stream.have {
            return Ok(());
        }
        if offset > stream.have {
            match self.state.replier.text_so_far(message_id) {
                Some(text) if text.len() >= end && text.is_char_boundary(stream.have) && text.is_char_boundary(end) => {
                    stream.pending.push_str(&text[stream.have..end]);
                }
                // Generated elsewhere: ask once; the answer fills the gap.
                None if self.state.bus.shared() => {
                    if !std::mem::replace(&mut stream.asked, true) {
                        let ask = ConvEvent::ReplySync { message_id: Some(message_id) };
                        if let Err(e) = self.state.bus.publish(self.peer.conversation_id, ask).await {
                            tracing::debug!(error = %e, "asking for a reply's text failed");
                        }
                    }
                    return Ok(());
                }
                // The reply is already over; its final message is on the way.
                _ => return Ok(()),
            }
        } else if delta.is_char_boundary(stream.have - offset) {
            stream.pending.push_str(&delta[stream.have - offset..]);
        } else {
            return Ok(());
        }
        stream.have = end;
        stream.asked = false;
        self.flush_deltas()
    }

    /// Sends pending deltas while the queue has room; what does not fit waits, coalesced.
    pub(super) fn flush_deltas(&mut self) -> Result<(), End> {
        let Some(r) = self.replies.as_mut() else { return Ok(()) };
        for (id, stream) in r.streams.iter_mut() {
            if stream.pending.is_empty() {
                continue;
            }
            if self.io.is_full() {
                self.state.metrics.deltas_coalesced.inc();
                return Ok(());
            }
            let frame = ServerFrame::MessageDelta {
                message_id: *id,
                in_reply_to: stream.in_reply_to,
                delta: std::mem::take(&mut stream.pending),
            };
            let json = frame.to_json();
            self.counters.msgs_out += 1;
            self.counters.bytes_out += json.len() as u64;
            self.io.queue.push_back(Out::Text(json));
        }
        Ok(())
    }
}
