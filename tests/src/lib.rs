//! Harness for umnet's integration tests: real UML guests, `umnet` nodes as child processes,
//! and network namespaces as hosts.
//!
//! Scenario tests in `tests/tests/` combine these parts:
//!
//! * [`Guest`] boots a User-Mode Linux guest and runs shell commands in it ([`guest`] documents
//!   the console protocol and the interface syntaxes the 6.1 kernel accepts).
//! * [`Node`] runs `umnet node` with its own run and state directories and drives its CLI.
//! * [`Netns`] and [`Veth`] make hosts and the cables between them.
//! * [`Background`] keeps any other daemon (uml_switch, vde_switch) running for a test.
//! * [`client::DaemonClient`] speaks the UML daemon protocol itself, to send what no guest
//!   would.
//! * [`cluster`] makes a CA, hosts on a shared underlay, and nodes with identities on them.
//! * [`TestPeer`] completes a real QUIC handshake with a node and then sends what no node
//!   would.
//! * [`wait_until`] and [`wait_for`] replace fixed sleeps with bounded polling.
//!
//! Everything here cleans up on drop, so a failing test leaves no namespace, link or process
//! behind, and every wait is bounded. Child processes also die with the thread that started
//! them, so a killed test binary leaves no processes either (namespaces and temp dirs it left
//! are removed by the next run); start guests, nodes and daemons on the test's own thread.
//!
//! Tests need root and the Debian packages `user-mode-linux`, `busybox-static`,
//! `uml-utilities`, `vde2`, `iproute2` and `util-linux`; a missing one is a test failure naming
//! the package, never a silent skip. The harness does not build the `umnet` binary: run
//! `cargo build -p umnet` first (or set `UMNET_BIN`).

#![warn(missing_docs)]

pub mod client;
pub mod cluster;
pub mod guest;
pub mod netns;
pub mod node;
pub mod peer;
pub mod process;
pub mod temp;
pub mod wait;

pub use guest::{mac, Guest, GuestConfig, PingStats};
pub use netns::{Netns, Veth};
pub use node::{umnet_bin, Node, NodeOptions};
pub use peer::TestPeer;
pub use process::{require_program, Background};
pub use temp::TempDir;
pub use wait::{wait_for, wait_until};
