//! Fan-out through the in-process bus: one event published to a conversation with N local
//! subscribers (tabs), until every subscriber has received it. Run with
//! `cargo bench -p natter-server --bench fanout`.

use std::hint::black_box;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use natter_proto::frames::{MessageRole, MessageStatus, WireMessage};
use natter_server::bus::{Bus, ConvEvent, LocalBus, Received};
use uuid::Uuid;

fn event(conversation_id: Uuid) -> ConvEvent {
    ConvEvent::Message(
        WireMessage {
            id: Uuid::new_v4(),
            conversation_id,
            seq: 1,
            role: MessageRole::Bot,
            content: "x".repeat(64),
            created_at: Utc::now(),
            client_id: None,
            in_reply_to: Some(Uuid::new_v4()),
            status: MessageStatus::Complete,
        },
        None,
    )
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut g = c.benchmark_group("local_bus_fanout");
    for n in [1usize, 10, 100, 1000] {
        let bus = LocalBus::new(1024);
        let conv = Uuid::new_v4();
        let mut subs = rt.block_on(async { futures_subs(&bus, conv, n).await });
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                rt.block_on(async {
                    bus.publish(conv, event(conv)).await.unwrap();
                    for s in subs.iter_mut() {
                        match s.recv().await {
                            Received::Event(e) => {
                                black_box(e);
                            }
                            _ => panic!("subscriber lagged or closed"),
                        }
                    }
                })
            })
        });
    }
    g.finish();
}

async fn futures_subs(bus: &LocalBus, conv: Uuid, n: usize) -> Vec<natter_server::bus::Subscription> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(bus.subscribe(conv).await.unwrap());
    }
    v
}

criterion_group!(benches, fanout);
criterion_main!(benches);
