use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the eBPF object with aya-build so that `cargo build` and `cargo test` just work;
/// `src/datapath` embeds it with `include_bytes_aligned!`.
///
/// `AYA_BUILD_SKIP=1` skips the eBPF build (for `cargo check` without bpf-linker); an empty
/// object is embedded then and loading the datapath fails with a clear error.
fn main() -> anyhow::Result<()> {
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let obj = out_dir.join("netns");
        if !obj.exists() {
            std::fs::write(&obj, []).context("writing the stub eBPF object")?;
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("netns-user has no parent directory"))?
        .join("netns-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package {
            name: "netns-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
