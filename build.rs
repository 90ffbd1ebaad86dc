//! Compiles kernels/bertcuda.cu (which includes every kernel family) with nvcc into one fatbin — SASS for
//! sm_80 and sm_90, PTX for compute_90 — embedded in the binary by src/backend/cuda.rs. nvcc is found
//! through NVCC, CUDA_HOME, the project's toolchain directory (.toolchain/cuda, made by
//! scripts/install-cuda-compiler.sh) or PATH. Without nvcc the crate still builds, with a warning, and the
//! CUDA backend says at run time how to get the kernels.

use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("NVCC").map(PathBuf::from),
        std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")),
        Some(root.join(".toolchain/cuda/nvidia/cu13/bin/nvcc")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file()).or_else(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file())
    })
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.fatbin");
    println!("cargo:rerun-if-changed=kernels");
    for e in std::fs::read_dir(root.join("kernels")).expect("kernels/ exists").flatten() {
        println!("cargo:rerun-if-changed={}", e.path().display());
    }
    for v in ["NVCC", "CUDA_HOME", "PATH"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rerun-if-changed=.toolchain/cuda/nvidia/cu13/bin/nvcc");
    let Some(nvcc) = find_nvcc(&root) else {
        println!(
            "cargo:warning=nvcc not found: building without CUDA kernels (run scripts/install-cuda-compiler.sh, or set NVCC or CUDA_HOME)"
        );
        std::fs::write(&out, b"").unwrap();
        return;
    };
    let status = Command::new(&nvcc)
        .args(["-fatbin", "-O3", "-lineinfo", "--std=c++17", "-Werror", "all-warnings", "--threads", "0"])
        .args(["-gencode", "arch=compute_80,code=sm_80"])
        .args(["-gencode", "arch=compute_90,code=sm_90"])
        .args(["-gencode", "arch=compute_90,code=compute_90"])
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-o")
        .arg(&out)
        .arg(root.join("kernels/bertcuda.cu"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc ({}) failed to compile kernels/bertcuda.cu: {s}", nvcc.display()),
        Err(e) => panic!("cannot run nvcc ({}): {e}", nvcc.display()),
    }
}
