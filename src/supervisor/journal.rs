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
    let Some(group) = leftover_group(entry) else {
        return false;
    };
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).is_ok()
}

/// The process group a journal entry names, if it is still the job's. The
/// file may have been tampered with: like a pid the worker reports
/// (`worker::connection`), it must be above 1 (0 and 1 would be our own
/// group and init's), not ours, and a valid pid, whatever start time it
/// claims.
fn leftover_group(entry: &Entry) -> Option<nix::unistd::Pid> {
    let (pid, started) = (entry.pid?, entry.pid_start_time?);
    let raw = i32::try_from(pid).ok().filter(|raw| *raw > 1 && pid != std::process::id())?;
    (process_start_time(pid) == Some(started)).then_some(nix::unistd::Pid::from_raw(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    fn id() -> ExecutionId {
        ExecutionId::parse("3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b").unwrap()
    }

    /// Before, an entry naming pid 1 or the supervisor with its real start
    /// time would have had that whole process group killed.
    #[test]
    fn an_entry_never_names_init_the_supervisor_or_an_invalid_pid() {
        for pid in [0, 1, std::process::id(), u32::MAX, i32::MAX as u32 + 1] {
            let entry = Entry {
                id: id(),
                command: "migrate".into(),
                pid: Some(pid),
                pid_start_time: process_start_time(pid).or(Some(0)),
            };
            assert_eq!(leftover_group(&entry), None, "{pid}");
        }
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let entry = Entry {
            id: id(),
            command: "migrate".into(),
            pid: Some(child.id()),
            pid_start_time: process_start_time(child.id()),
        };
        assert_eq!(leftover_group(&entry).map(|pid| pid.as_raw() as u32), Some(child.id()));
        let recycled = Entry { pid_start_time: entry.pid_start_time.map(|t| t + 1), ..entry };
        assert_eq!(leftover_group(&recycled), None, "another process under the same pid");
        let _ = child.kill();
        let _ = child.wait();
    }

    proptest! {
        #![proptest_config(crate::proptest_support::config(256))]

        /// Journal files of any content (a crash mid-rename, tampering):
        /// read or removed, never a panic; every pid they name is checked.
        #[test]
        fn any_journal_file_is_read_or_removed(
            contents in prop::collection::vec(
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..64),
                    crate::proptest_support::json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
                    (any::<u32>(), any::<u64>()).prop_map(|(pid, start)| {
                        serde_json::to_vec(&serde_json::json!({
                            "id": "3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b", "command": "migrate",
                            "pid": pid, "pid_start_time": start,
                        })).unwrap()
                    }),
                ],
                1..4,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let journal = Journal::open(dir.path()).unwrap();
            for (n, content) in contents.iter().enumerate() {
                std::fs::write(dir.path().join("journal").join(format!("{n}.json")), content).unwrap();
            }
            for entry in journal.entries() {
                if let Some(group) = leftover_group(&entry) {
                    prop_assert!(group.as_raw() > 1 && group.as_raw() as u32 != std::process::id());
                }
            }
        }
    }
}
