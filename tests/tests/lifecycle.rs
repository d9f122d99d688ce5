//! A node's life: start on defaults, refuse a second node on the same sockets, replace a dead
//! node's stale sockets, restore networks and tap ports after a restart; and the CLI's answers
//! when things are wrong.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use umnet_tests::client::{frame, DaemonClient};
use umnet_tests::process::run;
use umnet_tests::{mac, umnet_bin, Guest, GuestConfig, Netns, Node, NodeOptions, TempDir};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs the umnet binary with `args` and returns (exit code, stdout, stderr).
fn umnet(args: &[&str]) -> Result<(i32, String, String)> {
    let mut command = Command::new(umnet_bin()?);
    command.args(args).env_remove("UMNET_RUN_DIR");
    let output = run(&mut command, TIMEOUT)?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[test]
fn a_node_on_defaults_serves_network_100_and_cleans_up() -> Result<()> {
    let mut node = Node::start(NodeOptions::new())?;
    let networks = node.cli_json(&["net", "list"])?;
    assert_eq!(networks[0]["id"], 100, "{networks}");
    assert_eq!(networks.as_array().map(Vec::len), Some(1));

    // The attach strings printed at start are the ones clients need.
    let ctl = node.ctl(100);
    let log = node.log();
    assert!(log.contains(&format!("eth0=daemon,,unix,{}", ctl.display())), "{log}");
    assert!(log.contains(&format!("vec0:transport=bess,dst={}", node.bess(100).display())));
    assert!(log.contains(&format!("vde_plug {}", node.vde_dir(100).display())));

    let admin = std::fs::metadata(node.admin_socket())?;
    assert_eq!(admin.permissions().mode() & 0o777, 0o600, "admin socket not owner-only");

    let status = node.cli_json(&["status"])?;
    assert_eq!(status["networks"], 1);
    assert_eq!(status["pid"], node.pid().context("not running")?);

    let exit = node.stop()?;
    assert!(exit.success(), "node exited with {exit}");
    for path in [node.admin_socket(), ctl, node.bess(100)] {
        assert!(!path.exists(), "{} left behind", path.display());
    }
    Ok(())
}

#[test]
fn a_second_node_is_refused_and_stale_sockets_are_replaced() -> Result<()> {
    let mut node = Node::start(NodeOptions::new())?;
    let run_dir = node.run_dir().display().to_string();
    let state = TempDir::new("second")?;
    let state_dir = state.path().display().to_string();

    let (code, _, stderr) = umnet(&["node", "--run-dir", &run_dir, "--state-dir", &state_dir])?;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("another umnet node"), "{stderr}");
    assert!(node.admin_socket().exists(), "the refused node removed the live node's socket");
    node.cli_ok(&["status"])?;

    // A node killed outright leaves its sockets; the next one replaces them.
    node.kill()?;
    assert!(node.ctl(100).exists());
    node.restart()?;
    let client = DaemonClient::connect(&node.ctl(100))?;
    drop(client);
    node.cli_ok(&["status"])?;
    Ok(())
}

#[test]
fn restarting_restores_networks_and_tap_ports() -> Result<()> {
    let host = Netns::new("restart")?;
    let mut node = Node::start(NodeOptions::new().netns(&host))?;
    node.cli_ok(&["net", "add", "101"])?;
    node.cli_ok(&["net", "add", "102"])?;
    node.cli_ok(&["net", "rm", "102"])?;
    node.cli_ok(&["port", "add", "tap", "umtap1", "--net", "101"])?;
    host.addr("umtap1", "10.0.1.9/24")?;

    node.restart()?;

    let networks = node.cli_json(&["net", "list"])?;
    let ids: Vec<u64> =
        networks.as_array().into_iter().flatten().filter_map(|n| n["id"].as_u64()).collect();
    assert_eq!(ids, [100, 101]);
    let ports = node.cli_json(&["port", "list"])?;
    assert_eq!(ports[0]["kind"], "tap", "{ports}");
    assert_eq!(ports[0]["client"], "umtap1", "{ports}");
    assert_eq!(ports[0]["net"], 101, "{ports}");

    // The tap kept the address the host gave it, and carries traffic again.
    let guest = Guest::boot(GuestConfig::new("g").daemon(0, &mac(1), &node.ctl(101)).netns(&host))?;
    guest.ip("eth0", "10.0.1.1/24")?;
    assert!(guest.ping_ok("10.0.1.9")?, "no traffic through the restored tap");
    Ok(())
}

