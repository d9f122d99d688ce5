//! What a certificate says: names, fingerprint, validity window.
//!
//! This module reads certificates (with `x509-parser`); it does not verify them. Whether a
//! certificate is trusted is decided by [`crate::Identity`] when a bundle is loaded and by the
//! TLS verifiers during a handshake.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::x509::X509Name;

use crate::pem::Blocks;
use crate::{validate_node_name, Error};

/// What a certificate says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The node name: the certificate's first DNS name; for a certificate without one (a CA
    /// certificate), its subject common name; empty if it has neither.
    pub name: String,
    /// SHA-256 of the certificate's DER encoding, as 64 lowercase hex digits without separators:
    /// the same text `openssl x509 -outform der | sha256sum` prints.
    pub fingerprint: String,
    /// The common name of the issuer: the cluster name for certificates of a cluster CA.
    pub issuer: String,
    /// The common name of the subject: the node name, or the cluster name for a CA certificate.
    pub subject: String,
    /// Start of the validity window.
    pub not_before: SystemTime,
    /// End of the validity window.
    pub not_after: SystemTime,
    /// Whether the certificate may issue others (basic constraints `CA:TRUE`).
    pub is_ca: bool,
}

impl CertInfo {
    /// Whether the certificate is expired at `now + within`, so `expires_within(EXPIRY_WARNING,
    /// now)` says it is time to renew. True for a certificate that has expired already.
    ///
    /// [`EXPIRY_WARNING`]: crate::EXPIRY_WARNING
    pub fn expires_within(&self, within: Duration, now: SystemTime) -> bool {
        match now.checked_add(within) {
            Some(horizon) => self.not_after <= horizon,
            None => true,
        }
    }

    /// Whether `now` lies in the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// Describes the first certificate in `cert_pem`.
///
/// Any further certificates are ignored, so a bundle file describes its node certificate.
pub fn inspect(cert_pem: &str) -> Result<CertInfo, Error> {
    let blocks = Blocks::parse(cert_pem, "certificate text")?;
    let Some(der) = blocks.certificates.first() else {
        return Err(Error::NoCertificate { what: "certificate text".into() });
    };
    inspect_der(&CertificateDer::from(der.as_slice()))
}

/// Describes a DER-encoded certificate, as found in a TLS peer's certificate chain.
pub fn inspect_der(cert: &CertificateDer<'_>) -> Result<CertInfo, Error> {
    let parsed = parse(cert, "certificate")?;
    describe(cert, &parsed, "certificate")
}

/// The description of `parsed`, the parsed form of `der`.
pub(crate) fn describe(
    der: &[u8],
    parsed: &X509Certificate<'_>,
    what: &str,
) -> Result<CertInfo, Error> {
    let subject = common_name(parsed.subject()).unwrap_or_default();
    let name = match dns_names(parsed, what)?.into_iter().next() {
        Some(dns) => dns.to_owned(),
        None => subject.clone(),
    };
    let validity = parsed.validity();
    Ok(CertInfo {
        name,
        fingerprint: fingerprint(der),
        issuer: common_name(parsed.issuer()).unwrap_or_default(),
        subject,
        not_before: system_time(validity.not_before.timestamp(), what)?,
        not_after: system_time(validity.not_after.timestamp(), what)?,
        is_ca: parsed.is_ca(),
    })
}

/// Parses one DER certificate; trailing bytes are an error.
pub(crate) fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, Error> {
    let bad = |detail: String| Error::BadCertificate { what: what.into(), detail };
    let (rest, parsed) =
        x509_parser::parse_x509_certificate(der).map_err(|e| bad(format!("not X.509: {e}")))?;
    match rest.is_empty() {
        true => Ok(parsed),
        false => Err(bad(format!("{} bytes follow the certificate", rest.len()))),
    }
}

/// The node a certificate names: its subject alternative names must be exactly one DNS name, and
/// that a valid node name.
pub(crate) fn node_name(parsed: &X509Certificate<'_>, what: &str) -> Result<String, Error> {
    let none = |detail: String| Error::NoNodeName { what: what.into(), detail };
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| none(format!("its subject alternative names do not parse: {e}")))?;
    let names = san.map(|san| san.value.general_names.as_slice()).unwrap_or_default();
    match names {
        [] => Err(none("it has no subject alternative name".into())),
        [GeneralName::DNSName(dns)] => {
            validate_node_name(dns).map_err(|e| none(e.to_string()))?;
            Ok((*dns).to_owned())
        }
        [other] => Err(none(format!("its only subject alternative name is {other}"))),
        many => Err(none(format!("it has {} subject alternative names", many.len()))),
    }
}

