//! The two "hosts": network namespaces joined by a veth pair that carries the underlay, and
//! behind host a a LAN: a namespace with a Linux bridge, and a machine on it.
//!
//! [`Hosts`] creates two namespaces named after this process's pid and builds every device
//! inside them: the veth pair is created from within host a with its peer placed straight into
//! host b, so no device ever appears in the host's own namespace, and nothing touches the host's
//! own interfaces or routes. Dropping it deletes the namespaces, which deletes every device in
//! them (veth, VXLAN, taps). A namespace lives on while a process runs inside it, so the
//! processes started there must be stopped before the [`Hosts`] is dropped.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process::{run_checked, Finished};

/// The hosts' names, as messages and node names use them.
pub(crate) const HOST_NAMES: [&str; 2] = ["a", "b"];

/// The machine on host a's LAN, as a host index.
pub(crate) const MACHINE: usize = 2;

/// The LAN's bridge namespace, as a host index.
const LAN: usize = 3;

/// The machine's interface on the LAN.
pub(crate) const MACHINE_DEVICE: &str = "eth0";

/// The underlay device in each namespace.
pub(crate) const UNDERLAY_DEVICE: &str = "ul0";

/// The hosts' underlay addresses, in a /24.
pub(crate) const UNDERLAY: [Ipv4Addr; 2] =
    [Ipv4Addr::new(10, 201, 0, 1), Ipv4Addr::new(10, 201, 0, 2)];

/// How long one `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Two network namespaces joined by a veth pair, deleted on drop.
#[derive(Debug)]
pub(crate) struct Hosts {
    ip: PathBuf,
    /// Where bounded commands leave their output for a moment.
    scratch: PathBuf,
    /// The namespaces created so far, which drop deletes.
    namespaces: Vec<String>,
}

impl Hosts {
    /// Creates the namespaces and the underlay between them. `ip` is the `ip` program.
    pub(crate) fn create(ip: &Path, scratch: &Path) -> Result<Hosts> {
        let mut hosts =
            Hosts { ip: ip.to_path_buf(), scratch: scratch.to_path_buf(), namespaces: Vec::new() };

        // Step 1: the namespaces, each recorded as soon as it exists so drop deletes it.
        for name in HOST_NAMES.into_iter().chain(["machine", "lan"]) {
            let namespace = format!("umnet-bench-{}-{name}", std::process::id());
            hosts.run_ip(&["netns", "add", &namespace])?;
            hosts.namespaces.push(namespace);
        }

        // Step 2: the veth pair, both ends named alike, one in each namespace.
        let peer_namespace = hosts.namespaces[1].clone();
        hosts.ip(
            0,
            &[
                "link",
                "add",
                UNDERLAY_DEVICE,
                "type",
                "veth",
                "peer",
                "name",
                UNDERLAY_DEVICE,
                "netns",
                &peer_namespace,
            ],
        )?;
        for (host, address) in UNDERLAY.iter().enumerate() {
            let address = format!("{address}/24");
            hosts.ip(host, &["link", "set", "lo", "up"])?;
            hosts.ip(host, &["addr", "add", &address, "dev", UNDERLAY_DEVICE])?;
            hosts.ip(host, &["link", "set", UNDERLAY_DEVICE, "up"])?;
        }

        // Step 3: the LAN behind host a, and the machine on it.
        hosts.ip(LAN, &["link", "add", "br0", "type", "bridge"])?;
        hosts.ip(LAN, &["link", "set", "br0", "up"])?;
        hosts.ip(MACHINE, &["link", "set", "lo", "up"])?;
        hosts.cable(MACHINE, MACHINE_DEVICE, "pm")?;
        Ok(hosts)
    }

    /// Plugs `host` into the LAN with a veth pair: `device` in the host, `port` on the LAN's
    /// bridge, both up, neither with an address.
    pub(crate) fn cable(&self, host: usize, device: &str, port: &str) -> Result<()> {
        let lan = self.namespaces[LAN].clone();
        self.ip(
            host,
            &["link", "add", device, "type", "veth", "peer", "name", port, "netns", &lan],
        )?;
        self.ip(host, &["link", "set", device, "up"])?;
        self.ip(LAN, &["link", "set", port, "master", "br0", "up"])?;
        Ok(())
    }

    /// Sets sysctl `key` to `value` inside the namespace of `host`.
    pub(crate) fn sysctl(&self, host: usize, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let mut command = Command::new(&self.ip);
        command.args(["netns", "exec", self.namespace(host), "sh", "-c"]);
        command.arg(format!("echo {value} > {}", path.display()));
        run_checked(&mut command, &self.scratch, "sysctl", IP_TIMEOUT)?;
        Ok(())
    }

    /// The namespace of `host` (0 or 1, or [`MACHINE`]).
    pub(crate) fn namespace(&self, host: usize) -> &str {
        &self.namespaces[host]
    }

    /// Runs `ip -n NAMESPACE ARGS` and fails unless it succeeds.
    pub(crate) fn ip(&self, host: usize, args: &[&str]) -> Result<Finished> {
        let mut full = vec!["-n", self.namespace(host)];
        full.extend_from_slice(args);
        self.run_ip(&full)
    }

    /// A command that runs `program` inside the namespace of `host`. `ip netns exec` enters the
    /// namespace and then executes the program in its own place, so the child's pid is the
    /// program's.
    pub(crate) fn exec(&self, host: usize, program: &Path) -> Command {
        let mut command = Command::new(&self.ip);
        command.args(["netns", "exec", self.namespace(host)]).arg(program);
        command
    }

    /// Whether `device` exists on `host`.
    pub(crate) fn has_device(&self, host: usize, device: &str) -> bool {
        self.ip(host, &["link", "show", "dev", device]).is_ok()
    }

    /// The MTU of `device` on `host`.
    pub(crate) fn mtu(&self, host: usize, device: &str) -> Option<u32> {
        let shown = self.ip(host, &["-o", "link", "show", "dev", device]).ok()?;
        let mut words = shown.stdout.split_whitespace();
        words.find(|&word| word == "mtu")?;
        words.next()?.parse().ok()
    }

    /// Gives `device` on `host` an address in a /24 and brings it up.
    pub(crate) fn address(&self, host: usize, device: &str, address: Ipv4Addr) -> Result<()> {
        let with_prefix = format!("{address}/24");
        self.ip(host, &["addr", "add", &with_prefix, "dev", device])?;
        self.ip(host, &["link", "set", device, "up"])?;
        Ok(())
    }

    fn run_ip(&self, args: &[&str]) -> Result<Finished> {
        run_checked(Command::new(&self.ip).args(args), &self.scratch, "ip", IP_TIMEOUT)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for namespace in self.namespaces.iter().rev() {
            // Plain `status()`: the scratch directory may already be gone, and `ip netns del`
            // does not block.
            let deleted = Command::new(&self.ip)
                .args(["netns", "del", namespace])
                .stdin(Stdio::null())
                .status()
                .context("running ip");
            match deleted {
                Ok(status) if status.success() => {}
                Ok(status) => eprintln!("umnet-bench: ip netns del {namespace}: {status}"),
                Err(error) => eprintln!("umnet-bench: ip netns del {namespace}: {error:#}"),
            }
        }
    }
}
