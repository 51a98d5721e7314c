//! LibTorch's CUDA backend, loaded when the client starts on a GPU.
//!
//! The client links LibTorch's CPU library only (the Makefile's `LINK_LIB`), so that a CPU
//! release bundle carries no CUDA libraries. On a machine with an NVIDIA driver it loads
//! `libtorch_cuda.so` (from the bundle's `lib/`, or the LibTorch it was built against, through
//! its RUNPATH) with global symbols; the library's initialisers register the CUDA backend with
//! LibTorch, after which `tch::Cuda::is_available()` answers as if it had been linked.

use std::path::Path;

const CUDA_BACKEND: &str = "libtorch_cuda.so";

/// Whether an NVIDIA driver is loaded, the only case where the CUDA backend can help.
pub fn driver_present() -> bool {
    Path::new("/proc/driver/nvidia/version").exists()
}

/// Loads LibTorch's CUDA backend for the life of the process. Call it before `tch` makes a
/// tensor; loading it twice is harmless (the loader counts references).
pub fn load_backend() -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: libtorch_cuda.so belongs to the LibTorch this binary was built against (the
    // same RUNPATH found libtorch_cpu.so); its initialisers only register LibTorch's CUDA
    // hooks. It is never unloaded, so no symbol outlives it.
    #[allow(unsafe_code)]
    let library = unsafe { Library::open(Some(CUDA_BACKEND), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| format!("could not load {CUDA_BACKEND}: {e}"))?;
    std::mem::forget(library);
    Ok(())
}
