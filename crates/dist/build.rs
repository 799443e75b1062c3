//! Compiles the C++ Gloo bridge and links Debian's libgloo (package libgloo-dev), which
//! ships neither a pkg-config file nor a static library: its headers are in the default
//! include path and the shared library pulls in its own dependencies (hiredis, ibverbs).

fn main() {
    cxx_build::bridge("src/gloo/ffi.rs")
        .file("cpp/gloo_bridge.cc")
        .std("c++17")
        // Gloo's own headers trip these; our bridge code is clean without them.
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-sign-compare")
        .compile("ff_dist_gloo_bridge");
    println!("cargo:rustc-link-lib=dylib=gloo");
    println!("cargo:rerun-if-changed=src/gloo/ffi.rs");
    println!("cargo:rerun-if-changed=cpp/gloo_bridge.cc");
    println!("cargo:rerun-if-changed=cpp/gloo_bridge.h");
}
