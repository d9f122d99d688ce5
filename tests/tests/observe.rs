//! Seeing what crosses a network: `umnet capture` read back by tcpdump, and the Prometheus
//! endpoint scraped while traffic flows.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use umnet_tests::client::{frame, DaemonClient};
use umnet_tests::cluster::{wait_connected, Ca, Underlay, NETWORKS};
use umnet_tests::process::{require_program, run};
use umnet_tests::{mac, umnet_bin, Guest, GuestConfig, Netns, Node, NodeOptions, TempDir};

/// `tcpdump -n -r FILE`: what it printed.
fn tcpdump(file: &str) -> Result<String> {
    let mut command = Command::new(require_program("tcpdump", "tcpdump")?);
    command.args(["-n", "-r", file]);
    let output = run(&mut command, Duration::from_secs(30))?;
    if !output.status.success() {
        bail!("tcpdump -r {file} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn capture(node: &Node, args: &[&str]) -> Result<std::process::Child> {
    let mut command = Command::new(umnet_bin()?);
    command.arg("--run-dir").arg(node.run_dir()).arg("capture").args(args);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command.spawn().context("starting umnet capture")
}

#[test]
fn a_capture_read_back_by_tcpdump_shows_a_ping() -> Result<()> {
    let host = Netns::new("host")?;
    let node = Node::start(NodeOptions::new().netns(&host))?;
    let guest = Guest::boot(GuestConfig::new("g").daemon(0, &mac(1), &node.ctl(100)).netns(&host))?;
    guest.ip("eth0", "10.0.0.1/24")?;
    node.cli_ok(&["port", "add", "tap", "umtap0", "--net", "100"])?;
    host.addr("umtap0", "10.0.0.2/24")?;
    assert!(guest.ping_ok("10.0.0.2")?);
    let dir = TempDir::new("capture")?;

    // To a file, the whole network, and to a pipe into tcpdump, one port only.
    let file = dir.join("net100.pcap").display().to_string();
    let to_file = capture(&node, &["--net", "100", "-w", &file, "--duration", "6"])?;
    let mut piped = Command::new("sh");
    piped.arg("-c").arg(format!(
        "{} --run-dir {} capture --net 100 --port umtap0 --count 6 | tcpdump -n -r -",
        umnet_bin()?.display(),
        node.run_dir().display()
    ));
    let piped = piped.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let pings = guest.ping("10.0.0.2", 3)?;
    assert_eq!(pings.received, 3);

    let output = to_file.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "umnet capture failed: {stderr}");
    assert!(stderr.contains("dropped 0"), "{stderr}");
    let shown = tcpdump(&file)?;
    assert!(shown.contains("10.0.0.1 > 10.0.0.2: ICMP echo request"), "{shown}");
    assert!(shown.contains("10.0.0.2 > 10.0.0.1: ICMP echo reply"), "{shown}");

    let output = piped.wait_with_output()?;
    let shown = String::from_utf8_lossy(&output.stdout);
    assert_eq!(shown.lines().count(), 6, "{shown}");
    assert!(shown.contains("ICMP echo"), "{shown}");

    // Bad requests say what is wrong.
    for (args, message) in
        [(&["--net", "7"][..], "no network 7"), (&["--net", "100", "--port", "nosuch"], "no port")]
    {
        let output = capture(&node, args)?.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(message), "{args:?}: {stderr}");
    }
    Ok(())
}

#[test]
fn a_capture_that_falls_behind_drops_and_says_so_without_slowing_the_switch() -> Result<()> {
    let host = Netns::new("host")?;
    let node = Node::start(NodeOptions::new().netns(&host))?;
    let ctl = node.ctl(100);
    let (flooder, sink) =
        host.within(move || Ok((DaemonClient::connect(&ctl)?, DaemonClient::connect(&ctl)?)))?;
    let sink_mac = [0x52, 0x54, 0, 0, 0, 0x20];
    sink.send(&frame([0xff; 6], sink_mac, 0x0800, &[0; 46]))?;

    // The capture's output is not read while 20,000 frames cross the network.
    let mut slow = capture(&node, &["--net", "100", "--duration", "3"])?;
    std::thread::sleep(Duration::from_millis(300));
    let source = [0x52, 0x54, 0, 0, 0, 0x21];
    let sent = 20_000u32;
    let reader = std::thread::spawn(move || -> Result<u32> {
        let mut received = 0;
        sink.set_timeout(Duration::from_millis(500))?;
        while sink.recv()?.is_some() {
            received += 1;
        }
        Ok(received)
    });
    for i in 0..sent {
        flooder.send(&frame(sink_mac, source, 0x0800, &i.to_be_bytes().repeat(12)))?;
    }
    let received = reader.join().map_err(|_| anyhow::anyhow!("the sink thread panicked"))??;

    // Only now is the capture read; it reports what it dropped.
    let mut stdout = slow.stdout.take().context("no stdout")?;
    let mut pcap = Vec::new();
    stdout.read_to_end(&mut pcap)?;
    let output = slow.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("sink received {received} of {sent}; capture: {stderr}");
    let dropped: u64 = stderr
        .split("dropped ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no drop count in: {stderr}"))?;
    assert!(dropped > 0, "a capture that was not read dropped nothing: {stderr}");
    assert_eq!(received, sent, "the switch lost frames because of a slow capture");
    let ports = node.cli_json(&["port", "list"])?;
    for port in ports.as_array().into_iter().flatten() {
        assert_eq!(port["counters"]["drops"]["queue_full"], 0, "{ports}");
    }
    Ok(())
}

