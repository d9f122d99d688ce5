//! Wire formats spoken by an umnet node.
//!
//! This crate parses and builds bytes and nothing else: it opens no socket, reads no clock and
//! spawns no task, so every format can be tested from byte fixtures alone.
//!
//! - [`daemon`]: the control request of UML's daemon transport and of libvdeplug clients
//!   (`vde_plug`, QEMU `-netdev vde`), and the `sockaddr_un` reply.
//! - [`ethernet`]: MAC addresses and the fixed Ethernet header every switched frame starts with.
//! - [`admin`]: the JSON-lines protocol between the `umnet` CLI and a running node.
//! - [`peer`]: what nodes send each other: frames as QUIC datagrams, fragmented when they do
//!   not fit, and announcements of the networks each serves.
//! - [`beacon`]: the frame NIC ports send on their wire to find others bridging the same LAN.
//! - [`capture`]: the stream of captured frames a node sends `umnet capture`, and pcap.
//! - [`guest`]: what a guest asks of its node in-band (moving its port to another network),
//!   and the node's answer.
//! - [`offload`]: the virtio header of packet sockets, and turning offloaded super-frames,
//!   partial checksums and stripped VLAN tags back into wire frames.
//! - [`mss`]: the MSS option of TCP SYNs, lowered so a connection's frames fit one peer
//!   datagram.
#![warn(missing_docs)]

pub mod admin;
pub mod beacon;
pub mod capture;
pub mod daemon;
pub mod ethernet;
pub mod guest;
pub mod mss;
pub mod offload;
pub mod peer;
