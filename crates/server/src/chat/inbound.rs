//! What a session does with the client's frames: the frame budget, parsing, `ping`,
//! `cancel`, and a `message` checked ([`check_message`]), rate-limited, stored, acked,
//! announced and handed to the bot.

use natter_proto::{ClientFrame, ErrorCode, MessageRole, MessageStatus, ServerFrame, WireMessage};
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::session::{internal_end, Peer, Session};
use super::transport::{End, Inbound, Transport};
use crate::bots::InstantReply;
use crate::bus::ConvEvent;
use crate::config::Limits;
use crate::logsafe::Untrusted;
use crate::metrics::DirectionLabel;
use crate::state::AppState;
use crate::store::{Appended, NewMessage, StoreError, StoreResult};

/// Why a `message` frame is refused before anything is stored: its error code and text.
pub fn check_message(limits: &Limits, client_id: &str, content: &str) -> Result<(), (ErrorCode, String)> {
    let id_len = client_id.chars().count();
    if !(1..=64).contains(&id_len) {
        return Err((ErrorCode::InvalidClientId, format!("client_id must be 1 to 64 characters, got {id_len}")));
    }
    // NUL: PostgreSQL cannot store it, so no store does (`domain::no_nul`).
    crate::domain::no_nul("client_id", client_id).map_err(|m| (ErrorCode::InvalidClientId, m))?;
    crate::domain::no_nul("content", content).map_err(|m| (ErrorCode::InvalidFrame, m))?;
    if content.trim().is_empty() {
        return Err((ErrorCode::EmptyContent, "content is empty".into()));
    }
    let (chars, max) = (content.chars().count(), limits.max_content_chars);
    if chars > max {
        return Err((ErrorCode::ContentTooLong, format!("content is {chars} characters; the limit is {max}")));
    }
    Ok(())
}

/// An error frame that says how long to wait.
pub(super) fn rate_limited(message: String, client_id: Option<&str>, wait: std::time::Duration) -> ServerFrame {
    let ms = wait.as_millis() as u64 + 1;
    ServerFrame::Error {
        code: ErrorCode::RateLimited,
        message: format!("{message}; wait {ms} ms before sending again"),
        client_id: client_id.map(str::to_owned),
        in_reply_to: None,
        retry_after_ms: Some(ms),
    }
}

impl<T: Transport> Session<T> {
    pub(super) async fn on_frame(&mut self, frame: Result<Inbound<T::Text>, End>) -> Result<(), End> {
        let frame = frame?;
        self.counters.msgs_in += 1;
        self.counters.bytes_in += match &frame {
            Inbound::Text(t) => t.len(),
            Inbound::Binary(n) => *n,
            _ => 0,
        } as u64;
        // Every data frame takes a token before it is parsed; the transport answers its own
        // control frames (one pong pending at most).
        if matches!(frame, Inbound::Text(_) | Inbound::Binary(_)) {
            if let Err(wait) = self.frame_bucket.take() {
                return self.send(&rate_limited("too many frames".into(), None, wait)).await;
            }
        }
        match frame {
            Inbound::Text(t) => match ClientFrame::parse(&t) {
                Ok(frame) => self.on_client_frame(frame).await,
                Err(e) => self.send(&ServerFrame::error(e.code, e.message)).await,
            },
            Inbound::Binary(_) => {
                self.send(&ServerFrame::error(
                    ErrorCode::BinaryNotSupported,
                    "binary frames are not part of the protocol; send JSON text frames",
                ))
                .await
            }
            Inbound::Control => Ok(()),
            Inbound::Close(c) => Err(End::ClientClosed(c)),
        }
    }

    async fn on_client_frame(&mut self, frame: ClientFrame) -> Result<(), End> {
        match frame {
            ClientFrame::Ping { id } => self.send(&ServerFrame::Pong { id, server_time: chrono::Utc::now() }).await,
            ClientFrame::Cancel { message_id } => {
                match cancel(&self.state, self.peer.conversation_id, message_id).await {
                    Ok(()) => Ok(()),
                    Err(unknown) => self.send(&unknown).await,
                }
            }
            ClientFrame::Message { client_id, content } => self.on_message(client_id, content).await,
        }
    }

