//! Scenarios of the single-host switch with real UML guests: every transport on one network,
//! isolation between networks and live moves, a tap port, and `vde_plug`.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use umnet_tests::client::{arp_request, is_arp_reply_from};
use umnet_tests::{mac, require_program, Guest, GuestConfig, Netns, Node, NodeOptions};

/// Ports of `net` in `umnet port list --json`.
fn ports_on(node: &Node, net: u64) -> Result<Vec<Value>> {
    let ports = node.cli_json(&["port", "list"])?;
    let ports = ports.as_array().context("port list is not an array")?;
    Ok(ports.iter().filter(|p| p["net"] == net).cloned().collect())
}

#[test]
fn daemon_bess_and_vde_guests_share_network_100() -> Result<()> {
    let node = Node::start(NodeOptions::new())?;
    let [daemon, bess, vde] = Guest::boot_all([
        GuestConfig::new("daemon").daemon(0, &mac(1), &node.ctl(100)),
        GuestConfig::new("bess").bess(0, &mac(2), &node.bess(100)),
        GuestConfig::new("vde").vde(0, &mac(3), &node.vde_dir(100)),
    ])?;
    daemon.ip("eth0", "10.0.0.1/24")?;
    bess.ip("vec0", "10.0.0.2/24")?;
    vde.ip("eth0", "10.0.0.3/24")?;

    assert!(daemon.ping_ok("10.0.0.2")?, "daemon guest cannot reach the BESS guest");
    assert!(bess.ping_ok("10.0.0.1")?, "BESS guest cannot reach the daemon guest");
    assert!(vde.ping_ok("10.0.0.1")?, "vde guest cannot reach the daemon guest");
    assert!(vde.ping_ok("10.0.0.2")?, "vde guest cannot reach the BESS guest");

    let ports = ports_on(&node, 100)?;
    let mut kinds: Vec<&str> = ports.iter().filter_map(|p| p["kind"].as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["bess", "uml", "vde"]);
    for port in &ports {
        assert!(port["counters"]["rx_frames"].as_u64() > Some(0), "no traffic on {port}");
        assert!(port["pid"].as_u64().is_some(), "no client pid on {port}");
    }

    let fdb = node.cli_json(&["fdb", "--net", "100"])?;
    let macs: Vec<&str> =
        fdb.as_array().into_iter().flatten().filter_map(|e| e["mac"].as_str()).collect();
    for n in 1..=3 {
        assert!(macs.contains(&mac(n).as_str()), "{} not learned: {macs:?}", mac(n));
    }

    // A guest that goes away takes its port and its addresses with it.
    drop(vde);
    umnet_tests::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        ports_on(&node, 100).map(|p| p.len() == 2).unwrap_or(false)
    })
    .context("the vde guest's port was not removed")?;
    let fdb = node.cli_json(&["fdb", "--net", "100"])?;
    assert!(!fdb.to_string().contains(&mac(3)), "stale address of a gone port: {fdb}");
    Ok(())
}

#[test]
fn networks_are_isolated_until_a_port_moves() -> Result<()> {
    let node = Node::start(NodeOptions::new())?;
    node.cli_ok(&["net", "add", "101"])?;
    let [a, b] = Guest::boot_all([
        GuestConfig::new("on100").daemon(0, &mac(1), &node.ctl(100)),
        GuestConfig::new("on101").daemon(0, &mac(2), &node.ctl(101)),
    ])?;
    a.ip("eth0", "10.0.0.1/24")?;
    b.ip("eth0", "10.0.0.2/24")?;

    assert_eq!(a.ping("10.0.0.2", 2)?.received, 0, "frames crossed from network 100 to 101");
    assert_eq!(b.ping("10.0.0.1", 2)?.received, 0, "frames crossed from network 101 to 100");

    let moving = ports_on(&node, 101)?;
    let [port] = moving.as_slice() else { bail!("expected one port on 101: {moving:?}") };
    let id = port["id"].to_string();
    let moved = node.cli_json(&["port", "set", &id, "--net", "100"])?;
    assert_eq!(moved[0]["net"], 100);

    // The guest was neither rebooted nor reconfigured.
    assert!(a.ping_ok("10.0.0.2")?, "no connectivity after the move");
    assert!(b.ping_ok("10.0.0.1")?, "no connectivity after the move");

    // And back: isolated again.
    node.cli_ok(&["port", "set", &id, "--net", "101"])?;
    assert_eq!(a.ping("10.0.0.2", 2)?.received, 0, "frames crossed after moving back");
    Ok(())
}

