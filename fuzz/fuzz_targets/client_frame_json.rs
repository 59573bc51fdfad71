//! A text WebSocket message (proto3 JSON `ClientFrame`) never panics the
//! decoder, and what it decodes to survives both encodings.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The WebSocket layer refuses text that is not UTF-8 before decoding.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(frame) = confab_gateway::fuzzing::decode_ws_text(text) {
        confab_fuzz::check_frame(&frame);
    }
});
