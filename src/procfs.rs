//! What Linux says about a process in `/proc/<pid>/stat`: one reader and
//! one parser, for the journal's pid checks and the tests.
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
    }
}
