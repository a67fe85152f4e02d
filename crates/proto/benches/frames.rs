//! The frame codec on the hot path: every client frame is parsed, every server frame encoded.
//! Run with `cargo bench -p natter-proto`.

use std::hint::black_box;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use natter_proto::frames::{ClientFrame, MessageRole, MessageStatus, ServerFrame, WireMessage};
use uuid::Uuid;

fn message(role: MessageRole, content: &str) -> WireMessage {
    WireMessage {
        id: Uuid::new_v4(),
        conversation_id: Uuid::new_v4(),
        seq: 42,
        role,
        content: content.to_owned(),
        created_at: Utc::now(),
        client_id: (role == MessageRole::User).then(|| "c-42".to_owned()),
        in_reply_to: (role == MessageRole::Bot).then(Uuid::new_v4),
        status: MessageStatus::Complete,
    }
}

fn codec(c: &mut Criterion) {
    let content = "x".repeat(64);
    let text = format!(r#"{{"type":"message","client_id":"c-42","content":"{content}"}}"#);
    let mut g = c.benchmark_group("client_frame");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("parse message 64 B", |b| b.iter(|| ClientFrame::parse(black_box(&text)).unwrap()));
    let ping = r#"{"type":"ping","id":1}"#;
    g.bench_function("parse ping", |b| b.iter(|| ClientFrame::parse(black_box(ping)).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("server_frame");
    let ack =
        ServerFrame::Ack { client_id: "c-42".into(), message: message(MessageRole::User, &content), duplicate: false };
    let reply = ServerFrame::Message { message: message(MessageRole::Bot, &content) };
    g.bench_function("to_json ack 64 B", |b| b.iter(|| black_box(&ack).to_json()));
    g.bench_function("to_json message 64 B", |b| b.iter(|| black_box(&reply).to_json()));
    let long = ServerFrame::Message { message: message(MessageRole::Bot, &"y".repeat(4096)) };
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("to_json message 4 KiB", |b| b.iter(|| black_box(&long).to_json()));
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
