//! The proto3 JSON mapping of WebSocket text frames (through prost-reflect): a
//! client's `Send` parsed, the server's pushed message `Event` rendered. Compare
//! with `cargo bench --bench frames` (binary protobuf). Run with `cargo bench
//! --bench json`.

use confab_gateway::fuzzing::{
    decode_json_client_frame as decode_client_frame,
    encode_json_server_frame as encode_server_frame,
};
use confab_proto::v1::{Event, Message, ServerFrame, event, server_frame};
use divan::{Bencher, black_box};

fn main() {
    divan::main();
}

/// A 100-byte message text.
fn text() -> String {
    "The quick brown fox jumps over the lazy dog; the lazy dog naps again. ".repeat(2)[..100]
        .to_owned()
}

/// Parses a client `Send` frame from JSON.
#[divan::bench(sample_size = 16)]
fn decode_client_send(bencher: Bencher<'_, '_>) {
    let json = format!(
        r#"{{"ref":"42","send":{{"conversationId":"7300000000000123","clientMsgId":"0b6f8a2c-5d1e-4f7a-9c3b-2e8d6a1f4b90","text":"{}"}}}}"#,
        text()
    );
    decode_client_frame(&json).unwrap();
    bencher.bench_local(|| decode_client_frame(black_box(&json)).unwrap());
}

/// Renders a server message `Event` frame as JSON.
#[divan::bench(sample_size = 16)]
fn encode_server_event(bencher: Bencher<'_, '_>) {
    let frame = ServerFrame {
        r#ref: 0,
        kind: Some(server_frame::Kind::Event(Event {
            seq: 123_456,
            kind: Some(event::Kind::Message(Message {
                id: 7_300_000_000_004_567,
                conversation_id: 7_300_000_000_000_123,
                sender_id: 7_300_000_000_000_042,
                sender_device: "phone-7f3a".into(),
                client_msg_id: "0b6f8a2c-5d1e-4f7a-9c3b-2e8d6a1f4b90".into(),
                sent_at_ms: 1_767_225_600_000,
                text: text(),
                notice: None,
            })),
        })),
    };
    bencher.bench_local(|| encode_server_frame(black_box(&frame)));
}