/// The DNS names among a certificate's subject alternative names.
fn dns_names<'a>(parsed: &'a X509Certificate<'_>, what: &str) -> Result<Vec<&'a str>, Error> {
    let san = parsed.subject_alternative_name().map_err(|e| Error::BadCertificate {
        what: what.into(),
        detail: format!("subject alternative names do not parse: {e}"),
    })?;
    let names = san.map(|san| san.value.general_names.as_slice()).unwrap_or_default();
    Ok(names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        })
        .collect())
}

/// The first common name of a distinguished name, if it has a readable one.
pub(crate) fn common_name(name: &X509Name<'_>) -> Option<String> {
    name.iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned)
}

/// SHA-256 of `der` as lowercase hex.
pub(crate) fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Converts seconds since the Unix epoch (negative before it) to a `SystemTime`.
fn system_time(seconds: i64, what: &str) -> Result<SystemTime, Error> {
    let offset = Duration::from_secs(seconds.unsigned_abs());
    let time = match seconds >= 0 {
        true => UNIX_EPOCH.checked_add(offset),
        false => UNIX_EPOCH.checked_sub(offset),
    };
    time.ok_or_else(|| Error::BadCertificate {
        what: what.into(),
        detail: format!("validity time {seconds} is out of range"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::ca;
    use crate::{DEFAULT_NODE_VALIDITY, EXPIRY_WARNING};

    #[test]
    fn inspect_reports_names_window_and_fingerprint() {
        let before = SystemTime::now();
        let authority = ca("lab");
        let identity = authority.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        let after = SystemTime::now();

        let info = inspect(identity.cert_pem()).unwrap();
        assert_eq!(info.name, "node-a");
        assert_eq!(info.subject, "node-a");
        assert_eq!(info.issuer, "lab");
        assert!(!info.is_ca);
        assert!(info.not_before <= before && info.is_valid_at(after));
        let expected_end = before + DEFAULT_NODE_VALIDITY;
        let slack = Duration::from_secs(60);
        assert!(info.not_after + slack >= expected_end && info.not_after <= expected_end + slack);

        assert_eq!(info.fingerprint.len(), 64);
        assert!(info.fingerprint.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        assert_eq!(inspect(identity.cert_pem()).unwrap().fingerprint, info.fingerprint);
        assert_eq!(&info, identity.info());
        let other = authority.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        assert_ne!(other.info().fingerprint, info.fingerprint);

        // A bundle describes its node certificate.
        assert_eq!(inspect(&identity.to_bundle()).unwrap(), info);

        let ca_info = inspect(authority.certificate_pem()).unwrap();
        assert_eq!((ca_info.name.as_str(), ca_info.issuer.as_str()), ("lab", "lab"));
        assert!(ca_info.is_ca);
    }

    #[test]
    fn fingerprint_is_sha256_of_der() {
        // SHA-256 of the empty string, a published test vector.
        assert_eq!(
            fingerprint(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn expires_within() {
        let now = SystemTime::now();
        let authority = ca("lab");
        let identity = authority
            .issue_with_window("node-a", now - Duration::from_secs(60), now + 10 * DAY)
            .unwrap();
        let info = identity.info();
        assert!(info.expires_within(EXPIRY_WARNING, now));
        assert!(!info.expires_within(Duration::from_secs(3600), now));
        assert!(info.expires_within(Duration::ZERO, now + 11 * DAY));
        assert!(!info.is_valid_at(now + 11 * DAY));
    }

    #[test]
    fn inspect_refuses_garbage() {
        assert!(matches!(inspect("nothing here"), Err(Error::NoCertificate { .. })));
        let garbage = crate::pem::encode("CERTIFICATE", b"\x30\x00");
        assert!(matches!(inspect(&garbage), Err(Error::BadCertificate { .. })));
    }

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);
}
