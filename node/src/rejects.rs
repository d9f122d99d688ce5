//! Node-wide counts of refused clients and requests, shared by the control tasks and the switch
//! thread, and reported by `umnet status`.

use std::sync::atomic::{AtomicU64, Ordering};

use umnet_proto::admin::Rejects;

/// One counter per reason in [`Rejects`].
#[derive(Debug, Default)]
pub(crate) struct RejectCounters {
    pub(crate) bad_magic: AtomicU64,
    pub(crate) bad_version: AtomicU64,
    pub(crate) truncated: AtomicU64,
    pub(crate) timeout: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) unreachable: AtomicU64,
    pub(crate) too_many_ports: AtomicU64,
    pub(crate) admin_bad_request: AtomicU64,
    pub(crate) guest_malformed: AtomicU64,
    pub(crate) guest_refused: AtomicU64,
    pub(crate) guest_forged: AtomicU64,
}

impl RejectCounters {
    /// Adds one to `counter`.
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts as the admin protocol reports them.
    pub(crate) fn snapshot(&self) -> Rejects {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Rejects {
            bad_magic: get(&self.bad_magic),
            bad_version: get(&self.bad_version),
            truncated: get(&self.truncated),
            timeout: get(&self.timeout),
            malformed: get(&self.malformed),
            unreachable: get(&self.unreachable),
            too_many_ports: get(&self.too_many_ports),
            admin_bad_request: get(&self.admin_bad_request),
            guest_malformed: get(&self.guest_malformed),
            guest_refused: get(&self.guest_refused),
            guest_forged: get(&self.guest_forged),
        }
    }
}
