//! natter's wire types: what travels over the chat WebSocket and the REST API.
//!
//! This crate is the protocol boundary. It holds the frame enums, the close-code and
//! error-code registries and the REST bodies, and nothing async: no tokio, no axum,
//! no database. The server and every Rust client (tests, `natter doctor`,
//! `natter bench`) speak through these types, so they cannot drift apart.

pub mod api;
pub mod codes;
pub mod frames;

pub use codes::{Close, CloseCode, ErrorCode, RetryPolicy};
pub use frames::{ClientFrame, FrameError, MessageRole, MessageStatus, ServerFrame, WireMessage};

/// Version of the chat protocol described in `docs/protocol.md`.
pub const PROTOCOL_VERSION: u32 = 1;
