//! A node's TLS identity: its certificate, the CA certificate it trusts, and its private key.
//!
//! An identity is stored as one bundle file of three PEM blocks in this order:
//!
//! 1. `CERTIFICATE`: the node certificate;
//! 2. `CERTIFICATE`: the cluster CA certificate;
//! 3. `PRIVATE KEY`: the node's PKCS #8 private key.
//!
//! Text outside the blocks is ignored. Every way in ([`Identity::load`],
//! [`Identity::from_bundle`], [`Identity::from_parts`]) makes the same checks, so an `Identity`
//! value is always consistent: the key belongs to the certificate, the CA signed the certificate,
//! and the certificate names exactly one valid node. Expiry is not checked here, so that an
//! expired identity can still be loaded and inspected; the TLS handshake refuses it.

use std::path::Path;

use rcgen::{KeyPair, PublicKeyData};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::info::{self, CertInfo};
use crate::pem::{self, Blocks};
use crate::{ca, files, Error};

/// A node's certificate, the CA certificate, and the node's private key, checked to belong
/// together.
pub struct Identity {
    /// The node certificate.
    cert_der: CertificateDer<'static>,
    /// The cluster CA certificate.
    ca_der: CertificateDer<'static>,
    /// The node's PKCS #8 private key.
    key_der: PrivatePkcs8KeyDer<'static>,
    /// The node certificate as PEM.
    cert_pem: String,
    /// The CA certificate as PEM.
    ca_pem: String,
    /// The private key as PEM.
    key_pem: String,
    /// What the node certificate says; its `name` is the node name.
    info: CertInfo,
    /// What the CA certificate says.
    ca_info: CertInfo,
}

