//! Clusters of nodes for federation scenarios: a CA made for the test, hosts as network
//! namespaces on one bridged underlay, and nodes on them with identities of that CA.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::netns::{Netns, Veth};
use crate::node::{umnet_bin, Node, NodeOptions};
use crate::process::run;
use crate::temp::TempDir;
use crate::wait::wait_for;

/// The UDP port every node of a test cluster listens on, each in its own namespace.
pub const PEER_PORT: u16 = 7780;

/// Networks 100 and 101, open to every peer: what most nodes of the tests serve.
pub const NETWORKS: &str = "[[network]]\nid = 100\n\n[[network]]\nid = 101\n";

/// Runs the umnet CLI on local files (CA and certificates) and returns its stdout; a failure
/// is an error quoting stderr.
pub fn umnet(args: &[&str]) -> Result<String> {
    let mut command = Command::new(umnet_bin()?);
    command.args(args);
    let output = run(&mut command, Duration::from_secs(30))?;
    if !output.status.success() {
        bail!("umnet {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A cluster CA in a temporary directory (`ca/` inside [`Ca::dir`]).
#[derive(Debug)]
pub struct Ca {
    /// Holds the CA in `ca/` and the identities issued, one `NAME.pem` each.
    pub dir: TempDir,
}

impl Ca {
    /// Makes a CA for cluster `name`.
    pub fn new(name: &str) -> Result<Ca> {
        let dir = TempDir::new("ca")?;
        let ca = dir.join("ca");
        umnet(&["ca", "init", "--dir", &ca.display().to_string(), "--name", name])?;
        Ok(Ca { dir })
    }

    /// Issues an identity for `name`, valid for `days`, and returns the bundle's path.
    pub fn issue(&self, name: &str, days: u32) -> Result<String> {
        let out = self.dir.join(format!("{name}.pem")).display().to_string();
        let ca = self.dir.join("ca").display().to_string();
        umnet(&["ca", "issue", name, "--dir", &ca, "--out", &out, "--days", &days.to_string()])?;
        Ok(out)
    }
}

/// Hosts on one bridged underlay: host `i` has address 10.200.0.`i+1` on its `eth0`.
#[derive(Debug)]
pub struct Underlay {
    /// The hosts, in the order they were named.
    pub hosts: Vec<Netns>,
    _links: Vec<Veth>,
    _switch: Netns,
}

impl Underlay {
    /// Makes a host for each of `names`, all on one bridge whose links have MTU `mtu`.
    pub fn new(names: &[&str], mtu: u32) -> Result<Underlay> {
        let switch = Netns::new("under")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "mtu", &mtu.to_string(), "up"])?;
        let mut hosts = Vec::new();
        let mut links = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let host = Netns::new(name)?;
            let port = format!("p{i}");
            links.push(Veth::between(&switch, &port, &host, "eth0")?);
            switch.ip(&["link", "set", &port, "master", "br0", "mtu", &mtu.to_string(), "up"])?;
            host.ip(&["link", "set", "eth0", "mtu", &mtu.to_string()])?;
            host.addr("eth0", &format!("10.200.0.{}/24", i + 1))?;
            hosts.push(host);
        }
        Ok(Underlay { hosts, _links: links, _switch: switch })
    }

    /// Starts a node on host `i` with the identity bundle at `identity`, a config holding
    /// `networks` (and whatever else the text says), and `peers` (host index, node name).
    pub fn start_node(
        &self,
        i: usize,
        identity: &str,
        peers: &[(usize, &str)],
        networks: &str,
    ) -> Result<Node> {
        let mut config = networks.to_string();
        for (j, name) in peers {
            config.push_str(&format!(
                "\n[[peer]]\nname = \"{name}\"\naddress = \"{}\"\n",
                address(*j)
            ));
        }
        Node::start(
            NodeOptions::new()
                .netns(&self.hosts[i])
                .config(&config)
                .arg("--identity")
                .arg(identity)
                .arg("--listen")
                .arg(&format!("0.0.0.0:{PEER_PORT}")),
        )
    }
}

/// Where the node on host `i` listens for peers.
pub fn address(i: usize) -> String {
    format!("10.200.0.{}:{PEER_PORT}", i + 1)
}

/// The entry of peer `name` in the output of `umnet peer list --json`.
pub fn peer<'a>(peers: &'a Value, name: &str) -> Option<&'a Value> {
    peers.as_array()?.iter().find(|p| p["name"] == name)
}

/// Waits until `node` is connected to every peer in `names`.
pub fn wait_connected(node: &Node, names: &[&str]) -> Result<()> {
    wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        let peers = node.cli_json(&["peer", "list"])?;
        let all = names.iter().all(|n| peer(&peers, n).is_some_and(|p| p["state"] == "connected"));
        Ok(all.then_some(()))
    })
    .with_context(|| format!("peers {names:?} did not connect:\n{}", node.log()))
}

/// A number at `path` in a JSON value, 0 where there is none.
pub fn counter(value: &Value, path: &[&str]) -> u64 {
    path.iter().fold(value, |value, key| &value[*key]).as_u64().unwrap_or(0)
}
