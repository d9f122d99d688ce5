//! Bad input, each kind in the same run as guests that keep pinging: every bad client or
//! frame is refused or dropped with a log line and a counter, and nothing else changes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use umnet_proto::daemon::{Request, RequestKind, UnixAddress};
use umnet_tests::client::{frame, mac_bytes, DaemonClient};
use umnet_tests::{mac, Guest, GuestConfig, Node, NodeOptions};

/// A valid UML request naming an abstract address nobody bound.
fn request_bytes() -> Vec<u8> {
    let address = UnixAddress::abstract_name(b"umnet-test-nobody").expect("short name");
    let request = Request {
        kind: RequestKind::NewControl,
        requested_port: 0,
        address,
        description: "".into(),
    };
    request.to_uml_bytes().to_vec()
}

/// Connects to `ctl`, writes `bytes`, and returns how long the node took to hang up.
fn refused_after(ctl: &std::path::Path, bytes: &[u8], half_close: bool) -> Result<Duration> {
    let start = Instant::now();
    let mut stream = UnixStream::connect(ctl)?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.write_all(bytes)?;
    if half_close {
        stream.shutdown(std::net::Shutdown::Write)?;
    }
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).context("the node did not hang up")?;
    if !reply.is_empty() {
        bail!("the node answered {} bytes to a bad request", reply.len());
    }
    Ok(start.elapsed())
}

fn rejects(node: &Node) -> Result<Value> {
    Ok(node.cli_json(&["status"])?["rejects"].clone())
}

/// Pings from `a` to `address` in a thread while `work` runs, and checks no reply was lost.
fn while_pinging(a: &Guest, address: &str, work: impl FnOnce() -> Result<()>) -> Result<()> {
    assert!(a.ping_ok(address)?, "no connectivity before the bad input");
    std::thread::scope(|scope| {
        let pinger = scope.spawn(|| {
            a.run(&format!("ping -c 40 -i 0.25 -W 2 {address}"), Duration::from_secs(40))
        });
        let worked = work();
        let (_, output) = pinger.join().map_err(|_| anyhow::anyhow!("ping thread panicked"))??;
        worked?;
        if !output.contains("40 packets transmitted, 40 packets received") {
            bail!("the guests noticed the bad input:\n{output}");
        }
        Ok(())
    })
}

#[test]
fn bad_clients_and_frames_are_refused_while_guests_keep_pinging() -> Result<()> {
    let node = Node::start(NodeOptions::new())?;
    let [a, b] = Guest::boot_all([
        GuestConfig::new("a").daemon(0, &mac(1), &node.ctl(100)),
        GuestConfig::new("b").daemon(0, &mac(2), &node.ctl(100)),
    ])?;
    a.ip("eth0", "10.0.0.1/24")?;
    b.ip("eth0", "10.0.0.2/24")?;
    let ctl = node.ctl(100);

    while_pinging(&a, "10.0.0.2", || {
        let mut wrong_magic = request_bytes();
        wrong_magic[..4].copy_from_slice(&0xdead_beefu32.to_ne_bytes());
        refused_after(&ctl, &wrong_magic, false)?;

        let mut wrong_version = request_bytes();
        wrong_version[4..8].copy_from_slice(&2u32.to_ne_bytes());
        refused_after(&ctl, &wrong_version, false)?;

        refused_after(&ctl, &request_bytes()[..60], true)?;

        // Holding the connection open without a word: dropped after the handshake timeout.
        let waited = refused_after(&ctl, &[], false)?;
        assert!(waited >= Duration::from_secs(4), "silent client dropped after {waited:?}");

        // A valid request for a data socket that does not exist.
        refused_after(&ctl, &request_bytes(), false)?;

        // Garbage on the admin socket gets an error, not a crash.
        let mut admin = UnixStream::connect(node.admin_socket())?;
        admin.set_read_timeout(Some(Duration::from_secs(5)))?;
        admin.write_all(b"\x00\x01\x02 not json at all\n")?;
        let mut answer = String::new();
        admin.read_to_string(&mut answer)?;
        assert!(answer.contains("bad-request"), "admin answered {answer:?}");

        // A client that plugs in properly, then sends a runt and an oversize datagram.
        let client = DaemonClient::connect(&ctl)?;
        client.send(&[0x55])?;
        client.send(&vec![0u8; 9000])?;
        let ok = frame([0xff; 6], [0x02, 0, 0, 0, 0, 0x42], 0x88b5, &[0; 46]);
        client.send(&ok)?;
        let drops = node.cli_json(&["port", "list"])?;
        let port = drops
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["counters"]["drops"]["runt"] == 1)
            .cloned();
        let Some(port) = port else { bail!("no port counted the runt: {drops}") };
        assert_eq!(port["counters"]["drops"]["oversize"], 1, "{port}");
        assert_eq!(port["counters"]["rx_frames"], 1, "{port}");
        Ok(())
    })?;

    let rejects = rejects(&node)?;
    for reason in ["bad_magic", "bad_version", "truncated", "timeout", "unreachable"] {
        assert_eq!(rejects[reason], 1, "{reason}: {rejects}");
    }
    assert_eq!(rejects["admin_bad_request"], 1, "{rejects}");

    let log = node.log();
    for line in [
        "bad magic 0xdeadbeef",
        "unsupported protocol version 2",
        "truncated request: 60 bytes",
        "sent no request within",
        "cannot reach the client's data socket",
        "admin request refused",
        "dropped a malformed frame",
    ] {
        assert!(log.contains(line), "no log line with {line:?}:\n{log}");
    }
    Ok(())
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    line.split_whitespace().nth(1).context("bad VmRSS")?.parse().context("bad VmRSS")
}

