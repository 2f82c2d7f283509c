//! Compiles the protocol with protox (pure Rust: no `protoc` needed on the machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/weft/control/v1/control.proto");
    println!("cargo:rerun-if-changed=proto/etcd/kv.proto");
    let fds = protox::compile(
        ["weft/control/v1/control.proto", "etcd/kv.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
