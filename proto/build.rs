//! Compiles the protobuf contracts with protox (pure Rust: no `protoc` on any machine)
//! and generates the prost messages and tonic services into `OUT_DIR`.

use std::path::PathBuf;

use prost::Message as _;

const PROTOS: &[&str] = &[
    "confab/v1/types.proto",
    "confab/v1/edge.proto",
    "confab/group/v1/group.proto",
    "confab/message/v1/message.proto",
    "confab/session/v1/session.proto",
    "confab/presence/v1/presence.proto",
    "confab/bus/v1/bus.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=confab");
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection and the proto3 JSON mapping of WebSocket text frames read this set.
    std::fs::write(
        out_dir.join("confab_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Small initial buffers per call and stream: see src/codec.rs.
        .codec_path("crate::codec::SmallCodec")
        .build_client(true)
        .build_server(true)
        // New RPCs answer UNIMPLEMENTED in test fakes of a service (message-svc
        // and presence-svc fake `Groups`) until they need them.
        .compile_fds(descriptors)?;
    Ok(())
}
