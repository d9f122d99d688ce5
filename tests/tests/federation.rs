//! Federation scenarios: hosts are network namespaces on one bridged underlay, each with a
//! node holding an identity from a cluster CA made for the test.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use umnet_tests::cluster::{
    address, counter, peer, umnet, wait_connected, Ca, Underlay, NETWORKS, PEER_PORT,
};
use umnet_tests::process::run;
use umnet_tests::{
    mac, umnet_bin, wait_for, Guest, GuestConfig, Node, NodeOptions, TempDir, TestPeer,
};

#[test]
fn guests_on_two_hosts_and_a_tap_on_a_third_share_network_100() -> Result<()> {
    let ca = Ca::new("test-cluster")?;
    let underlay = Underlay::new(&["a", "b", "c"], 1500)?;
    let names = ["a", "b", "c"];
    // On a, network 101 is for c alone.
    let a_networks = "[[network]]\nid = 100\n\n[[network]]\nid = 101\npeers = [\"c\"]\n";
    let networks = [a_networks, NETWORKS, NETWORKS];
    let mut nodes = Vec::new();
    for i in 0..3 {
        let peers: Vec<(usize, &str)> = (0..3).filter(|&j| j != i).map(|j| (j, names[j])).collect();
        nodes.push(underlay.start_node(i, &ca.issue(names[i], 30)?, &peers, networks[i])?);
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

    // On a, network 101 is for c alone: a's tap on 101 reaches c's guest on 101, and b, which
    // serves 101 too, gets none of a's frames of 101.
    nodes[0].cli_ok(&["port", "add", "tap", "umtapa101", "--net", "101"])?;
    nodes[1].cli_ok(&["port", "add", "tap", "umtapb101", "--net", "101"])?;
    underlay.hosts[0].addr("umtapa101", "10.0.0.11/24")?;
    underlay.hosts[1].addr("umtapb101", "10.0.0.12/24")?;
    assert!(underlay.hosts[0].ping_ok("10.0.0.4")?, "a's tap on 101 cannot reach c's guest");
    let link = underlay.hosts[0].ip(&["-o", "link", "show", "umtapa101"])?;
    let tap_mac = link.split_whitespace().skip_while(|w| *w != "link/ether").nth(1);
    let tap_mac = tap_mac.context("no MAC address in `ip link show`")?.to_string();
    let learned_on = |node: &Node| -> Result<bool> {
        let fdb = node.cli_json(&["fdb", "--net", "101"])?;
        Ok(fdb.as_array().into_iter().flatten().any(|e| e["mac"] == tap_mac.as_str()))
    };
    assert!(learned_on(&nodes[2])?, "c did not learn a's tap on 101");
    assert!(!underlay.hosts[1].ping_ok("10.0.0.11")?, "b's tap on 101 reached a's");
    assert!(!learned_on(&nodes[1])?, "b received a frame of a's network 101");
    let peers = nodes[0].cli_json(&["peer", "list"])?;
    assert_eq!(peer(&peers, "b").map(|p| &p["networks"]), Some(&serde_json::json!([100])));

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
    let a = underlay.start_node(0, &ca.issue("a", 30)?, &[(1, "b")], NETWORKS)?;
    let b = underlay.start_node(1, &ca.issue("b", 30)?, &[(0, "a")], NETWORKS)?;
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
    let restrict = format!("{NETWORKS}\n[[network]]\nid = 102\npeers = [\"c\"]\n");
    let with_102 = format!("{NETWORKS}\n[[network]]\nid = 102\n");
    let a = underlay.start_node(0, &ca.issue("a", 30)?, &[(1, "b")], &with_102)?;
    let b = underlay.start_node(1, &ca.issue("b", 30)?, &[(0, "a")], &restrict)?;
    wait_connected(&a, &["b"])?;

    // x: a certificate from another CA; y: an expired one; z: none at all (no identity, so
    // it cannot even dial). Each dials a.
    let x = underlay.start_node(2, &foreign.issue("x", 30)?, &[(0, "a")], NETWORKS)?;
    let y = underlay.start_node(3, &ca.issue("y", 0)?, &[(0, "a")], NETWORKS);
    let z = Node::start(NodeOptions::new().netns(&underlay.hosts[4]))?;
    let refused = z.cli(&["peer", "add", "a", &address(0)])?;
    assert_eq!(refused.status.code(), Some(4), "a node without identity took a peer");
    // It runs single-host, and both its log and the refusal say how to get an identity.
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("umnet ca issue"), "{stderr}");
    assert!(z.log().contains("running single-host"), "{}", z.log());
    assert!(z.log().contains("umnet ca"), "{}", z.log());
    // a's certificate is valid for 30 days, inside the warning window: a warns at start.
    assert!(a.log().contains("the node certificate expires soon"), "{}", a.log());

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

/// A TLS client configuration trusting the cluster CA of `identity` and presenting no
/// certificate at all, as a stranger who got hold of the CA certificate would build.
fn anonymous_client(identity: &umnet_certs::Identity) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.ca_certificate_der().clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![umnet_certs::ALPN.to_vec()];
    Ok(config)
}

