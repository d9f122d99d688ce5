//! The client side of the admin socket: turns subcommands into requests and replies into
//! tables or JSON.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use umnet_proto::admin::{self, ErrorKind, Reply, Request, Response};

use crate::{AddPort, Command, NetCommand, PeerCommand, PortCommand};

/// A local failure.
pub(crate) const EXIT_FAILURE: u8 = 1;
/// No node is running at the run directory.
pub(crate) const EXIT_NO_NODE: u8 = 3;
/// The node refused the request.
pub(crate) const EXIT_REFUSED: u8 = 4;

/// How long to wait for a node's answer.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `command` to the node at `run_dir` and prints its answer.
pub(crate) fn run(run_dir: &Path, json: bool, command: Command) -> ExitCode {
    let request = match command {
        Command::Node(_)
        | Command::Ca(_)
        | Command::Cert(_)
        | Command::Guest(_)
        | Command::Completions { .. }
        | Command::Man
        | Command::Capture { .. } => {
            unreachable!("not a client command")
        }
        Command::Status => Request::Status,
        Command::Net(NetCommand::List) => Request::NetList,
        Command::Net(NetCommand::Add { net }) => Request::NetAdd { net },
        Command::Net(NetCommand::Rm { net, force }) => Request::NetRm { net, force },
        Command::Port(PortCommand::List) => Request::PortList,
        Command::Port(PortCommand::Add(AddPort::Tap { name, net })) => {
            Request::PortAddTap { name, net }
        }
        Command::Port(PortCommand::Add(AddPort::Nic { name, net })) => {
            Request::PortAddNic { name, net }
        }
        Command::Port(PortCommand::Set { port, net }) => Request::PortSet { port, net },
        Command::Port(PortCommand::Rm { port }) => Request::PortRm { port },
        Command::Fdb { net } => Request::Fdb { net },
        Command::Peer(PeerCommand::List) => Request::PeerList,
        Command::Peer(PeerCommand::Add { name, address }) => Request::PeerAdd { name, address },
        Command::Peer(PeerCommand::Rm { name }) => Request::PeerRm { name },
    };

    let response = match exchange(run_dir, &request) {
        Ok(response) => response,
        Err(Failure::NoNode(reason)) => {
            eprintln!(
                "umnet: no node is running with run directory {} ({reason}).\n\
                 Start one with `umnet node`, or point at a running one with --run-dir DIR or \
                 UMNET_RUN_DIR.",
                run_dir.display()
            );
            return ExitCode::from(EXIT_NO_NODE);
        }
        Err(Failure::Other(message)) => {
            eprintln!("umnet: {message}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };

    match response {
        Response::Ok(reply) => {
            if json {
                println!("{}", to_json(&reply));
            } else {
                print!("{}", render(&request, &reply));
            }
            ExitCode::SUCCESS
        }
        Response::Error(error) => {
            if json {
                println!("{}", serde_json::json!({ "error": error }));
            }
            eprintln!("umnet: {}", error.message);
            ExitCode::from(match error.kind {
                ErrorKind::Internal => EXIT_FAILURE,
                _ => EXIT_REFUSED,
            })
        }
    }
}

enum Failure {
    NoNode(String),
    Other(String),
}

fn exchange(run_dir: &Path, request: &Request) -> Result<Response, Failure> {
    let path = run_dir.join(admin::SOCKET_NAME);
    let stream = UnixStream::connect(&path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            Failure::NoNode(error.to_string())
        }
        _ => Failure::Other(format!("cannot connect to {}: {error}", path.display())),
    })?;
    let io_error = |error: std::io::Error| Failure::Other(format!("admin connection: {error}"));
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_error)?;

    let mut line = serde_json::to_vec(request).map_err(|e| Failure::Other(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_error)?;

    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io_error)?;
    if answer.is_empty() {
        return Err(Failure::Other("the node closed the connection without answering".into()));
    }
    serde_json::from_str(&answer)
        .map_err(|error| Failure::Other(format!("cannot read the node's answer: {error}")))
}

