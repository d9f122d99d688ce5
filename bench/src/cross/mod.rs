//! The cross-host suite: two hosts (network namespaces joined by a veth pair), and between them
//! umnet, tinc 1.0 in switch mode and kernel VXLAN, all up side by side for the whole run; and
//! from a machine on host a's LAN to host b, umnet through a NIC port beside a Linux bridge
//! with kernel VXLAN.
//!
//! Each measurement runs on every overlay before the next one starts, and the order of the
//! overlays rotates from round to round, so that a burst of noise on the shared cores falls on
//! all of them alike:
//!
//! - `tcp1`, `tcp4`: iperf3 TCP from host a (or the LAN machine) to host b, one stream and
//!   four; the receiver's Mbit/s.
//! - `udp64`: iperf3 UDP with 64-byte payloads sent as fast as iperf3 can (`-b 0`); packets/s
//!   the receiver counted, and the share lost.
//! - `ping`: `ping -i 0.01` from a to b; median and p99 round trip in milliseconds.
//!
//! Every iperf3 and ping runs for a bounded time and is killed if it overruns. Both hosts, the
//! overlays' daemons and iperf3 share the machine's cores, so every figure pays for both ends
//! of the tunnel; compare overlays only within a run, by the per-round ratios.

mod hosts;
mod overlay;

use std::path::{Path as FsPath, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use self::hosts::Hosts;
pub(crate) use self::overlay::System;
use self::overlay::{Overlay, Programs};
use crate::measure::percentile;
use crate::noise::{CpuSnapshot, NOISY_CORES};
use crate::process::{self, run_bounded, Daemon, TempDir};
use crate::report::{self, Cell, Row, Table, Unit};

/// The port iperf3 listens on inside host b.
const IPERF_PORT: &str = "5201";

/// How long iperf3 may run past its own duration (connection set-up, result exchange).
const IPERF_GRACE: Duration = Duration::from_secs(15);

/// How long an iperf3 server may take to start listening; the client retries until then.
const IPERF_START: Duration = Duration::from_secs(5);

/// The interval between pings; root may go below ping's floor of 200 ms.
const PING_INTERVAL: &str = "0.01";

/// The measurements of this suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub(crate) enum Measurement {
    /// TCP, one stream.
    Tcp1,
    /// TCP, four streams.
    Tcp4,
    /// UDP, 64-byte payloads.
    Udp64,
    /// ICMP echo round trips.
    Ping,
}

impl Measurement {
    fn name(self) -> &'static str {
        match self {
            Measurement::Tcp1 => "tcp1",
            Measurement::Tcp4 => "tcp4",
            Measurement::Udp64 => "udp64",
            Measurement::Ping => "ping",
        }
    }
}

/// What the suite is asked to do.
#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) systems: Vec<System>,
    pub(crate) measurements: Vec<Measurement>,
    pub(crate) rounds: u32,
    /// Length of each iperf3 run.
    pub(crate) duration: Duration,
    /// Echo requests per ping measurement.
    pub(crate) pings: u32,
    pub(crate) umnet: PathBuf,
}

/// What the suite found: the tables as text, what went wrong, and the raw results.
#[derive(Debug)]
pub(crate) struct Summary {
    pub(crate) text: String,
    pub(crate) problems: Vec<String>,
    pub(crate) json: Value,
}

/// One figure of one measurement.
#[derive(Debug)]
struct Figure {
    key: &'static str,
    title: &'static str,
    unit: Unit,
    value: f64,
}

/// One measurement of one overlay in one round.
#[derive(Debug)]
struct Entry {
    round: u32,
    system: System,
    measurement: Measurement,
    result: Result<Vec<Figure>, String>,
    foreign_cores: Option<f64>,
}

