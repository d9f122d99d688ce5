//! Loop safety for NIC ports: of the ports that bridge one LAN onto one network, exactly one
//! forwards.
//!
//! Two NIC ports on the same LAN and the same network, on one node or on two peered nodes,
//! close a loop: a broadcast from the LAN enters at one, crosses the overlay, leaves at the
//! other onto the LAN and enters the first again. Split horizon cannot stop it, since a NIC
//! port is a local port. So each NIC port sends a beacon ([`umnet_proto::beacon`]) on its wire
//! every [`BEACON_INTERVAL`] and listens for the beacons of others; the ports that hear each
//! other share a segment, and among them the one with the smallest (node name, interface
//! name) forwards. The others stand by: they still listen for beacons, but pass no frame
//! between the wire and the network.
//!
//! Only beacons that could close a loop count: those of another port of this node, and those
//! of nodes connected to this one as peers on the same network (a frame from a peer is never
//! sent to another peer, so nodes further away cannot close a loop through this port). A port
//! that stops hearing the forwarder for [`HOLD`] (or hears it leave) takes over; a port that
//! starts listens for [`HOLD`] before it forwards, so it joins an existing segment as a
//! standby rather than as a second forwarder.
//!
//! Plain data, with the clock passed in.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use umnet_proto::admin::NetworkId;
use umnet_proto::beacon::{Beacon, FLAG_FORWARDING, FLAG_LEAVING};

/// How often a NIC port sends its beacon.
pub(crate) const BEACON_INTERVAL: Duration = Duration::from_secs(1);

/// How long a port is remembered without a beacon from it, and how long a new port listens
/// before it forwards: three beacons, so one lost beacon changes nothing.
pub(crate) const HOLD: Duration = Duration::from_millis(3_200);

/// A port's place in the election: its node's name and its interface's.
pub(crate) type Key = (String, String);

/// What a NIC port does with frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Just started: it sends beacons and listens, and passes no frames yet.
    Listening,
    /// It passes frames between its wire and the network.
    Forwarding,
    /// Another port on the same segment forwards; this one passes nothing.
    Standby {
        /// The forwarder.
        forwarder: Key,
    },
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Listening => f.write_str("listening"),
            Role::Forwarding => f.write_str("forwarding"),
            Role::Standby { forwarder: (node, port) } => {
                write!(f, "standby: {node}/{port} forwards this segment")
            }
        }
    }
}

/// The election state of one NIC port.
#[derive(Debug)]
pub(crate) struct Segment {
    key: Key,
    net: NetworkId,
    started: Instant,
    /// Other ports heard on this wire for this network, and when last.
    heard: BTreeMap<Key, Instant>,
    role: Role,
}

impl Segment {
    /// A port of node `node` on interface `port`, serving network `net`, starting at `now`.
    pub(crate) fn new(node: &str, port: &str, net: NetworkId, now: Instant) -> Self {
        Segment {
            key: (node.to_string(), port.to_string()),
            net,
            started: now,
            heard: BTreeMap::new(),
            role: Role::Listening,
        }
    }

    /// The port's role as last decided.
    pub(crate) fn role(&self) -> &Role {
        &self.role
    }

    /// Whether frames pass between the wire and the network.
    pub(crate) fn forwarding(&self) -> bool {
        self.role == Role::Forwarding
    }

    /// Moves the port to network `net` at `now`: what it heard was about the old network, so
    /// it listens afresh.
    pub(crate) fn set_network(&mut self, net: NetworkId, now: Instant) {
        self.net = net;
        self.started = now;
        self.heard.clear();
        self.role = Role::Listening;
    }

    /// Records a beacon heard on the wire at `now`. Returns whether it may change the role:
    /// a new port, or one that left.
    pub(crate) fn hear(&mut self, beacon: &Beacon, now: Instant) -> bool {
        if beacon.net != self.net {
            return false;
        }
        let key = (beacon.node.clone(), beacon.port.clone());
        if key == self.key {
            return false;
        }
        if beacon.leaving() {
            return self.heard.remove(&key).is_some();
        }
        self.heard.insert(key, now).is_none()
    }

    /// Decides the role at `now`, counting only the ports whose node `relevant` accepts (this
    /// node and its peers on the network). Returns the new role if it changed.
    pub(crate) fn decide(&mut self, now: Instant, relevant: impl Fn(&str) -> bool) -> Option<Role> {
        self.heard.retain(|_, last| now.saturating_duration_since(*last) < HOLD);
        let own = &self.key.0;
        let winner = self
            .heard
            .keys()
            .filter(|(node, _)| node == own || relevant(node))
            .min()
            .filter(|key| **key < self.key);
        let role = match winner {
            Some(key) => Role::Standby { forwarder: key.clone() },
            None if now.saturating_duration_since(self.started) < HOLD => Role::Listening,
            None => Role::Forwarding,
        };
        if role == self.role {
            return None;
        }
        self.role = role.clone();
        Some(role)
    }

