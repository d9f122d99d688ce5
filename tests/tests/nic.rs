//! NIC ports: a "LAN" namespace with a Linux bridge and a plain machine on it stands for a
//! physical subnet, and hosts (namespaces with a node each) bridge it onto network 100
//! through a veth cable called `lan0`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use umnet_tests::cluster::{counter, wait_connected, Ca, Underlay, NETWORKS};
use umnet_tests::{mac, wait_for, Guest, GuestConfig, Netns, Node, NodeOptions, Veth};

/// The plain machine's address on the LAN.
const MACHINE: &str = "10.0.0.100";

/// A LAN: a bridge in a namespace of its own, a machine on it, and cables to hosts.
struct Lan {
    machine: Netns,
    cables: Vec<Veth>,
    switch: Netns,
}

impl Lan {
    fn new() -> Result<Lan> {
        let switch = Netns::new("lan")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let machine = Netns::new("machine")?;
        let cable = Veth::between(&switch, "pm", &machine, "eth0")?;
        switch.ip(&["link", "set", "pm", "master", "br0", "up"])?;
        machine.addr("eth0", &format!("{MACHINE}/24"))?;
        Ok(Lan { machine, cables: vec![cable], switch })
    }

    /// Cables `host` to the LAN: interface `lan0` in the host, `port` on the bridge. The host
    /// side has no address: the node bridges it.
    fn plug(&mut self, host: &Netns, port: &str) -> Result<()> {
        self.cables.push(Veth::between(&self.switch, port, host, "lan0")?);
        self.switch.ip(&["link", "set", port, "master", "br0", "up"])?;
        Ok(())
    }
}

fn ports(node: &Node) -> Result<Vec<Value>> {
    Ok(node.cli_json(&["port", "list"])?.as_array().cloned().unwrap_or_default())
}

/// The NIC port of `node` on `lan0`.
fn nic(node: &Node) -> Result<Value> {
    ports(node)?.into_iter().find(|p| p["kind"] == "nic").context("no NIC port")
}

/// Waits until the NIC port's state starts with `state`.
fn wait_state(node: &Node, state: &str, within: Duration) -> Result<Value> {
    wait_for(within, Duration::from_millis(100), || {
        let nic = nic(node)?;
        Ok(nic["state"].as_str().is_some_and(|s| s.starts_with(state)).then_some(nic))
    })
    .with_context(|| {
        format!("the NIC port did not become {state}: {:?}\n{}", nic(node), node.log())
    })
}

/// Frames that came in on the NIC ports of `nodes`, in all.
fn nic_frames(nodes: &[&Node]) -> Result<u64> {
    let mut total = 0;
    for node in nodes {
        total += counter(&nic(node)?, &["counters", "rx_frames"]);
    }
    Ok(total)
}

