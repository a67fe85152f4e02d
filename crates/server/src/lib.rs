//! natter as a library: everything `natter serve` runs, so that tests and the binary start
//! the server the same way ([`app::Server`]).

pub mod accounts;
pub mod app;
pub mod auth;
pub mod backup;
pub mod bots;
pub mod bus;
pub mod chat;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod http;
pub mod ledger;
pub mod logsafe;
pub mod metrics;
pub mod passwords;
pub mod revocation;
pub mod serve;
pub mod sse;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod testenv;
pub mod throttle;
pub mod web;
pub mod ws;

pub use app::{Server, StartError};
pub use config::Config;
pub use state::AppState;
