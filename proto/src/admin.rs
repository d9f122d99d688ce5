//! The admin protocol between the `umnet` CLI and a running node.
//!
//! The CLI connects to the node's admin socket (a unix stream socket in its run directory),
//! writes one [`Request`] as a line of JSON and reads one [`Response`] line back. JSON keeps the
//! exchange readable with `socat` and makes `--json` output a re-encoding of what the node said.
//! A line longer than [`MAX_LINE_LEN`] or one that does not decode is answered with an
//! [`ErrorKind::BadRequest`] error and the connection is closed.

use serde::{Deserialize, Serialize};

/// The longest request line a node reads.
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// Name of the admin socket inside a node's run directory.
pub const SOCKET_NAME: &str = "admin.sock";

/// A numbered network: frames of one network never reach another.
pub type NetworkId = u32;

/// What the CLI asks of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// Node-wide state and counters.
    Status,
    /// Every network with its attach paths.
    NetList,
    /// Creates a network and persists it.
    NetAdd {
        /// The network's number.
        net: NetworkId,
    },
    /// Removes a network; refused while ports are attached unless `force`.
    NetRm {
        /// The network's number.
        net: NetworkId,
        /// Detach (and close) its ports first.
        force: bool,
    },
    /// Every port with its counters.
    PortList,
    /// Creates or attaches tap device `name` and puts it on `net`.
    PortAddTap {
        /// Device name, at most 15 bytes.
        name: String,
        /// Network the port joins.
        net: NetworkId,
    },
    /// Bridges network interface `name` onto `net`.
    PortAddNic {
        /// Interface name, at most 15 bytes.
        name: String,
        /// Network the port joins.
        net: NetworkId,
    },
    /// Moves a live port to another network.
    PortSet {
        /// Port id, or a tap port's device name.
        port: String,
        /// Network the port moves to.
        net: NetworkId,
    },
    /// Detaches a port.
    PortRm {
        /// Port id, or a tap port's device name.
        port: String,
    },
    /// Learned MAC addresses, of one network or all.
    Fdb {
        /// Only this network.
        net: Option<NetworkId>,
    },
    /// Every peer with its state and counters.
    PeerList,
    /// Adds a peer the node dials, and persists it.
    PeerAdd {
        /// The peer's node name, as in its certificate.
        name: String,
        /// Where it listens, `HOST:PORT`.
        address: String,
    },
    /// Removes a peer and closes its connection.
    PeerRm {
        /// The peer's node name.
        name: String,
    },
    /// Streams the frames of network `net` (or of one of its ports) until the client closes
    /// the connection: after the response line, the connection carries
    /// [`crate::capture::Record`]s.
    Capture {
        /// The network.
        net: NetworkId,
        /// Only what this port (an id, or a tap or NIC name) sends and receives.
        port: Option<String>,
    },
}

/// What a node answers: a [`Reply`] or an [`Error`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    /// The request was carried out.
    Ok(Reply),
    /// It was not, and why.
    Error(Error),
}

/// The payload of a successful response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "kebab-case")]
pub enum Reply {
    /// Answer to [`Request::Status`].
    Status(Box<Status>),
    /// Answer to [`Request::NetList`] and [`Request::NetAdd`].
    Networks(Vec<Network>),
    /// Answer to [`Request::PortList`], [`Request::PortAddTap`] and [`Request::PortSet`].
    Ports(Vec<Port>),
    /// Answer to [`Request::Fdb`].
    Fdb(Vec<FdbEntry>),
    /// Answer to [`Request::PeerList`] and [`Request::PeerAdd`].
    Peers(Vec<Peer>),
    /// Answer to requests that return nothing.
    Done,
}

/// A refused request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// Which kind of failure, for scripts and exit codes.
    pub kind: ErrorKind,
    /// What went wrong, for people.
    pub message: String,
}

/// Who or what a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request line did not decode.
    BadRequest,
    /// An argument is out of range or malformed.
    Invalid,
    /// The network or port does not exist.
    NotFound,
    /// It exists already.
    Exists,
    /// It is in use: a network with ports attached.
    Busy,
    /// The node lacks a privilege the request needs.
    Permission,
    /// The node failed locally.
    Internal,
}