#[test]
fn a_lan_bridged_on_two_hosts_reaches_a_guest_without_a_storm() -> Result<()> {
    let ca = Ca::new("lan")?;
    let underlay = Underlay::new(&["a", "b", "c"], 1500)?;
    let names = ["a", "b", "c"];
    let mut nodes = Vec::new();
    for i in 0..3 {
        let peers: Vec<(usize, &str)> = (0..3).filter(|&j| j != i).map(|j| (j, names[j])).collect();
        nodes.push(underlay.start_node(i, &ca.issue(names[i], 30)?, &peers, NETWORKS)?);
    }
    for (i, node) in nodes.iter().enumerate() {
        let others: Vec<&str> = (0..3).filter(|&j| j != i).map(|j| names[j]).collect();
        wait_connected(node, &others)?;
    }
    let mut lan = Lan::new()?;
    lan.plug(&underlay.hosts[0], "pa")?;
    lan.plug(&underlay.hosts[2], "pc")?;

    // Host a bridges the LAN onto network 100; a guest on b reaches the LAN machine and the
    // machine, after forgetting every neighbour, reaches the guest through an ARP broadcast.
    nodes[0].cli_ok(&["port", "add", "nic", "lan0", "--net", "100"])?;
    wait_state(&nodes[0], "forwarding", Duration::from_secs(10))?;
    let guest = Guest::boot(
        GuestConfig::new("gb").daemon(0, &mac(2), &nodes[1].ctl(100)).netns(&underlay.hosts[1]),
    )?;
    guest.ip("eth0", "10.0.0.2/24")?;
    assert!(guest.ping_ok(MACHINE)?, "the guest on b cannot reach the LAN machine");
    lan.machine.ip(&["neigh", "flush", "all"])?;
    assert!(lan.machine.ping_ok("10.0.0.2")?, "the LAN machine cannot reach the guest on b");
    let neighbours = guest.run_ok("ip neigh show")?;
    assert!(neighbours.contains(MACHINE), "the machine's ARP never reached the guest");

    // Host c bridges the same LAN onto the same network: it hears a's beacons and stands by.
    nodes[2].cli_ok(&["port", "add", "nic", "lan0", "--net", "100"])?;
    let standby = wait_state(&nodes[2], "standby", Duration::from_secs(10))?;
    assert!(standby["state"].as_str().unwrap_or("").contains("a/lan0"), "{standby}");
    wait_state(&nodes[0], "forwarding (LAN shared with c/lan0)", Duration::from_secs(5))?;

    // Ten seconds of pings and broadcasts (ARP for an address nobody has) stay bounded.
    let before = nic_frames(&[&nodes[0], &nodes[2]])?;
    let mut arp = lan.machine.command("/bin/busybox")?;
    arp.args(["arping", "-c", "10", "-w", "11", "-I", "eth0", "10.0.0.250"]);
    arp.stdout(Stdio::null());
    let mut arp = arp.spawn().context("starting arping in the LAN machine")?;
    let pings = guest.ping(MACHINE, 10)?;
    let _ = arp.wait();
    let frames = nic_frames(&[&nodes[0], &nodes[2]])? - before;
    eprintln!("{} of 10 pings answered; {frames} frames came in on the NIC ports", pings.received);
    assert_eq!(pings.received, 10, "pings were lost while both hosts bridged the LAN");
    assert!(frames < 500, "{frames} frames in 10 s through the NIC ports: a storm");
    for node in [&nodes[0], &nodes[1], &nodes[2]] {
        let networks = node.cli_json(&["net", "list"])?;
        let flaps: u64 =
            networks.as_array().into_iter().flatten().map(|n| counter(n, &["mac_flaps"])).sum();
        assert_eq!(flaps, 0, "addresses flapped: {networks}");
    }

    // a's node stops: c takes over, and the guest reaches the machine again within 5 s.
    nodes[0].stop()?;
    let stopped = Instant::now();
    let answered = || -> Result<bool> {
        let (status, _) =
            guest.run(&format!("ping -c 1 -W 1 {MACHINE}"), Duration::from_secs(5))?;
        Ok(status == 0)
    };
    wait_for(Duration::from_secs(10), Duration::from_millis(50), || Ok(answered()?.then_some(())))
        .with_context(|| format!("c did not take over:\n{}", nodes[2].log()))?;
    let resumed = stopped.elapsed();
    eprintln!("the guest reached the LAN machine again {resumed:?} after a stopped");
    assert!(resumed < Duration::from_secs(5), "took {resumed:?} to resume after a stopped");
    wait_state(&nodes[2], "forwarding", Duration::from_secs(1))?;
    Ok(())
}

/// Loads the guest kernel's 802.1Q support (a module of Debian's UML kernel) and makes
/// `eth0.ID`.
fn guest_vlan(guest: &Guest, id: u16, cidr: &str) -> Result<()> {
    guest.run_ok(
        "for m in llc stp garp mrp 8021q; do \
         insmod $(find /usr/lib/uml/modules -name $m.ko | head -n 1) || exit 1; done",
    )?;
    guest.run_ok(&format!(
        "ip link set eth0 up && vconfig add eth0 {id} && ip link set eth0.{id} up"
    ))?;
    guest.ip(&format!("eth0.{id}"), cidr)
}

