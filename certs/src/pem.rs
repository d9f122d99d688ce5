//! PEM text in and out: splitting text into its blocks, and writing one DER item as a block.
//!
//! Parsing uses the PEM reader of `rustls-pki-types`; encoding is the few lines of RFC 7468 below,
//! so that the crate stores every certificate and key in one canonical form whatever spacing or
//! comments the input had.

use rustls::pki_types::pem::{PemObject, SectionKind};

use crate::Error;

/// The PEM label of a certificate.
pub(crate) const CERTIFICATE: &str = "CERTIFICATE";

/// The PEM label of a PKCS #8 private key.
pub(crate) const PRIVATE_KEY: &str = "PRIVATE KEY";

/// The blocks of a PEM text, split by kind, in the order they appear.
#[derive(Default)]
pub(crate) struct Blocks {
    /// DER of each `CERTIFICATE` block.
    pub(crate) certificates: Vec<Vec<u8>>,
    /// DER of each `PRIVATE KEY` (PKCS #8) block.
    pub(crate) keys: Vec<Vec<u8>>,
    /// DER of each `CERTIFICATE REQUEST` block.
    pub(crate) requests: Vec<Vec<u8>>,
}

impl Blocks {
    /// Splits `text` into its PEM blocks. `what` names the text in errors.
    ///
    /// Text outside blocks is ignored, as PEM allows. Private keys in a format other than PKCS #8
    /// and blocks of kinds this crate never reads are refused with a message saying what to do.
    pub(crate) fn parse(text: &str, what: &str) -> Result<Self, Error> {
        let mut blocks = Self::default();
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes()) {
            let (kind, der) =
                section.map_err(|e| Error::Pem { what: what.into(), detail: e.to_string() })?;
            match kind {
                SectionKind::Certificate => blocks.certificates.push(der),
                SectionKind::PrivateKey => blocks.keys.push(der),
                SectionKind::Csr => blocks.requests.push(der),
                SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey => {
                    return Err(Error::BadKey {
                        what: what.into(),
                        detail: format!(
                            "{kind:?} keys are not supported, only PKCS #8 (\"PRIVATE KEY\"); \
                             convert it with `openssl pkcs8 -topk8 -nocrypt`"
                        ),
                    });
                }
                other => {
                    return Err(Error::UnexpectedPem {
                        what: what.into(),
                        detail: format!("unexpected PEM block of kind {other:?}"),
                    });
                }
            }
        }
        Ok(blocks)
    }

    /// The only certificate in the text: an error if there is none, more than one, or anything
    /// else.
    pub(crate) fn single_certificate(text: &str, what: &str) -> Result<Vec<u8>, Error> {
        let mut blocks = Self::parse(text, what)?;
        blocks.expect_no_keys(what)?;
        blocks.expect_no_requests(what)?;
        match blocks.certificates.len() {
            0 => Err(Error::NoCertificate { what: what.into() }),
            1 => Ok(blocks.certificates.remove(0)),
            n => Err(Error::UnexpectedPem {
                what: what.into(),
                detail: format!("expected one certificate, found {n}"),
            }),
        }
    }

    /// The only private key in the text: an error if there is none, more than one, or anything
    /// else.
    pub(crate) fn single_key(text: &str, what: &str) -> Result<Vec<u8>, Error> {
        let mut blocks = Self::parse(text, what)?;
        blocks.expect_no_requests(what)?;
        if !blocks.certificates.is_empty() {
            return Err(Error::UnexpectedPem {
                what: what.into(),
                detail: "expected only a private key, found a certificate too".into(),
            });
        }
        match blocks.keys.len() {
            0 => Err(Error::NoKey { what: what.into() }),
            1 => Ok(blocks.keys.remove(0)),
            n => Err(Error::UnexpectedPem {
                what: what.into(),
                detail: format!("expected one private key, found {n}"),
            }),
        }
    }

    /// Refuses text holding a private key where none belongs, so that a key is not passed around
    /// by mistake as if it were public.
    pub(crate) fn expect_no_keys(&self, what: &str) -> Result<(), Error> {
        match self.keys.is_empty() {
            true => Ok(()),
            false => Err(Error::UnexpectedPem {
                what: what.into(),
                detail: "holds a private key where only certificates belong".into(),
            }),
        }
    }

    /// Refuses text holding a certificate request where none belongs.
    pub(crate) fn expect_no_requests(&self, what: &str) -> Result<(), Error> {
        match self.requests.is_empty() {
            true => Ok(()),
            false => Err(Error::UnexpectedPem {
                what: what.into(),
                detail: "holds a certificate request where none belongs".into(),
            }),
        }
    }
}

/// Writes `der` as one PEM block with the given label (RFC 7468: base64 in lines of 64
/// characters), ending with a newline.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const LINE: usize = 64;

    let mut out = format!("-----BEGIN {label}-----\n");
    let mut column = 0;
    for chunk in der.chunks(3) {
        let bytes =
            [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let group = u32::from(bytes[0]) << 16 | u32::from(bytes[1]) << 8 | u32::from(bytes[2]);
        for i in 0..4 {
            // A chunk of n bytes yields n + 1 significant characters; '=' pads the group to 4.
            let c = match i <= chunk.len() {
                true => char::from(ALPHABET[(group >> (18 - 6 * i)) as usize & 63]),
                false => '=',
            };
            out.push(c);
            column += 1;
            if column == LINE {
                out.push('\n');
                column = 0;
            }
        }
    }
    if column != 0 {
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_round_trips_through_the_parser() {
        for len in [1, 2, 3, 47, 48, 49, 200] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let text = encode(CERTIFICATE, &der);
            assert!(text.lines().all(|line| line.len() <= 64));
            let blocks = Blocks::parse(&text, "test").unwrap();
            assert_eq!(blocks.certificates, vec![der]);
        }
    }

    #[test]
    fn encode_matches_rfc_4648_vectors() {
        let body = |s: &str| encode("X", s.as_bytes()).lines().nth(1).unwrap().to_string();
        assert_eq!(body("f"), "Zg==");
        assert_eq!(body("fo"), "Zm8=");
        assert_eq!(body("foo"), "Zm9v");
        assert_eq!(body("foobar"), "Zm9vYmFy");
    }

    #[test]
    fn sec1_keys_are_refused_with_advice() {
        let text = encode("EC PRIVATE KEY", b"not really a key");
        let message = Blocks::parse(&text, "bundle").err().unwrap().to_string();
        assert!(message.contains("PKCS #8") && message.contains("openssl pkcs8"), "{message}");
    }
}