#[test]
fn expired_early_and_anonymous_clients_fail_the_handshake() -> Result<()> {
    let ca = Ca::new("handshake")?;
    let underlay = Underlay::new(&["a", "s"], 1500)?;
    let a = underlay.start_node(0, &ca.issue("a", 30)?, &[], NETWORKS)?;
    let authority = umnet_certs::CertificateAuthority::load(&ca.dir.join("ca"))?;
    let day = Duration::from_secs(24 * 60 * 60);
    let now = SystemTime::now();
    let none = || Arc::new(umnet_certs::Revocations::new());
    let expired = authority.issue_with_window("s", now - 2 * day, now - day)?;
    let early = authority.issue_with_window("t", now + day, now + 2 * day)?;
    let attempts = [
        ("an expired certificate", umnet_certs::client_config(&expired, none())?),
        ("a certificate not valid yet", umnet_certs::client_config(&early, none())?),
        ("no certificate", anonymous_client(&expired)?),
    ];

    for (what, tls) in attempts {
        let failed = |node: &Node| -> Result<u64> {
            Ok(counter(&node.cli_json(&["status"])?, &["federation", "handshakes_failed"]))
        };
        let before = failed(&a)?;
        // In TLS 1.3 the client finishes its half of the handshake before the server has
        // judged its certificate, so the refusal may come as a closed connection.
        let attempt =
            TestPeer::connect_with(&underlay.hosts[1], tls, "a", address(0).parse()?, &[100]);
        if let Ok(stranger) = &attempt {
            wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
                Ok(stranger.close_reason())
            })
            .with_context(|| format!("a client with {what} kept its connection"))?;
        }
        wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
            Ok((failed(&a)? > before).then_some(()))
        })
        .with_context(|| format!("a client with {what} was not counted:\n{}", a.log()))?;
        let peers = a.cli_json(&["peer", "list"])?;
        assert_eq!(peers, serde_json::json!([]), "a client with {what} became a peer");
    }
    let log = a.log();
    assert!(log.contains("peer handshake failed"), "no warning names the failures:\n{log}");
    for reason in ["certificate expired", "certificate not valid yet", "no certificates"] {
        assert!(log.contains(reason), "no warning gives the reason {reason}:\n{log}");
    }
    Ok(())
}

#[test]
fn the_peer_cli_says_what_is_wrong() -> Result<()> {
    let ca = Ca::new("cli")?;
    let underlay = Underlay::new(&["a"], 1500)?;
    let a = underlay.start_node(0, &ca.issue("a", 30)?, &[], NETWORKS)?;
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

/// A datagram carrying a whole frame of network `net`, as [`umnet_proto::peer`] lays it out.
fn frame_datagram(net: u32, frame: &[u8]) -> Vec<u8> {
    let mut datagram = vec![umnet_proto::peer::FRAME];
    datagram.extend_from_slice(&net.to_be_bytes());
    datagram.extend_from_slice(frame);
    datagram
}

/// A broadcast ARP-sized frame from `source`.
fn broadcast_from(source: [u8; 6]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&[0x08, 0x06]);
    frame.resize(60, 0);
    frame
}

