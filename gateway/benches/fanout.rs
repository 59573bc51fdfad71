//! The hub's fan-out in process: one message to 1,024 live devices.
//!
//! - `group_message`: a group message as the writer publishes it, one event per
//!   member (each member's sequence), to 1,024 users with one device each.
//! - `channel_post`: one channel post to the 1,024 connections that have the
//!   channel open (fan-out through the followers map).
//! - `group_message_to_tasks`: as `group_message`, with every device's queue
//!   read by its own task on a multi-threaded runtime, as the connection engine
//!   does: publish until the last device has woken up with its event.
//!
//! Run with `cargo bench --bench fanout`.

use std::sync::Arc;
use std::time::Instant;

use confab_common::bus::{Audience, LiveBus as _, LiveEvent};
use confab_gateway::Hub;
use confab_gateway::hub::Registration;
use confab_proto::v1::{Event, Message, event};
use divan::{Bencher, black_box};

fn main() {
    divan::main();
}

/// Live devices a message goes to.
const DEVICES: usize = 1_024;
/// Live queue of each device (the gateway's default is larger; one event is in
/// flight at a time here).
const QUEUE: usize = 64;
const CHANNEL: i64 = 900;

fn message() -> Message {
    Message {
        id: 7_300_000_000_004_567,
        conversation_id: CHANNEL,
        sender_id: 1,
        sender_device: "phone".into(),
        client_msg_id: "m1".into(),
        sent_at_ms: 1_767_225_600_000,
        text: "x".repeat(100),
        notice: None,
    }
}

fn live(audience: Audience, kind: event::Kind, seq: u64) -> Arc<LiveEvent> {
    Arc::new(LiveEvent {
        audience,
        event: Event {
            seq,
            kind: Some(kind),
        },
        origin_device: Some("phone".into()),
        accepted_at: Instant::now(),
    })
}

/// Registers one device for each of users 1..=DEVICES.
fn devices(hub: &Hub) -> Vec<(i64, Registration)> {
    (1..=DEVICES as i64)
        .map(|user_id| (user_id, hub.register(user_id, "d", QUEUE)))
        .collect()
}

/// One event per member (the writer's batch for one group message), published
/// and then taken off every device's queue.
#[divan::bench]
fn group_message(bencher: Bencher<'_, '_>) {
    let hub = Hub::new();
    let mut devices = devices(&hub);
    let events: Vec<Arc<LiveEvent>> = devices
        .iter()
        .map(|(user_id, _)| live(Audience::User(*user_id), event::Kind::Message(message()), 1))
        .collect();
    bencher.bench_local(|| {
        hub.publish(black_box(&events));
        for (_, device) in &mut devices {
            black_box(device.events.try_recv().expect("an event for every device"));
        }
    });
}

/// One channel post to every connection that has the channel open.
#[divan::bench]
fn channel_post(bencher: Bencher<'_, '_>) {
    let hub = Hub::new();
    let mut devices = devices(&hub);
    for (user_id, device) in &devices {
        assert!(hub.open_channel(*user_id, device.connection_id, CHANNEL));
    }
    let post = [live(
        Audience::Channel(CHANNEL),
        event::Kind::ChannelPost(message()),
        0,
    )];
    bencher.bench_local(|| {
        hub.publish(black_box(&post));
        for (_, device) in &mut devices {
            black_box(device.events.try_recv().expect("a post for every follower"));
        }
    });
}

/// A group message to 1,024 devices, each read by its own task: publish until
/// every task has its event.
#[divan::bench(sample_count = 50)]
fn group_message_to_tasks(bencher: Bencher<'_, '_>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let hub = Hub::new();
    let devices = devices(&hub);
    let events: Vec<Arc<LiveEvent>> = devices
        .iter()
        .map(|(user_id, _)| live(Audience::User(*user_id), event::Kind::Message(message()), 1))
        .collect();
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    for (_, device) in devices {
        let arrived = arrived.clone();
        runtime.spawn(async move {
            while let Ok(event) = device.events.recv_async().await {
                if arrived.send(event.event.seq).is_err() {
                    return;
                }
            }
        });
    }
    bencher.bench_local(|| {
        runtime.block_on(async {
            hub.publish(&events);
            for _ in 0..DEVICES {
                black_box(arrivals.recv().await);
            }
        });
    });
    drop(hub);
    runtime.shutdown_background();
}
