//! Builds the kernels twice:
//! - for the GPU: kernels/bertcuda.cu (which includes every kernel family) with nvcc into one fatbin —
//!   SASS for sm_80 and sm_90, PTX for compute_90 — embedded in the binary by src/backend/device/driver.rs.
//!   nvcc is found through NVCC, CUDA_HOME, the project's toolchain directory (.toolchain/cuda, made by
//!   scripts/install-cuda-compiler.sh) or PATH. Without nvcc the crate still builds, with a warning, and
//!   the CUDA backend says at run time how to get the kernels.
//! - for the emulated device (src/backend/device/emu.rs): the same sources compiled for the host on top
//!   of kernels/emu/cuda_emu.h, with the emulator's runtime. clang++ (BERTCUDA_EMU_CXX, clang++-16 or
//!   clang++; scripts/install-emulator-compiler.sh) builds it with the checker's instrumentation; g++ builds
//!   it without the checker; with neither (or BERTCUDA_EMU_CXX=none) the crate builds without the
//!   emulator, with a warning.

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
        if c == "none" {
            return None;
        }
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
    let mut objects = kernels.compile_intermediates();
    let mut planted = 0;
    if clang {
        let mut mutants = base();
        mutants.flag("-fsanitize=thread").flag("-mllvm").flag("-tsan-instrument-func-entry-exit=0");
        mutants.include(&emu).warnings(false).flag("-w");
        for tu in planted_bugs(root) {
            mutants.file(tu);
            planted += 1;
        }
        objects.extend(mutants.compile_intermediates());
    }
    let mut lib = base();
    lib.file(emu.join("runtime.cpp")).file(anchors(planted));
    for o in objects {
        lib.object(o);
    }
    lib.compile("bertcuda_emu");
    println!("cargo:rustc-cfg=bertcuda_emu");
}

/// The planted bugs of kernels/emu/mutants.txt: for each, a copy of the kernel sources with its one change,
/// and a translation unit that compiles the family it names inside a namespace of its own, its kernels
/// registered as `mutant/<name>/<kernel>` (tests/emulator.rs runs them).
fn planted_bugs(root: &Path) -> Vec<PathBuf> {
    let list =
        std::fs::read_to_string(root.join("kernels/emu/mutants.txt")).expect("kernels/emu/mutants.txt");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("mutants");
    let sources: Vec<(String, String)> = std::fs::read_dir(root.join("kernels"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            (name.ends_with(".cu") || name.ends_with(".cuh"))
                .then(|| (name, std::fs::read_to_string(e.path()).unwrap()))
        })
        .collect();
    let mut tus = Vec::new();
    for (k, line) in list.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).enumerate() {
        let f: Vec<&str> = line.split(" | ").map(str::trim).collect();
        assert_eq!(f.len(), 8, "kernels/emu/mutants.txt: `{line}` needs 8 fields");
        let (name, file, nth, from, to, compiled) =
            (f[0], f[1], f[2].parse::<usize>().unwrap(), f[3], f[4], f[5]);
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut found = false;
        for (src_name, text) in &sources {
            let mut text = text.clone();
            if src_name == file {
                let at = text.match_indices(from).nth(nth - 1).map(|(i, _)| i).unwrap_or_else(|| {
                    panic!("kernels/emu/mutants.txt: mutant {name}: `{from}` (occurrence {nth}) is no longer in kernels/{file}: update the mutant")
                });
                text.replace_range(at..at + from.len(), to);
                found = true;
            }
            std::fs::write(dir.join(src_name), text).unwrap();
        }
        assert!(found, "kernels/emu/mutants.txt: mutant {name}: no kernels/{file}");
        let tu = dir.join("mutant.cpp");
        std::fs::write(
            &tu,
            format!(
                "#include \"cuda_emu.h\"\nnamespace bcemu_mutant_{k} {{\n#include \"common.cuh\"\n#undef BERTCUDA_KERNEL\n\
                 #define BERTCUDA_KERNEL(name, ...) void name(__VA_ARGS__); \\\n    static bcemu::Kernel bcemu_kernel_##name(\"mutant/{name}/\" #name, &name); \\\n    void name(__VA_ARGS__)\n\
                 #include \"{compiled}\"\n}}\nextern \"C\" void bcemu_mutant_anchor_{k}() {{}}\n"
            ),
        )
        .unwrap();
        tus.push(tu);
    }
    tus
}

/// The runtime calls `bcemu_mutants_anchor`, which calls each planted bug's anchor: a link that uses the
/// runtime keeps their objects (and so their kernel registrations).
fn anchors(count: usize) -> PathBuf {
    let mut text = String::new();
    for k in 0..count {
        text += &format!("extern \"C\" void bcemu_mutant_anchor_{k}();\n");
    }
    text += "extern \"C\" void bcemu_mutants_anchor() {\n";
    for k in 0..count {
        text += &format!("    bcemu_mutant_anchor_{k}();\n");
    }
    text += "}\n";
    let path = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("mutant_anchors.cpp");
    std::fs::write(&path, text).unwrap();
    path
}

/// kernels/launch.cuh's `constexpr int NAME = VALUE;` lines as Rust constants (OUT_DIR/launch.rs).
fn launch_constants(root: &Path) {
    let text = std::fs::read_to_string(root.join("kernels/launch.cuh")).expect("kernels/launch.cuh");
    let mut out = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("constexpr int ") {
            let (name, value) = rest.trim_end_matches(';').split_once(" = ").expect("NAME = VALUE");
            let value: u32 =
                value.parse().unwrap_or_else(|_| panic!("kernels/launch.cuh: {name} is not a number"));
            out += &format!("pub const {name}: u32 = {value};\n");
        }
    }
    std::fs::write(PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("launch.rs"), out).unwrap();
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
    launch_constants(&root);
    build_gpu(&root);
    build_emulator(&root);
}