#[test]
fn the_cli_says_what_is_wrong() -> Result<()> {
    let nowhere = TempDir::new("nonode")?;
    let nowhere = nowhere.path().display().to_string();
    let (code, _, stderr) = umnet(&["--run-dir", &nowhere, "status"])?;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("no node is running") && stderr.contains("umnet node"), "{stderr}");

    for args in [&["net", "add", "ten"][..], &["port", "set", "1"], &["bogus"], &["fdb", "--net"]] {
        let (code, _, stderr) = umnet(args)?;
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }

    let node = Node::start(NodeOptions::new())?;
    let refused = [
        (&["net", "add", "100"][..], "exists already"),
        (&["net", "rm", "555"], "no network 555"),
        (&["port", "rm", "999"], "no port 999"),
        (&["port", "set", "999", "--net", "100"], "no port 999"),
        (&["port", "add", "tap", "bad/name"], "not a valid interface name"),
        (&["port", "add", "tap", "umtapx", "--net", "555"], "no network 555"),
        (&["fdb", "--net", "555"], "no network 555"),
    ];
    for (args, message) in refused {
        let output = node.cli(args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }

    // A network with a port attached is removed only with --force, which closes the port.
    node.cli_ok(&["net", "add", "101"])?;
    let client = DaemonClient::connect(&node.ctl(101))?;
    let output = node.cli(&["net", "rm", "101"])?;
    assert_eq!(output.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--force"));
    node.cli_ok(&["net", "rm", "101", "--force"])?;
    assert_eq!(node.cli_json(&["port", "list"])?.as_array().map(Vec::len), Some(0));
    drop(client);

    let (code, _, stderr) = umnet(&["node", "--config", "/nonexistent/umnet.toml"])?;
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read config file /nonexistent/umnet.toml"), "{stderr}");
    let config = TempDir::new("badconfig")?;
    let path = config.join("umnet.toml");
    std::fs::write(&path, "[switch]\nmac_limt = 5\n")?;
    let (code, _, stderr) = umnet(&["node", "--config", &path.display().to_string()])?;
    assert_eq!(code, 1);
    assert!(stderr.contains("mac_limt"), "{stderr}");
    Ok(())
}

#[test]
fn a_config_file_declares_networks_taps_and_limits() -> Result<()> {
    let config = "[switch]\nmac_limit = 2\nmax_frame = 1000\n\n\
                  [[network]]\nid = 7\n\n[[network]]\nid = 8\n";
    let node = Node::start(NodeOptions::new().config(config))?;
    let networks = node.cli_json(&["net", "list"])?;
    let ids: Vec<u64> =
        networks.as_array().into_iter().flatten().filter_map(|n| n["id"].as_u64()).collect();
    assert_eq!(ids, [7, 8], "the config declares 7 and 8, so 100 is not served");
    assert_eq!(networks[0]["mac_limit"], 2);

    let a = DaemonClient::connect(&node.ctl(7))?;
    let b = DaemonClient::connect(&node.ctl(7))?;
    let source = [2, 0, 0, 0, 0, 1];
    let frame = |len: usize| frame([0xff; 6], source, 0x88b5, &vec![0; len - 14]);
    a.send(&frame(1001))?;
    a.send(&frame(1000))?;
    let got = b.recv_matching(3, |_| true)?.context("the 1000-byte frame did not arrive")?;
    assert_eq!(got.len(), 1000, "the 1001-byte frame passed max_frame = 1000");

    // Taps are declared the same way; a tap needs a namespace of its own.
    let host = Netns::new("config")?;
    let config = "[[network]]\nid = 8\n\n[[tap]]\nname = \"umtap8\"\nnet = 8\n";
    let node = Node::start(NodeOptions::new().netns(&host).config(config))?;
    let ports = node.cli_json(&["port", "list"])?;
    assert_eq!(ports[0]["client"], "umtap8", "{ports}");
    assert_eq!(ports[0]["net"], 8, "{ports}");
    assert!(host.ip(&["-o", "link"])?.contains("umtap8"));
    Ok(())
}

#[test]
fn the_cli_describes_itself_version_completions_and_manual() -> Result<()> {
    let (code, out, _) = umnet(&["--version"])?;
    assert_eq!(code, 0);
    assert!(out.starts_with("umnet 0."), "{out}");
    for (shell, marker) in
        [("bash", "complete -F"), ("zsh", "#compdef umnet"), ("fish", "complete -c umnet")]
    {
        let (code, out, err) = umnet(&["completions", shell])?;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(marker), "{shell}: {out}");
        assert!(out.contains("capture") && out.contains("set-net"), "{shell} lacks subcommands");
    }
    let (code, out, _) = umnet(&["man"])?;
    assert_eq!(code, 0);
    assert!(out.contains(".TH umnet 1"), "{out}");
    assert!(out.contains("capture"), "{out}");
    let (code, _, err) = umnet(&["completions", "tcsh"])?;
    assert_eq!(code, 2, "{err}");
    Ok(())
}

