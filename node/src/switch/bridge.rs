//! The learning bridge of one network: which port each source MAC was last seen on, and where
//! a frame goes.
//!
//! Plain data and plain methods: no sockets, no clock (callers pass `now`), so learning,
//! aging, flooding and the MAC limit are tested without root.

use std::time::{Duration, Instant};

use umnet_proto::ethernet::MacAddress;

use super::{FastMap, PortId};

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// To this one port.
    Forward(PortId),
    /// To every port of the network but the one it came in on: broadcast, multicast, or a
    /// destination not (or no longer) in the table.
    Flood,
    /// Nowhere: the destination sits behind the port the frame came in on.
    Filter,
}

/// What learning a source address did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Learned {
    /// A new entry.
    New,
    /// The entry was already there, on this port.
    Refreshed,
    /// The entry was on another port and now points here.
    Moved {
        /// The port it was on.
        from: PortId,
        /// It had moved already less than [`FLAP_WINDOW`] before: the address is seen
        /// alternately on two ports, the mark of a loop (or of two hosts sharing a MAC).
        flapping: bool,
    },
    /// The table is full: the address was not learned, frames to it will be flooded.
    TableFull,
    /// Group addresses are never sources; nothing was learned.
    Ignored,
}

/// An address that moves again within this long of its last move is flapping. A guest that
/// migrates, or a LAN whose forwarding node changes, moves an address once; a loop moves it
/// back and forth many times a second.
pub(crate) const FLAP_WINDOW: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug)]
struct Entry {
    port: PortId,
    last_seen: Instant,
    /// When the address last moved to another port.
    moved: Option<Instant>,
}

/// One learned address, as the admin interface shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FdbRow {
    pub(crate) mac: MacAddress,
    pub(crate) port: PortId,
    pub(crate) age: Duration,
}

/// The forwarding database of one network.
#[derive(Debug)]
pub(crate) struct Bridge {
    fdb: FastMap<MacAddress, Entry>,
    aging: Duration,
    limit: usize,
    limit_hits: u64,
    flaps: u64,
}

impl Bridge {
    /// A bridge that forgets an address after `aging` without traffic and learns at most
    /// `limit` addresses.
    pub(crate) fn new(aging: Duration, limit: usize) -> Self {
        // Reserve for the common case only: a full table is allocated as it fills.
        Bridge {
            fdb: FastMap::with_capacity_and_hasher(limit.min(256), Default::default()),
            aging,
            limit,
            limit_hits: 0,
            flaps: 0,
        }
    }

    /// Records that `source` was seen on `port`.
    pub(crate) fn learn(&mut self, source: MacAddress, port: PortId, now: Instant) -> Learned {
        if source.is_group() {
            return Learned::Ignored;
        }
        if let Some(entry) = self.fdb.get_mut(&source) {
            let from = entry.port;
            entry.last_seen = now;
            if from == port {
                return Learned::Refreshed;
            }
            let flapping =
                entry.moved.is_some_and(|moved| now.saturating_duration_since(moved) < FLAP_WINDOW);
            entry.port = port;
            entry.moved = Some(now);
            self.flaps += u64::from(flapping);
            return Learned::Moved { from, flapping };
        }
        if self.fdb.len() >= self.limit {
            self.limit_hits += 1;
            return Learned::TableFull;
        }
        self.fdb.insert(source, Entry { port, last_seen: now, moved: None });
        Learned::New
    }

    /// Where a frame for `destination` that came in on `ingress` goes.
    pub(crate) fn decide(
        &self,
        destination: MacAddress,
        ingress: PortId,
        now: Instant,
    ) -> Decision {
        if destination.is_group() {
            return Decision::Flood;
        }
        match self.fdb.get(&destination) {
            Some(entry) if now.saturating_duration_since(entry.last_seen) < self.aging => {
                if entry.port == ingress {
                    Decision::Filter
                } else {
                    Decision::Forward(entry.port)
                }
            }
            _ => Decision::Flood,
        }
    }

    /// Forgets every address learned on `port`, when it leaves the network.
    pub(crate) fn forget_port(&mut self, port: PortId) -> usize {
        let before = self.fdb.len();
        self.fdb.retain(|_, entry| entry.port != port);
        before - self.fdb.len()
    }

    /// Forgets addresses not seen for the aging time. Returns how many went.
    pub(crate) fn age(&mut self, now: Instant) -> usize {
        let before = self.fdb.len();
        let aging = self.aging;
        self.fdb.retain(|_, entry| now.saturating_duration_since(entry.last_seen) < aging);
        before - self.fdb.len()
    }

    /// Number of learned addresses.
    pub(crate) fn len(&self) -> usize {
        self.fdb.len()
    }

    /// The most addresses this bridge learns.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Sources not learned because the table was full.
    pub(crate) fn limit_hits(&self) -> u64 {
        self.limit_hits
    }

    /// Moves of an address that had moved less than [`FLAP_WINDOW`] before.
    pub(crate) fn flaps(&self) -> u64 {
        self.flaps
    }

