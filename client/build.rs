//! Gives the client's binaries, tests and examples an rpath to LibTorch's `lib/` folder, so they
//! run without `LD_LIBRARY_PATH`. torch-sys publishes that folder to its direct dependents.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
