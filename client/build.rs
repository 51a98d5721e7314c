//! Gives the client's binaries, tests and examples their library search path (RUNPATH):
//! `$ORIGIN/../lib` first, where a release bundle keeps LibTorch, then the folder of the
//! LibTorch they were built against, so they run from the build tree without
//! `LD_LIBRARY_PATH`. `quorum-aggregator release bundle` removes the second entry.
//!
//! torch-sys publishes the folder the linker saw (the Makefile's LINK_LIB, links into the real
//! LibTorch); the runtime path is the real folder, where LibTorch's own `$ORIGIN` paths find
//! its dependencies and where `libtorch_cuda.so` can be loaded from.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../lib");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let real = Path::new(&lib)
            .join("libtorch_cpu.so")
            .canonicalize()
            .ok()
            .and_then(|cpu| cpu.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| lib.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", real.display());
    }
}