/// The metrics page of the node listening on `address` inside `netns`.
fn scrape(netns: &Netns, address: &str) -> Result<String> {
    let address = address.to_string();
    let mut stream =
        netns.within(move || std::net::TcpStream::connect(&address).context("connecting"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: umnet\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    if !text.starts_with("HTTP/1.1 200") {
        bail!("metrics answer: {text}");
    }
    Ok(text)
}

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn sample(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    page.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_move_with_traffic() -> Result<()> {
    let ca = Ca::new("metrics")?;
    let underlay = Underlay::new(&["a", "b"], 1500)?;
    let with_metrics = format!("metrics_listen = \"127.0.0.1:9110\"\n{NETWORKS}");
    let a = underlay.start_node(0, &ca.issue("a", 30)?, &[(1, "b")], &with_metrics)?;
    let b = underlay.start_node(1, &ca.issue("b", 30)?, &[(0, "a")], NETWORKS)?;
    wait_connected(&a, &["b"])?;
    a.cli_ok(&["port", "add", "tap", "mta", "--net", "100"])?;
    b.cli_ok(&["port", "add", "tap", "mtb", "--net", "100"])?;
    underlay.hosts[0].addr("mta", "10.0.0.1/24")?;
    underlay.hosts[1].addr("mtb", "10.0.0.2/24")?;

    let before = scrape(&underlay.hosts[0], "127.0.0.1:9110")?;
    assert!(before.contains("application/openmetrics-text"), "{before}");
    let tap = ["kind=\"tap\"", "client=\"mta\""];
    let frames_before = sample(&before, "umnet_port_received_frames_total", &tap).unwrap_or(0.0);
    let peer_before =
        sample(&before, "umnet_peer_sent_frames_total", &["peer=\"b\""]).context("no peer")?;
    assert_eq!(sample(&before, "umnet_peer_connected", &["peer=\"b\""]), Some(1.0), "{before}");
    assert!(sample(&before, "umnet_peer_rtt_seconds", &["peer=\"b\""]).is_some(), "{before}");

    for _ in 0..5 {
        assert!(underlay.hosts[0].ping_ok("10.0.0.2")?);
    }
    let after = scrape(&underlay.hosts[0], "127.0.0.1:9110")?;
    let frames_after = sample(&after, "umnet_port_received_frames_total", &tap).unwrap_or(0.0);
    let peer_after = sample(&after, "umnet_peer_sent_frames_total", &["peer=\"b\""]).unwrap_or(0.0);
    assert!(frames_after >= frames_before + 5.0, "{frames_before} -> {frames_after}\n{after}");
    assert!(peer_after >= peer_before + 5.0, "{peer_before} -> {peer_after}");
    assert!(sample(&after, "umnet_network_macs", &["net=\"100\""]).is_some_and(|m| m >= 2.0));
    assert!(after.contains("umnet_port_dropped_frames_total{"), "{after}");
    assert!(after.contains("umnet_refused_total{reason=\"bad-magic\"} 0"), "{after}");

    // Anything but GET /metrics is refused, garbage included, and scrapes go on.
    for (request, status) in [
        (&b"GET /other HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 404"),
        (b"\x00\x01\xffgarbage\r\n\r\n", "HTTP/1.1 405"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405"),
    ] {
        let address = "127.0.0.1:9110".to_string();
        let mut stream =
            underlay.hosts[0].within(move || Ok(std::net::TcpStream::connect(address)?))?;
        stream.write_all(request)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        assert!(answer.starts_with(status), "{request:?}: {answer}");
    }
    assert!(scrape(&underlay.hosts[0], "127.0.0.1:9110")?.contains("umnet_peer_connected"));
    Ok(())
}
