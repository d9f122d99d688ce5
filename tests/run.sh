#!/usr/bin/env bash
# Runs what CI runs: installs what the tests need when it is missing, then checks formatting
# and lints, builds once and runs every test. Needs root: the tests make tap devices and
# network namespaces, and boot UML guests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: the tests need root (taps, network namespaces); run it with sudo" >&2
    exit 1
fi

# Debian packages the tests and benchmarks use: the UML kernel and a static busybox for the
# guests, vde_plug and vde_switch, uml_switch, ip, iperf3 and tcpdump.
packages=(user-mode-linux busybox-static vde2 uml-utilities iproute2 iperf3 tcpdump)
missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$package")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
        rustup component add "$component"
    fi
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
echo "== cargo build"
cargo build --workspace --all-targets --locked
echo "== cargo test"
cargo test --workspace --locked -- --test-threads=2