#[test]
fn vlan_tags_and_tcp_cross_between_the_lan_and_the_network() -> Result<()> {
    let host = Netns::new("host")?;
    let mut lan = Lan::new()?;
    lan.plug(&host, "pa")?;
    let node = Node::start(NodeOptions::new().netns(&host))?;
    node.cli_ok(&["port", "add", "nic", "lan0", "--net", "100"])?;
    wait_state(&node, "forwarding", Duration::from_secs(10))?;

    // A guest on the network and a second LAN machine talk on VLAN 42, tagged on the LAN and
    // in the guest. The host kernel of the test may lack 802.1Q, so the LAN machine that tags
    // is a UML guest on a tap plugged into the LAN's bridge.
    lan.switch.ip(&["tuntap", "add", "dev", "lm0", "mode", "tap"])?;
    lan.switch.ip(&["link", "set", "lm0", "master", "br0", "up"])?;
    let [guest, tagger] = Guest::boot_all([
        GuestConfig::new("g").daemon(0, &mac(1), &node.ctl(100)).netns(&host),
        GuestConfig::new("lm").iface(format!("eth0=tuntap,lm0,{}", mac(9))).netns(&lan.switch),
    ])?;
    guest_vlan(&guest, 42, "10.42.0.1/24")?;
    guest_vlan(&tagger, 42, "10.42.0.9/24")?;
    assert!(guest.ping_ok("10.42.0.9")?, "VLAN 42 did not cross between guest and LAN");
    let nic_port = nic(&node)?;
    assert_eq!(counter(&nic_port, &["counters", "drops", "oversize"]), 0, "{nic_port}");

    // TCP from the machine to a tap port on the host: the LAN hands the NIC super-frames
    // with partial checksums (veth offloads), which the port cuts back into wire frames.
    node.cli_ok(&["port", "add", "tap", "umtap0", "--net", "100"])?;
    host.addr("umtap0", "10.0.0.2/24")?;
    let mut server = host.command("iperf3")?;
    server.args(["-s", "-1", "-p", "5201"]).stdout(Stdio::null());
    let mut server = server.spawn().context("starting iperf3 (Debian package iperf3)")?;
    std::thread::sleep(Duration::from_millis(500));
    let mut client = lan.machine.command("iperf3")?;
    client.args(["-c", "10.0.0.2", "-p", "5201", "-t", "2", "-J"]);
    let output = umnet_tests::process::run(&mut client, Duration::from_secs(30))?;
    let _ = server.kill();
    let _ = server.wait();
    let result: Value = serde_json::from_slice(&output.stdout).context("iperf3 said no JSON")?;
    let received = result["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    eprintln!("TCP through the NIC port: {received} bytes in 2 s");
    assert!(received > 1_000_000, "TCP did not cross the NIC port: {result}");
    let nic_port = nic(&node)?;
    assert_eq!(counter(&nic_port, &["counters", "drops", "oversize"]), 0, "{nic_port}");
    Ok(())
}

#[test]
fn the_interface_may_go_down_and_away_and_a_killed_node_leaves_it_as_it_was() -> Result<()> {
    let host = Netns::new("host")?;
    let mut lan = Lan::new()?;
    lan.plug(&host, "pa")?;
    let promiscuity = |host: &Netns| -> Result<String> {
        let link = host.ip(&["-d", "link", "show", "lan0"])?;
        let words: Vec<&str> = link.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "promiscuity").context("no promiscuity")?;
        Ok(words.get(at + 1).unwrap_or(&"?").to_string())
    };
    assert_eq!(promiscuity(&host)?, "0");

    let mut node = Node::start(NodeOptions::new().netns(&host))?;
    node.cli_ok(&["port", "add", "nic", "lan0", "--net", "100"])?;
    node.cli_ok(&["port", "add", "tap", "umtap0", "--net", "100"])?;
    host.addr("umtap0", "10.0.0.2/24")?;
    assert_eq!(promiscuity(&host)?, "1", "the NIC port did not make lan0 promiscuous");
    wait_state(&node, "forwarding", Duration::from_secs(10))?;
    assert!(host.ping_ok(MACHINE)?, "the host's tap cannot reach the LAN machine");

    // Down and up again.
    host.ip(&["link", "set", "lan0", "down"])?;
    assert!(!host.ping_ok(MACHINE)?, "the LAN answered through a downed interface");
    host.ip(&["link", "set", "lan0", "up"])?;
    wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        Ok(host.ping_ok(MACHINE)?.then_some(()))
    })
    .with_context(|| format!("no traffic after lan0 came back up:\n{}", node.log()))?;

    // Gone (the cable pulled out), then back under the same name.
    lan.cables.pop();
    wait_state(&node, "interface lan0 is gone", Duration::from_secs(10))?;
    lan.plug(&host, "pa")?;
    wait_for(Duration::from_secs(15), Duration::from_millis(200), || {
        Ok(host.ping_ok(MACHINE)?.then_some(()))
    })
    .with_context(|| format!("no traffic after lan0 came back:\n{}", node.log()))?;
    assert_eq!(promiscuity(&host)?, "1", "the new lan0 is not promiscuous");
    node.cli_ok(&["status"])?;

    // A node killed outright leaves the interface as it found it.
    node.kill()?;
    assert_eq!(promiscuity(&host)?, "0", "lan0 stayed promiscuous after the node was killed");
    Ok(())
}