    async fn reject(&mut self, code: ErrorCode, message: String, client_id: &str) -> Result<(), End> {
        let client_id = Some(client_id.to_owned());
        self.send(&ServerFrame::Error { code, message, client_id, in_reply_to: None, retry_after_ms: None }).await
    }

    /// The message budgets: this connection's, then the user's over all of their connections
    /// on every node (issue 14: 20 sockets made 20 budgets).
    async fn take_message_budget(&mut self, client_id: &str) -> Option<ServerFrame> {
        if let Err(wait) = self.bucket.take() {
            return Some(rate_limited("too many messages".into(), Some(client_id), wait));
        }
        take_user_budget(&self.state, self.peer.user_id, client_id).await
    }

    async fn on_message(&mut self, client_id: String, content: String) -> Result<(), End> {
        let received = Instant::now();
        self.state.metrics.messages.get_or_create(&DirectionLabel { direction: "in" }).inc();
        if let Err((code, message)) = check_message(&self.state.config.limits, &client_id, &content) {
            return self.reject(code, message, &client_id).await;
        }
        if let Some(refused) = self.take_message_budget(&client_id).await {
            return self.send(&refused).await;
        }
        let span = message_span(&client_id, self.peer.conversation_id);
        self.accept_message(client_id, content, received).instrument(span).await
    }

    /// Stores, acks, announces and hands to the bot a message that passed every check.
    async fn accept_message(&mut self, client_id: String, content: String, received: Instant) -> Result<(), End> {
        let (appended, answered) = append(&self.state, &self.peer, &client_id, content)
            .await
            .map_err(|e| internal_end("storing a message", e))?;
        let message = (!appended.duplicate).then(|| appended.message.clone());
        let acked = self.ack(client_id, appended).await;
        self.state.metrics.ack_seconds.observe(received.elapsed().as_secs_f64());
        // Announced and handed on even when the ack could not be written (the write failure
        // ends the session after this): what is stored must reach the other tabs and the bot.
        // This socket's own copy of the announcement comes through its loop, after the ack.
        if let Some(message) = message {
            hand_on(&self.state, &self.peer, message, answered, received).await;
        }
        acked
    }

    /// Sends what precedes `appended` and is not sent yet, then its ack.
    async fn ack(&mut self, client_id: String, appended: Appended) -> Result<(), End> {
        let seq = appended.message.seq;
        if seq > self.delivered {
            self.fill_to(seq - 1).await?;
            self.delivered = seq;
        }
        self.send(&ServerFrame::Ack { client_id, message: appended.message, duplicate: appended.duplicate }).await
    }
}

/// Stops a reply in progress: here, or on the node generating it. An error frame if no node is.
pub(super) async fn cancel(state: &AppState, conv: Uuid, message_id: Uuid) -> Result<(), ServerFrame> {
    if state.replier.cancel(conv, message_id) {
        return Ok(());
    }
    let elsewhere = match state.store.generation_in_progress(conv, message_id).await {
        Ok(true) => state.bus.publish(conv, ConvEvent::Cancel { message_id }).await.is_ok(),
        Ok(false) => false,
        Err(e) => {
            tracing::warn!(error = %e, "looking up a reply to cancel failed");
            false
        }
    };
    if elsewhere {
        return Ok(());
    }
    Err(ServerFrame::Error {
        code: ErrorCode::UnknownMessage,
        message: format!("no reply in progress has message_id {message_id}"),
        client_id: None,
        in_reply_to: None,
        retry_after_ms: None,
    })
}

/// The user's message budget over all of their connections, on every node.
pub(super) async fn take_user_budget(state: &AppState, user_id: Uuid, client_id: &str) -> Option<ServerFrame> {
    let limits = &state.config.limits;
    let (rate, burst) = (limits.user_messages_per_second, limits.user_message_burst);
    let over = match state.hub.take_user_message(user_id, rate, burst) {
        Err(wait) => Some(wait),
        Ok(()) => state.cluster.user_message_over(user_id, rate, burst).await,
    };
    let message = "too many messages from this user on all connections";
    over.map(|wait| rate_limited(message.into(), Some(client_id), wait))
}

