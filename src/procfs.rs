//! What Linux says about a process under `/proc/<pid>`: one reader and
//! parser for `stat` (the journal's pid checks, the worker's pid checks, the
//! tests) and one for the resident set size in `status` (worker recycling,
//! metrics).
//!
//! The command name (field 2) is in parentheses and may itself contain
//! spaces or ')', so the fields are counted from the last ')'.

/// The fields of `/proc/<pid>/stat` this crate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: R, S, D, Z (zombie), T, …
    pub state: char,
    /// Field 4: the parent's pid.
    pub parent: u32,
    /// Field 22: clock ticks since boot when the process started; with the
    /// pid, it names one process even after the pid is reused.
    pub start_time: u64,
}

impl Stat {
    /// Exited but not yet reaped.
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z'
    }
}

/// The process's stat, or `None` when it does not exist (or is unreadable).
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses the text of a stat file; `None` when it is not one.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    // After state and parent, start_time is the 18th field still to come.
    let start_time = fields.nth(17)?.parse().ok()?;
    Some(Stat { state, parent, start_time })
}

/// The process's resident set size (`VmRSS` in `/proc/<pid>/status`).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    parse_resident_bytes(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `VmRSS` of the text of a status file, in bytes; `None` when it has none
/// (or one too large to count in bytes).
pub fn parse_resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_counted_after_the_last_parenthesis() {
        let text = "42 (a) b) c) S 7 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        let stat = parse_stat(text).unwrap();
        assert_eq!(stat, Stat { state: 'S', parent: 7, start_time: 123456 });
        assert!(!stat.is_zombie());
    }

    #[test]
    fn this_process_has_a_stat_and_garbage_has_none() {
        let me = stat(std::process::id()).unwrap();
        assert_eq!(me.parent, std::os::unix::process::parent_id());
        assert_eq!(parse_stat("no parenthesis"), None);
        assert_eq!(parse_stat("1 (x) S"), None);
        assert!(resident_bytes(std::process::id()).is_some_and(|bytes| bytes > 0));
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        /// /proc files are the kernel's, but the parsers take any text.
        #[test]
        fn any_stat_or_status_text_parses_or_is_none(
            text in "[0-9 ()SZRa-z:\n-]{0,80}|.{0,80}",
            rss in proptest::prelude::any::<u64>(),
        ) {
            let _ = parse_stat(&text);
            let _ = parse_resident_bytes(&text);
            let status = format!("Name:\tx\nVmRSS:\t{rss} kB\n");
            proptest::prop_assert_eq!(parse_resident_bytes(&status), rss.checked_mul(1024));
        }
    }
}
