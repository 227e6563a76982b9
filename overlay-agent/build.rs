//! Compiles `overlay-ebpf` for the BPF target with the nightly toolchain and bpf-linker, leaving the
//! object in `OUT_DIR/overlay`, where `dataplane::ebpf` embeds it with `include_bytes_aligned!`.
//! Set `AYA_BUILD_SKIP=1` to skip (the object is then whatever the last build left, or missing).
fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../overlay-ebpf");
    // overlay-common is compiled into the object too; aya-build only watches the package itself.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../overlay-common")
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "overlay-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
