//! rustls configurations for node-to-node QUIC: mutual TLS 1.3 within one cluster.
//!
//! Both sides present their node certificate and accept only a peer certificate that chains to
//! the cluster CA (the only trust root), is within its validity window, has the right extended key
//! usage and is not on the [`Revocations`] list. The dialing side also checks that the server's
//! certificate names the node it dialed. Both configs use the ring provider explicitly, never a
//! process-wide default, and offer the ALPN protocol [`ALPN`].
//!
//! Session resumption is off on both sides: a resumed session skips certificate verification, so
//! a peer revoked or expired since its first handshake could otherwise come back on an old
//! ticket. Node connections are long-lived, so the cost of full handshakes is small.
//!
//! This module does not open connections; wrap the configs with quinn's
//! `QuicServerConfig::try_from` and `QuicClientConfig::try_from`.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::info::{self, CertInfo};
use crate::{validate_node_name, Error, Identity};

/// The ALPN protocol of umnet's node-to-node connections, version 1.
pub const ALPN: &[u8] = b"umnet/1";

/// The configuration for accepting connections from peers.
///
/// Peers must present a certificate issued by `identity`'s CA; `revoked` is consulted on every
/// handshake, so replacing its contents takes effect for the next connection.
pub fn server_config(
    identity: &Identity,
    revoked: Arc<Revocations>,
) -> Result<ServerConfig, Error> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider.clone())
        .build()
        .map_err(|source| Error::Verifier { source })?;
    let verifier = Arc::new(RevocationCheckingClientVerifier { inner, revoked });

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.certificate_der().clone()], identity.private_key())
        .map_err(tls_error)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The configuration for dialing peers.
///
/// Dial with the peer's node name as server name: the peer's certificate must name it, and must
/// be issued by `identity`'s CA and not be revoked.
pub fn client_config(
    identity: &Identity,
    revoked: Arc<Revocations>,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(roots(identity)?, provider.clone())
        .build()
        .map_err(|source| Error::Verifier { source })?;
    let verifier = Arc::new(RevocationCheckingServerVerifier { inner, revoked });

    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.certificate_der().clone()], identity.private_key())
        .map_err(tls_error)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The node name in a peer's certificate chain, as rustls (or quinn's `peer_identity`) reports
/// it after a handshake: the only DNS name of the first (end-entity) certificate.
///
/// `None` if the chain is empty or its first certificate does not name exactly one valid node;
/// after a handshake with these configs it is always `Some`.
pub fn peer_name(certs: &[CertificateDer<'_>]) -> Option<String> {
    let der = certs.first()?;
    let parsed = info::parse(der, "peer certificate").ok()?;
    info::node_name(&parsed, "peer certificate").ok()
}

/// The node names and certificate fingerprints a node refuses to talk to, shared between the
/// TLS verifiers and whoever updates the list.
///
/// Thread-safe: [`replace`](Self::replace) swaps the whole list at once while handshakes read it.
/// Connections established before a replacement are not affected; to cut them, check their peer
/// certificates with [`is_revoked_certificate`](Self::is_revoked_certificate) after replacing.
#[derive(Debug, Default)]
pub struct Revocations {
    /// The current list.
    list: RwLock<RevokedSet>,
}

/// One version of the revocation list.
#[derive(Debug, Default)]
struct RevokedSet {
    /// Revoked node names.
    names: HashSet<String>,
    /// Revoked certificate fingerprints, as 64 lowercase hex digits.
    fingerprints: HashSet<String>,
}

impl Revocations {
    /// An empty list: nothing is revoked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole list with `names` and `fingerprints`.
    ///
    /// Names must be valid node names. Fingerprints are SHA-256 fingerprints as in
    /// [`CertInfo::fingerprint`]; upper case and colons between bytes are accepted too. If an
    /// entry is invalid, the list is left as it was.
    pub fn replace<N, F>(&self, names: N, fingerprints: F) -> Result<(), Error>
    where
        N: IntoIterator,
        N::Item: AsRef<str>,
        F: IntoIterator,
        F::Item: AsRef<str>,
    {
        let mut new = RevokedSet::default();
        for name in names {
            let name = name.as_ref();
            validate_node_name(name)?;
            new.names.insert(name.to_owned());
        }
        for fingerprint in fingerprints {
            new.fingerprints.insert(normalize_fingerprint(fingerprint.as_ref())?);
        }
        *self.list.write().unwrap_or_else(PoisonError::into_inner) = new;
        Ok(())
    }

    /// Whether the certificate described by `info` is revoked, by node name or by fingerprint.
    pub fn is_revoked(&self, info: &CertInfo) -> bool {
        let list = self.list.read().unwrap_or_else(PoisonError::into_inner);
        list.names.contains(&info.name) || list.fingerprints.contains(&info.fingerprint)
    }

    /// Whether a DER certificate is revoked, by node name or by fingerprint. A certificate that
    /// does not parse counts as revoked: it cannot be shown not to be.
    pub fn is_revoked_certificate(&self, cert: &CertificateDer<'_>) -> bool {
        info::inspect_der(cert).map_or(true, |info| self.is_revoked(&info))
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        let list = self.list.read().unwrap_or_else(PoisonError::into_inner);
        list.names.is_empty() && list.fingerprints.is_empty()
    }
}

/// A fingerprint as 64 lowercase hex digits, from hex with optional colons in any case.
fn normalize_fingerprint(entry: &str) -> Result<String, Error> {
    let invalid = |reason| Error::InvalidRevocation { entry: entry.into(), reason };
    let hex: String = entry.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid("a fingerprint has only hex digits and colons"));
    }
    match hex.len() {
        64 => Ok(hex),
        _ => Err(invalid("a SHA-256 fingerprint has 64 hex digits")),
    }
}