    /// Every entry, for display.
    pub(crate) fn rows(&self, now: Instant) -> Vec<FdbRow> {
        let mut rows: Vec<FdbRow> = self
            .fdb
            .iter()
            .map(|(mac, entry)| FdbRow {
                mac: *mac,
                port: entry.port,
                age: now.saturating_duration_since(entry.last_seen),
            })
            .collect();
        rows.sort_by_key(|row| (row.port, row.mac));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(last: u8) -> MacAddress {
        MacAddress([0x52, 0x54, 0, 0, 0, last])
    }

    fn bridge() -> Bridge {
        Bridge::new(Duration::from_secs(300), 4)
    }

    #[test]
    fn unknown_destinations_flood_then_known_ones_forward() {
        let now = Instant::now();
        let mut bridge = bridge();
        assert_eq!(bridge.decide(mac(2), 1, now), Decision::Flood);
        assert_eq!(bridge.learn(mac(2), 2, now), Learned::New);
        assert_eq!(bridge.decide(mac(2), 1, now), Decision::Forward(2));
        assert_eq!(bridge.learn(mac(2), 2, now), Learned::Refreshed);
    }

    #[test]
    fn group_destinations_always_flood_and_are_never_learned() {
        let now = Instant::now();
        let mut bridge = bridge();
        let multicast: MacAddress = "01:00:5e:00:00:fb".parse().unwrap();
        assert_eq!(bridge.learn(multicast, 1, now), Learned::Ignored);
        assert_eq!(bridge.learn(MacAddress::BROADCAST, 1, now), Learned::Ignored);
        assert_eq!(bridge.len(), 0);
        assert_eq!(bridge.decide(multicast, 2, now), Decision::Flood);
        assert_eq!(bridge.decide(MacAddress::BROADCAST, 2, now), Decision::Flood);
    }

    #[test]
    fn a_frame_never_goes_back_where_it_came_from() {
        let now = Instant::now();
        let mut bridge = bridge();
        bridge.learn(mac(1), 1, now);
        assert_eq!(bridge.decide(mac(1), 1, now), Decision::Filter);
    }

    #[test]
    fn moved_addresses_are_relearned() {
        let now = Instant::now();
        let mut bridge = bridge();
        bridge.learn(mac(1), 1, now);
        let moved = bridge.learn(mac(1), 3, now);
        assert_eq!(moved, Learned::Moved { from: 1, flapping: false });
        assert_eq!(bridge.decide(mac(1), 2, now), Decision::Forward(3));
    }

    #[test]
    fn an_address_moving_back_and_forth_is_flapping() {
        let start = Instant::now();
        let mut bridge = bridge();
        bridge.learn(mac(1), 1, start);
        let later = |ms| start + Duration::from_millis(ms);
        assert_eq!(bridge.learn(mac(1), 2, later(10)), Learned::Moved { from: 1, flapping: false });
        assert_eq!(bridge.learn(mac(1), 1, later(20)), Learned::Moved { from: 2, flapping: true });
        assert_eq!(bridge.learn(mac(1), 2, later(30)), Learned::Moved { from: 1, flapping: true });
        assert_eq!(bridge.flaps(), 2);

        // One move long after the last is a migration, not a flap.
        let moved = bridge.learn(mac(1), 1, later(30) + FLAP_WINDOW);
        assert_eq!(moved, Learned::Moved { from: 2, flapping: false });
        assert_eq!(bridge.flaps(), 2);
    }

    #[test]
    fn entries_age_out() {
        let start = Instant::now();
        let mut bridge = Bridge::new(Duration::from_secs(10), 4);
        bridge.learn(mac(1), 1, start);
        bridge.learn(mac(2), 2, start + Duration::from_secs(5));
        let later = start + Duration::from_secs(11);
        assert_eq!(bridge.decide(mac(1), 2, later), Decision::Flood, "stale entries flood");
        assert_eq!(bridge.age(later), 1);
        assert_eq!(bridge.len(), 1);
        assert_eq!(bridge.decide(mac(2), 1, later), Decision::Forward(2));
    }

    #[test]
    fn the_limit_holds_and_unlearned_sources_flood() {
        let now = Instant::now();
        let mut bridge = bridge();
        for i in 0..4 {
            assert_eq!(bridge.learn(mac(i), 1, now), Learned::New);
        }
        assert_eq!(bridge.learn(mac(9), 2, now), Learned::TableFull);
        assert_eq!(bridge.len(), 4);
        assert_eq!(bridge.limit_hits(), 1);
        assert_eq!(bridge.decide(mac(9), 1, now), Decision::Flood);

        // Known addresses still move and refresh at the limit.
        assert_eq!(bridge.learn(mac(0), 2, now), Learned::Moved { from: 1, flapping: false });
        assert_eq!(bridge.learn(mac(0), 2, now), Learned::Refreshed);
    }

    #[test]
    fn a_leaving_port_takes_all_its_addresses() {
        let now = Instant::now();
        let mut bridge = bridge();
        bridge.learn(mac(1), 1, now);
        bridge.learn(mac(2), 1, now);
        bridge.learn(mac(3), 2, now);
        assert_eq!(bridge.forget_port(1), 2);
        assert_eq!(bridge.decide(mac(1), 2, now), Decision::Flood);
        assert_eq!(bridge.rows(now).len(), 1);
    }

    #[test]
    fn a_hundred_thousand_random_sources_stay_bounded() {
        let now = Instant::now();
        let mut bridge = Bridge::new(Duration::from_secs(300), 1024);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let b = state.to_le_bytes();
            bridge.learn(MacAddress([b[0] & 0xfe, b[1], b[2], b[3], b[4], b[5]]), 1, now);
        }
        assert_eq!(bridge.len(), 1024);
        assert!(bridge.limit_hits() > 98_000);
    }
}