impl Identity {
    /// Reads and checks a bundle file (see the module documentation for its layout).
    ///
    /// Fails with [`Error::FileMissing`] if there is no file, [`Error::NoCertificate`] or
    /// [`Error::NoKey`] if a part is missing, [`Error::KeyMismatch`] if the key belongs to another
    /// certificate, and [`Error::WrongIssuer`] if the bundled CA did not issue the certificate.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = files::read_text(path)?;
        Self::parse_bundle(&text, &format!("bundle {}", path.display()))
    }

    /// Checks a bundle held in memory, with the same checks as [`load`](Self::load).
    pub fn from_bundle(text: &str) -> Result<Self, Error> {
        Self::parse_bundle(text, "bundle")
    }

    /// Writes the bundle to `path` with mode 0600, replacing any file there.
    ///
    /// The bundle is written to a new file beside `path` and renamed over it, so the key is never
    /// in a file more open than 0600 and a crash leaves the old bundle or the new one.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        files::replace_private(path, &self.to_bundle())
    }

    /// Builds an identity from its parts, each PEM, with the same checks as
    /// [`load`](Self::load).
    ///
    /// This is the install step of the request flow: the node made its key with [`request`],
    /// the CA returned the certificate from
    /// [`sign_request`](crate::CertificateAuthority::sign_request), and the CA certificate came
    /// with it.
    pub fn from_parts(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let ca = Blocks::single_certificate(ca_pem, "CA certificate")?;
        let cert = Blocks::single_certificate(cert_pem, "node certificate")?;
        let key = Blocks::single_key(key_pem, "private key")?;
        Self::assemble("identity", ca, cert, key)
    }

    /// The bundle text: node certificate, CA certificate, private key.
    pub fn to_bundle(&self) -> String {
        format!("{}{}{}", self.cert_pem, self.ca_pem, self.key_pem)
    }

    /// The node name: the only DNS name of the node certificate.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// What the node certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// What the CA certificate says.
    pub fn ca_info(&self) -> &CertInfo {
        &self.ca_info
    }

    /// The node certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate as PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The private key as PEM (PKCS #8).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The node certificate as DER.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate as DER.
    pub fn ca_certificate_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// A copy of the private key in the form rustls takes.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone_key())
    }

    /// Splits bundle text into its parts and checks them. `what` names the bundle in errors.
    fn parse_bundle(text: &str, what: &str) -> Result<Self, Error> {
        const LAYOUT: &str = "a bundle holds the node certificate, then the CA certificate, then \
                              the private key";

        let mut blocks = Blocks::parse(text, what)?;
        blocks.expect_no_requests(what)?;
        let unexpected = |detail: String| Error::UnexpectedPem { what: what.into(), detail };
        let (cert, ca) = match blocks.certificates.len() {
            0 => return Err(Error::NoCertificate { what: what.into() }),
            1 => return Err(unexpected(format!("holds one certificate; {LAYOUT}"))),
            2 => {
                let ca = blocks.certificates.remove(1);
                (blocks.certificates.remove(0), ca)
            }
            n => return Err(unexpected(format!("holds {n} certificates; {LAYOUT}"))),
        };
        let key = match blocks.keys.len() {
            0 => return Err(Error::NoKey { what: what.into() }),
            1 => blocks.keys.remove(0),
            n => return Err(unexpected(format!("holds {n} private keys; {LAYOUT}"))),
        };
        Self::assemble(what, ca, cert, key)
    }

    /// Checks that the parts belong together and builds the identity.
    fn assemble(what: &str, ca: Vec<u8>, cert: Vec<u8>, key: Vec<u8>) -> Result<Self, Error> {
        // The node certificate first, so that a bundle with its certificates swapped is reported
        // as such rather than as a CA that is not a CA.
        let cert_what = format!("{what}: node certificate");
        let parsed_cert = info::parse(&cert, &cert_what)?;
        if parsed_cert.is_ca() {
            return Err(Error::NotNodeCertificate { what: cert_what });
        }
        let ca_what = format!("{what}: CA certificate");
        let parsed_ca = info::parse(&ca, &ca_what)?;
        if !parsed_ca.is_ca() {
            return Err(Error::NotCa { what: ca_what });
        }

        let key_pair = KeyPair::try_from(key.as_slice()).map_err(|e| Error::BadKey {
            what: format!("{what}: private key"),
            detail: e.to_string(),
        })?;
        if key_pair.der_bytes() != parsed_cert.public_key().subject_public_key.data.as_ref() {
            return Err(Error::KeyMismatch { what: what.into() });
        }

        let wrong_issuer = |detail: String| Error::WrongIssuer {
            what: what.into(),
            ca: info::common_name(parsed_ca.subject()).unwrap_or_default(),
            detail,
        };
        if parsed_cert.issuer().as_raw() != parsed_ca.subject().as_raw() {
            let issuer = info::common_name(parsed_cert.issuer()).unwrap_or_default();
            return Err(wrong_issuer(format!("its issuer is {issuer:?}")));
        }
        parsed_cert
            .verify_signature(Some(parsed_ca.public_key()))
            .map_err(|e| wrong_issuer(format!("the CA's signature on it does not verify ({e})")))?;

        info::node_name(&parsed_cert, &cert_what)?;
        let info = info::describe(&cert, &parsed_cert, &cert_what)?;
        let ca_info = info::describe(&ca, &parsed_ca, &ca_what)?;
        Ok(Self {
            cert_pem: pem::encode(pem::CERTIFICATE, &cert),
            ca_pem: pem::encode(pem::CERTIFICATE, &ca),
            key_pem: pem::encode(pem::PRIVATE_KEY, &key),
            cert_der: cert.into(),
            ca_der: ca.into(),
            key_der: key.into(),
            info,
            ca_info,
        })
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert_der: self.cert_der.clone(),
            ca_der: self.ca_der.clone(),
            key_der: self.key_der.clone_key(),
            cert_pem: self.cert_pem.clone(),
            ca_pem: self.ca_pem.clone(),
            key_pem: self.key_pem.clone(),
            info: self.info.clone(),
            ca_info: self.ca_info.clone(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Identity")
            .field("info", &self.info)
            .field("ca_info", &self.ca_info)
            .finish_non_exhaustive()
    }
}