#[test]
fn garbage_and_malformed_datagrams_are_counted_and_change_nothing() -> Result<()> {
    let ca = Ca::new("garbage")?;
    let underlay = Underlay::new(&["a", "b", "r"], 1500)?;
    // Network 102 on a is for b alone.
    let restricted = format!("{NETWORKS}\n[[network]]\nid = 102\npeers = [\"b\"]\n");
    let with_102 = format!("{NETWORKS}\n[[network]]\nid = 102\n");
    let a = underlay.start_node(0, &ca.issue("a", 30)?, &[(1, "b")], &restricted)?;
    let b = underlay.start_node(1, &ca.issue("b", 30)?, &[(0, "a")], &with_102)?;
    wait_connected(&a, &["b"])?;
    a.cli_ok(&["port", "add", "tap", "gta", "--net", "100"])?;
    b.cli_ok(&["port", "add", "tap", "gtb", "--net", "100"])?;
    a.cli_ok(&["port", "add", "tap", "gta102", "--net", "102"])?;
    underlay.hosts[0].addr("gta", "10.0.0.1/24")?;
    underlay.hosts[1].addr("gtb", "10.0.0.2/24")?;
    assert!(underlay.hosts[0].ping_ok("10.0.0.2")?, "a's tap cannot reach b's");
    let uptime_of_b = |node: &Node| -> Result<u64> {
        Ok(counter(
            peer(&node.cli_json(&["peer", "list"])?, "b").context("b gone")?,
            &["uptime_secs"],
        ))
    };
    let b_since = uptime_of_b(&a)?;

    // Step 1: datagrams that are no QUIC for a, from a host of nobody's.
    let status = a.cli_json(&["status"])?;
    let not_quic_before = counter(&status, &["federation", "not_quic"]);
    let socket = underlay.hosts[2].udp_socket("0.0.0.0:0")?;
    let mut short_header = vec![0x40u8; 1200];
    short_header[1..9].copy_from_slice(&[9, 8, 7, 6, 5, 4, 3, 2]);
    let mut other_version = vec![0xc0u8, 0x0a, 0x0a, 0x0a, 0x0a];
    other_version.resize(1200, 0);
    let garbage: [&[u8]; 4] = [&[0u8], &short_header, &other_version, &[0x00; 1472]];
    for datagram in garbage {
        socket.send_to(datagram, address(0)).context("sending garbage to a")?;
    }
    let counted = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let status = a.cli_json(&["status"])?;
        let not_quic = counter(&status, &["federation", "not_quic"]);
        Ok((not_quic >= not_quic_before + garbage.len() as u64).then_some(not_quic))
    });
    counted.with_context(|| format!("garbage not counted:\n{}", a.log()))?;

    // Step 2: a peer with a real identity of the cluster, sending what no node would.
    let identity = ca.issue("r", 30)?;
    let r_address = address(0).parse()?;
    let r =
        TestPeer::connect(&underlay.hosts[2], Path::new(&identity), "a", r_address, &[100, 102])?;
    wait_connected(&a, &["r"])?;
    let peers = a.cli_json(&["peer", "list"])?;
    let r_peer = peer(&peers, "r").context("r not listed")?;
    assert_eq!(r_peer["networks"], serde_json::json!([100]), "r was given 102: {peers}");
    let frame_102 = broadcast_from([0x02, 0, 0, 0, 0x01, 0x02]);
    for datagram in [
        vec![0xee, 1, 2, 3],                  // no datagram kind of the protocol
        vec![umnet_proto::peer::FRAME, 0, 0], // shorter than its header
        vec![umnet_proto::peer::FRAGMENT, 0, 0, 0, 100, 0, 0, 0, 1, 5, 3, 0xaa], // piece 5 of 3
        frame_datagram(100, &[0xff; 5]),      // a runt frame on a network r has
        frame_datagram(102, &frame_102),      // a network r may not carry
    ] {
        r.send_datagram(&datagram)?;
    }
    let counters = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let peers = a.cli_json(&["peer", "list"])?;
        let counters = peer(&peers, "r").context("r gone")?["counters"].clone();
        let done =
            counter(&counters, &["malformed"]) >= 3 && counter(&counters, &["not_allowed"]) >= 1;
        Ok(done.then_some(counters))
    })
    .with_context(|| format!("malformed datagrams not counted:\n{}", a.log()))?;
    eprintln!("r's counters on a: {counters}");
    let ports = a.cli_json(&["port", "list"])?;
    let r_port = ports.as_array().into_iter().flatten().find(|p| p["client"] == "r");
    let runts = r_port.map_or(0, |p| counter(p, &["counters", "drops", "runt"]));
    assert_eq!(runts, 1, "r's runt frame not counted on its port: {ports}");
    let tap_102 = ports.as_array().into_iter().flatten().find(|p| p["client"] == "gta102");
    let delivered = tap_102.map_or(u64::MAX, |p| counter(p, &["counters", "tx_frames"]));
    assert_eq!(delivered, 0, "r's frame for 102 reached a's tap on 102: {ports}");
    assert!(r.close_reason().is_none(), "a closed r's connection over datagrams");

    // Nothing else changed: a and b still talk over the same connection.
    assert!(underlay.hosts[0].ping_ok("10.0.0.2")?, "a's tap lost b's after the garbage");
    assert!(uptime_of_b(&a)? >= b_since, "a's connection to b was replaced");
    drop(r);
    drop(b);
    Ok(())
}

