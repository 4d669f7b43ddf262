//! What the benchmarks share: which binary they measure and the machine they ran on.

use std::path::PathBuf;

/// The binary to measure and a label saying which build it is: `WSDRAIN_BENCH_BIN`, else
/// the release build next to this bench if there is one, else the debug build.
pub fn pick_binary() -> (PathBuf, &'static str) {
    if let Some(bin) = std::env::var_os("WSDRAIN_BENCH_BIN") {
        return (PathBuf::from(bin), "WSDRAIN_BENCH_BIN, build type as given");
    }
    // A bench runs from <target>/<profile>/deps/NAME-HASH.
    let target = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let release = target.join("release/wsdrain");
    if release.exists() {
        return (release, "release build");
    }
    (target.join("debug/wsdrain"), "debug build")
}

/// CPUs and load average, printed beside every figure.
pub fn machine() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{} cpus, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}
