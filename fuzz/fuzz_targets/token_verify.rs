//! A bearer token (from the `Authorization` header, the `access_token` query
//! parameter, a `Hello` or a `Reauthenticate`) never panics verification, own
//! HS256 or external Ed25519, and verification agrees with itself.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Every way a token arrives (a header value, a query string, a protobuf
    // or JSON string) hands it over as text.
    if let Ok(token) = std::str::from_utf8(data) {
        confab_fuzz::check_token(token);
    }
});