/// Sets up the hosts and overlays, measures, and tears everything down again.
pub(crate) fn run(options: &Options) -> Result<Summary> {
    let programs = Programs::find(&options.umnet)?;
    let scratch = TempDir::new("cross")?;
    let hosts = Hosts::create(&programs.ip, &scratch.path)?;

    // Step 1: every overlay up between the hosts; one that fails is reported and left out.
    let mut overlays: Vec<Overlay> = Vec::new();
    let mut problems = Vec::new();
    let mut starts = Vec::new();
    for &system in &options.systems {
        match Overlay::start(system, &hosts, &programs, &scratch.path) {
            Ok(overlay) => {
                let mtu = overlay.mtu.map_or("unknown".into(), |mtu| mtu.to_string());
                println!("overlay {system}: up, device MTU {mtu}");
                starts
                    .push(json!({ "system": system.name(), "started": true, "mtu": overlay.mtu }));
                overlays.push(overlay);
            }
            Err(error) => {
                println!("overlay {system}: FAILED TO START: {error:#}");
                problems.push(format!("{system}: not started: {error:#}"));
                starts.push(json!({ "system": system.name(), "started": false,
                                    "error": format!("{error:#}") }));
            }
        }
    }
    if overlays.is_empty() {
        bail!("no overlay started");
    }

    // Step 2: the measurements, interleaved.
    let mut entries = Vec::new();
    'rounds: for round in 1..=options.rounds {
        for &measurement in &options.measurements {
            for offset in 0..overlays.len() {
                if crate::interrupted() {
                    break 'rounds;
                }
                let index = (offset + round as usize - 1) % overlays.len();
                let overlay = &mut overlays[index];
                let entry = measure(round, measurement, overlay, &hosts, &programs, options);
                eprintln!("{}", progress(&entry));
                entries.push(entry);
            }
        }
    }

    // Step 3: what the daemons said, then stop them before the namespaces go.
    let counters: Vec<Value> =
        overlays.iter().filter_map(|o| o.umnet_counters(&programs, &scratch.path)).collect();
    for overlay in &overlays {
        for (daemon, lines) in overlay.warnings() {
            if !lines.is_empty() {
                println!("{daemon} logged {} warning(s); the last: {}", lines.len(), lines[0]);
            }
        }
    }
    drop(overlays);
    drop(hosts);

    problems.extend(entries.iter().filter_map(|entry| {
        let error = entry.result.as_ref().err()?;
        Some(format!(
            "round {} {} {}: {error}",
            entry.round,
            entry.measurement.name(),
            entry.system
        ))
    }));
    Ok(Summary {
        text: tables(&options.systems, options.rounds, &entries),
        problems,
        json: json!({
            "overlays": starts,
            "rounds": options.rounds,
            "duration_ms": options.duration.as_millis() as u64,
            "pings": options.pings,
            "results": entries.iter().map(entry_json).collect::<Vec<_>>(),
            "umnet_counters": counters,
        }),
    })
}

