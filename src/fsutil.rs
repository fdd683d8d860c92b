//! Every file the tool writes goes through here: atomic writes that never follow a link and never
//! leave a temporary file behind, checks that a destination is writable before the work that fills
//! it, and the advisory lock of a run folder. Low level on purpose: it imports nothing of the crate.
//!
//! An atomic write creates a temporary file with a random name in the destination's folder
//! (created exclusively, so an existing file or link of that name is never opened), writes it,
//! and renames it over the destination: readers see the old file or the new one, never half of
//! one, and a link at the destination is replaced, not written through. On any failure (disk
//! full, a failed rename) the temporary file is removed.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};

/// The folder `path` lives in (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A new temporary file beside `path` (created exclusively, random name, removed on drop).
fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = parent(path);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    let name = path.file_name().ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let mut b = tempfile::Builder::new();
    let prefix = format!(".{}.", name.to_string_lossy());
    b.prefix(&prefix).suffix(".tmp");
    // The final file gets the permissions std::fs::write would give it (0666 less the umask),
    // not tempfile's private 0600: run folders and sample folders are often shared.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        b.permissions(std::fs::Permissions::from_mode(0o666));
    }
    b.tempfile_in(dir).with_context(|| format!("cannot create a file in {}", dir.display()))
}

/// Write `bytes` to `path` through `tmp` and a rename, syncing the data first when `sync`.
fn finish(path: &Path, mut tmp: tempfile::NamedTempFile, bytes: &[u8], sync: bool) -> Result<File> {
    tmp.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    if sync {
        tmp.as_file().sync_all().with_context(|| format!("cannot write {}", path.display()))?;
    }
    // On failure the error owns the temporary file, and dropping it removes the file.
    tmp.persist(path).map_err(|e| anyhow!("cannot replace {}: {}", path.display(), e.error))
}

/// Replace `path` with `bytes` atomically (see the module). Creates missing parent folders.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    finish(path, temp_beside(path)?, bytes, false).map(drop)
}

/// [`write_atomic`], with the data on disk before the rename: for checkpoints and run configs,
/// which must survive a power cut as either the old or the new file.
pub fn write_atomic_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    finish(path, temp_beside(path)?, bytes, true).map(drop)
}

/// [`write_atomic`] and return the new file, open for appending: a log (loss.csv) starts from a
/// consistent prefix and grows through this handle, never through a path someone could swap.
pub fn create_atomic(path: &Path, bytes: &[u8]) -> Result<File> {
    let mut f = finish(path, temp_beside(path)?, bytes, false)?;
    f.seek(std::io::SeekFrom::End(0)).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(f)
}

/// Fail now, before any work, unless files can be created in folder `dir` (made if missing).
/// `what` names the flag for the message (`--out-dir`).
pub fn check_dir_writable(dir: &Path, what: &str) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("{what} {}: exists and is not a folder; give a folder", dir.display());
    }
    let probe = probe_in(dir);
    probe.map_err(|e| anyhow!("{what} {}: cannot write there ({e}); give a writable folder", dir.display()))
}

/// Fail now, before any work, unless `path` can be written atomically (its folder exists or can
/// be made, and takes new files; `path` itself is not a folder).
pub fn check_file_writable(path: &Path, what: &str) -> Result<()> {
    if path.is_dir() {
        bail!("{what} {}: is a folder; give a file path", path.display());
    }
    if path.file_name().is_none() {
        bail!("{what} {}: is not a file path", path.display());
    }
    let dir = parent(path);
    probe_in(dir).map_err(|e| anyhow!("{what} {}: cannot write to {} ({e})", path.display(), dir.display()))
}

/// Create and remove a temporary file in `dir` (creating `dir` if needed).
fn probe_in(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    tempfile::Builder::new().prefix(".sddpm-write-check.").tempfile_in(dir).map(drop)
}

/// The advisory lock of a folder: held while the process lives (or until dropped), so two
/// processes never work in the same folder at once. The lock file (`.lock`) holds the pid of the
/// holder, for the message the second one prints.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    pub path: PathBuf,
}

/// Name of the lock file in a locked folder.
pub const LOCK_FILE: &str = ".lock";

impl DirLock {
    /// Lock `dir` (created if missing) or fail with one line naming the holder's pid. `what`
    /// says what holds such a lock ("training run").
    pub fn acquire(dir: &Path, what: &str) -> Result<DirLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.file_type().is_file()) {
            bail!("{}: is not a regular file; remove it", path.display());
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => "another process".to_string(),
                    p => format!("process {p}"),
                };
                bail!(
                    "{} is in use by another {what} ({holder} holds {}); wait for it to finish, or use another folder",
                    dir.display(),
                    path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                bail!("cannot lock {}: {e}", path.display())
            }
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write the lock file {}", path.display()))?;
        Ok(DirLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_links_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let target = dir.path().join("out.png");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_atomic(&target, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep", "wrote through a link");
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert!(!std::fs::symlink_metadata(&target).unwrap().file_type().is_symlink());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty folder fails on every platform.
        let target = dir.path().join("ckpt");
        std::fs::create_dir_all(target.join("x")).unwrap();
        assert!(write_atomic(&target, b"data").is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ckpt")]);
    }

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "run").unwrap();
        let e = DirLock::acquire(dir.path(), "run").unwrap_err().to_string();
        assert!(e.contains(&format!("process {}", std::process::id())), "{e}");
        drop(first);
        DirLock::acquire(dir.path(), "run").unwrap();
    }
}
