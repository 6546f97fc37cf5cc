#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: the Debian packages the demo,
# tests and benchmark use (podman 4.3 and its conmon for tests/tests/podman.rs,
# containerd 1.6 with ctr for tests/tests/cni_clients.rs),
# nightly rust-src, and bpf-linker built against the nightly toolchain's own libLLVM
# (Debian 12 ships no LLVM new enough).
set -euo pipefail

PKGS=(runc busybox-static iproute2 bpftool iptables nftables conntrack iperf3
      sockperf tcpdump socat netcat-openbsd iputils-ping containernetworking-plugins jq
      python3 util-linux podman containerd)

need=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
rustup component list --toolchain nightly --installed | grep -q '^rust-src' \
    || rustup component add rust-src --toolchain nightly

if ! command -v bpf-linker >/dev/null 2>&1; then
    d="$HOME/.cache/bpf-linker-llvm/lib"
    mkdir -p "$d"
    sysroot="$(rustc +nightly --print sysroot)"
    mapfile -t libs < <(ls "$sysroot"/lib/libLLVM.so.*-rust-* 2>/dev/null)
    if ((${#libs[@]} != 1)); then
        echo "setup: expected exactly one libLLVM in $sysroot/lib, found ${#libs[@]}" >&2
        exit 1
    fi
    ln -sf "${libs[0]}" "$d/libLLVM.so"
    major="$(basename "${libs[0]}" | sed -E 's/libLLVM\.so\.([0-9]+).*/\1/')"
    echo "setup: building bpf-linker against ${libs[0]} (llvm-$major, about 2 minutes)"
    LLVM_PREFIX="${d%/lib}" cargo +nightly install bpf-linker --locked \
        --no-default-features --features "llvm-$major"
fi

# bpffs for pinning the datapath (the hook exits; pins keep links and maps alive).
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
echo "setup: ok"
