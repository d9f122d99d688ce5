//! `umnet`: the node daemon and its command-line client, in one binary.
//!
//! `umnet node` runs a node on one thread: the switch ([`switch`]) moving frames between ports
//! (UML and VDE clients, taps, NICs, peers), control tasks accepting UML and VDE clients
//! ([`control`]), peer connections over QUIC ([`peers`], started by [`federation`]), the admin
//! socket ([`admin`], which also streams captures, [`capture`]) and the optional Prometheus
//! endpoint ([`metrics`]); [`node`] owns networks, ports and peers and reloads the config.
//! Every other subcommand is a client of a running node's admin socket ([`cli`]), works on
//! local certificate files ([`identity_cli`]), or talks to a node in-band from inside a guest
//! ([`guest_cli`]). Wire formats live in the `umnet-proto` crate; the system calls std does
//! not offer are in [`sys`].
//!
//! Exit codes: 0 success, 1 failure, 2 bad command line, 3 no node running, 4 the node refused
//! the request.

mod admin;
mod capture;
mod cli;
mod config;
mod control;
mod federation;
mod guest_cli;
mod identity_cli;
mod metrics;
mod node;
mod peers;
mod rejects;
mod switch;
mod sys;
mod underlay;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use clap::{Args, Parser, Subcommand};
use umnet_proto::admin::NetworkId;

/// A distributed overlay Ethernet switch for UML, VDE and QEMU guests and taps.
#[derive(Debug, Parser)]
#[command(name = "umnet", version, propagate_version = true)]
struct Cli {
    /// Run directory of the node (sockets); default /run/umnet for root, else
    /// $XDG_RUNTIME_DIR/umnet.
    #[arg(long, global = true, env = "UMNET_RUN_DIR", value_name = "DIR")]
    run_dir: Option<PathBuf>,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,

    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node in the foreground.
    Node(NodeArgs),
    /// Show the node's state and refusal counters.
    Status,
    /// Manage networks.
    #[command(subcommand)]
    Net(NetCommand),
    /// Manage ports.
    #[command(subcommand)]
    Port(PortCommand),
    /// The cluster CA: create it, issue node identities, sign requests.
    #[command(subcommand)]
    Ca(identity_cli::CaCommand),
    /// This node's certificate: request, install, show.
    #[command(subcommand)]
    Cert(identity_cli::CertCommand),
    /// Manage peers: other nodes of the cluster.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Run inside a guest: ask the node serving one of its interfaces for a change.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Write the frames of a network (or of one port) as pcap, for tcpdump or Wireshark.
    Capture {
        /// The network.
        #[arg(long)]
        net: NetworkId,
        /// Only what this port (an id, or a tap or NIC name) sends and receives.
        #[arg(long)]
        port: Option<String>,
        /// Write to FILE instead of standard output (`umnet capture --net 100 | tcpdump -r -`).
        #[arg(short = 'w', long = "write", value_name = "FILE")]
        write: Option<PathBuf>,
        /// Stop after this many frames.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, value_name = "SECONDS")]
        duration: Option<u64>,
    },
    /// Show learned MAC addresses.
    Fdb {
        /// Only this network.
        #[arg(long)]
        net: Option<NetworkId>,
    },
    /// Print a shell completion script: umnet completions bash > /etc/bash_completion.d/umnet
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): umnet man > /usr/local/share/man/man1/umnet.1
    Man,
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (persisted networks and tap ports); default /var/lib/umnet for root,
    /// else $XDG_STATE_HOME/umnet.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Identity bundle (node certificate, CA certificate, key) for federation; default
    /// STATE/identity.pem. Without one the node runs single-host.
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// UDP address to listen on for peers; default 0.0.0.0:7780.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum NetCommand {
    /// List networks and where clients attach.
    List,
    /// Create a network.
    Add {
        /// Network number.
        net: NetworkId,
    },
    /// Remove a network.
    Rm {
        /// Network number.
        net: NetworkId,
        /// Detach its ports too.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum PortCommand {
    /// List ports with their counters.
    List,
    /// Add a port.
    #[command(subcommand)]
    Add(AddPort),
    /// Move a port to another network, live.
    Set {
        /// Port id, or a tap port's device name.
        port: String,
        /// Network to move it to.
        #[arg(long)]
        net: NetworkId,
    },
    /// Remove a port.
    Rm {
        /// Port id, or a tap port's device name.
        port: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum GuestCommand {
    /// Move this interface's port to another network, as um_eth_net_set did. The node must
    /// let guests choose that network (`[guests]` in its config).
    SetNet {
        /// The guest's interface on the node, as eth0.
        iface: String,
        /// The network to move to.
        net: NetworkId,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum PeerCommand {
    /// List peers: state, address, RTT, traffic, drops.
    List,
    /// Add a peer to dial.
    Add {
        /// Its node name, as in its certificate.
        name: String,
        /// Where it listens, HOST:PORT.
        address: String,
    },
    /// Remove a peer and close its connection.
    Rm {
        /// Its node name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AddPort {
    /// A tap device, created if it does not exist: the host joins the network.
    Tap {
        /// Device name.
        name: String,
        /// Network it joins.
        #[arg(long, default_value_t = config::DEFAULT_NETWORK)]
        net: NetworkId,
    },
    /// A network interface, bridged onto the network: its LAN joins it.
    Nic {
        /// Interface name.
        name: String,
        /// Network it joins.
        #[arg(long, default_value_t = config::DEFAULT_NETWORK)]
        net: NetworkId,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Node(args) => {
            let options = node::Options {
                config: args.config,
                run_dir: cli.run_dir,
                state_dir: args.state_dir,
                identity: args.identity,
                listen: args.listen,
            };
            match node::run(options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("umnet: {error:#}");
                    ExitCode::from(cli::EXIT_FAILURE)
                }
            }
        }
        Command::Ca(command) => local(identity_cli::ca(command)),
        Command::Cert(command) => local(identity_cli::cert(command)),
        Command::Capture { net, port, write, count, duration } => {
            let run_dir = cli.run_dir.unwrap_or_else(config::default_run_dir);
            let limits = capture::Limits { count, duration: duration.map(Duration::from_secs) };
            let result = match write {
                Some(path) => std::fs::File::create(&path)
                    .with_context(|| format!("cannot create {}", path.display()))
                    .and_then(|file| {
                        let mut out = std::io::BufWriter::new(file);
                        capture::record(&run_dir, net, port, &mut out, limits)
                    }),
                None => capture::record(&run_dir, net, port, &mut std::io::stdout().lock(), limits),
            };
            local(result.map(|_| ()))
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "umnet", &mut script);
            local(print(&script))
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            let mut page = Vec::new();
            let rendered = clap_mangen::Man::new(command).render(&mut page);
            local(rendered.context("cannot render the manual page").and_then(|()| print(&page)))
        }
        Command::Guest(GuestCommand::SetNet { iface, net }) => {
            guest_cli::set_net(&iface, net, cli.json)
        }
        command => {
            let run_dir = cli.run_dir.unwrap_or_else(config::default_run_dir);
            cli::run(&run_dir, cli.json, command)
        }
    }
}

/// Writes `bytes` to standard output; a reader that stopped early (`| head`) is no error.
fn print(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(error).context("cannot write to standard output")
        }
        _ => Ok(()),
    }
}

/// The exit code of a command that works on local files.
fn local(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("umnet: {error:#}");
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
