//! The state directory: what the supervisor keeps on disk between runs.
//! Here: creating it private, probing that it takes writes, and the
//! instance lock: one supervisor per project, and the lock file names the
//! pid that holds it (the Python `djangocommand status/stop` commands read
//! it). The journal and the output logs live in it too.
//!
//! Output waiting for delivery and the journal may hold command output, so
//! the directory and everything under it is private: directories 0700,
//! files 0600, also when an older version left them wider.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

pub const LOCK_FILE: &str = "dcsupervisor.lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use the state directory {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error(
        "another dcsupervisor (pid {pid}) is already running for this project (lock {path}); stop it first"
    )]
    AlreadyRunning { pid: String, path: String },
}

/// Creates the state directory, and makes it and everything in it private.
pub fn prepare(dir: &Path) -> Result<PathBuf, StateError> {
    let io = |error| StateError::Io { path: dir.display().to_string(), error };
    private_dir(dir).map_err(io)?;
    make_private_within(dir).map_err(io)?;
    Ok(dir.to_path_buf())
}

/// Bytes a probe writes: enough to need a real block, not one inode.
const PROBE_BYTES: usize = 64 * 1024;

/// Whether the state directory takes writes (`dcsupervisor check`): writes,
/// syncs and removes a probe file; the bytes free for us on its filesystem.
pub fn probe(dir: &Path) -> Result<u64, StateError> {
    let dir = prepare(dir)?;
    let path = dir.join(".write-probe");
    let io = |error| StateError::Io { path: path.display().to_string(), error };
    let written =
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path).and_then(
            |mut file| {
                file.write_all(&[0u8; PROBE_BYTES])?;
                file.sync_all()
            },
        );
    let _ = std::fs::remove_file(&path);
    written.map_err(io)?;
    let stats = nix::sys::statvfs::statvfs(&dir).map_err(|e| io(e.into()))?;
    Ok((stats.blocks_available() as u64).saturating_mul(stats.fragment_size() as u64))
}

/// Creates `dir` (and its parents) 0700, or narrows it to 0700 if it exists.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    narrow(dir, 0o700)
}

/// Takes group and other permissions off everything under `dir`
/// (symlinks are left alone, never followed).
fn make_private_within(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            narrow(&entry.path(), 0o700)?;
            make_private_within(&entry.path())?;
        } else if kind.is_file() {
            narrow(&entry.path(), 0o600)?;
        }
    }
    Ok(())
}

fn narrow(path: &Path, private: u32) -> std::io::Result<()> {
    let mode = std::fs::symlink_metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & private))?;
    }
    Ok(())
}

/// Held for the supervisor's lifetime; the kernel releases it if we die.
pub struct InstanceLock {
    _file: Flock<File>,
}

impl InstanceLock {
    pub fn acquire(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(LOCK_FILE);
        let io = |error| StateError::Io { path: path.display().to_string(), error };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim().to_string();
                return Err(StateError::AlreadyRunning { pid, path: path.display().to_string() });
            }
        };
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_says_whether_the_state_directory_takes_writes() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(probe(&state).unwrap() > 0, "free bytes");
        assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0, "the probe file is removed");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        assert!(probe(&file.join("state")).is_err(), "a state directory under a file cannot exist");
    }

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let state = prepare(&dir.path().join("state")).unwrap();
        let _held = InstanceLock::acquire(&state).unwrap();
        let err = InstanceLock::acquire(&state).err().unwrap().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        let contents = std::fs::read_to_string(state.join(LOCK_FILE)).unwrap();
        assert_eq!(contents, format!("{}\n", std::process::id()));
    }
}