fn to_json(reply: &Reply) -> String {
    let value = match reply {
        Reply::Status(status) => serde_json::to_value(status),
        Reply::Networks(networks) => serde_json::to_value(networks),
        Reply::Ports(ports) => serde_json::to_value(ports),
        Reply::Fdb(entries) => serde_json::to_value(entries),
        Reply::Peers(peers) => serde_json::to_value(peers),
        Reply::Done => Ok(serde_json::json!({ "done": true })),
    };
    value.map(|v| v.to_string()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn render(request: &Request, reply: &Reply) -> String {
    match reply {
        Reply::Status(status) => render_status(status),
        Reply::Networks(networks) => render_networks(networks),
        Reply::Ports(ports) => render_ports(ports),
        Reply::Fdb(entries) => render_fdb(entries),
        Reply::Peers(peers) => render_peers(peers),
        Reply::Done => match request {
            Request::NetRm { net, .. } => format!("network {net} removed\n"),
            Request::PortRm { port } => format!("port {port} removed\n"),
            Request::PeerRm { name } => format!("peer {name} removed\n"),
            _ => String::new(),
        },
    }
}

fn render_status(status: &admin::Status) -> String {
    let r = &status.rejects;
    let federation = match &status.federation {
        Some(f) => format!(
            "node name        {}\npeer port        UDP {} (datagrams={} not-quic={} \
             handshakes-failed={})\n",
            f.name, f.listen, f.datagrams, f.not_quic, f.handshakes_failed
        ),
        None => "node name        none: single-host (no identity)\n".to_string(),
    };
    let text = format!(
        "umnet node {version}, pid {pid}, up {uptime} s\n\
         run directory    {run_dir}\n\
         state directory  {state_dir}\n\
         networks         {networks}\n\
         ports            {ports}\n\
         refused clients  bad-magic={} bad-version={} truncated={} timeout={} malformed={} \
         unreachable={} too-many-ports={}\n\
         refused admin    bad-request={}\n\
         refused guests   malformed={} refused={} forged={}\n",
        r.bad_magic,
        r.bad_version,
        r.truncated,
        r.timeout,
        r.malformed,
        r.unreachable,
        r.too_many_ports,
        r.admin_bad_request,
        r.guest_malformed,
        r.guest_refused,
        r.guest_forged,
        version = status.version,
        pid = status.pid,
        uptime = status.uptime_secs,
        run_dir = status.run_dir,
        state_dir = status.state_dir,
        networks = status.networks,
        ports = status.ports,
    );
    text + &federation
}

fn render_networks(networks: &[admin::Network]) -> String {
    let mut out = format!(
        "{:<8} {:>5} {:>6} {:>6} {:>6}  {}\n",
        "NET", "PORTS", "MACS", "LIMIT", "FLAPS", "ATTACH"
    );
    for n in networks {
        out.push_str(&format!(
            "{:<8} {:>5} {:>6} {:>6} {:>6}  ctl={} bess={}\n",
            n.id, n.ports, n.macs, n.mac_limit, n.mac_flaps, n.attach.ctl, n.attach.bess
        ));
    }
    out
}

fn render_ports(ports: &[admin::Port]) -> String {
    let mut out = format!(
        "{:<5} {:<5} {:<6} {:<28} {:>7} {:>10} {:>12} {:>10} {:>12}  DROPS\n",
        "ID", "KIND", "NET", "CLIENT", "PID", "RX-FRAMES", "RX-BYTES", "TX-FRAMES", "TX-BYTES"
    );
    for p in ports {
        let c = &p.counters;
        let d = &c.drops;
        let pid = p.pid.map(|pid| pid.to_string()).unwrap_or_else(|| "-".into());
        let mut client = p.client.clone();
        if client.chars().count() > 28 {
            client = client.chars().take(27).collect::<String>() + "…";
        }
        out.push_str(&format!(
            "{:<5} {:<5} {:<6} {:<28} {:>7} {:>10} {:>12} {:>10} {:>12}  {} (runt={} oversize={} \
             bad-source={} queue-full={} send-error={} standby={} bad-beacon={}){}\n",
            p.id,
            p.kind.to_string(),
            p.net,
            client,
            pid,
            c.rx_frames,
            c.rx_bytes,
            c.tx_frames,
            c.tx_bytes,
            d.total(),
            d.runt,
            d.oversize,
            d.bad_source,
            d.queue_full,
            d.send_error,
            d.standby,
            d.bad_beacon,
            p.state.as_ref().map(|state| format!("  {state}")).unwrap_or_default(),
        ));
    }
    out
}

fn render_fdb(entries: &[admin::FdbEntry]) -> String {
    let mut out = format!("{:<8} {:<18} {:>5} {:>6}\n", "NET", "MAC", "PORT", "AGE");
    for e in entries {
        out.push_str(&format!("{:<8} {:<18} {:>5} {:>5}s\n", e.net, e.mac, e.port, e.age_secs));
    }
    out
}

fn render_peers(peers: &[admin::Peer]) -> String {
    let mut out = format!(
        "{:<16} {:<12} {:<22} {:>8} {:>8} {:>6} {:>10} {:>10}  NETWORKS / DROPS / LAST ERROR\n",
        "PEER", "STATE", "ADDRESS", "RTT-US", "UP-S", "MAXDG", "RX-FRAMES", "TX-FRAMES"
    );
    let dash = || "-".to_string();
    for p in peers {
        let c = &p.counters;
        let nets: Vec<String> = p.networks.iter().map(u32::to_string).collect();
        out.push_str(&format!(
            "{:<16} {:<12} {:<22} {:>8} {:>8} {:>6} {:>10} {:>10}  [{}] malformed={} \
             not-allowed={} reassembly={} send-failed={} mss-clamped={}{}\n",
            p.name,
            p.state.to_string(),
            p.address.clone().unwrap_or_else(dash),
            p.rtt_us.map_or_else(dash, |v| v.to_string()),
            p.uptime_secs.map_or_else(dash, |v| v.to_string()),
            p.max_datagram.map_or_else(dash, |v| v.to_string()),
            c.rx_frames,
            c.tx_frames,
            nets.join(","),
            c.malformed,
            c.not_allowed,
            c.reassembly,
            c.send_failed,
            c.mss_clamped,
            p.last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default(),
        ));
    }
    out
}