impl Error {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }
}

/// Answer to [`Request::Status`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The node's version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Its run directory (sockets).
    pub run_dir: String,
    /// Its state directory (persisted networks and ports).
    pub state_dir: String,
    /// Number of networks.
    pub networks: usize,
    /// Number of ports.
    pub ports: usize,
    /// Refused clients and requests.
    pub rejects: Rejects,
    /// Federation, when the node has an identity.
    #[serde(default)]
    pub federation: Option<FederationStatus>,
}

/// A node's federation endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationStatus {
    /// The node's name, from its certificate.
    pub name: String,
    /// The UDP address it listens on for peers.
    pub listen: String,
    /// UDP datagrams received on that port.
    pub datagrams: u64,
    /// Of those, datagrams that cannot be QUIC for this node, dropped.
    pub not_quic: u64,
    /// Handshakes that failed: a certificate of another CA, expired or revoked, a wrong name,
    /// or none.
    pub handshakes_failed: u64,
}

/// Clients and requests a node refused, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejects {
    /// Control requests whose first word was not the magic.
    pub bad_magic: u64,
    /// Control requests of another protocol version.
    pub bad_version: u64,
    /// Control requests cut short by the client closing.
    pub truncated: u64,
    /// Control connections that sent no complete request in time.
    pub timeout: u64,
    /// Other malformed control requests (kind, address family, empty address).
    pub malformed: u64,
    /// Clients accepted but whose data socket could not be reached.
    pub unreachable: u64,
    /// Control connections refused because the node serves its maximum of ports.
    pub too_many_ports: u64,
    /// Admin requests that did not decode.
    pub admin_bad_request: u64,
    /// In-band guest requests that did not decode.
    #[serde(default)]
    pub guest_malformed: u64,
    /// Guest requests for a network the config does not let guests choose.
    #[serde(default)]
    pub guest_refused: u64,
    /// Guest requests that came from where no guest is: a peer, a NIC's LAN, a tap.
    #[serde(default)]
    pub guest_forged: u64,
}

/// One network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Its number.
    pub id: NetworkId,
    /// Ports attached.
    pub ports: usize,
    /// MAC addresses learned.
    pub macs: usize,
    /// Most MAC addresses it learns.
    pub mac_limit: usize,
    /// Sources not learned because the MAC table was full.
    pub mac_limit_hits: u64,
    /// Moves of an address seen alternately on two ports: the mark of a loop.
    #[serde(default)]
    pub mac_flaps: u64,
    /// Where clients attach.
    pub attach: Attach,
}

/// Where and how clients attach to a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    /// Directory libvdeplug clients are given; its `ctl` is the control socket.
    pub vde_dir: String,
    /// The daemon-transport control socket, `vde_dir/ctl`.
    pub ctl: String,
    /// The `SOCK_SEQPACKET` socket for UML's vector BESS transport.
    pub bess: String,
}

/// How a port is connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortKind {
    /// A UML guest on the daemon transport.
    Uml,
    /// A libvdeplug client: `vde_plug`, QEMU, or UML's vde transport.
    Vde,
    /// A UML guest on the vector BESS transport.
    Bess,
    /// A tap device: the host joins the network.
    Tap,
    /// A NIC, bridged onto the network through a packet socket.
    Nic,
    /// Another node, for one network both serve.
    Peer,
}

impl std::fmt::Display for PortKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PortKind::Uml => "uml",
            PortKind::Vde => "vde",
            PortKind::Bess => "bess",
            PortKind::Tap => "tap",
            PortKind::Nic => "nic",
            PortKind::Peer => "peer",
        })
    }
}

/// One port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// Node-assigned id, stable while the port lives.
    pub id: u32,
    /// How it is connected.
    pub kind: PortKind,
    /// The network it is on.
    pub net: NetworkId,
    /// The client's description, or the tap device name.
    pub client: String,
    /// The client's process id, where the kernel told it.
    pub pid: Option<u32>,
    /// Traffic and drops.
    pub counters: PortCounters,
    /// What the port is doing, where that varies: for a NIC port, whether it forwards, stands
    /// by for another port on its LAN, or waits for its interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// Traffic of one port, seen from the switch: `rx` came in from the client, `tx` went out to
