//! `umnet-bench`: local switching through UML's daemon transport, umnet beside `uml_switch`
//! and `vde_switch`, measured in one run.
//!
//! The clients are this crate's own and speak the protocol as UML's `daemon_user.c` does: a
//! `SOCK_DGRAM` data socket bound to an abstract address of the full 110-byte `sockaddr_un`
//! length, a `SOCK_STREAM` control connection that stays open while the port is in use, the
//! 124-byte request, the 110-byte reply, and one unconnected `sendto` per frame. Receivers drain
//! with `recvmmsg` (64 per call). Every switch is driven by the same client code in the same run,
//! because on a small shared machine only side-by-side figures can be compared.
//!
//! What it measures, each for every switch, interleaved in rounds (the order of the switches
//! rotates from round to round):
//!
//! - a. 64-byte unicast flood from one sender to one receiver: delivered frames/s, Mbit/s, drop
//!   share (sent − received) / sent, and the switch's CPU time per frame.
//! - b. the same with 1514-byte frames.
//! - c. 64-byte broadcast flood to three receivers: delivered frames/s and drops per receiver.
//! - d. 64-byte unicast paced at 25, 50 and 100 thousand frames/s: frames lost, and slots the
//!   sender missed because it was not scheduled in time.
//! - e. request/echo round trip, one outstanding: median and p99 in microseconds.
//!
//! A flood sender waits (up to 100 ms) when the switch's socket queue is full rather than
//! dropping the frame as UML does, so "sent" counts frames the switch accepted and "dropped"
//! counts frames the switch lost on the way out. The paced sender sends as UML does, without
//! waiting, and counts a frame the switch's queue refused as lost; slots it wakes too late for
//! (preempted) are skipped rather than sent in a burst, and reported. Every loop is bounded by a
//! frame count and by time. Each measurement also records how much CPU other processes used
//! meanwhile; figures taken with more than 0.2 cores of such noise are marked `*`.
//!
//! Reading the figures: everything shares the host's cores, so compare switches only within a
//! run and by the per-round ratios. On a virtual machine a sleeping thread takes 25-100 µs to
//! wake, and a round trip wakes three of them, so round trips measured on idle cores are several
//! times longer than on busy ones (on a 2-vCPU KVM guest both Debian switches measured about
//! 90 µs idle and about 30 µs beside one busy process); a `*` marks figures taken beside other
//! busy processes.
//!
//! Each switch runs in a fresh temporary directory: `uml_switch -unix DIR/uml.ctl`,
//! `vde_switch -d -s DIR/vde -p DIR/vde.pid` (clients connect to `DIR/vde/ctl`) and
//! `umnet node --run-dir DIR/run --state-dir DIR/state` (clients connect to
//! `DIR/run/net100/ctl`). The tool stops only the processes it started, by pid, and removes the
//! directories, also when a measurement fails or panics or on Ctrl-C.
//!
//! Run it with
//!
//! ```text
//! cargo build --release -p umnet -p umnet-bench
//! cargo run --release -p umnet-bench -- --help
//! cargo run --release -p umnet-bench                      # all three switches, 3 rounds
//! cargo run --release -p umnet-bench -- --switches uml_switch,vde_switch --rounds 1
//! cargo run --release -p umnet-bench -- --only a,e --json results.json
//! ```
//!
//! The umnet binary is `--umnet PATH`, else `$UMNET_BIN`, else `umnet` beside this binary
//! (`target/release/umnet`). A switch that fails to start is reported and the run goes on with
//! the others. The host's `net.unix.max_dgram_qlen` (default 10) bounds every switch's queues
//! and is left alone; the header prints it with the kernel version and CPU count.

mod cross;
mod measure;
mod noise;
mod port;
mod process;
mod report;
mod stamp;
mod switch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;

use crate::measure::{Settings, Test};
use crate::noise::CpuSnapshot;
use crate::report::{Entry, Environment};
use crate::switch::{Switch, SwitchKind};