    /// The beacon to send now; `leaving` when the port goes away.
    pub(crate) fn beacon(&self, leaving: bool) -> Beacon {
        let mut flags = 0;
        if self.forwarding() {
            flags |= FLAG_FORWARDING;
        }
        if leaving {
            flags |= FLAG_LEAVING;
        }
        Beacon { net: self.net, node: self.key.0.clone(), port: self.key.1.clone(), flags }
    }

    /// Other ports this one shares a segment with, for display.
    pub(crate) fn neighbours(&self) -> impl Iterator<Item = &Key> {
        self.heard.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beacon(node: &str, port: &str, net: NetworkId) -> Beacon {
        Beacon { net, node: node.into(), port: port.into(), flags: FLAG_FORWARDING }
    }

    fn any(_: &str) -> bool {
        true
    }

    fn after(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_port_alone_listens_then_forwards() {
        let start = Instant::now();
        let mut b = Segment::new("b", "eth1", 100, start);
        assert_eq!(b.decide(after(start, 1000), any), None);
        assert_eq!(b.role(), &Role::Listening);
        assert_eq!(b.decide(start + HOLD, any), Some(Role::Forwarding));
        assert!(b.forwarding());
        assert_eq!(b.beacon(false).flags, FLAG_FORWARDING);
    }

    #[test]
    fn the_smallest_key_forwards_and_the_other_takes_over_when_it_goes() {
        let start = Instant::now();
        let mut a = Segment::new("a", "eth1", 100, start);
        let mut c = Segment::new("c", "eth1", 100, start);
        for ms in [0, 1000, 2000, 3000] {
            let now = after(start, ms);
            a.hear(&c.beacon(false), now);
            c.hear(&a.beacon(false), now);
            a.decide(now, any);
            c.decide(now, any);
        }
        let now = after(start, 3300);
        a.decide(now, any);
        c.decide(now, any);
        assert!(a.forwarding());
        assert_eq!(c.role(), &Role::Standby { forwarder: ("a".into(), "eth1".into()) });
        assert_eq!(c.role().to_string(), "standby: a/eth1 forwards this segment");

        // a's beacons stop: c takes over once they are HOLD old.
        assert_eq!(c.decide(after(start, 3000) + HOLD - Duration::from_millis(1), any), None);
        assert_eq!(c.decide(after(start, 3000) + HOLD, any), Some(Role::Forwarding));
    }

    #[test]
    fn a_leaving_beacon_hands_over_at_once() {
        let start = Instant::now();
        let mut c = Segment::new("c", "eth1", 100, start);
        c.hear(&beacon("a", "eth1", 100), after(start, 1000));
        c.decide(start + HOLD, any);
        assert!(!c.forwarding());
        let mut leaving = beacon("a", "eth1", 100);
        leaving.flags |= FLAG_LEAVING;
        assert!(c.hear(&leaving, start + HOLD));
        assert_eq!(c.decide(start + HOLD, any), Some(Role::Forwarding));
    }

    #[test]
    fn only_this_node_and_its_peers_on_the_network_count() {
        let start = Instant::now();
        let mut c = Segment::new("c", "eth1", 100, start);
        c.hear(&beacon("a", "eth1", 100), start);
        c.hear(&beacon("b", "eth0", 101), start);
        let now = start + HOLD - Duration::from_millis(1);
        c.hear(&beacon("a", "eth1", 100), now);
        // a is no peer of c: no loop runs through c, so c forwards.
        assert_eq!(c.decide(now, |node| node != "a"), None);
        assert_eq!(c.decide(start + HOLD, |node| node != "a"), Some(Role::Forwarding));
        // Once a is a peer, its beacons count.
        let forwarder = ("a".to_string(), "eth1".to_string());
        assert_eq!(c.decide(start + HOLD, any), Some(Role::Standby { forwarder }));

        // Another port of the same node always counts.
        let mut own = Segment::new("c", "eth2", 100, start);
        own.hear(&c.beacon(false), start);
        own.hear(&beacon("c", "eth1", 100), start + HOLD);
        assert!(matches!(own.decide(start + HOLD, |_| false), Some(Role::Standby { .. })));
    }

    #[test]
    fn beacons_of_other_networks_and_its_own_are_ignored() {
        let start = Instant::now();
        let mut a = Segment::new("b", "eth1", 100, start);
        assert!(!a.hear(&beacon("a", "eth1", 101), start));
        assert!(!a.hear(&beacon("b", "eth1", 100), start));
        assert_eq!(a.decide(start + HOLD, any), Some(Role::Forwarding));
        assert_eq!(a.neighbours().count(), 0);

        // Moving to another network starts the election again.
        a.hear(&beacon("a", "eth1", 100), start + HOLD);
        a.set_network(101, start + HOLD);
        assert_eq!(a.role(), &Role::Listening);
        assert_eq!(a.neighbours().count(), 0);
    }
}