/// Runs one measurement on one overlay, with the CPU other processes used meanwhile.
fn measure(
    round: u32,
    measurement: Measurement,
    overlay: &mut Overlay,
    hosts: &Hosts,
    programs: &Programs,
    options: &Options,
) -> Entry {
    let system = overlay.system;
    let pids = overlay.pids();
    let before = CpuSnapshot::take(&pids);
    let daemons_before: Option<Duration> = pids.iter().map(|&pid| process::cpu_time(pid)).sum();
    let started = Instant::now();
    let result = overlay.check_running().and_then(|()| {
        let path = Path { hosts, programs, client: system.client(), target: system.address(1) };
        let scratch = TempDir::new("measure")?;
        let attempt = || match measurement {
            Measurement::Tcp1 => tcp(&path, 1, options.duration, &scratch.path),
            Measurement::Tcp4 => tcp(&path, 4, options.duration, &scratch.path),
            Measurement::Udp64 => udp64(&path, options.duration, &scratch.path),
            Measurement::Ping => ping(&path, options.pings, &scratch.path),
        };
        // iperf3 now and then loses its control connection or its report under full load
        // (seen with every overlay, VXLAN included): one more try before counting a failure.
        attempt().or_else(|error| {
            eprintln!("round {round} {} {system}: {error:#}; trying once more", measurement.name());
            attempt()
        })
    });
    let wall = started.elapsed().as_secs_f64();
    let daemons_after: Option<Duration> = pids.iter().map(|&pid| process::cpu_time(pid)).sum();
    let after = CpuSnapshot::take(&pids);
    let result = result.map(|mut figures| {
        // VXLAN has no daemon: the kernel does its work, on the cores of whoever sends.
        if let (Some(before), Some(after), false) = (daemons_before, daemons_after, pids.is_empty())
        {
            figures.push(Figure {
                key: "cpu",
                title: "CPU used by the overlay's daemons, both hosts, in cores",
                unit: Unit::Cores,
                value: after.saturating_sub(before).as_secs_f64() / wall,
            });
        }
        figures
    });
    Entry {
        round,
        system,
        measurement,
        result: result.map_err(|error| format!("{error:#}")),
        foreign_cores: before.foreign_cores(&after),
    }
}

/// Where a measurement runs: from `client` to `target` on host b.
struct Path<'a> {
    hosts: &'a Hosts,
    programs: &'a Programs,
    client: usize,
    target: std::net::Ipv4Addr,
}

/// iperf3 TCP along `path` with `streams` parallel streams.
fn tcp(path: &Path<'_>, streams: u32, duration: Duration, dir: &FsPath) -> Result<Vec<Figure>> {
    let parallel = streams.to_string();
    let result = iperf(path, &["-P", &parallel], duration, dir)?;
    let bits = result["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 reported no received rate: {}", summary(&result)))?;
    let (key, title) = if streams == 1 {
        ("mbps", "TCP, one stream, Mbit/s received")
    } else {
        ("mbps", "TCP, four streams, Mbit/s received")
    };
    Ok(vec![Figure { key, title, unit: Unit::Mbps, value: bits / 1e6 }])
}

/// iperf3 UDP with 64-byte payloads, unpaced; what host b received.
fn udp64(path: &Path<'_>, duration: Duration, dir: &FsPath) -> Result<Vec<Figure>> {
    let result = iperf(path, &["-u", "-l", "64", "-b", "0"], duration, dir)?;
    // The client's summary of a UDP test carries the receiver's counts.
    let sum = &result["end"]["sum"];
    let (Some(packets), Some(lost), Some(seconds)) =
        (sum["packets"].as_f64(), sum["lost_packets"].as_f64(), sum["seconds"].as_f64())
    else {
        bail!("iperf3 reported no packet counts: {sum}");
    };
    if seconds <= 0.0 || packets <= 0.0 {
        bail!("iperf3 sent nothing: {sum}");
    }
    let received = (packets - lost).max(0.0);
    Ok(vec![
        Figure {
            key: "pps",
            title: "UDP, 64-byte payloads, packets/s received",
            unit: Unit::Rate,
            value: received / seconds,
        },
        Figure {
            key: "lost",
            title: "UDP, 64-byte payloads, share of packets lost",
            unit: Unit::Percent,
            value: 100.0 * lost / packets,
        },
    ])
}