/// Starts the request flow on a node: makes a new key and a certificate request naming
/// `node_name`. Returns `(request_pem, key_pem)`.
///
/// The request goes to the CA holder for
/// [`sign_request`](crate::CertificateAuthority::sign_request); the key stays on the node until
/// [`Identity::from_parts`] joins it with the returned certificate and the CA certificate.
pub fn request(node_name: &str) -> Result<(String, String), Error> {
    ca::new_request(node_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ca, mode, TempDir};
    use crate::DEFAULT_NODE_VALIDITY;

    #[test]
    fn issue_save_load_round_trip() {
        let dir = TempDir::new();
        let path = dir.path().join("node.pem");
        let identity = ca("lab").issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        identity.save(&path).unwrap();
        assert_eq!(mode(&path), 0o600);

        let loaded = Identity::load(&path).unwrap();
        assert_eq!(loaded.name(), "node-a");
        assert_eq!(loaded.to_bundle(), identity.to_bundle());
        assert_eq!(loaded.info(), identity.info());
        assert_eq!(loaded.ca_info().name, "lab");

        // The documented order: node certificate, CA certificate, key.
        let text = std::fs::read_to_string(&path).unwrap();
        let node_at = text.find(identity.cert_pem()).unwrap();
        let ca_at = text.find(identity.ca_pem()).unwrap();
        let key_at = text.find(identity.key_pem()).unwrap();
        assert!(node_at < ca_at && ca_at < key_at);
    }

    #[test]
    fn save_replaces_an_open_file_with_a_private_one() {
        let dir = TempDir::new();
        let path = dir.path().join("node.pem");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let identity = ca("lab").issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        identity.save(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(Identity::load(&path).unwrap().name(), "node-a");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temporary file left");
    }

    #[test]
    fn load_errors_say_what_is_wrong() {
        let dir = TempDir::new();
        let path = dir.path().join("node.pem");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Identity::load(&path).unwrap_err()
        };

        let error = Identity::load(&dir.path().join("absent.pem")).unwrap_err();
        assert!(matches!(error, Error::FileMissing { .. }), "{error:?}");
        assert!(error.to_string().contains("absent.pem does not exist"), "{error}");

        let error = load("this is not a certificate\n");
        assert!(matches!(error, Error::NoCertificate { .. }), "{error:?}");
        assert!(error.to_string().contains("node.pem holds no certificate"), "{error}");

        let error = load("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n");
        assert!(matches!(error, Error::Pem { .. }), "{error:?}");

        let authority = ca("lab");
        let identity = authority.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        let other = authority.issue("node-b", DEFAULT_NODE_VALIDITY).unwrap();
        let (cert, ca_pem, key) = (identity.cert_pem(), identity.ca_pem(), identity.key_pem());

        let error = load(&format!("{cert}{ca_pem}"));
        assert!(matches!(error, Error::NoKey { .. }), "{error:?}");
        assert!(error.to_string().contains("holds no private key"), "{error}");

        let error = load(&format!("{cert}{key}"));
        assert!(error.to_string().contains("holds one certificate"), "{error}");

        let error = load(&format!("{cert}{ca_pem}{}", other.key_pem()));
        assert!(matches!(error, Error::KeyMismatch { .. }), "{error:?}");
        assert!(error.to_string().contains("does not belong"), "{error}");

        let error = load(&format!("{ca_pem}{cert}{key}"));
        assert!(matches!(error, Error::NotNodeCertificate { .. }), "{error:?}");
        assert!(error.to_string().contains("node certificate first"), "{error}");
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let ours = ca("lab");
        for theirs in [ca("elsewhere"), ca("lab")] {
            let foreign = theirs.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
            let error =
                Identity::from_parts(ours.certificate_pem(), foreign.cert_pem(), foreign.key_pem())
                    .unwrap_err();
            assert!(matches!(error, Error::WrongIssuer { .. }), "{error:?}");
            assert!(error.to_string().contains("not issued by the bundled CA"), "{error}");
        }
    }

    #[test]
    fn from_parts_checks_each_part() {
        let authority = ca("lab");
        let identity = authority.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        let (cert, ca_pem, key) = (identity.cert_pem(), identity.ca_pem(), identity.key_pem());

        let rebuilt = Identity::from_parts(ca_pem, cert, key).unwrap();
        assert_eq!(rebuilt.to_bundle(), identity.to_bundle());

        let error = Identity::from_parts(ca_pem, cert, "").unwrap_err();
        assert!(error.to_string().contains("private key holds no private key"), "{error}");
        let error = Identity::from_parts(ca_pem, key, key).unwrap_err();
        assert!(matches!(error, Error::UnexpectedPem { .. }), "{error:?}");
        let error = Identity::from_parts(cert, cert, key).unwrap_err();
        assert!(matches!(error, Error::NotCa { .. }), "{error:?}");
    }

    #[test]
    fn debug_output_hides_the_key() {
        let identity = ca("lab").issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        let debug = format!("{identity:?}");
        assert!(debug.contains("node-a") && !debug.contains("PRIVATE"), "{debug}");
        assert_eq!(identity.clone().key_pem(), identity.key_pem());
    }
}
