//! Integration tests: the real server on port 0 with a temporary data dir, driven over HTTP
//! and real WebSocket connections.

mod auth_abuse;
mod authz;
mod bots;
mod bots_limits;
mod egress;
mod fuzz_rest;
mod gateway;
mod hardening;
mod helpers;
mod hostile_input;
mod multinode;
mod observability;
mod rest;
mod session_io;
mod sse;
mod transcript;
mod web;
