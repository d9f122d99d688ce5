//! The cluster certificate authority and the TLS identities of umnet nodes.
//!
//! Every node of a cluster holds a certificate issued by the cluster's CA, naming the node in its
//! only DNS name. Nodes dial each other by node name over QUIC with mutual TLS: each side proves
//! its name with its certificate and accepts only certificates that chain to the cluster CA, are
//! within their validity window and are not on the node's revocation list.
//!
//! This crate creates, stores, checks and describes those certificates, and builds the rustls
//! configurations that enforce the rules above. Its only I/O is reading and writing the files it
//! is pointed at (the CA's `ca.crt` and `ca.key`, a node's bundle file): it opens no socket, starts
//! no task and knows nothing of QUIC beyond the rustls configs it hands out. It keeps no CRLs:
//! revocation is a list of node names and certificate fingerprints that the caller supplies and
//! may replace at any time.
//!
//! - [`CertificateAuthority`] (module `ca`): generate, save, load the CA; issue node identities;
//!   sign certificate requests.
//! - [`Identity`] (module `identity`): a node's certificate, CA certificate and key, kept as one
//!   bundle file; [`request`] starts the request-and-install flow on the node's side.
//! - [`CertInfo`] and [`inspect`] (module `info`): what a certificate says, for humans and for
//!   revocation checks.
//! - [`validate_node_name`] (module `name`): the one rule for node names.
//! - [`server_config`], [`client_config`], [`Revocations`], [`peer_name`] (module `tls`): mutual
//!   TLS 1.3 for QUIC with the ring provider.
//! - [`Error`] (module `error`): everything that can go wrong, in one enum.
#![warn(missing_docs)]

mod ca;
mod error;
mod files;
mod identity;
mod info;
mod name;
mod pem;
mod tls;

use std::time::Duration;

pub use ca::CertificateAuthority;
pub use error::Error;
pub use identity::{request, Identity};
pub use info::{inspect, inspect_der, CertInfo};
pub use name::{validate_node_name, MAX_NAME_LEN};
pub use tls::{client_config, peer_name, server_config, Revocations, ALPN};

/// How long a new CA is valid by default: ten years of 365 days.
///
/// Replacing a CA means reissuing every node certificate, so the CA outlives many node
/// certificates.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * DAY);

/// How long a new node certificate is valid by default: 365 days.
pub const DEFAULT_NODE_VALIDITY: Duration = Duration::from_secs(365 * DAY);

/// How far ahead of expiry a certificate should be reported as expiring: 30 days.
///
/// Pass it to [`CertInfo::expires_within`].
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * DAY);

/// Seconds in a day.
const DAY: u64 = 24 * 60 * 60;

#[cfg(test)]
mod testutil {
    //! Helpers shared by the unit tests.

    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::{CertificateAuthority, DEFAULT_CA_VALIDITY};

    /// A directory under the system temporary directory, removed with its contents on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("umnet-certs-test-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A new CA named `cluster`.
    pub(crate) fn ca(cluster: &str) -> CertificateAuthority {
        CertificateAuthority::generate(cluster, DEFAULT_CA_VALIDITY).unwrap()
    }

    /// The file mode bits of `path`.
    pub(crate) fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }
}