#[test]
fn an_unprivileged_node_serves_guests_and_names_the_capabilities_it_lacks() -> Result<()> {
    let host = Netns::new("host")?;
    let nobody = 65_534;
    let node = Node::start(NodeOptions::new().netns(&host).as_user(nobody, nobody))?;
    let [a, b] = Guest::boot_all([
        GuestConfig::new("a").daemon(0, &mac(1), &node.ctl(100)).netns(&host),
        GuestConfig::new("b").bess(0, &mac(2), &node.bess(100)).netns(&host),
    ])?;
    a.ip("eth0", "10.0.0.1/24")?;
    b.ip("vec0", "10.0.0.2/24")?;
    assert!(a.ping_ok("10.0.0.2")?, "guests of an unprivileged node cannot talk");

    for (args, capability) in [
        (&["port", "add", "tap", "umtapx", "--net", "100"][..], "CAP_NET_ADMIN"),
        (&["port", "add", "nic", "lo", "--net", "100"], "loopback"),
        (&["port", "add", "nic", "umnoif0", "--net", "100"], "no network interface"),
    ] {
        let output = node.cli(args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(stderr.contains(capability), "{args:?}: {stderr}");
    }
    host.ip(&["link", "add", "umdummy0", "type", "veth", "peer", "name", "umdummy1"])?;
    let output = node.cli(&["port", "add", "nic", "umdummy0", "--net", "100"])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("CAP_NET_RAW"), "{stderr}");
    Ok(())
}

#[test]
fn the_service_unit_runs_a_node_that_can_do_its_job() -> Result<()> {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/umnet.service"),
    )?;
    let value = |key: &str| -> Result<String> {
        unit.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .with_context(|| format!("deploy/umnet.service has no {key}="))
    };

    // Every flag ExecStart passes is one `umnet node` takes.
    let (_, help, _) = umnet(&["node", "--help"])?;
    let exec = value("ExecStart")?;
    for flag in exec.split_whitespace().filter(|word| word.starts_with("--")) {
        assert!(help.contains(flag), "ExecStart passes {flag}, which umnet node does not take");
    }
    assert_eq!(value("User")?, "umnet");
    assert_eq!(value("CapabilityBoundingSet")?, value("AmbientCapabilities")?);

    // A node with no more than the unit's capabilities, as an unprivileged user, makes a tap
    // and bridges a NIC.
    let capabilities: Vec<String> = value("AmbientCapabilities")?
        .split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_lowercase())
        .collect();
    let capabilities: Vec<&str> = capabilities.iter().map(String::as_str).collect();
    let host = Netns::new("service")?;
    host.ip(&["link", "add", "umsvc0", "type", "veth", "peer", "name", "umsvc1"])?;
    let nobody = 65_534;
    let node = Node::start(
        NodeOptions::new()
            .netns(&host)
            .as_user(nobody, nobody)
            .with_capabilities(&capabilities)
            .open_tun(),
    )?;
    node.cli_ok(&["port", "add", "tap", "umsvctap", "--net", "100"])?;
    node.cli_ok(&["port", "add", "nic", "umsvc0", "--net", "100"])?;
    let ports = node.cli_json(&["port", "list"])?;
    assert_eq!(ports.as_array().map(Vec::len), Some(2), "{ports}");
    Ok(())
}
