//! Marks a build made with `HELM` set (as `scripts/test` does) with `cfg(has_helm)`: the chart
//! tests (tests/it/chart.rs) run then, and fail if that helm does not work; without it
//! `cargo test` lists them as ignored rather than passing them without running helm.

fn main() {
    println!("cargo::rerun-if-env-changed=HELM");
    println!("cargo::rustc-check-cfg=cfg(has_helm)");
    if std::env::var_os("HELM").is_some_and(|h| !h.is_empty()) {
        println!("cargo::rustc-cfg=has_helm");
    }
}
