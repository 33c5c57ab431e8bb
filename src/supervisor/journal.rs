//! The journal of executions in flight, in the state directory. An entry is
//! written when an execution starts and removed once its completion has been
//! delivered. A supervisor that was killed (even with SIGKILL) finds the
//! entries at its next start: it kills what is left of those jobs and
//! delivers the rest of each one's output log (see `outbox`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::api::ExecutionId;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: ExecutionId,
    pub command: String,
    /// The job's pid (also its process group), once it exists.
    pub pid: Option<u32>,
    /// The pid's start time (clock ticks since boot, from /proc), so a
    /// recycled pid is never mistaken for the job.
    pub pid_start_time: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("journal");
        super::state::private_dir(&dir)?;
        Ok(Self { dir })
    }

    /// Writes (or replaces) an entry atomically.
    pub fn record(&self, entry: &Entry) {
        let path = self.path(&entry.id);
        let temporary = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(&serde_json::to_vec(entry).map_err(std::io::Error::other)?)?;
            fs::rename(&temporary, &path)
        };
        if let Err(error) = write() {
            tracing::error!(execution = %entry.id, "cannot write the journal entry {}: {error}", path.display());
        }
    }

    pub fn remove(&self, id: &ExecutionId) {
        let _ = fs::remove_file(self.path(id));
    }

    /// Entries left by a previous run.
    pub fn entries(&self) -> Vec<Entry> {
        let Ok(listing) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut entries = Vec::new();
        for file in listing.flatten() {
            let path = file.path();
            if path.extension().is_some_and(|e| e == "json") {
                match fs::read(&path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()) {
                    Some(entry) => entries.push(entry),
                    None => {
                        tracing::warn!("unreadable journal entry {} removed", path.display());
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        entries
    }

    fn path(&self, id: &ExecutionId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }
}

/// A process's start time, field 22 of /proc/<pid>/stat.
pub fn process_start_time(pid: u32) -> Option<u64> {
    crate::procfs::stat(pid).map(|stat| stat.start_time)
}

/// Kills the job's process group if the pid is still the job's.
pub fn kill_leftover(entry: &Entry) -> bool {
    let (Some(pid), Some(started)) = (entry.pid, entry.pid_start_time) else {
        return false;
    };
    if process_start_time(pid) != Some(started) {
        return false;
    }
    let group = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let id = ExecutionId::parse("3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b").unwrap();
        let entry = Entry {
            id: id.clone(),
            command: "migrate".into(),
            pid: Some(std::process::id()),
            pid_start_time: process_start_time(std::process::id()),
        };
        journal.record(&entry);
        assert_eq!(journal.entries(), vec![entry]);
        journal.remove(&id);
        assert!(journal.entries().is_empty());
        assert!(process_start_time(std::process::id()).is_some());
    }
}
