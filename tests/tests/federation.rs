//! Federation scenarios: hosts are network namespaces on one bridged underlay, each with a
//! node holding an identity from a cluster CA made for the test.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use umnet_tests::process::run;
use umnet_tests::{
    mac, umnet_bin, wait_for, Guest, GuestConfig, Netns, Node, NodeOptions, TempDir, Veth,
};

const PEER_PORT: u16 = 7780;

/// Runs the umnet CLI for local files (CA and certificates).
fn umnet(args: &[&str]) -> Result<String> {
    let mut command = Command::new(umnet_bin()?);
    command.args(args);
    let output = run(&mut command, Duration::from_secs(30))?;
    if !output.status.success() {
        bail!("umnet {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A cluster CA in a temporary directory.
struct Ca {
    dir: TempDir,
}

impl Ca {
    fn new(name: &str) -> Result<Ca> {
        let dir = TempDir::new("ca")?;
        let ca = dir.join("ca");
        umnet(&["ca", "init", "--dir", &ca.display().to_string(), "--name", name])?;
        Ok(Ca { dir })
    }

    /// Issues an identity for `name`, valid for `days`.
    fn issue(&self, name: &str, days: u32) -> Result<String> {
        let out = self.dir.join(format!("{name}.pem")).display().to_string();
        let ca = self.dir.join("ca").display().to_string();
        umnet(&["ca", "issue", name, "--dir", &ca, "--out", &out, "--days", &days.to_string()])?;
        Ok(out)
    }
}

/// Hosts on one bridged underlay: host `i` has address 10.200.0.`i+1`.
struct Underlay {
    hosts: Vec<Netns>,
    _links: Vec<Veth>,
    _switch: Netns,
}

impl Underlay {
    fn new(names: &[&str], mtu: u32) -> Result<Underlay> {
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
}

fn address(i: usize) -> String {
    format!("10.200.0.{}:{PEER_PORT}", i + 1)
}

/// Starts a node on host `i` with `identity` and a config naming `peers` (index, name).
fn start_node(
    underlay: &Underlay,
    i: usize,
    identity: &str,
    peers: &[(usize, &str)],
    extra: &str,
) -> Result<Node> {
    let mut config = String::from("[[network]]\nid = 100\n\n[[network]]\nid = 101\n");
    config.push_str(extra);
    for (j, name) in peers {
        config.push_str(&format!("\n[[peer]]\nname = \"{name}\"\naddress = \"{}\"\n", address(*j)));
    }
    Node::start(
        NodeOptions::new()
            .netns(&underlay.hosts[i])
            .config(&config)
            .arg("--identity")
            .arg(identity)
            .arg("--listen")
            .arg(&format!("0.0.0.0:{PEER_PORT}")),
    )
}

fn peer<'a>(peers: &'a Value, name: &str) -> Option<&'a Value> {
    peers.as_array()?.iter().find(|p| p["name"] == name)
}

/// Waits until `node` is connected to every peer in `names`.
fn wait_connected(node: &Node, names: &[&str]) -> Result<()> {
    wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        let peers = node.cli_json(&["peer", "list"])?;
        let all = names.iter().all(|n| peer(&peers, n).is_some_and(|p| p["state"] == "connected"));
        Ok(all.then_some(()))
    })
    .with_context(|| format!("peers {names:?} did not connect:\n{}", node.log()))
}

