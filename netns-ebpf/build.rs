use which::which;

/// The crate has an undeclared dependency on the `bpf-linker` binary: rebuild when it changes.
fn main() {
    match which("bpf-linker") {
        Ok(p) => println!("cargo:rerun-if-changed={}", p.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run scripts/setup.sh"),
    }
}
