//! Generates the gRPC code from `proto/shardpress.proto` with a vendored protoc, so nobody has
//! to install protoc by hand.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/shardpress.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto/shardpress.proto");
    Ok(())
}