#[test]
fn guests_on_two_hosts_and_a_tap_on_a_third_share_network_100() -> Result<()> {
    let ca = Ca::new("test-cluster")?;
    let underlay = Underlay::new(&["a", "b", "c"], 1500)?;
    let names = ["a", "b", "c"];
    let mut nodes = Vec::new();
    for i in 0..3 {
        let peers: Vec<(usize, &str)> = (0..3).filter(|&j| j != i).map(|j| (j, names[j])).collect();
        nodes.push(start_node(&underlay, i, &ca.issue(names[i], 30)?, &peers, "")?);
    }
    for (i, node) in nodes.iter().enumerate() {
        let others: Vec<&str> = (0..3).filter(|&j| j != i).map(|j| names[j]).collect();
        wait_connected(node, &others)?;
    }

    let [ga, gc] = [
        Guest::boot(
            GuestConfig::new("ga").daemon(0, &mac(1), &nodes[0].ctl(100)).netns(&underlay.hosts[0]),
        )?,
        Guest::boot(
            GuestConfig::new("gc").daemon(0, &mac(3), &nodes[2].ctl(100)).netns(&underlay.hosts[2]),
        )?,
    ];
    ga.ip("eth0", "10.0.0.1/24")?;
    gc.ip("eth0", "10.0.0.3/24")?;
    assert!(ga.ping_ok("10.0.0.3")?, "guest on a cannot reach guest on c");

    nodes[1].cli_ok(&["port", "add", "tap", "umtapb", "--net", "100"])?;
    underlay.hosts[1].addr("umtapb", "10.0.0.2/24")?;
    assert!(underlay.hosts[1].ping_ok("10.0.0.1")?, "tap on b cannot reach guest on a");
    assert!(underlay.hosts[1].ping_ok("10.0.0.3")?, "tap on b cannot reach guest on c");

    // Network 101 on a and c is isolated from 100, across hosts too.
    let g101 = Guest::boot(
        GuestConfig::new("g101").daemon(0, &mac(4), &nodes[2].ctl(101)).netns(&underlay.hosts[2]),
    )?;
    g101.ip("eth0", "10.0.0.4/24")?;
    assert_eq!(ga.ping("10.0.0.4", 2)?.received, 0, "network 100 reached network 101");

    // Remote addresses are learned on the peer's port.
    let fdb = nodes[0].cli_json(&["fdb", "--net", "100"])?;
    let ports = nodes[0].cli_json(&["port", "list"])?;
    let remote = fdb.as_array().into_iter().flatten().find(|e| e["mac"] == mac(3)).cloned();
    let remote = remote.context("guest c's address not learned on a")?;
    let port = ports.as_array().into_iter().flatten().find(|p| p["id"] == remote["port"]);
    assert_eq!(port.map(|p| &p["kind"]), Some(&"peer".into()), "{ports}");
    assert_eq!(port.map(|p| &p["client"]), Some(&"c".into()), "{ports}");

    // Stop b: a and c keep talking. Restart it: its tap carries traffic again within 5 s.
    nodes[1].stop()?;
    assert!(ga.ping_ok("10.0.0.3")?, "a and c stopped talking when b stopped");
    nodes[1].restart()?;
    let started = std::time::Instant::now();
    wait_for(Duration::from_secs(5), Duration::from_millis(200), || {
        Ok(underlay.hosts[1].ping_ok("10.0.0.1")?.then_some(()))
    })
    .with_context(|| format!("b's tap did not reach a again:\n{}", nodes[1].log()))?;
    eprintln!("b's tap reached a again {:?} after the restart", started.elapsed());
    Ok(())
}

#[test]
fn an_underlay_mtu_of_1280_carries_full_frames() -> Result<()> {
    let ca = Ca::new("mtu")?;
    let underlay = Underlay::new(&["a", "b"], 1280)?;
    let a = start_node(&underlay, 0, &ca.issue("a", 30)?, &[(1, "b")], "")?;
    let b = start_node(&underlay, 1, &ca.issue("b", 30)?, &[(0, "a")], "")?;
    wait_connected(&a, &["b"])?;
    let ga = Guest::boot(
        GuestConfig::new("ga").daemon(0, &mac(1), &a.ctl(100)).netns(&underlay.hosts[0]),
    )?;
    let gb = Guest::boot(
        GuestConfig::new("gb").daemon(0, &mac(2), &b.ctl(100)).netns(&underlay.hosts[1]),
    )?;
    ga.ip("eth0", "10.0.0.1/24")?;
    gb.ip("eth0", "10.0.0.2/24")?;
    assert!(ga.ping_ok("10.0.0.2")?);
    let (status, output) = ga.run(
        "ping -c 3 -s 1472 -M do 10.0.0.2 || ping -c 3 -s 1472 10.0.0.2",
        Duration::from_secs(20),
    )?;
    assert_eq!(status, 0, "a 1500-byte packet did not cross a 1280-byte underlay:\n{output}");
    let peers = a.cli_json(&["peer", "list"])?;
    let max = peer(&peers, "b").and_then(|p| p["max_datagram"].as_u64()).unwrap_or(0);
    assert!(max < 1514, "the datagram size {max} should be smaller than a frame");
    Ok(())
}