#[test]
fn revoking_a_peer_on_sighup_closes_its_connection() -> Result<()> {
    let ca = Ca::new("revoke")?;
    let underlay = Underlay::new(&["a", "b", "c"], 1500)?;
    let config = |extra: &str| {
        format!(
            "{extra}[[network]]\nid = 100\n\n[[peer]]\nname = \"b\"\naddress = \"{}\"\n\n\
             [[peer]]\nname = \"c\"\naddress = \"{}\"\n",
            address(1),
            address(2)
        )
    };
    let mut a = Node::start(
        NodeOptions::new()
            .netns(&underlay.hosts[0])
            .config(&config(""))
            .arg("--identity")
            .arg(&ca.issue("a", 30)?)
            .arg("--listen")
            .arg(&format!("0.0.0.0:{PEER_PORT}")),
    )?;
    let _b = underlay.start_node(1, &ca.issue("b", 30)?, &[(0, "a")], NETWORKS)?;
    let _c = underlay.start_node(2, &ca.issue("c", 30)?, &[(0, "a")], NETWORKS)?;
    wait_connected(&a, &["b", "c"])?;

    // A bad revocation list changes nothing.
    a.reconfigure(&config("[federation]\nrevoked_fingerprints = [\"not hex\"]\n\n"))?;
    wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        Ok(a.log().contains("revocation list not applied").then_some(()))
    })
    .with_context(|| format!("no complaint about the bad list:\n{}", a.log()))?;
    wait_connected(&a, &["b", "c"])?;

    // Revoking b by name cuts it off at once, and it stays off; c is untouched.
    a.reconfigure(&config("[federation]\nrevoked_names = [\"b\"]\n\n"))?;
    wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let peers = a.cli_json(&["peer", "list"])?;
        let b = peer(&peers, "b").context("b not listed")?;
        Ok((b["state"] != "connected").then_some(()))
    })
    .with_context(|| format!("b still connected after its revocation:\n{}", a.log()))?;
    std::thread::sleep(Duration::from_secs(2));
    let peers = a.cli_json(&["peer", "list"])?;
    assert_ne!(peer(&peers, "b").map(|p| &p["state"]), Some(&"connected".into()), "{peers}");
    assert_eq!(peer(&peers, "c").map(|p| &p["state"]), Some(&"connected".into()), "{peers}");
    assert!(a.log().contains("peer revoked"), "no warning names the revocation");
    Ok(())
}

#[test]
fn a_peer_dialed_under_the_wrong_name_is_refused() -> Result<()> {
    let ca = Ca::new("names")?;
    let underlay = Underlay::new(&["a", "b"], 1500)?;
    // a expects node c at b's address: b's certificate names b.
    let a = underlay.start_node(0, &ca.issue("a", 30)?, &[(1, "c")], NETWORKS)?;
    let _b = underlay.start_node(1, &ca.issue("b", 30)?, &[], NETWORKS)?;
    let error = wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        let peers = a.cli_json(&["peer", "list"])?;
        let c = peer(&peers, "c").context("c not listed")?;
        assert_ne!(c["state"], "connected", "a took b for c: {peers}");
        Ok(c["last_error"].as_str().map(str::to_string))
    })?;
    assert!(error.contains("not valid for name") || error.contains("name"), "{error}");
    assert!(a.log().contains("peer handshake failed"), "no warning:\n{}", a.log());
    Ok(())
}

