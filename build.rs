//! Builds the kernels twice:
//! - for the GPU: kernels/bertcuda.cu (which includes every kernel family) with nvcc into one fatbin —
//!   SASS for sm_80 and sm_90, PTX for compute_90 — embedded in the binary by src/backend/device/driver.rs.
//!   nvcc is found through NVCC, CUDA_HOME, the project's toolchain directory (.toolchain/cuda, made by
//!   scripts/install-cuda-compiler.sh) or PATH. Without nvcc the crate still builds, with a warning, and
//!   the CUDA backend says at run time how to get the kernels.
//! - for the emulated device (src/backend/device/emu.rs): the same sources compiled for the host on top
//!   of kernels/emu/cuda_emu.h, with the emulator's runtime. clang++ (BERTCUDA_EMU_CXX, clang++-16 or
//!   clang++; scripts/install-emulator-compiler.sh) builds it with the checker's instrumentation; g++ builds
//!   it without the checker; with neither the crate builds without the emulator, with a warning.

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

fn runs(cmd: &str) -> bool {
    Command::new(cmd).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The host C++ compiler for the emulator, and whether it is clang (which builds the checker).
fn find_cxx() -> Option<(String, bool)> {
    if let Ok(c) = std::env::var("BERTCUDA_EMU_CXX") {
        let clang = Command::new(&c)
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("clang"));
        return Some((c, clang));
    }
    for c in ["clang++-16", "clang++"] {
        if runs(c) {
            return Some((c.to_string(), true));
        }
    }
    runs("g++").then(|| ("g++".to_string(), false))
}

fn build_gpu(root: &Path) {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.fatbin");
    let Some(nvcc) = find_nvcc(root) else {
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

fn build_emulator(root: &Path) {
    let Some((cxx, clang)) = find_cxx() else {
        println!(
            "cargo:warning=no C++ compiler: building without the emulated device (run scripts/install-emulator-compiler.sh)"
        );
        return;
    };
    if !clang {
        println!(
            "cargo:warning={cxx} builds the emulated device without its checker (clang++ builds it with: scripts/install-emulator-compiler.sh)"
        );
    }
    let checked = if clang { "1" } else { "0" };
    let emu = root.join("kernels/emu");
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .compiler(&cxx)
            .std("c++20")
            .opt_level(2)
            .debug(false)
            .define("BCEMU_CHECKED", checked)
            .include(root.join("kernels"))
            .flag_if_supported("-Wno-unknown-pragmas")
            .warnings(true);
        b
    };
    let mut kernels = base();
    kernels.file(emu.join("kernels.cpp"));
    if clang {
        // Every load and store of the kernels calls the checker (runtime.cpp); no TSan runtime is linked.
        kernels.flag("-fsanitize=thread").flag("-mllvm").flag("-tsan-instrument-func-entry-exit=0");
    }
    let objects = kernels.compile_intermediates();
    let mut lib = base();
    lib.file(emu.join("runtime.cpp"));
    for o in objects {
        lib.object(o);
    }
    lib.compile("bertcuda_emu");
    println!("cargo:rustc-cfg=bertcuda_emu");
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo::rustc-check-cfg=cfg(bertcuda_emu)");
    println!("cargo:rerun-if-changed=kernels");
    for dir in ["kernels", "kernels/emu"] {
        for e in std::fs::read_dir(root.join(dir)).expect("kernels/ exists").flatten() {
            println!("cargo:rerun-if-changed={}", e.path().display());
        }
    }
    for v in ["NVCC", "CUDA_HOME", "PATH", "BERTCUDA_EMU_CXX"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rerun-if-changed=.toolchain/cuda/nvidia/cu13/bin/nvcc");
    build_gpu(&root);
    build_emulator(&root);
}
