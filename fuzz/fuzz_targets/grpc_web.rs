//! A gRPC-web request body (see `confab_fuzz::web_call` for the input format),
//! binary or base64 text, posted to the edge's real router: the gRPC-web
//! translation, tonic's deframing with its decode limit and the prost decode
//! never panic, and every body gets a gRPC answer (HTTP 200 with a
//! `grpc-status`), never an HTTP failure.

#![no_main]

use std::sync::LazyLock;

use confab_gateway::fuzzing::GrpcWebCalls;
use libfuzzer_sys::fuzz_target;

static CALLS: LazyLock<GrpcWebCalls> = LazyLock::new(GrpcWebCalls::new);

fuzz_target!(|data: &[u8]| {
    let Some((method, text, body)) = confab_fuzz::web_call(data) else {
        return;
    };
    let answer = CALLS.call(method, text, body);
    assert_eq!(answer.status, 200, "{answer:?}");
    if !text {
        assert!(answer.grpc_status().is_some(), "no grpc-status: {answer:?}");
    }
});
