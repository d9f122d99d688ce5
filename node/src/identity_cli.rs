//! `umnet ca ...` and `umnet cert ...`: the cluster CA and node identities, on local files.
//!
//! Two ways to give a node its identity:
//! - on the CA host, `umnet ca issue NAME` writes a bundle (certificate, CA certificate and
//!   key) to copy to the node;
//! - on the node, `umnet cert request NAME` keeps a new key and writes a signing request; the
//!   CA host signs it with `umnet ca sign`, and `umnet cert install` puts the certificate
//!   beside the key. The key never leaves the node.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Subcommand;
use umnet_certs::{CertInfo, CertificateAuthority, Identity};

use crate::federation::IDENTITY_FILE;

/// Name of the key `umnet cert request` keeps in the state directory until `install`.
const PENDING_KEY: &str = "identity.key";

const DAY: u64 = 24 * 60 * 60;

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create the cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600; keep it on this host).
    Init {
        /// Where the CA lives; default STATE/ca.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The cluster's name, in the CA certificate.
        #[arg(long, default_value = "umnet")]
        name: String,
        /// Validity in days; default 3650.
        #[arg(long)]
        days: Option<u64>,
    },
    /// Issue an identity for node NAME: one bundle file (mode 0600) for its --identity.
    Issue {
        /// The node's name (DNS-like: lowercase letters, digits, '-' and '.').
        name: String,
        /// Where the CA lives; default STATE/ca.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Where to write the bundle; default NAME.pem.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Validity in days; default 365.
        #[arg(long)]
        days: Option<u64>,
    },
    /// Sign a node's certificate request (from `umnet cert request`).
    Sign {
        /// The request file.
        csr: PathBuf,
        /// Where the CA lives; default STATE/ca.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Where to write the certificate; default the request's name with `.crt`.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Validity in days; default 365.
        #[arg(long)]
        days: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CertCommand {
    /// Make a key for node NAME, kept in the state directory, and write a signing request.
    Request {
        /// The node's name.
        name: String,
        /// Where to write the request; default NAME.csr.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The node's state directory.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Put a signed certificate beside the kept key, as the node's identity.
    Install {
        /// The certificate from `umnet ca sign`.
        cert: PathBuf,
        /// The cluster CA certificate (ca.crt).
        #[arg(long, value_name = "FILE")]
        ca: PathBuf,
        /// The node's state directory.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Show a certificate or identity: name, fingerprint, issuer, validity.
    Show {
        /// A bundle or certificate file; default the node's identity.
        file: Option<PathBuf>,
        /// The node's state directory.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

fn validity(days: Option<u64>, default: Duration) -> Duration {
    days.map_or(default, |days| Duration::from_secs(days * DAY))
}

fn ca_dir(dir: Option<PathBuf>) -> PathBuf {
    dir.unwrap_or_else(|| crate::config::default_state_dir().join("ca"))
}

/// Writes `text` to a new file of mode `mode`, refusing to replace one.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

/// Runs a `umnet ca` command.
pub(crate) fn ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { dir, name, days } => {
            let dir = ca_dir(dir);
            let ca = CertificateAuthority::generate(
                &name,
                validity(days, umnet_certs::DEFAULT_CA_VALIDITY),
            )?;
            ca.save(&dir)?;
            println!("cluster CA {name:?} created in {}", dir.display());
            println!(
                "keep {} on this host; copy ca.crt where needed",
                dir.join("ca.key").display()
            );
        }
        CaCommand::Issue { name, dir, out, days } => {
            umnet_certs::validate_node_name(&name)?;
            let ca = CertificateAuthority::load(&ca_dir(dir))?;
            let identity = ca.issue(&name, validity(days, umnet_certs::DEFAULT_NODE_VALIDITY))?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.pem")));
            identity.save(&out)?;
            println!("identity of {name} written to {} (mode 0600)", out.display());
            println!("on node {name}: umnet node --identity {}", out.display());
        }
        CaCommand::Sign { csr, dir, out, days } => {
            let ca = CertificateAuthority::load(&ca_dir(dir))?;
            let request = fs::read_to_string(&csr)
                .with_context(|| format!("cannot read {}", csr.display()))?;
            let certificate =
                ca.sign_request(&request, validity(days, umnet_certs::DEFAULT_NODE_VALIDITY))?;
            let out = out.unwrap_or_else(|| csr.with_extension("crt"));
            write_new(&out, &certificate, 0o644)?;
            let info = umnet_certs::inspect(&certificate)?;
            println!("certificate of {} written to {}", info.name, out.display());
        }
    }
    Ok(())
}

/// Runs a `umnet cert` command.
pub(crate) fn cert(command: CertCommand) -> anyhow::Result<()> {
    let state = |dir: Option<PathBuf>| dir.unwrap_or_else(crate::config::default_state_dir);
    match command {
        CertCommand::Request { name, out, state_dir } => {
            umnet_certs::validate_node_name(&name)?;
            let state_dir = state(state_dir);
            fs::create_dir_all(&state_dir)
                .with_context(|| format!("cannot create {}", state_dir.display()))?;
            let key_path = state_dir.join(PENDING_KEY);
            if key_path.exists() {
                bail!(
                    "{} exists: a request is pending; install its certificate, or remove the \
                     key to start over",
                    key_path.display()
                );
            }
            let (request, key) = umnet_certs::request(&name)?;
            write_new(&key_path, &key, 0o600)?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.csr")));
            write_new(&out, &request, 0o644)?;
            println!(
                "request written to {}; the key stays in {}",
                out.display(),
                key_path.display()
            );
            println!("on the CA host: umnet ca sign {}", out.display());
        }
        CertCommand::Install { cert, ca, state_dir } => {
            let state_dir = state(state_dir);
            let key_path = state_dir.join(PENDING_KEY);
            let read = |path: &Path| {
                fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
            };
            let identity = Identity::from_parts(&read(&ca)?, &read(&cert)?, &read(&key_path)?)?;
            let target = state_dir.join(IDENTITY_FILE);
            identity.save(&target)?;
            fs::remove_file(&key_path)
                .with_context(|| format!("cannot remove {}", key_path.display()))?;
            let info = identity.info();
            println!("identity of {} installed in {}", info.name, target.display());
        }
        CertCommand::Show { file, state_dir } => {
            let path = file.unwrap_or_else(|| state(state_dir).join(IDENTITY_FILE));
            let text = fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let info = umnet_certs::inspect(&text)?;
            print!("{}", render(&info));
        }
    }
    Ok(())
}

fn render(info: &CertInfo) -> String {
    let date = |time: SystemTime| {
        let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        format_utc(secs)
    };
    let now = SystemTime::now();
    let status = if info.expires_within(Duration::ZERO, now) {
        "EXPIRED"
    } else if info.expires_within(umnet_certs::EXPIRY_WARNING, now) {
        "expires within 30 days"
    } else {
        "valid"
    };
    format!(
        "name         {}\nfingerprint  {}\nissuer       {}\nvalid from   {}\n\
         valid until  {} ({})\n",
        info.name,
        info.fingerprint,
        info.issuer,
        date(info.not_before),
        date(info.not_after),
        status,
    )
}

/// `YYYY-MM-DD HH:MM:SS UTC` from seconds since 1970 (civil-from-days, proleptic Gregorian).
fn format_utc(secs: u64) -> String {
    let days = (secs / DAY) as i64;
    let rest = secs % DAY;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_796_300_000), "2026-12-03 12:13:20 UTC");
    }
}
