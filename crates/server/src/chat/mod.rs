//! The chat session, independent of its transport.
//!
//! - [`admission`]: every check of a new connection, and what an admitted one holds.
//! - [`transport`]: the [`Transport`] trait — receive a frame, send frames, close with a code —
//!   which the WebSocket binding (`crate::ws`) implements.
//! - `lifecycle`: [`run`] takes an accepted transport through admission, its session and the
//!   close (ledger row, metrics, close handshake).
//! - `session`, `inbound`, `delivery`: the session core — its loop, the client's frames, and
//!   what it sends of the conversation (seqs in order and once, streamed replies).
//! - `outbox`: the bounded queue of frames in front of the transport; `timers`: heartbeat,
//!   idle close, delta retries.
//! - `post`: [`post_frame`], client frames that arrive by HTTP POST (the SSE binding's way
//!   up), on whichever node the POST reaches, answered with their outcome.
//! - `access`: admission's answers remembered on one node, forgotten when a bot changes.
//! - [`hub`]: the registry of live connections and per-user counts.

mod access;
pub mod admission;
mod delivery;
pub mod hub;
mod inbound;
mod lifecycle;
mod outbox;
mod post;
mod session;
mod timers;
pub mod transport;

#[cfg(test)]
mod tests;

pub use access::AccessCache;
pub use admission::{admit, admit_post, preflight, Admission, ConnectRequest, Refusal, Rejected};
pub use inbound::check_message;
pub use lifecycle::run;
pub use post::post_frame;
pub use session::Peer;
pub use transport::{End, Inbound, Out, Transport, WriteFailed};