/// Runs an iperf3 server on host b for one test and the client at the path's start; returns the
/// client's JSON report.
fn iperf(path: &Path<'_>, args: &[&str], duration: Duration, dir: &FsPath) -> Result<Value> {
    let Path { hosts, programs, client, target } = *path;
    let target = &target.to_string();
    let mut server = hosts.exec(1, &programs.iperf3);
    server.args(["-s", "-1", "-p", IPERF_PORT, "-B", target]);
    let mut server = Daemon::spawn("iperf3 server on host b".into(), &mut server, &dir.join("s"))?;

    let seconds = duration.as_secs().max(1).to_string();
    let deadline = Instant::now() + IPERF_START;
    loop {
        let mut client = hosts.exec(client, &programs.iperf3);
        client.args(["-c", target, "-p", IPERF_PORT, "-t", &seconds, "-J"]).args(args);
        let finished = run_bounded(&mut client, dir, "iperf3", duration + IPERF_GRACE)?;
        let report: Value = serde_json::from_str(&finished.stdout).unwrap_or(Value::Null);
        // iperf3 may exit 0 with an error in its report, as when the server refused it.
        if finished.status.success() && report["error"].is_null() {
            return Ok(report);
        }
        let error = report["error"].as_str().map_or_else(|| finished.complaint(), str::to_string);
        // The server may not be listening yet: iperf3 then says it cannot connect.
        if !error.contains("unable to connect") || Instant::now() > deadline {
            server.check_running()?;
            bail!("iperf3 failed: {error}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// What iperf3 said went wrong, or the start of its report.
fn summary(report: &Value) -> String {
    if let Some(error) = report["error"].as_str() {
        return error.to_string();
    }
    let text = report["end"].to_string();
    text.chars().take(300).collect()
}

/// `count` pings along `path`, one every 10 ms; median and p99 round trip.
fn ping(path: &Path<'_>, count: u32, dir: &FsPath) -> Result<Vec<Figure>> {
    let target = path.target.to_string();
    let mut command = path.hosts.exec(path.client, &path.programs.ping);
    command.args(["-n", "-c", &count.to_string(), "-i", PING_INTERVAL, "-W", "1", &target]);
    let timeout = Duration::from_millis(u64::from(count) * 20) + Duration::from_secs(10);
    let finished = run_bounded(&mut command, dir, "ping", timeout)?;
    let mut times = round_trips(&finished.stdout);
    if times.is_empty() {
        bail!("no echo came back: {}", finished.complaint());
    }
    times.sort_by(f64::total_cmp);
    let lost = f64::from(count) - times.len() as f64;
    Ok(vec![
        Figure {
            key: "median",
            title: "ping round trip, median, ms",
            unit: Unit::Millis,
            value: percentile(&times, 50.0),
        },
        Figure {
            key: "p99",
            title: "ping round trip, p99, ms",
            unit: Unit::Millis,
            value: percentile(&times, 99.0),
        },
        Figure {
            key: "lost",
            title: "ping, share of echoes lost",
            unit: Unit::Percent,
            value: 100.0 * lost.max(0.0) / f64::from(count),
        },
    ])
}

/// The `time=X ms` of every echo reply ping printed.
fn round_trips(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|line| line.split_once("time=")?.1.split_whitespace().next()?.parse().ok())
        .collect()
}

/// One line per measurement, so a long run shows where it is.
fn progress(entry: &Entry) -> String {
    let mut line = format!("round {} {} {}:", entry.round, entry.measurement.name(), entry.system);
    match &entry.result {
        Ok(figures) => {
            for figure in figures {
                line.push_str(&format!(" {}={:.3}", figure.key, figure.value));
            }
        }
        Err(error) => line.push_str(&format!(" FAILED: {error}")),
    }
    if let Some(cores) = entry.foreign_cores {
        line.push_str(&format!(" [other processes: {cores:.2} cores]"));
    }
    line
}

/// A table per figure: a row per overlay, a column per round, then umnet over each other.
fn tables(systems: &[System], rounds: u32, entries: &[Entry]) -> String {
    let mut out = String::from("\ncross-host: two namespaces over veth\n");
    let mut seen: Vec<(Measurement, &str)> = Vec::new();
    for entry in entries {
        let Ok(figures) = &entry.result else { continue };
        for figure in figures {
            if !seen.contains(&(entry.measurement, figure.key)) {
                seen.push((entry.measurement, figure.key));
            }
        }
    }
    seen.sort_by_key(|(measurement, _)| *measurement as u8);
    for (measurement, key) in seen {
        let (title, unit) = entries
            .iter()
            .filter(|entry| entry.measurement == measurement)
            .filter_map(|entry| entry.result.as_ref().ok())
            .flatten()
            .find(|figure| figure.key == key)
            .map(|figure| (figure.title, figure.unit))
            .unwrap_or(("", Unit::Rate));
        let rows = systems
            .iter()
            .map(|&system| Row {
                name: system.name().to_string(),
                cells: (1..=rounds)
                    .map(|round| cell(entries, system, measurement, key, round))
                    .collect(),
            })
            .collect();
        let table = Table::new(unit, rounds, rows);
        out.push_str(&report::table_title(title, unit));
        out.push_str(&table.render("overlay"));
        for (index, system) in systems.iter().enumerate() {
            for (other_index, other) in systems.iter().enumerate() {
                if system.compared_with().contains(other) {
                    let line = table.ratio_between(index, other_index);
                    out.push_str(&format!("  {}\n", line.render(&format!("{system} / {other}"))));
                }
            }
        }
    }
    let loads: Vec<f64> = entries.iter().filter_map(|entry| entry.foreign_cores).collect();
    out.push_str(&report::noise_summary(&loads));
    out
}

/// The table cell of one overlay, measurement and figure in one round.
fn cell(
    entries: &[Entry],
    system: System,
    measurement: Measurement,
    key: &str,
    round: u32,
) -> Cell {
    let entry = entries.iter().find(|entry| {
        entry.system == system && entry.measurement == measurement && entry.round == round
    });
    let Some(entry) = entry else { return Cell::NotRun };
    let Ok(figures) = &entry.result else { return Cell::Failed };
    let noisy = entry.foreign_cores.is_some_and(|cores| cores > NOISY_CORES);
    match figures.iter().find(|figure| figure.key == key) {
        Some(figure) => Cell::Value(figure.value, None, noisy),
        None => Cell::NotRun,
    }
}

fn entry_json(entry: &Entry) -> Value {
    let (figures, error) = match &entry.result {
        Ok(figures) => {
            let figures: serde_json::Map<String, Value> =
                figures.iter().map(|f| (f.key.to_string(), json!(f.value))).collect();
            (Value::Object(figures), Value::Null)
        }
        Err(error) => (Value::Null, json!(error)),
    };
    json!({
        "round": entry.round,
        "system": entry.system.name(),
        "measurement": entry.measurement.name(),
        "ok": entry.result.is_ok(),
        "other_processes_cores": entry.foreign_cores,
        "figures": figures,
        "error": error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_round_trips_from_ping_output() {
        let output = "PING 10.202.1.2 (10.202.1.2) 56(84) bytes of data.\n\
                      64 bytes from 10.202.1.2: icmp_seq=1 ttl=64 time=0.412 ms\n\
                      64 bytes from 10.202.1.2: icmp_seq=2 ttl=64 time=0.25 ms\n\
                      \n--- 10.202.1.2 ping statistics ---\n\
                      rtt min/avg/max/mdev = 0.250/0.331/0.412/0.081 ms\n";
        assert_eq!(round_trips(output), vec![0.412, 0.25]);
    }

    #[test]
    fn tables_put_umnet_over_each_other_overlay() {
        let figure = |value| Figure { key: "mbps", title: "TCP", unit: Unit::Mbps, value };
        let entry = |system, value: f64| Entry {
            round: 1,
            system,
            measurement: Measurement::Tcp1,
            result: Ok(vec![figure(value)]),
            foreign_cores: Some(0.0),
        };
        let entries = [entry(System::Umnet, 1200.0), entry(System::Tinc, 600.0)];
        let systems = [System::Umnet, System::Tinc, System::Vxlan];
        let text = tables(&systems, 1, &entries);
        assert!(text.contains("umnet / tinc: 2.00x"), "{text}");
        assert!(text.contains("umnet / vxlan: -"), "{text}");
    }
}
