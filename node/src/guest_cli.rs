//! `umnet guest ...`: run inside a guest, asks the node serving one of its interfaces to
//! change something, in-band over that interface (see [`umnet_proto::guest`]).
//!
//! The guest needs no route, address or socket to the node: the request is an Ethernet frame
//! to the node's group address, which the node takes out of the frame stream. A UML guest
//! booted on the host's root through hostfs runs the host's own `umnet` binary.

use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use umnet_proto::admin::NetworkId;
use umnet_proto::beacon::ETHERTYPE;
use umnet_proto::ethernet::MacAddress;
use umnet_proto::guest::{Reply, Request, Status};

use crate::cli::{EXIT_FAILURE, EXIT_REFUSED};
use crate::sys;

/// How long to wait for the node's answer to one request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Requests sent before giving up: a frame may be lost, or the port may be paused a moment.
const ATTEMPTS: u32 = 3;

/// Asks the node behind `iface` to move this interface's port to network `net`.
pub(crate) fn set_net(iface: &str, net: NetworkId, json: bool) -> ExitCode {
    let reply = match ask(iface, net) {
        Ok(reply) => reply,
        Err(error) => {
            eprintln!("umnet: {error:#}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let moved = reply.status == Status::Moved;
    if json {
        let status = format!("{:?}", reply.status).to_lowercase();
        let net = reply.net;
        let message = &reply.message;
        println!("{}", serde_json::json!({ "status": status, "net": net, "message": message }));
    } else if moved {
        println!("{iface}: on network {} now", reply.net);
    }
    if moved {
        return ExitCode::SUCCESS;
    }
    eprintln!("umnet: the node refused: {} (still on network {})", reply.message, reply.net);
    ExitCode::from(EXIT_REFUSED)
}

fn ask(iface: &str, net: NetworkId) -> anyhow::Result<Reply> {
    let socket =
        sys::open_ethertype_socket(iface, ETHERTYPE, ANSWER_TIMEOUT).with_context(|| {
            format!("cannot open a packet socket on {iface} (it needs CAP_NET_RAW: run as root)")
        })?;
    let mac =
        MacAddress(sys::interface_mac(iface).with_context(|| format!("no interface {iface}"))?);
    let id =
        std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::process::id()) as u32;
    let request = Request { id, net }.emit(mac);
    let mut buffer = [0u8; 2048];
    for _ in 0..ATTEMPTS {
        sys::send(socket.as_raw_fd(), &request)
            .with_context(|| format!("cannot send on {iface}: is it up?"))?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while Instant::now() < deadline {
            let len = match sys::read(socket.as_raw_fd(), &mut buffer) {
                Ok(len) => len,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error).context("cannot read the answer"),
            };
            // Requests of other guests on the segment, and replies to them, are not ours.
            if let Ok(reply) = Reply::parse(&buffer[..len]) {
                if reply.id == id && buffer[..6] == mac.0 {
                    return Ok(reply);
                }
            }
        }
    }
    anyhow::bail!(
        "no umnet node answered on {iface} within {:?}: is the interface a port of a umnet \
         node?",
        ANSWER_TIMEOUT * ATTEMPTS
    )
}