/// it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    /// Frames received from the client and switched.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames delivered to the client.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Frames dropped, by reason.
    pub drops: Drops,
}

/// Frames dropped, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drops {
    /// Received frames shorter than an Ethernet header.
    pub runt: u64,
    /// Received frames longer than the node's maximum frame size.
    pub oversize: u64,
    /// Received frames with a group (multicast) source address.
    pub bad_source: u64,
    /// Frames for this port dropped because its queue was full: the client did not read.
    pub queue_full: u64,
    /// Frames for this port the kernel refused to send.
    pub send_error: u64,
    /// Frames a NIC port on standby did not pass: another port forwards for its LAN.
    #[serde(default)]
    pub standby: u64,
    /// Beacons (frames with a beacon's EtherType and magic) that do not decode.
    #[serde(default)]
    pub bad_beacon: u64,
}

impl Drops {
    /// All drops.
    pub fn total(&self) -> u64 {
        self.runt
            + self.oversize
            + self.bad_source
            + self.queue_full
            + self.send_error
            + self.standby
            + self.bad_beacon
    }
}

/// How a peer connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    /// Connected: frames flow.
    Connected,
    /// Dialing, or waiting to dial again.
    Connecting,
    /// Known only from an inbound connection that has closed.
    Disconnected,
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerState::Connected => "connected",
            PeerState::Connecting => "connecting",
            PeerState::Disconnected => "disconnected",
        })
    }
}

/// One peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its node name.
    pub name: String,
    /// Whether the node dials it (it is configured), or only accepts it.
    pub configured: bool,
    /// Connection state.
    pub state: PeerState,
    /// Its address: configured, or where the connection comes from.
    pub address: Option<String>,
    /// Networks both serve and the peer may carry.
    pub networks: Vec<NetworkId>,
    /// Round-trip time in microseconds, when connected.
    pub rtt_us: Option<u64>,
    /// Seconds since the connection was made.
    pub uptime_secs: Option<u64>,
    /// Largest datagram the connection carries now, in bytes.
    pub max_datagram: Option<usize>,
    /// Traffic and drops.
    pub counters: PeerCounters,
    /// Why the last connection or attempt ended.
    pub last_error: Option<String>,
}

/// Traffic with one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    /// Frames received from the peer and switched.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames sent to the peer.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Datagrams from the peer that did not parse, or fragments that did not fit together.
    pub malformed: u64,
    /// Frames from the peer for a network it does not share with this node or may not carry.
    pub not_allowed: u64,
    /// Incomplete frames given up.
    pub reassembly: u64,
    /// Frames that could not be sent: too large, or the connection failed.
    pub send_failed: u64,
    /// TCP SYNs sent with a lower MSS, so the connection's frames fit one datagram.
    #[serde(default)]
    pub mss_clamped: u64,
}

/// One learned MAC address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdbEntry {
    /// The network it was learned on.
    pub net: NetworkId,
    /// The address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The port it was last seen on.
    pub port: u32,
    /// Seconds since it was last seen.
    pub age_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        let line = r#"{"command":"port-set","port":"tap0","net":101}"#;
        let request: Request = serde_json::from_str(line).unwrap();
        assert_eq!(request, Request::PortSet { port: "tap0".into(), net: 101 });
        assert_eq!(serde_json::to_string(&request).unwrap(), line);
        assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"command":"status"}"#);
    }

    #[test]
    fn response_lines() {
        let done = serde_json::to_string(&Response::Ok(Reply::Done)).unwrap();
        assert_eq!(done, r#"{"ok":{"kind":"done"}}"#);
        let error = Response::Error(Error::new(ErrorKind::NotFound, "no network 7"));
        let line = serde_json::to_string(&error).unwrap();
        assert_eq!(line, r#"{"error":{"kind":"not-found","message":"no network 7"}}"#);
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), error);
    }

    #[test]
    fn garbage_does_not_decode() {
        for line in ["", "{", "null", r#"{"command":"reboot"}"#, r#"{"command":"net-add"}"#] {
            assert!(serde_json::from_str::<Request>(line).is_err(), "{line}");
        }
    }
}
