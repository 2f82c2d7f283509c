//! Compiles the test protos with protox (pure Rust: no `protoc` on the machine needed), when
//! the `grpc` feature is on.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "grpc")]
    {
        println!("cargo:rerun-if-changed=proto/echo.proto");
        let fds = protox::compile(["echo.proto"], ["proto"])?;
        tonic_prost_build::configure().compile_fds(fds)?;
    }
    Ok(())
}
