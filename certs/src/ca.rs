//! The cluster certificate authority: its creation, its two files, and the certificates it
//! issues.
//!
//! Every certificate this module issues has the same profile, whether the key is generated here
//! ([`CertificateAuthority::issue`]) or arrives in a request
//! ([`CertificateAuthority::sign_request`]): the node name as common name and as the only DNS
//! name, extended key usages server and client authentication, not a CA, a random 128-bit serial
//! number. Nothing a request asks for beyond its name and public key is copied. This module keeps
//! no record of what it issued and signs no CRLs.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::info::{self, CertInfo};
use crate::name::validate_cluster_name;
use crate::pem::{self, Blocks};
use crate::{files, validate_node_name, Error, Identity};

/// File name of the CA certificate inside the CA directory.
const CERT_FILE: &str = "ca.crt";

/// File name of the CA private key inside the CA directory.
const KEY_FILE: &str = "ca.key";

/// How far before "now" a new certificate's validity starts, so that a peer whose clock lags the
/// issuing host's by a few minutes does not reject a fresh certificate as not yet valid.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A cluster's certificate authority: its self-signed certificate and private key.
///
/// The key signs node certificates; it never leaves the host that holds the CA directory, and a
/// node needs only the certificate.
pub struct CertificateAuthority {
    /// The CA certificate.
    cert_der: CertificateDer<'static>,
    /// The CA certificate as PEM.
    cert_pem: String,
    /// The CA's subject (the cluster name) and key, as rcgen needs them to sign.
    issuer: Issuer<'static, KeyPair>,
    /// What the CA certificate says.
    info: CertInfo,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("CertificateAuthority").field("info", &self.info).finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a new CA for the cluster `cluster_name`, valid from now for `validity`.
    ///
    /// The certificate is self-signed with a new ECDSA P-256 key; its common name is the cluster
    /// name (checked with the node name rule); its key usages are certificate and CRL signing;
    /// its basic constraints make it a CA that may issue only end-entity certificates (path
    /// length 0).
    pub fn generate(cluster_name: &str, validity: Duration) -> Result<Self, Error> {
        validate_cluster_name(cluster_name)?;
        let (not_before, not_after) = window_from_now(validity)?;

        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(cluster_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial()?);
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset(not_after)?;

        let key = new_key()?;
        let cert = params.self_signed(&key).map_err(generate_error("the CA certificate"))?;
        Self::from_key_and_certificate(cert.der().clone(), key, "new CA certificate")
    }

