//! Bot engines: what produces a bot's reply. An engine knows nothing of HTTP servers or
//! WebSockets; it gets the user's message (and some history) and pushes the reply's text,
//! piece by piece, into a sink.
//!
//! [`Replier`] (`replier/`) runs engines off the connection — a reply completes and is stored
//! even when the socket that asked for it is gone — announces deltas and the final message on
//! the bus, keeps what is generated so far for sockets that join mid-reply, and bounds the work
//! per bot.

use async_trait::async_trait;
use natter_proto::{ErrorCode, WireMessage};
use uuid::Uuid;

pub mod bounds;
mod echo;
pub mod egress;
mod openai;
mod replier;
pub mod rules;
pub mod spec;
pub mod webhook;

pub use replier::{InProgress, InstantReply, Replier, ReplierLimits};
pub use spec::{EngineSpec, ENGINE_KINDS};

/// What an engine is asked to answer.
#[derive(Debug, Clone)]
pub struct ReplyRequest {
    pub bot_id: Uuid,
    pub bot_name: String,
    /// Earlier messages of the conversation, oldest first (as many as the engine asked for).
    pub history: Vec<WireMessage>,
    pub message: WireMessage,
}

/// Where an engine pushes the reply's text as it is produced.
#[async_trait]
pub trait DeltaSink: Send {
    async fn delta(&mut self, text: &str);
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    /// `bot_error` or `bot_timeout`.
    pub code: ErrorCode,
    pub message: String,
}

#[async_trait]
pub trait BotEngine: Send + Sync {
    /// Produces the reply, pushing pieces into `sink` as they come. Returns the whole text.
    async fn reply(&self, req: &ReplyRequest, sink: &mut dyn DeltaSink) -> Result<String, EngineError>;

    /// Whether the reply comes in one step, with no waiting (echo, rules). Such replies are
    /// not leased in the store while in progress: there is no "in progress" to cut off.
    fn instant(&self) -> bool {
        false
    }
}