#[test]
fn a_tap_port_in_a_namespace_reaches_a_guest() -> Result<()> {
    let host = Netns::new("tap")?;
    let node = Node::start(NodeOptions::new().netns(&host))?;
    let guest = Guest::boot(GuestConfig::new("g").daemon(0, &mac(1), &node.ctl(100)).netns(&host))?;
    guest.ip("eth0", "10.0.0.1/24")?;

    let added = node.cli_json(&["port", "add", "tap", "umtap0", "--net", "100"])?;
    assert_eq!(added[0]["kind"], "tap");
    host.addr("umtap0", "10.0.0.9/24")?;

    assert!(host.ping_ok("10.0.0.1")?, "the host cannot reach the guest through the tap");
    assert!(guest.ping_ok("10.0.0.9")?, "the guest cannot reach the host through the tap");

    node.cli_ok(&["port", "rm", "umtap0"])?;
    let links = host.ip(&["-o", "link"])?;
    assert!(!links.contains("umtap0"), "the tap the node created was not deleted:\n{links}");

    // A persistent tap made beforehand is attached to, and left in place on removal.
    host.ip(&["tuntap", "add", "dev", "umtapp", "mode", "tap"])?;
    node.cli_ok(&["port", "add", "tap", "umtapp", "--net", "100"])?;
    host.addr("umtapp", "10.0.0.8/24")?;
    assert!(guest.ping_ok("10.0.0.8")?, "the guest cannot reach the host through the tap");
    node.cli_ok(&["port", "rm", "umtapp"])?;
    let links = host.ip(&["-o", "link"])?;
    assert!(links.contains("umtapp"), "a tap the node did not create was deleted:\n{links}");
    Ok(())
}

/// `vde_plug DIR` relays frames between the switch and its stdin and stdout, each frame
/// prefixed with its length as two big-endian bytes.
#[test]
fn vde_plug_exchanges_frames_with_a_guest() -> Result<()> {
    let vde_plug = require_program("vde_plug", "vde2")?;
    let node = Node::start(NodeOptions::new())?;
    let guest = Guest::boot(GuestConfig::new("g").daemon(0, &mac(1), &node.ctl(100)))?;
    guest.ip("eth0", "10.0.0.1/24")?;

    let mut plug = Command::new(vde_plug)
        .arg(node.vde_dir(100))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting vde_plug")?;
    let result = (|| -> Result<()> {
        let mut stdout = plug.stdout.take().context("no stdout")?;
        let (frames, received) = mpsc::channel();
        std::thread::spawn(move || {
            let mut length = [0u8; 2];
            while stdout.read_exact(&mut length).is_ok() {
                let mut frame = vec![0u8; usize::from(u16::from_be_bytes(length))];
                if stdout.read_exact(&mut frame).is_err() || frames.send(frame).is_err() {
                    break;
                }
            }
        });

        let stdin = plug.stdin.as_mut().context("no stdin")?;
        let ours = [0x02, 0, 0, 0, 0, 0x99];
        let request = arp_request(ours, [10, 0, 0, 99], [10, 0, 0, 1]);
        for _ in 0..5 {
            let mut record = (request.len() as u16).to_be_bytes().to_vec();
            record.extend_from_slice(&request);
            stdin.write_all(&record)?;
            stdin.flush()?;
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                match received.recv_timeout(left) {
                    Ok(frame) if is_arp_reply_from(&frame, [10, 0, 0, 1]) => {
                        assert_eq!(&frame[..6], &ours, "the reply is not addressed to vde_plug");
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        bail!("no ARP reply from the guest reached vde_plug");
    })();

    let _ = plug.kill();
    let _ = plug.wait();
    let mut stderr = String::new();
    if let Some(mut pipe) = plug.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    result.with_context(|| format!("vde_plug stderr:\n{stderr}\nnode log:\n{}", node.log()))?;

    let ports = ports_on(&node, 100)?;
    assert!(
        ports.iter().any(|p| p["kind"] == "vde") || node.log().contains("kind=vde"),
        "vde_plug's port never appeared"
    );
    Ok(())
}