/// Side-by-side benchmark of umnet: local switching beside uml_switch and vde_switch, and
/// two hosts beside tinc and kernel VXLAN.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Suites to run: local (switching through UML's daemon transport), cross (two hosts).
    #[arg(long, value_delimiter = ',', default_value = "local,cross")]
    suites: Vec<Suite>,

    /// Switches to measure, in table order; the first is compared with the best of the others.
    #[arg(long, value_delimiter = ',', default_value = "umnet,uml_switch,vde_switch")]
    switches: Vec<SwitchKind>,

    /// Rounds; each round measures every switch once per measurement.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,

    /// Length of each flood and paced measurement, and the limit for the round trips.
    #[arg(
        long,
        default_value_t = 2000,
        value_parser = clap::value_parser!(u64).range(100..=60_000)
    )]
    duration_ms: u64,

    /// The umnet binary [default: `umnet` beside this binary].
    #[arg(long, env = "UMNET_BIN")]
    umnet: Option<PathBuf>,

    /// Measurements to run: a 64 B unicast, b 1514 B unicast, c broadcast, d paced, e round trip.
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,d,e")]
    only: Vec<Test>,

    /// Rates for the paced measurement, in frames per second.
    #[arg(long, value_delimiter = ',', default_value = "25000,50000,100000")]
    rates: Vec<u64>,

    /// Round trips to time per switch and round (also bounded by --duration-ms).
    #[arg(long, default_value_t = 5000)]
    rtt_samples: usize,

    /// Overlays for the cross-host suite, in table order: umnet, tinc and vxlan from tap to tap,
    /// umnet-nic and vxlan-bridge from a LAN machine through host a. umnet is compared with the
    /// others of its path.
    #[arg(long, value_delimiter = ',', default_value = "umnet,tinc,vxlan,umnet-nic,vxlan-bridge")]
    overlays: Vec<cross::System>,

    /// Measurements of the cross-host suite.
    #[arg(long, value_delimiter = ',', default_value = "tcp1,tcp4,udp64,ping")]
    cross_only: Vec<cross::Measurement>,

    /// Length of each iperf3 run of the cross-host suite, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    cross_seconds: u64,

    /// Echo requests per ping measurement of the cross-host suite (one every 10 ms).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(10..=10_000))]
    pings: u32,

    /// Write the raw results and summaries to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The benchmark's two halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// Local switching through UML's daemon transport: umnet, uml_switch, vde_switch.
    Local,
    /// Two hosts over veth: umnet, tinc, kernel VXLAN.
    Cross,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether the user asked to stop (SIGINT or SIGTERM); long loops check it.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("umnet-bench: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(mut cli: Cli) -> Result<ExitCode> {
    install_signal_handlers();
    dedup(&mut cli.suites);
    dedup(&mut cli.switches);
    dedup(&mut cli.only);
    dedup(&mut cli.overlays);
    dedup(&mut cli.cross_only);
    if cli.rates.contains(&0) {
        bail!("--rates must be positive");
    }
    let umnet = cli.umnet.clone().unwrap_or_else(default_umnet);
    let mut problems = Vec::new();
    let mut json = serde_json::Map::new();

    if cli.suites.contains(&Suite::Local) {
        let (found, results) = local(&cli, &umnet)?;
        problems.extend(found);
        json.insert("local".into(), results);
    }
    if cli.suites.contains(&Suite::Cross) && !interrupted() {
        let options = cross::Options {
            systems: cli.overlays.clone(),
            measurements: cli.cross_only.clone(),
            rounds: cli.rounds,
            duration: Duration::from_secs(cli.cross_seconds),
            pings: cli.pings,
            umnet: umnet.clone(),
        };
        let versions = cli.overlays.iter().map(|&system| {
            (
                system.name().to_string(),
                match system {
                    cross::System::Umnet | cross::System::UmnetNic => report::umnet_version(),
                    cross::System::Tinc => report::package_version("tinc"),
                    cross::System::Vxlan | cross::System::VxlanBridge => "(kernel)".to_string(),
                },
            )
        });
        let environment = Environment::read(versions.collect());
        println!("\numnet-bench: two hosts (network namespaces over veth)");
        println!("{}", environment.header());
        let estimate = cross_estimate(&cli);
        println!(
            "settings: {} round(s), {} s per iperf3 run, {} pings; about {estimate} s in all",
            cli.rounds, cli.cross_seconds, cli.pings
        );
        let summary = cross::run(&options)?;
        print!("{}", summary.text);
        problems.extend(summary.problems);
        let mut results = summary.json;
        results["environment"] = environment.to_json();
        json.insert("cross".into(), results);
    }

    if !problems.is_empty() {
        println!("\nproblems:");
        for problem in &problems {
            println!("  {problem}");
        }
    }
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(json))?;
        std::fs::write(path, text + "\n")
            .map_err(|error| anyhow::anyhow!("writing {}: {error}", path.display()))?;
        println!("\nraw results written to {}", path.display());
    }

    Ok(if interrupted() {
        ExitCode::from(130)
    } else if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The local suite: starts every switch, measures them in interleaved rounds, prints the
/// tables; returns what went wrong and the raw results.
fn local(cli: &Cli, umnet: &Path) -> Result<(Vec<String>, serde_json::Value)> {
    let settings = Settings {
        duration: Duration::from_millis(cli.duration_ms),
        rates: cli.rates.clone(),
        rtt_samples: cli.rtt_samples,
    };
    // Step 1: describe the host and start every switch.
    let environment = Environment::read(report::switch_versions(&cli.switches));
    println!("umnet-bench: local switching through UML's daemon transport");
    println!("{}", environment.header());
    println!(
        "settings: {} round(s), {} ms per measurement, measurements {}, paced rates {:?}/s, \
         {} round trips; about {} s in all",
        cli.rounds,
        cli.duration_ms,
        cli.only.iter().map(|t| t.letter()).collect::<Vec<_>>().join(","),
        settings.rates,
        settings.rtt_samples,
        estimate_seconds(cli, &settings),
    );

    let mut switches: Vec<Switch> = Vec::new();
    let mut starts: Vec<(SwitchKind, Result<libc::pid_t, String>)> = Vec::new();
    for &kind in &cli.switches {
        match Switch::start(kind, umnet) {
            Ok(switch) => {
                let pid = switch.pid().unwrap_or(0);
                println!(
                    "switch {kind}: started, pid {pid}, control socket {}",
                    switch.ctl.display()
                );
                starts.push((kind, Ok(pid)));
                switches.push(switch);
            }
            Err(error) => {
                println!("switch {kind}: FAILED TO START: {error:#}");
                starts.push((kind, Err(format!("{error:#}"))));
            }
        }
    }
    if switches.is_empty() {
        bail!("no switch started");
    }

    // Step 2: the measurements, interleaved: each measurement on every switch before the next.
    let mut entries: Vec<Entry> = Vec::new();
    'rounds: for round in 1..=cli.rounds {
        for &test in &cli.only {
            for offset in 0..switches.len() {
                if interrupted() {
                    break 'rounds;
                }
                let index = (offset + round as usize - 1) % switches.len();
                let switch = &mut switches[index];
                let before = CpuSnapshot::take(switch.pid().as_slice());
                let result = if switch.is_running() {
                    measure::run(test, switch, &settings).map_err(|error| format!("{error:#}"))
                } else {
                    Err(format!("{} is no longer running{}", switch.kind, switch.log_tail()))
                };
                let after = CpuSnapshot::take(switch.pid().as_slice());
                let foreign_cores = before.foreign_cores(&after);
                let entry = Entry { round, switch: switch.kind, test, result, foreign_cores };
                eprintln!("{}", progress(&entry));
                entries.push(entry);
            }
        }
    }

    // Step 3: stop the switches, then report.
    let exited: Vec<String> = switches
        .iter_mut()
        .filter_map(|switch| {
            (!switch.is_running()).then(|| format!("{} exited during the run", switch.kind))
        })
        .collect();
    drop(switches);

    print!("{}", report::tables(&cli.switches, cli.rounds, &entries));
    print!("{}", report::noise(&entries));
    let mut problems = report::failures(&entries);
    problems.extend(exited);
    problems.extend(starts.iter().filter_map(|(kind, start)| {
        start.as_ref().err().map(|e| format!("{kind}: not started: {e}"))
    }));
    let json = report::to_json(&environment, &settings, cli.rounds, &starts, &entries);
    Ok((problems, json))
}

