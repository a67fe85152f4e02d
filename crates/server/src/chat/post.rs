//! Client frames that arrive by HTTP POST — the SSE binding's way up — handled on whichever
//! node the POST reaches: the same parsing, checks, per-user budget, store, bus and bot as a
//! connection's frames, and the frame's outcome (an ack, an error, a pong) as the answer. The
//! stream the client reads (perhaps on another node) delivers the message by the bus like any
//! other tab's, and hears the client ([`ConvEvent::Heard`]) so its idle timer restarts.

use natter_proto::{ClientFrame, ServerFrame};
use tokio::time::Instant;
use tracing::Instrument;

use super::inbound::{append, cancel, check_message, hand_on, message_span, take_user_budget};
use super::session::Peer;
use crate::bus::ConvEvent;
use crate::metrics::DirectionLabel;
use crate::state::AppState;
use crate::store::StoreError;

/// Handles one POSTed frame for the stream `peer.connection_id`. `None`: accepted, nothing to
/// say (a cancel).
pub async fn post_frame(state: &AppState, peer: &Peer, text: &str) -> Result<Option<ServerFrame>, StoreError> {
    let received = Instant::now();
    let heard = ConvEvent::Heard { connection_id: peer.connection_id, user_id: peer.user_id };
    if let Err(e) = state.bus.publish(peer.conversation_id, heard).await {
        tracing::debug!(error = %e, "telling the stream its client was heard failed");
    }
    let frame = match ClientFrame::parse(text) {
        Ok(frame) => frame,
        Err(e) => return Ok(Some(ServerFrame::error(e.code, e.message))),
    };
    Ok(match frame {
        ClientFrame::Ping { id } => Some(ServerFrame::Pong { id, server_time: chrono::Utc::now() }),
        ClientFrame::Cancel { message_id } => cancel(state, peer.conversation_id, message_id).await.err(),
        ClientFrame::Message { client_id, content } => Some(message(state, peer, client_id, content, received).await?),
    })
}

async fn message(
    state: &AppState,
    peer: &Peer,
    client_id: String,
    content: String,
    received: Instant,
) -> Result<ServerFrame, StoreError> {
    state.metrics.messages.get_or_create(&DirectionLabel { direction: "in" }).inc();
    if let Err((code, message)) = check_message(&state.config.limits, &client_id, &content) {
        let client_id = Some(client_id);
        return Ok(ServerFrame::Error { code, message, client_id, in_reply_to: None, retry_after_ms: None });
    }
    if let Some(refused) = take_user_budget(state, peer.user_id, &client_id).await {
        return Ok(refused);
    }
    let span = message_span(&client_id, peer.conversation_id);
    let tasks = state.tasks.clone();
    let (state, peer) = (state.clone(), peer.clone());
    // A task of its own: this handler is dropped when the POST's client goes away, and a stored
    // message must still be announced and handed to the bot.
    let stored = async move {
        let (appended, answered) = append(&state, &peer, &client_id, content).await?;
        state.metrics.ack_seconds.observe(received.elapsed().as_secs_f64());
        if !appended.duplicate {
            hand_on(&state, &peer, appended.message.clone(), answered, received).await;
        }
        Ok(ServerFrame::Ack { client_id, message: appended.message, duplicate: appended.duplicate })
    }
    .instrument(span);
    tasks.spawn(stored).await.map_err(|e| StoreError::Backend(format!("storing a posted message: {e}")))?
}