    /// Writes the CA into `dir`, creating it (mode 0700) if needed: `ca.crt` (mode 0644) and
    /// `ca.key` (mode 0600, created with that mode).
    ///
    /// Refuses with [`Error::KeyExists`] if `ca.key` exists, and then writes nothing: a CA key is
    /// never overwritten. An existing `ca.crt` is replaced.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        files::create_dir(dir)?;
        files::write_new_private(&dir.join(KEY_FILE), &self.issuer.key().serialize_pem())?;
        files::write_public(&dir.join(CERT_FILE), &self.cert_pem)
    }

    /// Reads the CA from `ca.crt` and `ca.key` in `dir`, checking that the certificate is a CA
    /// certificate and that the key belongs to it.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let cert_what = cert_path.display().to_string();
        let key_what = key_path.display().to_string();

        let cert = Blocks::single_certificate(&files::read_text(&cert_path)?, &cert_what)?;
        let key = Blocks::single_key(&files::read_text(&key_path)?, &key_what)?;
        let key = KeyPair::try_from(key)
            .map_err(|e| Error::BadKey { what: key_what, detail: e.to_string() })?;
        Self::from_key_and_certificate(cert.into(), key, &format!("CA in {}", dir.display()))
    }

    /// Issues a certificate for `node_name` with a new key, valid from now for `validity`.
    pub fn issue(&self, node_name: &str, validity: Duration) -> Result<Identity, Error> {
        let (not_before, not_after) = window_from_now(validity)?;
        self.issue_with_window(node_name, not_before, not_after)
    }

    /// Issues a certificate for `node_name` with a new key, valid from `not_before` to
    /// `not_after` exactly (to the second). Meant for tests and for renewing ahead of time; the
    /// window may lie entirely in the past or the future.
    pub fn issue_with_window(
        &self,
        node_name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Identity, Error> {
        validate_node_name(node_name)?;
        let key = new_key()?;
        let cert_pem = self.sign(node_name, &key, not_before, not_after)?;
        Identity::from_parts(&self.cert_pem, &cert_pem, &key.serialize_pem())
    }

    /// Signs a node's certificate request (PEM `CERTIFICATE REQUEST`), returning the certificate
    /// as PEM, valid from now for `validity`.
    ///
    /// The request's signature must verify (the requester holds the key) and its subject
    /// alternative names must be exactly one DNS name that is a valid node name. The certificate
    /// gets the same profile as [`issue`](Self::issue): of the request, only that name and the
    /// public key are used; its subject and any extensions it asks for are ignored.
    pub fn sign_request(&self, csr_pem: &str, validity: Duration) -> Result<String, Error> {
        let (name, public_key) = read_request(csr_pem)?;
        let (not_before, not_after) = window_from_now(validity)?;
        self.sign(&name, &public_key, not_before, not_after)
    }

    /// The CA certificate as PEM: what every node needs to trust its peers.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate as DER.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// What the CA certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// The cluster name: the CA certificate's common name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Checks the pair and builds the CA from it. `what` names the source in errors.
    fn from_key_and_certificate(
        cert_der: CertificateDer<'static>,
        key: KeyPair,
        what: &str,
    ) -> Result<Self, Error> {
        let parsed = info::parse(&cert_der, what)?;
        if !parsed.is_ca() {
            return Err(Error::NotCa { what: what.into() });
        }
        if key.der_bytes() != parsed.public_key().subject_public_key.data.as_ref() {
            return Err(Error::KeyMismatch { what: what.into() });
        }
        let info = info::describe(&cert_der, &parsed, what)?;
        let cert_pem = pem::encode(pem::CERTIFICATE, &cert_der);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| Error::BadCertificate { what: what.into(), detail: e.to_string() })?;
        Ok(Self { cert_der, cert_pem, issuer, info })
    }

    /// Signs a node certificate for `node_name` and `public_key`, returning it as PEM.
    fn sign(
        &self,
        node_name: &str,
        public_key: &impl PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, Error> {
        if not_after <= not_before {
            return Err(Error::Validity { detail: "it ends before it starts".into() });
        }
        let dns_name = node_name.try_into().map_err(generate_error("the node name"))?;

        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(node_name);
        params.subject_alt_names = vec![SanType::DnsName(dns_name)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset(not_after)?;

        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(generate_error("the node certificate"))?;
        Ok(pem::encode(pem::CERTIFICATE, cert.der()))
    }
}

/// Reads a certificate request: checks its signature and returns the node it names and its
/// public key.
fn read_request(csr_pem: &str) -> Result<(String, SubjectPublicKeyInfo), Error> {
    let bad = |detail: String| Error::BadRequest { detail };
    let what = "certificate request";
    let mut blocks = Blocks::parse(csr_pem, what)?;
    blocks.expect_no_keys(what)?;
    if blocks.requests.len() != 1 || !blocks.certificates.is_empty() {
        return Err(bad(format!(
            "expected exactly one PEM \"CERTIFICATE REQUEST\" block, found {} and {} other blocks",
            blocks.requests.len(),
            blocks.certificates.len()
        )));
    }
    let der = blocks.requests.remove(0);

    let (rest, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| bad(format!("it does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes follow it", rest.len())));
    }
    csr.verify_signature().map_err(|e| bad(format!("its signature does not verify: {e}")))?;

    let mut names = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(san) => names.extend(&san.general_names),
            ParsedExtension::ParseError { error } => {
                return Err(bad(format!("an extension it asks for does not parse: {error}")));
            }
            _ => {}
        }
    }
    let name = match names.as_slice() {
        [] => Err(Error::RequestNames { detail: "no name".into() }),
        [GeneralName::DNSName(dns)] => validate_node_name(dns).map(|()| (*dns).to_owned()),
        [other] => Err(Error::RequestNames { detail: format!("{other}, which is not a DNS name") }),
        many => Err(Error::RequestNames { detail: format!("{} names", many.len()) }),
    }?;

    let spki = csr.certification_request_info.subject_pki.raw;
    let public_key = SubjectPublicKeyInfo::from_der(spki)
        .map_err(|e| bad(format!("its public key is not usable: {e}")))?;
    Ok((name, public_key))
}

