//! What a guest asks of its node from inside: `umnet guest set-net`, run in a UML guest through
//! hostfs, the way `um_eth_net_set eth0 101` was.

use std::time::Duration;

use anyhow::{Context, Result};
use umnet_tests::client::{frame, DaemonClient};
use umnet_tests::cluster::counter;
use umnet_tests::{mac, umnet_bin, wait_for, Guest, GuestConfig, Netns, Node, NodeOptions};

const CONFIG: &str = "[[network]]\nid = 100\n\n[[network]]\nid = 101\n\n[[network]]\nid = 102\n\n\
                      [guests]\nset_net = true\nnetworks = [100, 101]\n";

/// Runs `umnet guest set-net IFACE NET` inside `guest`: its exit status and output.
fn set_net(guest: &Guest, iface: &str, net: u32) -> Result<(i32, String)> {
    let umnet = umnet_bin()?;
    guest.run(
        &format!("{} guest set-net {iface} {net} 2>&1", umnet.display()),
        Duration::from_secs(20),
    )
}

fn rejects(node: &Node) -> Result<serde_json::Value> {
    Ok(node.cli_json(&["status"])?["rejects"].clone())
}

#[test]
fn a_guest_moves_its_own_port_where_the_node_allows() -> Result<()> {
    let host = Netns::new("host")?;
    let node = Node::start(NodeOptions::new().netns(&host).config(CONFIG))?;
    let [a, b, c] = Guest::boot_all([
        GuestConfig::new("a").daemon(0, &mac(1), &node.ctl(100)).netns(&host),
        GuestConfig::new("b").bess(0, &mac(2), &node.bess(101)).netns(&host),
        GuestConfig::new("c").daemon(0, &mac(3), &node.ctl(102)).netns(&host),
    ])?;
    a.ip("eth0", "10.0.0.1/24")?;
    b.ip("vec0", "10.0.0.2/24")?;
    c.ip("eth0", "10.0.0.3/24")?;
    assert_eq!(a.ping("10.0.0.2", 1)?.received, 0, "100 reached 101 before any move");

    // Refused: the config lets guests choose 100 and 101, not 102.
    let (status, output) = set_net(&a, "eth0", 102)?;
    assert_eq!(status, 4, "a move to 102 was not refused:\n{output}");
    assert!(output.contains("may not choose network 102"), "{output}");
    assert!(output.contains("still on network 100"), "{output}");
    assert_eq!(a.ping("10.0.0.3", 1)?.received, 0, "the refused guest reached 102");
    assert_eq!(counter(&rejects(&node)?, &["guest_refused"]), 1);

    // Allowed: a moves itself to 101 and reaches b there, without reconfiguring anything.
    let (status, output) = set_net(&a, "eth0", 101)?;
    assert_eq!(status, 0, "the move to 101 failed:\n{output}");
    assert!(output.contains("on network 101 now"), "{output}");
    assert!(a.ping_ok("10.0.0.2")?, "a cannot reach b after moving to 101");
    let ports = node.cli_json(&["port", "list"])?;
    let on_101 = ports.as_array().into_iter().flatten().filter(|p| p["net"] == 101).count();
    assert_eq!(on_101, 2, "{ports}");
    assert!(node.log().contains("guest moved its port"), "no log line for the move");
    Ok(())
}

#[test]
fn forged_and_malformed_guest_requests_are_refused_and_counted() -> Result<()> {
    let host = Netns::new("host")?;
    let node = Node::start(NodeOptions::new().netns(&host).config(CONFIG))?;
    let guest = Guest::boot(GuestConfig::new("g").daemon(0, &mac(1), &node.ctl(100)).netns(&host))?;
    guest.ip("eth0", "10.0.0.1/24")?;

    // Malformed: a client sends frames of the guest-request kind that are no request.
    let ctl = node.ctl(100);
    let client = host.within(move || DaemonClient::connect(&ctl))?;
    let group = [0x03, 0x75, 0x6d, 0x6e, 0x65, 0x74];
    let source = [0x52, 0x54, 0, 0, 0, 9];
    for body in
        [&b"UMNG"[..], b"UMNG\x09\x01\0\0\0\x01\0\0\0\x65", b"UMNG\x01\x07\0\0\0\x01\0\0\0\x65"]
    {
        let mut padded = body.to_vec();
        padded.resize(46, 0);
        client.send(&frame(group, source, 0x88b5, &padded))?;
    }
    wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        Ok((counter(&rejects(&node)?, &["guest_malformed"]) >= 3).then_some(()))
    })
    .with_context(|| format!("malformed requests not counted:\n{}", node.log()))?;

    // Forged: the host asks through a tap port, where no guest is; the node answers nothing.
    node.cli_ok(&["port", "add", "tap", "umtap0", "--net", "100"])?;
    let mut command = host.command(umnet_bin()?)?;
    command.args(["guest", "set-net", "umtap0", "101"]);
    let output = umnet_tests::process::run(&mut command, Duration::from_secs(20))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no umnet node answered"), "{stderr}");
    assert!(counter(&rejects(&node)?, &["guest_forged"]) >= 1, "{}", rejects(&node)?);
    let ports = node.cli_json(&["port", "list"])?;
    assert!(ports.as_array().into_iter().flatten().all(|p| p["net"] == 100), "{ports}");

    // The guest itself still moves, and with the node's default config it may not.
    let (status, output) = set_net(&guest, "eth0", 101)?;
    assert_eq!(status, 0, "{output}");
    let plain = Node::start(NodeOptions::new().netns(&host))?;
    let other =
        Guest::boot(GuestConfig::new("o").daemon(0, &mac(2), &plain.ctl(100)).netns(&host))?;
    other.run_ok("ip link set eth0 up")?;
    let (status, output) = set_net(&other, "eth0", 100)?;
    assert_eq!(status, 4, "{output}");
    assert!(output.contains("does not let guests choose"), "{output}");
    Ok(())
}
