//! Rebuild the eBPF object when bpf-linker changes: the linker does the final code generation, so
//! a different linker (or the LLVM under it) means a different object.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => {
            println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`")
        }
    }
}