#[test]
fn nic_ports_say_what_is_wrong() -> Result<()> {
    let host = Netns::new("host")?;
    let mut lan = Lan::new()?;
    lan.plug(&host, "pa")?;
    let node = Node::start(NodeOptions::new().netns(&host))?;
    for (args, code, message) in [
        (&["port", "add", "nic", "nowhere0", "--net", "100"][..], 4, "no network interface"),
        (&["port", "add", "nic", "lan0", "--net", "7"], 4, "no network 7"),
        (&["port", "add", "nic", "lo", "--net", "100"], 4, "loopback"),
        (&["port", "add", "nic", "a/b", "--net", "100"], 4, "not a valid interface name"),
        (&["port", "add", "nic", "lan0", "--net", "x"], 2, "invalid value"),
    ] {
        let output = node.cli(args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    node.cli_ok(&["port", "add", "nic", "lan0", "--net", "100"])?;
    let again = node.cli(&["port", "add", "nic", "lan0", "--net", "100"])?;
    assert!(String::from_utf8_lossy(&again.stderr).contains("is a port already"));
    node.cli_ok(&["port", "rm", "lan0"])?;
    assert!(ports(&node)?.is_empty());

    // Without CAP_NET_RAW the node says which capability a NIC port needs.
    let unprivileged = Node::start(NodeOptions::new().netns(&host).without_capability("net_raw"))?;
    let output = unprivileged.cli(&["port", "add", "nic", "lan0", "--net", "100"])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("CAP_NET_RAW"), "{stderr}");
    Ok(())
}

#[test]
fn nic_ports_are_restored_and_may_wait_for_their_interface() -> Result<()> {
    let host = Netns::new("host")?;
    let mut lan = Lan::new()?;
    let config = "[[network]]\nid = 100\n\n[[nic]]\nname = \"lan0\"\nnet = 100\n";
    let mut node = Node::start(NodeOptions::new().netns(&host).config(config))?;
    // lan0 does not exist yet: the port waits for it.
    wait_state(&node, "interface lan0 is gone", Duration::from_secs(5))?;
    lan.plug(&host, "pa")?;
    node.cli_ok(&["port", "add", "tap", "umtap0", "--net", "100"])?;
    host.addr("umtap0", "10.0.0.2/24")?;
    wait_for(Duration::from_secs(15), Duration::from_millis(200), || {
        Ok(host.ping_ok(MACHINE)?.then_some(()))
    })
    .with_context(|| format!("the waiting NIC port never carried traffic:\n{}", node.log()))?;

    // Moved to 101 with the CLI, which is saved, and restored there after a restart.
    node.cli_ok(&["net", "add", "101"])?;
    node.cli_ok(&["port", "set", "lan0", "--net", "101"])?;
    node.restart()?;
    let restored = nic(&node)?;
    assert_eq!(restored["net"], 101, "{restored}");
    Ok(())
}