/// The ring provider, chosen explicitly so that the configs never depend on which provider a
/// process installed as its default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root store holding only the identity's CA.
fn roots(identity: &Identity) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca_certificate_der().clone()).map_err(tls_error)?;
    Ok(Arc::new(roots))
}

/// Maps a rustls error to [`Error::Tls`].
fn tls_error(source: rustls::Error) -> Error {
    Error::Tls { source }
}

/// Refuses a verified peer certificate that is revoked.
fn check_revocation(
    revoked: &Revocations,
    end_entity: &CertificateDer<'_>,
) -> Result<(), rustls::Error> {
    match revoked.is_revoked_certificate(end_entity) {
        true => Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)),
        false => Ok(()),
    }
}

/// Refuses a client certificate that names no node: the server could not tell who connected.
fn check_client_name(end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    match peer_name(std::slice::from_ref(end_entity)) {
        Some(_) => Ok(()),
        None => {
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }
}

/// The webpki client verifier followed by the revocation check.
#[derive(Debug)]
struct RevocationCheckingClientVerifier {
    /// Checks the chain, validity window and key usage.
    inner: Arc<dyn ClientCertVerifier>,
    /// The list checked after `inner` accepts.
    revoked: Arc<Revocations>,
}

impl ClientCertVerifier for RevocationCheckingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_client_name(end_entity)?;
        check_revocation(&self.revoked, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The webpki server verifier followed by the revocation check.
#[derive(Debug)]
struct RevocationCheckingServerVerifier {
    /// Checks the chain, validity window, key usage and the dialed name.
    inner: Arc<WebPkiServerVerifier>,
    /// The list checked after `inner` accepts.
    revoked: Arc<Revocations>,
}

impl ServerCertVerifier for RevocationCheckingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_revocation(&self.revoked, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rustls::{ClientConnection, Connection, ServerConnection};

    use super::*;
    use crate::testutil::ca;
    use crate::{CertificateAuthority, DEFAULT_NODE_VALIDITY};

    /// Which side of a handshake failed, and how.
    #[derive(Debug)]
    enum Failure {
        Client(rustls::Error),
        Server(rustls::Error),
    }

    impl Failure {
        fn server_message(&self) -> String {
            match self {
                Failure::Server(error) => error.to_string(),
                Failure::Client(error) => panic!("expected the server to refuse, client: {error}"),
            }
        }

        fn client_message(&self) -> String {
            match self {
                Failure::Client(error) => error.to_string(),
                Failure::Server(error) => panic!("expected the client to refuse, server: {error}"),
            }
        }
    }

    /// Runs a handshake between the two configs through in-memory buffers, `client` dialing the
    /// server by the name `dial`. Returns both ends once neither has anything left to send.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
        dial: &str,
    ) -> Result<(Connection, Connection), Failure> {
        let name = ServerName::try_from(dial.to_owned()).unwrap();
        let mut client = Connection::from(ClientConnection::new(Arc::new(client), name).unwrap());
        let mut server = Connection::from(ServerConnection::new(Arc::new(server)).unwrap());
        loop {
            let to_server = transfer(&mut client, &mut server).map_err(Failure::Server)?;
            let to_client = transfer(&mut server, &mut client).map_err(Failure::Client)?;
            if !to_server && !to_client {
                break;
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        Ok((client, server))
    }

    /// Moves everything `from` has to send into `to`; reports whether there was anything and
    /// any error `to` found in it.
    fn transfer(from: &mut Connection, to: &mut Connection) -> Result<bool, rustls::Error> {
        let mut bytes = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut bytes).unwrap();
        }
        let mut unread = bytes.as_slice();
        while !unread.is_empty() {
            to.read_tls(&mut unread).unwrap();
            to.process_new_packets()?;
        }
        Ok(!bytes.is_empty())
    }

    /// Configs for `client` dialing `server` with no revocations.
    fn configs(client: &Identity, server: &Identity) -> (ClientConfig, ServerConfig) {
        let none = Arc::new(Revocations::new());
        (client_config(client, none.clone()).unwrap(), server_config(server, none).unwrap())
    }

    fn pair(authority: &CertificateAuthority) -> (Identity, Identity) {
        let client = authority.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        let server = authority.issue("node-b", DEFAULT_NODE_VALIDITY).unwrap();
        (client, server)
    }

    #[test]
    fn nodes_of_one_cluster_connect() {
        let (client, server) = pair(&ca("lab"));
        let (client_config, server_config) = configs(&client, &server);
        let (client_end, server_end) = handshake(client_config, server_config, "node-b").unwrap();

        let client_certs = server_end.peer_certificates().unwrap();
        assert_eq!(peer_name(client_certs).as_deref(), Some("node-a"));
        let server_certs = client_end.peer_certificates().unwrap();
        assert_eq!(peer_name(server_certs).as_deref(), Some("node-b"));
        assert_eq!(server_end.alpn_protocol(), Some(ALPN));
        assert_eq!(client_end.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    }

    /// A client config trusting `roots_of`'s CA and presenting `presenting`'s certificate, as a
    /// node of another cluster that got hold of our CA certificate would build.
    fn client_trusting(roots_of: &Identity, presenting: &Identity) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(roots_of.ca_certificate_der().clone()).unwrap();
        let chain = vec![presenting.certificate_der().clone()];
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, presenting.private_key())
            .unwrap()
    }

    #[test]
    fn a_client_from_another_cluster_is_refused() {
        let (_, server) = pair(&ca("lab"));
        let server_config = server_config(&server, Arc::new(Revocations::new())).unwrap();

        // A CA of another name: no trust anchor has the client certificate's issuer name.
        let (foreign, _) = pair(&ca("elsewhere"));
        let client_config = client_trusting(&server, &foreign);
        let failure = handshake(client_config, server_config.clone(), "node-b").unwrap_err();
        let message = failure.server_message();
        assert!(message.contains("UnknownIssuer"), "{message}");

        // A CA of the same name but another key: the issuer name matches, the signature does not.
        let (foreign, _) = pair(&ca("lab"));
        let client_config = client_trusting(&server, &foreign);
        let failure = handshake(client_config, server_config, "node-b").unwrap_err();
        let message = failure.server_message();
        assert!(message.contains("BadSignature"), "{message}");
    }

    #[test]
    fn a_server_from_another_cluster_is_refused() {
        let (client, _) = pair(&ca("lab"));
        let (_, server) = pair(&ca("elsewhere"));
        let (client_config, server_config) = configs(&client, &server);
        let failure = handshake(client_config, server_config, "node-b").unwrap_err();
        let message = failure.client_message();
        assert!(message.contains("UnknownIssuer"), "{message}");
    }

    #[test]
    fn a_server_with_another_name_is_refused() {
        let (client, server) = pair(&ca("lab"));
        let (client_config, server_config) = configs(&client, &server);
        let failure = handshake(client_config, server_config, "node-c").unwrap_err();
        let message = failure.client_message();
        assert!(message.contains("not valid for name \"node-c\""), "{message}");
    }

    #[test]
    fn expired_certificates_are_refused() {
        let authority = ca("lab");
        let (client, server) = pair(&authority);
        let day = Duration::from_secs(24 * 60 * 60);
        let now = SystemTime::now();
        let expired = authority.issue_with_window("node-a", now - 2 * day, now - day).unwrap();

        let (client_config, server_config) = configs(&expired, &server);
        let failure = handshake(client_config, server_config, "node-b").unwrap_err();
        let message = failure.server_message();
        assert!(message.contains("expired"), "{message}");

        let expired = authority.issue_with_window("node-b", now - 2 * day, now - day).unwrap();
        let (client_config, server_config) = configs(&client, &expired);
        let failure = handshake(client_config, server_config, "node-b").unwrap_err();
        let message = failure.client_message();
        assert!(message.contains("expired"), "{message}");
    }

    #[test]
    fn revoked_names_and_fingerprints_are_refused_without_restart() {
        let (client, server) = pair(&ca("lab"));
        let revoked = Arc::new(Revocations::new());
        let client_config = client_config(&client, revoked.clone()).unwrap();
        let server_config = server_config(&server, revoked.clone()).unwrap();
        let attempt = || handshake(client_config.clone(), server_config.clone(), "node-b");
        attempt().unwrap();

        // The server refuses the client by name.
        revoked.replace(["node-a"], [""; 0]).unwrap();
        let message = attempt().unwrap_err().server_message();
        assert!(message.contains("Revoked"), "{message}");

        // The client refuses the server by fingerprint, written with colons in upper case.
        let fingerprint = server.info().fingerprint.to_uppercase();
        let pairs: Vec<&str> = (0..32).map(|i| &fingerprint[2 * i..2 * i + 2]).collect();
        revoked.replace([""; 0], [pairs.join(":")]).unwrap();
        let message = attempt().unwrap_err().client_message();
        assert!(message.contains("Revoked"), "{message}");

        revoked.replace([""; 0], [""; 0]).unwrap();
        attempt().unwrap();
    }

    #[test]
    fn a_client_without_certificate_is_refused() {
        let (_, server) = pair(&ca("lab"));
        let mut roots = RootCertStore::empty();
        roots.add(server.ca_certificate_der().clone()).unwrap();
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_config = server_config(&server, Arc::new(Revocations::new())).unwrap();
        let failure = handshake(anonymous, server_config, "node-b").unwrap_err();
        let message = failure.server_message();
        assert!(message.contains("no certificates"), "{message}");
    }

    #[test]
    fn replace_checks_entries_and_keeps_the_old_list_on_error() {
        let revoked = Revocations::new();
        assert!(revoked.is_empty());
        revoked.replace(["node-a"], [""; 0]).unwrap();

        let error = revoked.replace(["Node-B"], [""; 0]).unwrap_err();
        assert!(matches!(error, Error::InvalidName { .. }), "{error:?}");
        let error = revoked.replace([""; 0], ["abc"]).unwrap_err();
        assert!(error.to_string().contains("64 hex digits"), "{error}");
        let error = revoked.replace([""; 0], ["z".repeat(64)]).unwrap_err();
        assert!(matches!(error, Error::InvalidRevocation { .. }), "{error:?}");

        let identity = ca("lab").issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        assert!(revoked.is_revoked(identity.info()));
        assert!(revoked.is_revoked_certificate(identity.certificate_der()));
        assert!(revoked.is_revoked_certificate(&CertificateDer::from(vec![1, 2, 3])));
    }

    #[test]
    fn peer_name_needs_a_node_certificate() {
        assert_eq!(peer_name(&[]), None);
        let authority = ca("lab");
        assert_eq!(peer_name(&[authority.certificate_der().clone()]), None);
        assert_eq!(peer_name(&[CertificateDer::from(vec![0x30, 0x00])]), None);
    }
}