/// Generates a certificate request for `node_name` with a new key, for the node side of the
/// request-and-install flow. Returns the request and the key, both PEM.
pub(crate) fn new_request(node_name: &str) -> Result<(String, String), Error> {
    validate_node_name(node_name)?;
    let dns_name = node_name.try_into().map_err(generate_error("the node name"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(node_name);
    params.subject_alt_names = vec![SanType::DnsName(dns_name)];

    let key = new_key()?;
    let request = params.serialize_request(&key).map_err(generate_error("the request"))?;
    let request_pem = request.pem().map_err(generate_error("the request"))?;
    Ok((request_pem, key.serialize_pem()))
}

/// A new ECDSA P-256 key: the algorithm every TLS 1.3 stack supports and the cheapest to verify.
fn new_key() -> Result<KeyPair, Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate_error("a key"))
}

/// A random positive 128-bit serial number: unique without keeping a register of issued
/// certificates (RFC 5280 allows up to 20 octets; CA/Browser Forum asks for 64 random bits).
fn random_serial() -> Result<SerialNumber, Error> {
    use ring::rand::SecureRandom;

    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Generate { what: "a serial number", detail: "no randomness".into() })?;
    // Clear the sign bit so that the DER INTEGER is positive without a padding byte; set the next
    // so that the number keeps all 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A distinguished name holding only the common name `name`.
fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// The validity window of a certificate issued now for `validity`, started [`BACKDATE`] early.
fn window_from_now(validity: Duration) -> Result<(SystemTime, SystemTime), Error> {
    let now = SystemTime::now();
    let not_after = now
        .checked_add(validity)
        .ok_or_else(|| Error::Validity { detail: format!("{validity:?} is too long") })?;
    Ok((now.checked_sub(BACKDATE).unwrap_or(now), not_after))
}

/// Converts a `SystemTime` to the type rcgen takes, to the second.
fn to_offset(time: SystemTime) -> Result<OffsetDateTime, Error> {
    let seconds = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok(),
        Err(before) => i64::try_from(before.duration().as_secs()).ok().map(|s| -s),
    };
    let out_of_range =
        || Error::Validity { detail: format!("{time:?} is outside the years 0 to 9999") };
    let seconds = seconds.ok_or_else(out_of_range)?;
    let date = OffsetDateTime::from_unix_timestamp(seconds).map_err(|_| out_of_range())?;
    // X.509 writes four-digit years; rcgen's encoder must not see others.
    match (0..=9999).contains(&date.year()) {
        true => Ok(date),
        false => Err(out_of_range()),
    }
}

/// Maps an rcgen error to [`Error::Generate`].
fn generate_error(what: &'static str) -> impl Fn(rcgen::Error) -> Error {
    move |e| Error::Generate { what, detail: e.to_string() }
}

#[cfg(test)]
mod tests {
    use x509_parser::extensions::ParsedExtension;

    use super::*;
    use crate::testutil::{ca, mode, TempDir};
    use crate::{DEFAULT_CA_VALIDITY, DEFAULT_NODE_VALIDITY};

    #[test]
    fn generate_save_load_round_trip() {
        let dir = TempDir::new();
        let ca_dir = dir.path().join("ca");
        let original = ca("lab");
        original.save(&ca_dir).unwrap();

        assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
        assert_eq!(mode(&ca_dir.join("ca.crt")), 0o644);
        assert_eq!(mode(&ca_dir), 0o700);

        let loaded = CertificateAuthority::load(&ca_dir).unwrap();
        assert_eq!(loaded.certificate_pem(), original.certificate_pem());
        assert_eq!(loaded.name(), "lab");
        assert!(loaded.info().is_ca);

        // The loaded CA signs certificates that chain to the saved certificate.
        let identity = loaded.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        assert_eq!(identity.ca_pem(), original.certificate_pem());
    }