#[test]
fn a_node_key_never_leaves_the_node_in_the_request_flow() -> Result<()> {
    let ca = Ca::new("csr")?;
    let underlay = Underlay::new(&["a", "n"], 1500)?;
    let a = underlay.start_node(0, &ca.issue("a", 30)?, &[], NETWORKS)?;

    // On the node: a key in its state directory, and a request.
    let node_dir = TempDir::new("csr-node")?;
    let state = node_dir.join("state");
    let state_arg = state.display().to_string();
    let csr = node_dir.join("n.csr").display().to_string();
    umnet(&["cert", "request", "n", "--state-dir", &state_arg, "--out", &csr])?;
    let request = std::fs::read_to_string(&csr)?;
    assert!(!request.contains("PRIVATE KEY"), "the request carries the key");

    // On the CA host: the certificate; then back on the node: install it.
    let ca_dir = ca.dir.join("ca").display().to_string();
    let crt = node_dir.join("n.crt").display().to_string();
    umnet(&["ca", "sign", &csr, "--dir", &ca_dir, "--out", &crt])?;
    let ca_crt = ca.dir.join("ca/ca.crt").display().to_string();
    umnet(&["cert", "install", &crt, "--ca", &ca_crt, "--state-dir", &state_arg])?;
    let shown = umnet(&["cert", "show", "--state-dir", &state_arg])?;
    assert!(shown.contains("name         n"), "{shown}");

    // The node runs on the identity in its state directory and joins a.
    let config = format!("[[peer]]\nname = \"a\"\naddress = \"{}\"\n", address(0));
    let n = Node::start(
        NodeOptions::new()
            .netns(&underlay.hosts[1])
            .state_dir(&state)
            .config(&config)
            .arg("--listen")
            .arg(&format!("0.0.0.0:{PEER_PORT}")),
    )?;
    wait_connected(&n, &["a"])?;
    wait_connected(&a, &["n"])?;

    // Errors: a request that is none, a certificate of another CA, a CA made twice.
    let fails = |args: &[&str], message: &str| -> Result<()> {
        let mut command = Command::new(umnet_bin()?);
        command.args(args);
        let output = run(&mut command, Duration::from_secs(30))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.to_lowercase().contains(message), "{args:?}: {stderr}");
        Ok(())
    };
    let junk = node_dir.join("junk.csr").display().to_string();
    std::fs::write(&junk, "not a request\n")?;
    fails(&["ca", "sign", &junk, "--dir", &ca_dir], "request")?;
    let foreign = Ca::new("other")?;
    let foreign_crt = foreign.dir.join("ca/ca.crt").display().to_string();
    fails(&["cert", "install", &crt, "--ca", &foreign_crt, "--state-dir", &state_arg], "ca")?;
    fails(&["ca", "init", "--dir", &ca_dir], "exist")?;
    fails(&["cert", "show", "/nonexistent/cert.pem"], "nonexistent")?;
    Ok(())
}