#[test]
fn strangers_cannot_join_and_allowed_networks_hold() -> Result<()> {
    let ca = Ca::new("cluster")?;
    let foreign = Ca::new("foreign")?;
    let underlay = Underlay::new(&["a", "b", "x", "y", "z"], 1500)?;
    let restrict = "\n[[network]]\nid = 102\npeers = [\"c\"]\n";
    let a =
        start_node(&underlay, 0, &ca.issue("a", 30)?, &[(1, "b")], "\n[[network]]\nid = 102\n")?;
    let b = start_node(&underlay, 1, &ca.issue("b", 30)?, &[(0, "a")], restrict)?;
    wait_connected(&a, &["b"])?;

    // x: a certificate from another CA; y: an expired one; z: none at all (no identity, so
    // it cannot even dial). Each dials a.
    let x = start_node(&underlay, 2, &foreign.issue("x", 30)?, &[(0, "a")], "")?;
    let y = start_node(&underlay, 3, &ca.issue("y", 0)?, &[(0, "a")], "");
    let z = Node::start(NodeOptions::new().netns(&underlay.hosts[4]))?;
    let refused = z.cli(&["peer", "add", "a", &address(0)])?;
    assert_eq!(refused.status.code(), Some(4), "a node without identity took a peer");

    std::thread::sleep(Duration::from_secs(3));
    let peers = a.cli_json(&["peer", "list"])?;
    for stranger in ["x", "y", "z"] {
        assert!(peer(&peers, stranger).is_none(), "{stranger} joined: {peers}");
    }
    assert!(a.log().contains("peer handshake failed"), "no warning about strangers");
    let x_peers = x.cli_json(&["peer", "list"])?;
    assert_ne!(peer(&x_peers, "a").map(|p| &p["state"]), Some(&"connected".into()));
    if let Ok(y) = &y {
        let y_peers = y.cli_json(&["peer", "list"])?;
        assert_ne!(peer(&y_peers, "a").map(|p| &p["state"]), Some(&"connected".into()));
    }

    // Network 102 is restricted on b to a peer that does not exist: b neither names it to a
    // nor carries it, and a, told nothing of it, does not send it.
    let peers = a.cli_json(&["peer", "list"])?;
    let shared = &peer(&peers, "b").context("b gone")?["networks"];
    assert_eq!(shared, &serde_json::json!([100, 101]), "a would send 102 to b: {peers}");
    let peers = b.cli_json(&["peer", "list"])?;
    let shared = &peer(&peers, "a").context("a gone")?["networks"];
    assert_eq!(shared, &serde_json::json!([100, 101]), "b would send 102 to a: {peers}");
    Ok(())
}

#[test]
fn the_peer_cli_says_what_is_wrong() -> Result<()> {
    let ca = Ca::new("cli")?;
    let underlay = Underlay::new(&["a"], 1500)?;
    let a = start_node(&underlay, 0, &ca.issue("a", 30)?, &[], "")?;
    for (args, message) in [
        (&["peer", "add", "Bad_Name", "10.200.0.9:7780"][..], "name"),
        (&["peer", "add", "b", "nowhere"], "HOST:PORT"),
        (&["peer", "rm", "nobody"], "no peer nobody"),
    ] {
        let output = a.cli(args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    let added = a.cli_json(&["peer", "add", "b", "10.200.0.9:7780"])?;
    assert_eq!(added[0]["state"], "connecting");
    a.cli_ok(&["peer", "rm", "b"])?;
    assert_eq!(a.cli_json(&["peer", "list"])?, serde_json::json!([]));

    let show = umnet(&["cert", "show", &ca.issue("c", 30)?])?;
    assert!(show.contains("name         c"), "{show}");
    assert!(show.contains("issuer       cli"), "{show}");
    Ok(())
}
