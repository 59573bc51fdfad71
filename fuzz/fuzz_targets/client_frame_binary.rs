//! A binary WebSocket message (protobuf `ClientFrame`; also what a gRPC
//! `Edge.Stream` message goes through) never panics the decoder, and what it
//! decodes to survives both encodings.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = confab_gateway::fuzzing::decode_ws_binary(data) {
        confab_fuzz::check_frame(&frame);
    }
});