#[test]
fn sighup_adds_a_peer_and_a_network_and_revokes_a_peer_while_a_ping_runs() -> Result<()> {
    let ca = Ca::new("reload")?;
    let underlay = Underlay::new(&["a", "b", "c", "d"], 1500)?;
    let config = |extra: &str, peers: &[usize]| {
        let mut text = format!("{extra}{NETWORKS}");
        for &j in peers {
            let name = ["a", "b", "c", "d"][j];
            text.push_str(&format!(
                "\n[[peer]]\nname = \"{name}\"\naddress = \"{}\"\n",
                address(j)
            ));
        }
        text
    };
    let a_identity = ca.issue("a", 30)?;
    let mut a = Node::start(
        NodeOptions::new()
            .netns(&underlay.hosts[0])
            .config(&config("", &[1]))
            .arg("--identity")
            .arg(&a_identity)
            .arg("--listen")
            .arg(&format!("0.0.0.0:{PEER_PORT}")),
    )?;
    let b = underlay.start_node(1, &ca.issue("b", 30)?, &[(0, "a")], NETWORKS)?;
    let _c = underlay.start_node(2, &ca.issue("c", 30)?, &[(0, "a")], NETWORKS)?;
    let _d = underlay.start_node(3, &ca.issue("d", 30)?, &[], NETWORKS)?;
    wait_connected(&a, &["b", "c"])?;
    a.cli_ok(&["port", "add", "tap", "rta", "--net", "100"])?;
    b.cli_ok(&["port", "add", "tap", "rtb", "--net", "100"])?;
    underlay.hosts[0].addr("rta", "10.0.0.1/24")?;
    underlay.hosts[1].addr("rtb", "10.0.0.2/24")?;
    assert!(underlay.hosts[0].ping_ok("10.0.0.2")?);
    let uptime = |node: &Node, name: &str| -> Result<u64> {
        let peers = node.cli_json(&["peer", "list"])?;
        Ok(counter(peer(&peers, name).context("peer gone")?, &["uptime_secs"]))
    };

    // A ping runs across the reload: 40 echoes, one every 100 ms.
    let mut ping = underlay.hosts[0].command("/bin/busybox")?;
    ping.args(["ping", "-c", "40", "-i", "0.1", "-W", "2", "10.0.0.2"]);
    let ping = ping.stdout(std::process::Stdio::piped()).spawn().context("starting ping")?;
    std::thread::sleep(Duration::from_millis(1000));
    let b_before = uptime(&a, "b")?;
    // The reload also brings a renewed certificate (a's bundle replaced in place), which the
    // new connection to d then uses.
    let renewed_dir = ca.dir.join("renewed");
    std::fs::create_dir_all(&renewed_dir)?;
    let out = renewed_dir.join("a.pem").display().to_string();
    let ca_dir = ca.dir.join("ca").display().to_string();
    umnet(&["ca", "issue", "a", "--dir", &ca_dir, "--out", &out, "--days", "90"])?;
    std::fs::copy(&out, &a_identity)?;
    a.reconfigure(&config(
        "[federation]\nrevoked_names = [\"c\"]\n\n[[network]]\nid = 102\n\n",
        &[1, 3],
    ))?;
    wait_connected(&a, &["d"])?;
    wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let peers = a.cli_json(&["peer", "list"])?;
        Ok(peer(&peers, "c").is_none_or(|c| c["state"] != "connected").then_some(()))
    })
    .with_context(|| format!("c still connected after its revocation:\n{}", a.log()))?;
    let networks = a.cli_json(&["net", "list"])?;
    assert!(networks.as_array().into_iter().flatten().any(|n| n["id"] == 102), "{networks}");

    let output = ping.wait_with_output().context("waiting for ping")?;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("40 packets transmitted, 40 packets received"), "{text}");
    assert!(uptime(&a, "b")? >= b_before, "the connection to b was replaced");
    assert!(a.log().contains("SIGHUP: config reloaded"), "{}", a.log());
    assert!(a.log().contains("new certificate in use"), "{}", a.log());
    Ok(())
}

#[test]
fn listed_inbound_refuses_other_nodes_and_crossed_dials_keep_one_connection() -> Result<()> {
    let ca = Ca::new("inbound")?;
    let underlay = Underlay::new(&["a", "b", "c"], 1500)?;
    let listed = format!("[federation]\ninbound = \"listed\"\n\n{NETWORKS}");
    // a accepts only b; c, of the same cluster, dials a and is turned away.
    let a = underlay.start_node(0, &ca.issue("a", 30)?, &[(1, "b")], &listed)?;
    let b = underlay.start_node(1, &ca.issue("b", 30)?, &[(0, "a")], NETWORKS)?;
    let c = underlay.start_node(2, &ca.issue("c", 30)?, &[(0, "a")], NETWORKS)?;
    wait_connected(&a, &["b"])?;
    wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        Ok(a.log().contains("not a listed peer").then_some(()))
    })
    .with_context(|| format!("a did not refuse c:\n{}", a.log()))?;
    let peers = a.cli_json(&["peer", "list"])?;
    assert!(peer(&peers, "c").is_none_or(|c| c["state"] != "connected"), "{peers}");
    let c_peers = c.cli_json(&["peer", "list"])?;
    assert_ne!(peer(&c_peers, "a").map(|p| &p["state"]), Some(&"connected".into()));

    // a and b dialed each other at once: one connection survives, and stays.
    let uptime = |node: &Node, name: &str| -> Result<u64> {
        let peers = node.cli_json(&["peer", "list"])?;
        Ok(counter(peer(&peers, name).context("peer gone")?, &["uptime_secs"]))
    };
    std::thread::sleep(Duration::from_secs(3));
    let (a_before, b_before) = (uptime(&a, "b")?, uptime(&b, "a")?);
    std::thread::sleep(Duration::from_secs(2));
    assert!(uptime(&a, "b")? > a_before, "a's connection to b was replaced");
    assert!(uptime(&b, "a")? > b_before, "b's connection to a was replaced");
    a.cli_ok(&["port", "add", "tap", "ina", "--net", "100"])?;
    b.cli_ok(&["port", "add", "tap", "inb", "--net", "100"])?;
    underlay.hosts[0].addr("ina", "10.0.0.1/24")?;
    underlay.hosts[1].addr("inb", "10.0.0.2/24")?;
    assert!(underlay.hosts[0].ping_ok("10.0.0.2")?, "a and b do not carry frames");
    Ok(())
}

