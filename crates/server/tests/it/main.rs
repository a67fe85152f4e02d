//! Integration tests: the real server on port 0 with a temporary data dir, driven over HTTP
//! and real WebSocket connections.

mod helpers;
mod bots;
mod gateway;
mod multinode;
mod observability;
mod transcript;
mod web;
mod rest;