#[test]
fn the_mac_limit_holds_against_a_hundred_thousand_random_sources() -> Result<()> {
    let node = Node::start(NodeOptions::new())?;
    let pid = node.pid().context("node not running")?;
    let [a, b] = Guest::boot_all([
        GuestConfig::new("a").daemon(0, &mac(1), &node.ctl(100)),
        GuestConfig::new("b").daemon(0, &mac(2), &node.ctl(100)),
    ])?;
    a.ip("eth0", "10.0.0.1/24")?;
    b.ip("eth0", "10.0.0.2/24")?;
    assert!(a.ping_ok("10.0.0.2")?);

    // The flood goes to a learned sink, so the guests see none of it: what is tested is the
    // table, not the guests' receive queues.
    let sink = DaemonClient::connect(&node.ctl(100))?;
    let sink_mac = [0x02, 0, 0, 0, 0, 0x5c];
    sink.send(&frame([0xff; 6], sink_mac, 0x88b5, &[0; 46]))?;
    let flooder = DaemonClient::connect(&node.ctl(100))?;
    flooder.set_timeout(Duration::from_secs(5))?;

    let before = rss_kib(pid)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..100_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let r = state.to_le_bytes();
        let source = [r[0] & 0xfe | 0x02, r[1], r[2], r[3], r[4], r[5]];
        flooder.send(&frame(sink_mac, source, 0x88b5, &[0; 46]))?;
    }
    let after = rss_kib(pid)?;

    let networks = node.cli_json(&["net", "list"])?;
    let net = &networks[0];
    assert_eq!(net["macs"], net["mac_limit"], "{net}");
    assert!(net["mac_limit_hits"].as_u64() > Some(90_000), "{net}");
    assert!(after < before + 16 * 1024, "memory grew from {before} KiB to {after} KiB");
    assert!(node.log().contains("MAC table full"), "no warning about the full table");

    assert!(a.ping_ok("10.0.0.2")?, "the guests stopped talking");
    assert!(b.ping_ok("10.0.0.1")?, "the guests stopped talking");
    let fdb = node.cli_json(&["fdb", "--net", "100"])?.to_string();
    let guest = mac_bytes(&mac(1))?;
    assert!(fdb.contains(&mac(1)), "guest {guest:?} no longer in the table");
    Ok(())
}
