//! The error type of every fallible operation in this crate.
//!
//! One enum serves all operations because they share most failures (a file is missing, a PEM block
//! is malformed, a certificate does not parse). Variants that concern a file or a piece of text
//! carry `what`: a short description such as "bundle /etc/umnet/node.pem" that the message starts
//! with, so that the operator knows which input is at fault.

use std::io;
use std::path::PathBuf;

/// What went wrong while creating, loading, checking or using certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A node name or cluster name breaks the naming rules of [`crate::validate_node_name`].
    #[error(
        "invalid {kind} name {name:?}: {reason}; use 1-63 lowercase letters, digits, '-' and '.', \
         like a DNS name"
    )]
    InvalidName {
        /// Which name: "node" or "cluster".
        kind: &'static str,
        /// The name as given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },

    /// A file that should be read does not exist.
    #[error("{} does not exist", path.display())]
    FileMissing {
        /// The missing file.
        path: PathBuf,
    },

    /// Reading a file failed for a reason other than its absence.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },

    /// Writing a file (or creating its directory) failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },

    /// Saving would overwrite an existing private key, which could destroy the only copy of a CA
    /// key.
    #[error(
        "refusing to overwrite the existing private key {}: move it away first if you really \
         mean to replace it",
        path.display()
    )]
    KeyExists {
        /// The key file that exists already.
        path: PathBuf,
    },

    /// Text that should hold PEM blocks has a malformed one (bad base64, missing END line).
    #[error("{what}: malformed PEM: {detail}")]
    Pem {
        /// The text or file at fault.
        what: String,
        /// What the PEM parser reported.
        detail: String,
    },

    /// Text that should hold a certificate holds none.
    #[error("{what} holds no certificate")]
    NoCertificate {
        /// The text or file at fault.
        what: String,
    },

    /// Text that should hold a private key holds none.
    #[error("{what} holds no private key")]
    NoKey {
        /// The text or file at fault.
        what: String,
    },

    /// Text holds PEM blocks other than, or more than, those expected.
    #[error("{what}: {detail}")]
    UnexpectedPem {
        /// The text or file at fault.
        what: String,
        /// What was expected and what was found.
        detail: String,
    },

    /// A certificate does not parse as X.509, or says something this crate cannot use.
    #[error("{what}: unusable certificate: {detail}")]
    BadCertificate {
        /// The certificate at fault.
        what: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A private key does not parse or is of an unsupported kind.
    #[error("{what}: unusable private key: {detail}")]
    BadKey {
        /// The key at fault.
        what: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A private key does not belong to the certificate it is stored with.
    #[error("{what}: the private key does not belong to the certificate")]
    KeyMismatch {
        /// The bundle or CA directory at fault.
        what: String,
    },

    /// A node certificate was not issued by the CA certificate it is stored with.
    #[error("{what}: the certificate was not issued by the bundled CA {ca:?}: {detail}")]
    WrongIssuer {
        /// The bundle or parts at fault.
        what: String,
        /// The subject name of the CA that should have issued it.
        ca: String,
        /// Which check failed.
        detail: String,
    },

    /// A certificate that should be a CA certificate is not one.
    #[error("{what}: not a CA certificate (its basic constraints do not allow issuing)")]
    NotCa {
        /// The certificate at fault.
        what: String,
    },

    /// A certificate that should be a node certificate is a CA certificate.
    #[error(
        "{what}: expected a node certificate but found a CA certificate; a bundle holds the node \
         certificate first, then the CA certificate"
    )]
    NotNodeCertificate {
        /// The certificate at fault.
        what: String,
    },

    /// A node certificate does not name exactly one valid node as its only DNS name.
    #[error("{what}: the certificate does not name a node: {detail}")]
    NoNodeName {
        /// The certificate at fault.
        what: String,
        /// What it names instead.
        detail: String,
    },

    /// A certificate request does not parse, or its signature does not verify.
    #[error("certificate request rejected: {detail}")]
    BadRequest {
        /// What is wrong with it.
        detail: String,
    },

    /// A certificate request does not name exactly one node as its only subject alternative
    /// name.
    #[error(
        "certificate request rejected: it names {detail}, but must name exactly one node as its \
         only DNS name"
    )]
    RequestNames {
        /// What it names instead.
        detail: String,
    },

    /// A validity window cannot be represented: it ends before it starts, or lies outside the
    /// years X.509 can encode.
    #[error("invalid validity period: {detail}")]
    Validity {
        /// What is wrong with it.
        detail: String,
    },

    /// Generating a key, certificate or request failed inside the crypto library.
    #[error("cannot generate {what}: {detail}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// What the library reported.
        detail: String,
    },

    /// An entry of a revocation list is not a node name or a SHA-256 fingerprint.
    #[error(
        "invalid revocation entry {entry:?}: {reason}; list node names and SHA-256 fingerprints \
         (64 hex digits, colons allowed)"
    )]
    InvalidRevocation {
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// rustls refused the configuration (for example, the key does not match the certificate).
    #[error("cannot build the TLS configuration: {source}")]
    Tls {
        /// What rustls reported.
        #[source]
        source: rustls::Error,
    },

    /// rustls refused to build a certificate verifier from the CA certificate.
    #[error("cannot build the certificate verifier from the CA certificate: {source}")]
    Verifier {
        /// What rustls reported.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}
