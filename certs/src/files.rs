//! Reading and writing the crate's files with the right permissions.
//!
//! Private keys are only ever written into files created with mode 0600, so that no other user
//! can read them even for the moment between creation and a later `chmod`. Certificates are
//! public and get mode 0644. Unix only, like the rest of umnet.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

/// Mode of files holding a private key: read and write for the owner only.
pub(crate) const PRIVATE_MODE: u32 = 0o600;

/// Mode of files holding only certificates.
pub(crate) const PUBLIC_MODE: u32 = 0o644;

/// Mode of a directory this crate creates to hold a CA.
const DIRECTORY_MODE: u32 = 0o700;

/// Reads a whole text file, telling a missing file apart from other failures.
pub(crate) fn read_text(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::FileMissing { path: path.into() },
        _ => Error::Read { path: path.into(), source },
    })
}

/// Creates `dir` (mode 0700) and its parents if it does not exist; leaves an existing one alone.
pub(crate) fn create_dir(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIRECTORY_MODE)
        .create(dir)
        .map_err(|source| Error::Write { path: dir.into(), source })
}

/// Writes a private key to a new file of mode 0600; refuses if the file exists.
pub(crate) fn write_new_private(path: &Path, contents: &str) -> Result<(), Error> {
    let file =
        OpenOptions::new().write(true).create_new(true).mode(PRIVATE_MODE).open(path).map_err(
            |source| match source.kind() {
                io::ErrorKind::AlreadyExists => Error::KeyExists { path: path.into() },
                _ => Error::Write { path: path.into(), source },
            },
        )?;
    fill(file, path, contents, PRIVATE_MODE)
}

/// Writes a file holding a private key, replacing any file at `path`.
///
/// The contents go to a new 0600 file beside `path` that is then renamed over it: truncating the
/// old file in place would keep its mode, which may be more open than 0600, and a crash halfway
/// would leave neither the old contents nor the new.
pub(crate) fn replace_private(path: &Path, contents: &str) -> Result<(), Error> {
    let temporary = temporary_path(path)?;

    // A leftover from a crashed run is ours to remove; `create_new` then also refuses to follow
    // a symlink planted in its place.
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::Write { path: temporary, source }),
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_MODE)
        .open(&temporary)
        .map_err(|source| Error::Write { path: temporary.clone(), source })?;

    let written = fill(file, &temporary, contents, PRIVATE_MODE)
        .and_then(|()| fs::rename(&temporary, path).map_err(|source| write_error(path, source)));
    if written.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_file(&temporary);
    }
    written
}

/// Writes a public file (a certificate) of mode 0644, replacing any file at `path`.
pub(crate) fn write_public(path: &Path, contents: &str) -> Result<(), Error> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PUBLIC_MODE)
        .open(path)
        .map_err(|source| write_error(path, source))?;
    fill(file, path, contents, PUBLIC_MODE)
}

/// Writes `contents`, sets the exact mode (the umask may have narrowed it; an existing file keeps
/// its old one) and flushes to disk.
fn fill(mut file: File, path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    file.set_permissions(Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents.as_bytes()))
        .and_then(|()| file.sync_all())
        .map_err(|source| write_error(path, source))
}

/// The temporary sibling `.<name>.tmp` of `path`.
fn temporary_path(path: &Path) -> Result<PathBuf, Error> {
    let Some(name) = path.file_name() else {
        let source = io::Error::new(io::ErrorKind::InvalidInput, "the path names no file");
        return Err(write_error(path, source));
    };
    let mut temporary = std::ffi::OsString::from(".");
    temporary.push(name);
    temporary.push(".tmp");
    Ok(path.with_file_name(temporary))
}

/// A write error about `path`.
fn write_error(path: &Path, source: io::Error) -> Error {
    Error::Write { path: path.into(), source }
}
