//! Tells `wsdrain version` which cargo profile built it (`dev`, `release`, `image`, ...).
//! Cargo gives build scripts only "debug"/"release" in PROFILE; the profile's own name is
//! the directory above `build/` in OUT_DIR (`target/[<triple>/]<profile>/build/...`).

fn main() {
    let out_dir = std::env::var("OUT_DIR").unwrap_or_default();
    let from_dir = std::path::Path::new(&out_dir)
        .ancestors()
        .nth(3)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .map(|n| if n == "debug" { "dev" } else { n }.to_owned());
    let profile = from_dir.unwrap_or_else(|| std::env::var("PROFILE").unwrap_or_default());
    println!("cargo:rustc-env=WSDRAIN_BUILD_PROFILE={profile}");
    println!("cargo:rerun-if-changed=build.rs");
}
