//! Link settings of the binaries.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // `broker-ctl` is a short-lived process, often started once per `curl`
    // (`$(broker-ctl token)`). Linked as a non-PIE executable, its ~11k relative
    // relocations are applied at link time instead of by the dynamic loader at
    // every start, and the pages they touch are no longer copied on write: about
    // a third of the loader's work and forty page faults per run.
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=broker-ctl=-no-pie");
    }
}