/// Two hosts on a 1500-byte underlay whose nodes dial each other, with a tap on network 100
/// on each: `{label}a` with 10.0.0.1 on host a, `{label}b` with 10.0.0.2 on host b.
struct TapPair {
    // Fields drop in order: the nodes before their namespaces and identities.
    a: Node,
    b: Node,
    underlay: Underlay,
    _ca: Ca,
}

impl TapPair {
    fn new(label: &str) -> Result<TapPair> {
        let ca = Ca::new(label)?;
        let underlay = Underlay::new(&["a", "b"], 1500)?;
        let a = underlay.start_node(0, &ca.issue("a", 30)?, &[(1, "b")], NETWORKS)?;
        let b = underlay.start_node(1, &ca.issue("b", 30)?, &[(0, "a")], NETWORKS)?;
        wait_connected(&a, &["b"])?;
        wait_connected(&b, &["a"])?;
        for (i, node) in [&a, &b].into_iter().enumerate() {
            let tap = format!("{label}{}", ["a", "b"][i]);
            node.cli_ok(&["port", "add", "tap", &tap, "--net", "100"])?;
            underlay.hosts[i].addr(&tap, &format!("10.0.0.{}/24", i + 1))?;
        }
        assert!(underlay.hosts[0].ping_ok("10.0.0.2")?, "the taps cannot reach each other");
        Ok(TapPair { a, b, underlay, _ca: ca })
    }

    /// Runs iperf3 with `args` from a's tap to b's: the MSS the client chose and the bytes the
    /// server received.
    fn iperf3(&self, args: &[&str]) -> Result<(u64, u64)> {
        let (client, server, address) =
            (&self.underlay.hosts[0], &self.underlay.hosts[1], "10.0.0.2");
        let mut daemon = server.command("iperf3")?;
        daemon.args(["-s", "-1", "-p", "5201", "-B", address]).stdout(Stdio::null());
        let mut daemon = daemon.spawn().context("starting iperf3 (Debian package iperf3)")?;
        // The server may not listen yet: the client then fails to connect at once, and tries
        // again.
        let result = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            let mut command = client.command("iperf3")?;
            command.args(["-c", address, "-p", "5201", "-J"]).args(args);
            let output = run(&mut command, Duration::from_secs(30))?;
            let report: serde_json::Value =
                serde_json::from_slice(&output.stdout).unwrap_or_default();
            Ok(output.status.success().then_some(report).filter(|r| r["error"].is_null()))
        });
        let _ = daemon.kill();
        let _ = daemon.wait();
        let report = result.context("iperf3 never completed a test")?;
        let mss = counter(&report, &["start", "tcp_mss_default"]);
        let received = counter(&report, &["end", "sum_received", "bytes"]);
        Ok((mss, received))
    }
}

