//! The two "hosts": network namespaces joined by a veth pair that carries the underlay.
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
        for name in HOST_NAMES {
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
        Ok(hosts)
    }

    /// The namespace of `host` (0 or 1).
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
