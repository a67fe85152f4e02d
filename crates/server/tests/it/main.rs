//! Integration tests: the real server on port 0 with a temporary data dir, driven over HTTP
//! and real WebSocket connections.

mod bots;
mod gateway;
mod hardening;
mod helpers;
mod multinode;
mod observability;
mod rest;
mod transcript;
mod web;