#[test]
fn tcp_syns_to_a_peer_announce_segments_that_fit_one_datagram() -> Result<()> {
    let mut pair = TapPair::new("mss")?;
    let clamped = |node: &Node, name: &str| -> Result<(u64, u64)> {
        let peers = node.cli_json(&["peer", "list"])?;
        let entry = peer(&peers, name).context("peer gone")?;
        Ok((counter(entry, &["counters", "mss_clamped"]), counter(entry, &["max_datagram"])))
    };

    // Both SYNs cross a peer, and each end hears an MSS whose segments fit one datagram: the
    // frame (Ethernet, IPv4, TCP with timestamps) and umnet's 5-byte header.
    let (mss, received) = pair.iperf3(&["-n", "4M"])?;
    let (a_clamped, max_datagram) = clamped(&pair.a, "b")?;
    let (b_clamped, _) = clamped(&pair.b, "a")?;
    eprintln!("MSS {mss} over datagrams of {max_datagram} bytes");
    assert!(received > 1 << 20, "TCP did not cross: {received} bytes");
    assert!(a_clamped >= 1 && b_clamped >= 1, "SYNs clamped: a {a_clamped}, b {b_clamped}");
    assert!(mss > 1000, "MSS {mss} is lower than the path needs");
    assert!(5 + 14 + 20 + 20 + 12 + mss <= max_datagram, "MSS {mss}, datagrams {max_datagram}");

    // Off on b: the SYN-ACK keeps the MSS the tap's MTU gives, and full frames cross cut in two.
    let peers = format!("\n[[peer]]\nname = \"a\"\naddress = \"{}\"\n", address(0));
    pair.b.reconfigure(&format!("[federation]\nclamp_mss = false\n\n{NETWORKS}{peers}"))?;
    wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        Ok(pair.b.log().contains("SIGHUP: config reloaded").then_some(()))
    })
    .with_context(|| format!("b did not reload its config:\n{}", pair.b.log()))?;
    let (mss, received) = pair.iperf3(&["-n", "4M"])?;
    assert!(received > 1 << 20, "TCP did not cross with clamping off: {received} bytes");
    assert_eq!(mss, 1448, "the client's MSS with clamping off on b");
    assert_eq!(clamped(&pair.b, "a")?.0, b_clamped, "b clamped a SYN after it was told not to");
    Ok(())
}

#[test]
fn a_tcp_flood_from_a_tap_is_paced_by_the_peer_not_dropped() -> Result<()> {
    // Both dial, and a's first packets may reach b before b listens: whichever dial connects
    // first carries the whole run, the other is given up rather than replace it.
    let pair = TapPair::new("pace")?;
    let (a, b) = (&pair.a, &pair.b);

    // Four streams from a tap hand the node super-frames faster than one QUIC connection
    // sends them: the node must hold the tap back rather than lose what it read.
    let (_, received) = pair.iperf3(&["-P", "4", "-n", "64M"])?;
    assert!(received > 48 << 20, "TCP did not cross: {received} bytes");
    let peer_port = |node: &Node| -> Result<serde_json::Value> {
        let ports = node.cli_json(&["port", "list"])?;
        let found = ports.as_array().into_iter().flatten().find(|p| p["kind"] == "peer");
        found.cloned().context("no peer port")
    };
    let (sent, received) = (peer_port(a)?, peer_port(b)?);
    let tx = counter(&sent, &["counters", "tx_frames"]);
    let rx = counter(&received, &["counters", "rx_frames"]);
    let queue_full = counter(&sent, &["counters", "drops", "queue_full"]);
    let peers = a.cli_json(&["peer", "list"])?;
    let failed = counter(peer(&peers, "b").context("peer gone")?, &["counters", "send_failed"]);
    eprintln!("a sent {tx} frames to b, b received {rx}; queue-full {queue_full}");
    assert!(tx > 40_000, "too few frames crossed to tell: {tx}");
    assert!(queue_full * 100 <= tx, "a dropped {queue_full} of {tx} frames at its peer port");
    assert_eq!(failed, 0, "a failed to send to b");
    // What a sent and b never got was lost on the way: in the underlay's socket buffers, not
    // in a (whose datagram queue would silently drop the oldest if a overran it).
    assert!(tx - rx.min(tx) <= tx / 20, "a sent {tx} frames, b received {rx}");
    for node in [a, b] {
        let log = node.log();
        assert_eq!(log.matches("peer connected peer=").count(), 1, "connections:\n{log}");
    }
    Ok(())
}
