//! The rule for node names, checked wherever a name enters a certificate, a request or a
//! revocation list.
//!
//! A node name is also the DNS name in the node's certificate and the server name its peers dial,
//! so the rule is the intersection of what DNS and rustls accept, narrowed to lowercase to keep one
//! spelling per node. This module only checks names; it does not resolve them.

use crate::Error;

/// The longest node or cluster name, in bytes: one DNS label's worth.
pub const MAX_NAME_LEN: usize = 63;

/// Checks that `name` can name a node.
///
/// A node name is 1 to [`MAX_NAME_LEN`] characters of lowercase ASCII letters, digits, `-` and
/// `.`, shaped like a DNS name: dot-separated labels, none empty, none starting or ending with
/// `-`. The last label must not look like a number (`42`, `0x1f`): TLS would read the name as an
/// address and refuse it as a server name.
pub fn validate_node_name(name: &str) -> Result<(), Error> {
    check(name).map_err(|reason| Error::InvalidName { kind: "node", name: name.into(), reason })
}

/// Checks a cluster name (the CA's common name) with the same rule as node names, so that it
/// prints and quotes the same way.
pub(crate) fn validate_cluster_name(name: &str) -> Result<(), Error> {
    check(name).map_err(|reason| Error::InvalidName { kind: "cluster", name: name.into(), reason })
}

/// Returns the rule `name` breaks, if any.
fn check(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("it is longer than 63 characters");
    }
    if let Some(bad) = name.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '.')) {
        return Err(if bad.is_ascii_uppercase() {
            "it has an uppercase letter"
        } else {
            "it has a character other than a-z, 0-9, '-' and '.'"
        });
    }

    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it starts or ends with '.' or has two dots in a row");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a part between dots starts or ends with '-'");
        }
        last = label;
    }
    if looks_numeric(last) {
        return Err("its last part looks like a number, which TLS would take for an address");
    }
    Ok(())
}

/// Whether a label is decimal digits or a `0x` hexadecimal number: the labels that rustls (after
/// the WHATWG URL "ends in a number" rule) refuses at the end of a DNS name.
fn looks_numeric(label: &str) -> bool {
    let decimal = label.bytes().all(|b| b.is_ascii_digit());
    let hex =
        label.strip_prefix("0x").is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_hexdigit()));
    decimal || hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::DnsName;

    #[test]
    fn name_table() {
        let long = "a".repeat(63);
        let too_long = "a".repeat(64);
        let table: &[(&str, bool)] = &[
            ("a", true),
            ("node1", true),
            ("node-1", true),
            ("rack1.node-2", true),
            ("1node", true),
            ("1.a", true),
            ("x-0", true),
            (&long, true),
            ("", false),
            (&too_long, false),
            ("Node1", false),
            ("node_1", false),
            ("node 1", false),
            ("nöde", false),
            ("-node", false),
            ("node-", false),
            ("a.-b", false),
            ("a-.b", false),
            (".node", false),
            ("node.", false),
            ("a..b", false),
            ("42", false),
            ("a.42", false),
            ("0", false),
            ("0x1f", false),
            ("0x", false),
        ];
        for (name, valid) in table {
            assert_eq!(validate_node_name(name).is_ok(), *valid, "{name:?}");
            if *valid {
                // Every valid node name must also be a server name rustls accepts.
                assert!(DnsName::try_from(*name).is_ok(), "rustls refuses {name:?}");
            }
        }
    }

    #[test]
    fn error_names_the_rule() {
        let message = validate_node_name("Node1").unwrap_err().to_string();
        assert!(message.contains("\"Node1\"") && message.contains("uppercase"), "{message}");
        let message = validate_cluster_name("").unwrap_err().to_string();
        assert!(message.contains("cluster name") && message.contains("empty"), "{message}");
    }
}
