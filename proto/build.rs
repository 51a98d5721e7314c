//! Generates the gRPC code from `proto/federation.proto` with protox, a pure-Rust protobuf
//! compiler, so building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/federation.proto");
    let descriptors = protox::compile(["federation.proto"], ["proto"])?;
    // The service code needs tonic; the round's state machines use only the messages.
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        // Large payloads stay reference-counted instead of being copied into fresh Vecs.
        .bytes(".quorum.v1.ModelChunk.data")
        .bytes(".quorum.v1.UpdateChunk.packed")
        .compile_fds(descriptors)?;
    Ok(())
}
