//! Unique names and scratch directories.
//!
//! Tests run in parallel: as threads of one test binary and as several binaries at once. Every
//! path, namespace and interface name the harness makes therefore carries this process's PID and
//! a per-process counter, so two tests never share one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use anyhow::{bail, Context, Result};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Returns `"{pid}-{n}"`, a suffix no other call in any running process returns.
pub fn unique_suffix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// Returns an interface name that is unique on this host and fits in `IFNAMSIZ` (15 bytes).
///
/// Only the first three bytes of `prefix` are used: the rest of the budget holds the PID in hex
/// (at most 6 digits, since `pid_max` is at most 2^22) and the counter.
pub fn unique_ifname(prefix: &str) -> String {
    let prefix: String = prefix.chars().filter(char::is_ascii_alphanumeric).take(3).collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}x{n:x}", std::process::id())
}

/// Whether the process whose unique suffix (`{pid}-{n}`) ends `name` has exited; false when
/// `name` carries no such suffix.
pub(crate) fn maker_is_gone(name: &str) -> bool {
    let Some(pid) = name.rsplit('-').nth(1).and_then(|pid| pid.parse::<u32>().ok()) else {
        return false;
    };
    !Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes temp dirs left by earlier test processes that died without running their drop
/// guards (a SIGKILLed test binary). Only `umnet-*-{pid}-{n}` directories whose maker is gone
/// are touched.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("umnet-") && maker_is_gone(&name) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A directory under the system temp dir, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/umnet-{prefix}-{pid}-{n}`.
    ///
    /// Keep `prefix` short: guests and nodes put Unix sockets in here, and a socket path must fit
    /// in the 108 bytes of `sockaddr_un.sun_path`.
    pub fn new(prefix: &str) -> Result<TempDir> {
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(remove_stale_dirs);

        // A directory with our name can only exist if a dead process with our PID left it
        // behind; skip such names rather than reuse a directory whose contents we don't know.
        for _ in 0..100 {
            let path = std::env::temp_dir().join(format!("umnet-{prefix}-{}", unique_suffix()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(err) => {
                    return Err(err).with_context(|| format!("creating {}", path.display()))
                }
            }
        }
        bail!("could not find a free temp dir name for prefix {prefix:?}")
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            if err.kind() != std::io::ErrorKind::NotFound {
                eprintln!("umnet-tests: could not remove {}: {err}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames_fit_ifnamsiz_and_differ() {
        let a = unique_ifname("veth");
        let b = unique_ifname("veth");
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
        assert!(a.starts_with("vet"));
    }

    #[test]
    fn makers_are_read_from_the_name_suffix() {
        assert!(!maker_is_gone(&format!("umnet-x-{}", unique_suffix())));
        assert!(maker_is_gone("umnet-x-999999999-1"));
        assert!(!maker_is_gone("umnet-bench.8433.0.uml_switch"));
    }

    #[test]
    fn temp_dir_is_removed_on_drop() -> Result<()> {
        let dir = TempDir::new("t")?;
        let path = dir.path().to_path_buf();
        std::fs::write(dir.join("file"), "x")?;
        drop(dir);
        assert!(!path.exists());
        Ok(())
    }
}
