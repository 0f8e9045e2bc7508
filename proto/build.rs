//! Compiles `proto/meshflow/**/*.proto` with protox (no system protoc), generates tonic stubs and
//! pbjson serde impls, and writes the encoded descriptor set for server reflection.

use prost::Message;
use std::path::{Path, PathBuf};

fn proto_files(dir: &Path, root: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            proto_files(&path, root, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            let rel = path.strip_prefix(root).expect("under root");
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tree = root.join("meshflow");
    println!("cargo:rerun-if-changed={}", tree.display());

    let mut files = Vec::new();
    proto_files(&tree, &root, &mut files)?;
    files.sort();

    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let bytes = fds.encode_to_vec();
    std::fs::write(out.join("descriptor.bin"), &bytes)?;

    tonic_prost_build::configure()
        // A request that does not decode is INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&bytes)?
        .build(&[".meshflow"])?;
    Ok(())
}