    #[test]
    fn save_refuses_to_overwrite_a_key() {
        let dir = TempDir::new();
        let first = ca("lab");
        first.save(dir.path()).unwrap();

        let error = ca("lab").save(dir.path()).unwrap_err();
        assert!(matches!(error, Error::KeyExists { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(&dir.path().join("ca.key").display().to_string()), "{message}");
        assert!(message.contains("refusing to overwrite"), "{message}");

        // Nothing was written: the certificate still matches the key.
        let loaded = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(loaded.certificate_pem(), first.certificate_pem());
    }

    #[test]
    fn load_reports_missing_files_and_mismatched_keys() {
        let dir = TempDir::new();
        let error = CertificateAuthority::load(dir.path()).unwrap_err();
        assert!(matches!(error, Error::FileMissing { .. }), "{error:?}");
        assert!(error.to_string().contains("ca.crt"), "{error}");

        let other = TempDir::new();
        ca("lab").save(dir.path()).unwrap();
        ca("lab").save(other.path()).unwrap();
        std::fs::copy(other.path().join("ca.key"), dir.path().join("ca.key")).unwrap();
        let error = CertificateAuthority::load(dir.path()).unwrap_err();
        assert!(matches!(error, Error::KeyMismatch { .. }), "{error:?}");
    }

    #[test]
    fn load_refuses_a_node_certificate_as_ca() {
        let dir = TempDir::new();
        let authority = ca("lab");
        let identity = authority.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        std::fs::write(dir.path().join("ca.crt"), identity.cert_pem()).unwrap();
        std::fs::write(dir.path().join("ca.key"), identity.key_pem()).unwrap();
        let error = CertificateAuthority::load(dir.path()).unwrap_err();
        assert!(matches!(error, Error::NotCa { .. }), "{error:?}");
    }

    #[test]
    fn generate_refuses_invalid_cluster_names() {
        let error = CertificateAuthority::generate("My Lab", DEFAULT_CA_VALIDITY).unwrap_err();
        assert!(error.to_string().contains("invalid cluster name"), "{error}");
        let error = CertificateAuthority::generate("lab", Duration::MAX).unwrap_err();
        assert!(matches!(error, Error::Validity { .. }), "{error:?}");
    }

    #[test]
    fn ca_certificate_profile() {
        let authority = ca("lab");
        let (_, cert) = x509_parser::parse_x509_certificate(authority.certificate_der()).unwrap();
        assert_eq!(info::common_name(cert.subject()).as_deref(), Some("lab"));
        assert_eq!(cert.subject(), cert.issuer());
        let constraints = cert.basic_constraints().unwrap().unwrap();
        assert!(constraints.critical);
        assert!(constraints.value.ca);
        assert_eq!(constraints.value.path_len_constraint, Some(0));
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(usage.key_cert_sign() && usage.crl_sign());
        assert!(!usage.digital_signature());
        cert.verify_signature(None).unwrap();
    }

    #[test]
    fn node_certificate_profile() {
        let authority = ca("lab");
        let first = authority.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        let second = authority.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(first.certificate_der()).unwrap();
        let (_, other) = x509_parser::parse_x509_certificate(second.certificate_der()).unwrap();

        assert_eq!(info::common_name(cert.subject()).as_deref(), Some("node-a"));
        assert_eq!(info::common_name(cert.issuer()).as_deref(), Some("lab"));
        assert_eq!(info::node_name(&cert, "test").unwrap(), "node-a");
        assert!(!cert.is_ca());
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!eku.any && !eku.code_signing && eku.other.is_empty());
        assert_eq!(cert.raw_serial().len(), 16);
        assert_ne!(cert.raw_serial(), other.raw_serial());
    }

    #[test]
    fn request_sign_install() {
        let authority = ca("lab");
        let (csr, key) = crate::request("node-b").unwrap();
        let cert = authority.sign_request(&csr, DEFAULT_NODE_VALIDITY).unwrap();
        let identity = Identity::from_parts(authority.certificate_pem(), &cert, &key).unwrap();
        assert_eq!(identity.name(), "node-b");
        assert_eq!(identity.info().issuer, "lab");
    }

    /// A PEM request for `names` signed by a new key, with extra requested `params`.
    fn custom_request(names: Vec<SanType>, edit: impl FnOnce(&mut CertificateParams)) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = names;
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().unwrap())
    }

    #[test]
    fn sign_request_refuses_bad_names() {
        let authority = ca("lab");
        let sign = |csr: &str| authority.sign_request(csr, DEFAULT_NODE_VALIDITY).unwrap_err();

        let error = sign(&custom_request(vec![], |_| {}));
        assert!(matches!(error, Error::RequestNames { .. }), "{error:?}");
        assert!(error.to_string().contains("no name"), "{error}");

        let error = sign(&custom_request(vec![dns("node-a"), dns("node-b")], |_| {}));
        assert!(error.to_string().contains("2 names"), "{error}");

        let ip = SanType::IpAddress([192, 0, 2, 1].into());
        let error = sign(&custom_request(vec![ip], |_| {}));
        assert!(error.to_string().contains("not a DNS name"), "{error}");

        let error = sign(&custom_request(vec![dns("Node_A")], |_| {}));
        assert!(matches!(error, Error::InvalidName { kind: "node", .. }), "{error:?}");
    }

    #[test]
    fn sign_request_refuses_garbage_and_forged_requests() {
        let authority = ca("lab");
        let sign = |csr: &str| authority.sign_request(csr, DEFAULT_NODE_VALIDITY).unwrap_err();

        let error = sign("hello");
        assert!(matches!(error, Error::BadRequest { .. }), "{error:?}");

        let error = sign(&pem::encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00"));
        assert!(error.to_string().contains("does not parse"), "{error}");

        // Flip a bit in the signature, the last bytes of the DER.
        let (csr, _key) = crate::request("node-a").unwrap();
        let mut der = Blocks::parse(&csr, "test").unwrap().requests.remove(0);
        let last = der.len() - 1;
        der[last] ^= 1;
        let error = sign(&pem::encode("CERTIFICATE REQUEST", &der));
        assert!(error.to_string().contains("signature"), "{error}");

        let error = sign(authority.certificate_pem());
        assert!(matches!(error, Error::BadRequest { .. }), "{error:?}");
    }

    #[test]
    fn sign_request_overrides_requested_extensions() {
        let authority = ca("lab");
        let csr = custom_request(vec![dns("node-a")], |params| {
            params.distinguished_name = common_name("somebody-else");
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        });
        let cert_pem = authority.sign_request(&csr, DEFAULT_NODE_VALIDITY).unwrap();
        let der = Blocks::single_certificate(&cert_pem, "test").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(info::common_name(cert.subject()).as_deref(), Some("node-a"));
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.code_signing);
        for extension in cert.extensions() {
            if let ParsedExtension::KeyUsage(usage) = extension.parsed_extension() {
                assert!(!usage.key_cert_sign());
            }
        }
    }

    #[test]
    fn issue_refuses_bad_windows_and_names() {
        let authority = ca("lab");
        let now = SystemTime::now();
        let error = authority.issue_with_window("node-a", now, now).unwrap_err();
        assert!(matches!(error, Error::Validity { .. }), "{error:?}");
        let error = authority.issue("-node", DEFAULT_NODE_VALIDITY).unwrap_err();
        assert!(matches!(error, Error::InvalidName { .. }), "{error:?}");
    }

    #[test]
    fn debug_output_hides_the_key() {
        let authority = ca("lab");
        let debug = format!("{authority:?}");
        assert!(debug.contains("lab") && !debug.contains("PRIVATE"), "{debug}");
    }
}
