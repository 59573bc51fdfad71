//! Binary protobuf encode and decode of the frames every live connection
//! carries: a client's `Send` and the server's pushed message `Event`, with a
//! 100-byte text. Run with `cargo bench --bench frames`.

use confab_proto::v1::{
    ClientFrame, Event, Message as ChatMessage, SendMessage, ServerFrame, client_frame, event,
    server_frame,
};
use divan::{Bencher, black_box};
use prost::Message;

fn main() {
    divan::main();
}

/// A 100-byte message text.
fn text() -> String {
    "The quick brown fox jumps over the lazy dog; the lazy dog naps again. ".repeat(2)[..100]
        .to_owned()
}

fn client_frame() -> ClientFrame {
    ClientFrame {
        r#ref: 42,
        kind: Some(client_frame::Kind::Send(SendMessage {
            conversation_id: 7_300_000_000_000_123,
            client_msg_id: "0b6f8a2c-5d1e-4f7a-9c3b-2e8d6a1f4b90".into(),
            text: text(),
        })),
    }
}

fn server_frame() -> ServerFrame {
    ServerFrame {
        r#ref: 0,
        kind: Some(server_frame::Kind::Event(Event {
            seq: 123_456,
            kind: Some(event::Kind::Message(ChatMessage {
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
    }
}

/// Encodes a client `Send` frame into a reused buffer.
#[divan::bench]
fn encode_client_send(bencher: Bencher<'_, '_>) {
    encode(bencher, &client_frame());
}

/// Decodes a client `Send` frame.
#[divan::bench(sample_size = 64)]
fn decode_client_send(bencher: Bencher<'_, '_>) {
    decode::<ClientFrame>(bencher, &client_frame());
}

/// Encodes a server message `Event` frame into a reused buffer.
#[divan::bench]
fn encode_server_event(bencher: Bencher<'_, '_>) {
    encode(bencher, &server_frame());
}

/// Decodes a server message `Event` frame.
#[divan::bench(sample_size = 64)]
fn decode_server_event(bencher: Bencher<'_, '_>) {
    decode::<ServerFrame>(bencher, &server_frame());
}

/// Encodes `frame` into a buffer reused between iterations.
fn encode<M: Message>(bencher: Bencher<'_, '_>, frame: &M) {
    let mut buffer = Vec::with_capacity(512);
    bencher.bench_local(|| {
        buffer.clear();
        black_box(frame).encode(&mut buffer).unwrap();
        black_box(buffer.len())
    });
}

/// Decodes the encoding of `frame`.
fn decode<M: Message + Default>(bencher: Bencher<'_, '_>, frame: &M) {
    let bytes = frame.encode_to_vec();
    bencher.bench_local(|| M::decode(black_box(bytes.as_slice())).unwrap());
}