/// A rough upper bound of the cross-host suite's run time, set-up included.
fn cross_estimate(cli: &Cli) -> u64 {
    let per_overlay: u64 = cli
        .cross_only
        .iter()
        .map(|measurement| match measurement {
            cross::Measurement::Ping => u64::from(cli.pings) / 100 + 1,
            _ => cli.cross_seconds + 1,
        })
        .sum();
    per_overlay * cli.overlays.len() as u64 * u64::from(cli.rounds) + 60
}

/// `umnet` beside this binary, else the workspace's `target/release/umnet`.
fn default_umnet() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("umnet");
        if sibling.exists() {
            return sibling;
        }
    }
    let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
    bench.parent().unwrap_or(bench).join("target/release/umnet")
}

/// One line per measurement, so a long run shows where it is.
fn progress(entry: &Entry) -> String {
    let mut line = format!("round {} {} {}:", entry.round, entry.test.letter(), entry.switch);
    match &entry.result {
        Ok(outcome) => {
            for metric in &outcome.metrics {
                line.push_str(&format!(" {}={:.2}", metric.key, metric.value));
            }
        }
        Err(error) => line.push_str(&format!(" FAILED: {error}")),
    }
    if let Some(cores) = entry.foreign_cores {
        line.push_str(&format!(" [other processes: {cores:.2} cores]"));
    }
    line
}

fn dedup<T: PartialEq + Copy>(items: &mut Vec<T>) {
    let mut seen = Vec::new();
    items.retain(|item| {
        let new = !seen.contains(item);
        seen.push(*item);
        new
    });
}

/// A rough upper bound of the run time, printed so nobody wonders whether it hangs.
fn estimate_seconds(cli: &Cli, settings: &Settings) -> u64 {
    let per_switch: f64 = cli
        .only
        .iter()
        .map(|test| match test {
            Test::D => settings.rates.len() as f64 * (settings.duration.as_secs_f64() + 0.1),
            _ => settings.duration.as_secs_f64() + 0.1,
        })
        .sum();
    (per_switch * cli.switches.len() as f64 * f64::from(cli.rounds)).ceil() as u64
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// The first SIGINT or SIGTERM ends the run early but still stops the switches and reports;
/// a second one kills as usual.
fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // sigaction struct is zero-initialised (an empty mask) before the fields are set.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}
