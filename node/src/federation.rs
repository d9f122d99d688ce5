//! Starting federation: the node's identity, its TLS configurations and its QUIC endpoint.
//!
//! A node with no identity runs single-host and says how to get one. [`crate::peers`] runs the
//! connections once the endpoint is up.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};

use umnet_proto::admin::NetworkId;

use crate::config::{Config, Inbound};
use crate::peers::Settings;
use crate::underlay::{self, UnderlayCounters};

/// Name of the identity bundle in the state directory.
pub(crate) const IDENTITY_FILE: &str = "identity.pem";

/// How often the dialing side of a connection proves it is alive; well below the idle timeout
/// and the 30 s a NAT binding commonly lasts.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// How long a silent connection lives: a stopped peer is noticed within this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Queued outgoing datagrams per connection. quinn drops the oldest when it is full, as a
/// switch port would; 1 MiB (its default) would hold over half a second at 10 Gbit/s of
/// 1500-byte frames, far more queueing than a switch should add.
const DATAGRAM_SEND_BUFFER: usize = 256 * 1024;

/// The largest UDP payload a 1500-byte Ethernet link carries over IPv4: 1500 less the IPv4
/// and UDP headers.
const MAX_UDP_PAYLOAD_IPV4_ETHERNET: u16 = 1500 - 20 - 8;

/// Loads the identity and opens the QUIC endpoint, or returns `None` when the node has no
/// identity and none was asked for.
pub(crate) fn start(
    config: &Config,
    identity: &Option<PathBuf>,
    listen: &Option<String>,
    state_dir: &Path,
) -> anyhow::Result<Option<(Settings, quinn::Endpoint, quinn::ClientConfig)>> {
    let explicit = identity.clone().or_else(|| config.federation.identity.clone());
    let path = explicit.clone().unwrap_or_else(|| state_dir.join(IDENTITY_FILE));
    if explicit.is_none() && !path.exists() {
        tracing::info!(
            expected = %path.display(),
            "no identity: running single-host. To join a cluster, issue one with `umnet ca \
             issue NAME` on the CA host and start the node with --identity FILE"
        );
        return Ok(None);
    }
    let identity = umnet_certs::Identity::load(&path)
        .with_context(|| format!("cannot use identity {}", path.display()))?;
    let info = identity.info().clone();
    if info.expires_within(Duration::ZERO, SystemTime::now()) {
        bail!("the certificate of {} has expired; issue a new one", path.display());
    }
    warn_of_expiry(&info.name, info.not_after, SystemTime::now());

    let revocations = Arc::new(umnet_certs::Revocations::new());
    revocations
        .replace(&config.federation.revoked_names, &config.federation.revoked_fingerprints)
        .context("bad revocation list in the config")?;
    let (server, client) = quic_configs(&identity, &revocations)?;

    let listen = listen.clone().unwrap_or_else(|| config.federation.listen.clone());
    let address: SocketAddr =
        listen.parse().with_context(|| format!("--listen {listen:?} is not ADDRESS:PORT"))?;
    let counters = Arc::new(UnderlayCounters::default());
    let endpoint = underlay::endpoint(address, server, counters.clone())
        .with_context(|| format!("cannot listen for peers on UDP {address}"))?;
    tracing::info!(name = %info.name, listen = %endpoint.local_addr()?, "listening for peers");

    let policy = Policy::of(config);
    let settings = Settings {
        name: info.name,
        not_after: std::sync::Mutex::new(info.not_after),
        identity: path,
        fingerprint: std::sync::Mutex::new(info.fingerprint),
        clamp_mss: Arc::new(AtomicBool::new(policy.clamp_mss)),
        policy: std::sync::Mutex::new(policy),
        counters,
        revocations,
    };
    Ok(Some((settings, endpoint, client)))
}

/// The QUIC server and client configurations of a node with `identity`, refusing peers that
/// `revocations` names.
pub(crate) fn quic_configs(
    identity: &umnet_certs::Identity,
    revocations: &Arc<umnet_certs::Revocations>,
) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let server = umnet_certs::server_config(identity, revocations.clone())?;
    let client = umnet_certs::client_config(identity, revocations.clone())?;
    let transport = Arc::new(transport());
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server)
        .context("the TLS configuration cannot carry QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport.clone());
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client)
        .context("the TLS configuration cannot carry QUIC")?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport);
    Ok((server, client))
}

/// Who may connect and carry which networks: what a SIGHUP may change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Accept inbound connections only from configured peers.
    pub(crate) listed_only: bool,
    /// Networks restricted to some peers: a peer not listed never carries their frames.
    pub(crate) allowed: BTreeMap<NetworkId, BTreeSet<String>>,
    /// Lower the MSS of TCP SYNs sent to peers ([`umnet_proto::mss`]).
    pub(crate) clamp_mss: bool,
}

impl Policy {
    /// The policy `config` sets.
    pub(crate) fn of(config: &Config) -> Self {
        let allowed = config
            .networks
            .iter()
            .filter_map(|n| Some((n.id, n.peers.clone()?.into_iter().collect())))
            .collect();
        Policy {
            listed_only: config.federation.inbound == Inbound::Listed,
            allowed,
            clamp_mss: config.federation.clamp_mss,
        }
    }
}

/// Warns when the node certificate of `name`, valid until `not_after`, expires within
/// [`umnet_certs::EXPIRY_WARNING`] of `now`, and says so louder once it has expired. Returns
/// whether it said anything.
pub(crate) fn warn_of_expiry(name: &str, not_after: SystemTime, now: SystemTime) -> bool {
    match not_after.duration_since(now) {
        Err(_) => {
            tracing::error!(
                name,
                "the node certificate has expired: peers refuse this node until it has a new one \
                 (umnet ca issue, or umnet cert request and install)"
            );
            true
        }
        Ok(left) if left <= umnet_certs::EXPIRY_WARNING => {
            let days = left.as_secs() / (24 * 60 * 60);
            tracing::warn!(name, days, "the node certificate expires soon; renew it");
            true
        }
        Ok(_) => false,
    }
}

fn transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    // 15 s fits in a VarInt of milliseconds.
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        transport.max_idle_timeout(Some(idle));
    }
    transport.datagram_send_buffer_size(DATAGRAM_SEND_BUFFER);
    // Path MTU discovery may climb to a full IPv4 Ethernet payload (quinn stops at 1452, which
    // also fits IPv6): 20 more bytes in every datagram, and in every TCP segment the MSS clamp
    // allows. Over IPv6 the probes above 1452 are lost and discovery settles below them.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD_IPV4_ETHERNET);
    transport.mtu_discovery_config(Some(mtu));
    transport
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_reported_within_the_warning_window_and_after() {
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 60 * 60);
        assert!(!warn_of_expiry("a", now + 90 * day, now));
        assert!(warn_of_expiry("a", now + 29 * day, now));
        assert!(warn_of_expiry("a", now - day, now));
    }
}