/// The journey of an accepted message (traces only): stored, acked, announced, answered; the
/// reply's spans are children of this one, on whichever node runs it.
pub(super) fn message_span(client_id: &str, conversation_id: Uuid) -> tracing::Span {
    tracing::info_span!(
        target: crate::telemetry::TRACE,
        "message",
        client_id = %Untrusted(client_id),
        conversation_id = %conversation_id,
        seq = tracing::field::Empty,
        duplicate = tracing::field::Empty
    )
}

/// A bot reply stored with the message it answers, and what is left to do for it.
pub(super) type Answered = Option<(InstantReply, StoreResult<Appended>)>;

/// Stores a user message (once per `client_id`: a resend returns the stored one) — with its
/// reply, when the bot's engine answers instantly ([`Replier::answer_now`]).
pub(super) async fn append(
    state: &AppState,
    peer: &Peer,
    client_id: &str,
    content: String,
) -> Result<(Appended, Answered), StoreError> {
    // With an instant engine's reply, one step stores both: `reply_seq` is the reply's.
    let store_span = tracing::info_span!(
        target: crate::telemetry::TRACE,
        "store",
        seq = tracing::field::Empty,
        reply_seq = tracing::field::Empty
    );
    let message = NewMessage {
        id: Uuid::now_v7(), // time-ordered, as bot replies are (bots::Replier::run)
        conversation_id: peer.conversation_id,
        role: MessageRole::User,
        content,
        client_id: Some(client_id.to_owned()),
        in_reply_to: None,
        status: MessageStatus::Complete,
    };
    let (appended, answered) = match state.replier.answer_now(&peer.engine, peer.bot_id, &peer.bot_name, &message).await
    {
        None => (state.store.append_message(message).instrument(store_span.clone()).await?, None),
        Some((reply, rest)) => {
            let pair = state.store.append_answered(message, reply).instrument(store_span.clone()).await?;
            (pair.message, pair.reply.map(|stored| (rest, stored)))
        }
    };
    let seq = appended.message.seq;
    store_span.record("seq", seq);
    if let Some((_, Ok(reply))) = &answered {
        store_span.record("reply_seq", reply.message.seq);
    }
    tracing::Span::current().record("seq", seq).record("duplicate", appended.duplicate);
    Ok((appended, answered))
}

/// Announces a newly stored user message to every connection, then its reply if it was stored
/// with it, or else hands the message to the bot.
pub(super) async fn hand_on(
    state: &AppState,
    peer: &Peer,
    message: WireMessage,
    answered: Answered,
    received: Instant,
) {
    if let Err(e) = crate::bus::announce(&*state.bus, peer.conversation_id, message.clone()).await {
        tracing::warn!(error = %e, "publishing a message failed; other tabs will catch up on reconnect");
    }
    match answered {
        Some((reply, stored)) => state.replier.answered(reply, stored, received).await,
        None => state.replier.reply(&peer.engine, peer.bot_id, &peer.bot_name, message, received).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_checked_before_anything_is_stored() {
        let limits = Limits { max_content_chars: 5, ..Limits::default() };
        let code = |id: &str, content: &str| check_message(&limits, id, content).err().map(|(c, _)| c);
        assert_eq!(code("c1", "hello"), None);
        assert_eq!(code("", "hi"), Some(ErrorCode::InvalidClientId));
        assert_eq!(code(&"x".repeat(65), "hi"), Some(ErrorCode::InvalidClientId));
        assert_eq!(code("a\0b", "hi"), Some(ErrorCode::InvalidClientId));
        assert_eq!(code("c1", "h\0i"), Some(ErrorCode::InvalidFrame));
        assert_eq!(code("c1", " \n\t"), Some(ErrorCode::EmptyContent));
        assert_eq!(code("c1", "héllo!"), Some(ErrorCode::ContentTooLong), "counted in characters");
        assert_eq!(code("c1", "héllo"), None, "5 characters, 6 bytes");
        let (_, text) = check_message(&limits, "c1", "toolong").unwrap_err();
        assert_eq!(text, "content is 7 characters; the limit is 5");
    }
}
