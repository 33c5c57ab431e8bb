//! An execution's output log and the task that delivers it.
//!
//! Everything read from a command is appended to a log file in the state
//! directory as it is read ([`super::wal`]), before anything else happens to
//! it; one task follows the log, replays it into chunks ([`super::replay`]),
//! delivers each in order and records each acknowledgement in the log. So a
//! runner stopped in any way (SIGTERM, `kill -9`, a crash) leaves a log from
//! which the next start delivers the rest, exactly once and in order, and
//! exactly one completion: the real one if it was logged, else one saying
//! the runner stopped.
//!
//! When a record cannot be written (disk full, file size limit, the log or
//! the state directory over its cap) it is held in memory, in order, behind
//! those already on disk; the follower reads held records from memory, so
//! delivery goes on; writing resumes when there is room. Held output beyond
//! the memory limit is dropped from the middle, replaced by a notice. Once
//! everything was delivered, the log is compacted to a checkpoint, so a
//! healthy control plane keeps it small.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::client::Client;
use super::delivery::{deliver, AuthGate, Message};
use super::replay::{Pipeline, Shaping};
use super::systemd;
use super::wal::{Meta, Record, WalReader};
use crate::protocol::api::{CompleteRequest, CompletionStatus, ExecutionId};
use crate::sync::LockExt as _;

/// Held records are offered to the disk again at most this often.
const RETRY_WRITE_EVERY: Duration = Duration::from_millis(500);
/// The fsync policy: a running command's log reaches the device at most this
/// long after it was written (and at once when the command ends).
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// A delivered log is compacted once it is this big.
const COMPACT_ABOVE: u64 = 1024 * 1024;
/// What a log file is called.
pub const LOG_EXTENSION: &str = "wal";
/// The file beside a log holding a completion the log could not take.
pub const COMPLETION_EXTENSION: &str = "end";

/// Where the output logs live and how big they may grow.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    /// Bytes of records one execution keeps in memory when they cannot go to disk.
    pub memory_limit: usize,
    /// Bytes one execution's log may take.
    pub max_bytes: u64,
    /// Shared by every log in the directory.
    pub usage: Arc<SpoolUsage>,
}

impl SpoolOptions {
    pub fn log_path(&self, id: &ExecutionId) -> PathBuf {
        self.dir.join(format!("{id}.{LOG_EXTENSION}"))
    }
}

/// The bytes every log of the state directory takes, against its cap, and
/// whether writing to it is failing (said once, loudly, per episode).
#[derive(Debug)]
pub struct SpoolUsage {
    bytes: AtomicU64,
    limit: u64,
    failing: AtomicBool,
}

impl SpoolUsage {
    /// Counts what the logs already in `dir` take.
    pub fn scan(dir: &Path, limit: u64) -> Self {
        Self { bytes: AtomicU64::new(bytes_in(dir)), limit, failing: AtomicBool::new(false) }
    }

    /// Counts again (after files were removed behind our back).
    pub fn recount(&self, dir: &Path) {
        self.bytes.store(bytes_in(dir), Ordering::Relaxed);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, bytes: u64) -> bool {
        self.bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    /// Bytes still free under the state directory's cap.
    fn room(&self) -> u64 {
        self.limit.saturating_sub(self.bytes.load(Ordering::Relaxed))
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| Some(used.saturating_sub(bytes)));
    }

    fn writes_failing(&self, error: &std::io::Error) {
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "cannot write output logs in the state directory: {error}; output is held in memory, in order, until there is room"
            );
            systemd::status(&format!(
                "DEGRADED: cannot write to the state directory ({error}); output held in memory"
            ));
        }
    }

    fn writes_working(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::warn!("the state directory takes writes again; held output is going to disk");
            systemd::status("active");
        }
    }
}

/// Why records wait in memory instead of on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holding {
    No,
    DiskError,
    OverCap,
}

/// The log as the writer and the follower share it.
struct Log {
    file: Option<File>,
    /// Bytes of good records in the file (a failed write is cut back to this).
    len: u64,
    /// A failed write may have left bytes past `len`.
    torn: bool,
    /// Records in the file.
    on_disk: u64,
    /// Records after those, in order, not written yet.
    held: VecDeque<Record>,
    held_bytes: usize,
    /// Records the follower has taken (file and held alike).
    consumed: u64,
    holding: Holding,
    last_attempt: Option<Instant>,
    last_sync: Option<Instant>,
    warned_drop: bool,
}

struct Shared {
    id: ExecutionId,
    path: PathBuf,
    opts: SpoolOptions,
    log: Mutex<Log>,
    appended: Notify,
    /// Flushes whose chunks are not delivered yet (the adaptive flush waits for 0).
    unacknowledged: watch::Sender<usize>,
}

/// What [`Outbox::recover`] found.
pub enum Recovered {
    /// The log had something left to deliver; its task is at it.
    Delivering(Outbox),
    /// The log says the completion was acknowledged: nothing to do.
    AlreadyDelivered,
    /// No log (the runner stopped before it existed) or an unreadable one.
    NoLog,
}

/// The output log of one execution and its delivery task.
pub struct Outbox {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Outbox {
    /// A fresh log for an execution that starts now.
    pub fn new(
        client: Client,
        gate: AuthGate,
        id: ExecutionId,
        spool: &SpoolOptions,
        shaping: Shaping,
    ) -> Self {
        let path = spool.log_path(&id);
        let file = create_log(&path);
        let holding = if file.is_ok() { Holding::No } else { Holding::DiskError };
        if let Err(error) = &file {
            tracing::error!(execution = %id, "cannot create the output log {}: {error}", path.display());
            spool.usage.writes_failing(error);
        }
        let log = Log::new(file.ok(), 0, 0, holding);
        Self::start(client, gate, Shared::new(id, path, spool, log), shaping, Resume::default())
    }

    /// Takes over the log a previous run left: its torn tail (if any) is cut
    /// off, a notice and a `failed` completion are added if the command's
    /// end was never logged, and what the control plane had not acknowledged
    /// is delivered.
    pub fn recover(
        client: Client,
        gate: AuthGate,
        id: ExecutionId,
        spool: &SpoolOptions,
        shaping: Shaping,
        notice: &str,
    ) -> Recovered {
        let path = spool.log_path(&id);
        let scan = match scan_log(&path) {
            Ok(Some(scan)) => scan,
            Ok(None) => return Recovered::NoLog,
            Err(error) => {
                tracing::error!(execution = %id, "cannot read the output log {}: {error}", path.display());
                return Recovered::NoLog;
            }
        };
        if scan.end_acked {
            return Recovered::AlreadyDelivered;
        }
        let file = match OpenOptions::new().append(true).open(&path) {
            Ok(file) => file,
            Err(error) => {
                tracing::error!(execution = %id, "cannot append to the output log {}: {error}", path.display());
                return Recovered::NoLog;
            }
        };
        let log = Log::new(Some(file), scan.len, scan.records, Holding::No);
        let shared = Shared::new(id, path, spool, log);
        if !scan.ended {
            let at = unix_now();
            shared.append(Record::meta(Meta::Flush { stderr: None }));
            let completion = match read_completion(&shared.path) {
                // It ended, and the completion may have been sent: the same one.
                Some(completion) => completion,
                None => {
                    shared.append(Record::meta(Meta::Note { stderr: true, at, text: notice.to_string() }));
                    CompleteRequest { exit_code: -1, status: CompletionStatus::Failed }
                }
            };
            shared.append(Record::meta(Meta::End { completion, at }));
        }
        Recovered::Delivering(Self::start(
            client,
            gate,
            shared,
            shaping,
            Resume { acked_through: scan.acked_through },
        ))
    }

    fn start(client: Client, gate: AuthGate, shared: Shared, shaping: Shaping, resume: Resume) -> Self {
        let shared = Arc::new(shared);
        let task = tokio::spawn(follow(shared.clone(), client, gate, shaping, resume).in_current_span());
        tokio::spawn(retry_held_writes(Arc::downgrade(&shared)).in_current_span());
        Self { shared, task }
    }

    pub fn id(&self) -> &ExecutionId {
        &self.shared.id
    }

    /// Bytes just read from the command; never waits.
    pub fn read(&self, stderr: bool, bytes: &[u8]) {
        self.shared.append(Record::Read { stderr, at: unix_now(), bytes: bytes.to_vec() });
    }

    pub fn eof(&self, stderr: bool) {
        self.shared.append(Record::meta(Meta::Eof { stderr, at: unix_now() }));
    }

    /// Sends what both streams have buffered (the periodic flush); the log
    /// goes to the device at most once a second.
    pub fn flush(&self) {
        self.shared.unacknowledged.send_modify(|count| *count += 1);
        self.shared.append(Record::meta(Meta::Flush { stderr: None }));
        let due = self.shared.lock().last_sync.is_none_or(|at| at.elapsed() >= SYNC_EVERY);
        if due {
            self.shared.sync();
        }
    }

    /// How many flushes have chunks the control plane has not acknowledged
    /// yet, as it changes.
    pub fn unacknowledged(&self) -> watch::Receiver<usize> {
        self.shared.unacknowledged.subscribe()
    }

    /// A line of the runner's own, as a chunk of its own.
    pub fn note(&self, stderr: bool, text: &str) {
        self.shared.append(Record::meta(Meta::Note { stderr, at: unix_now(), text: text.to_string() }));
    }

    /// Logs the command's real completion, then waits until everything was
    /// delivered (or refused).
    pub async fn finish(self, completion: CompleteRequest) {
        self.shared.append(Record::meta(Meta::End { completion, at: unix_now() }));
        self.shared.sync();
        let _ = self.task.await;
    }

    /// Waits for delivery of a log that already holds its end (recovery).
    pub async fn delivered(self) {
        let _ = self.task.await;
    }
}

/// A read bigger than the room left under the caps (one pipe read can hold
/// 64 KiB) is split so its head fills the log: the head of the output is
/// what the caps promise to keep on disk. `true` if the front record was split.
fn split_to_fit(log: &mut Log, frame_size: u64, max_bytes: u64, usage_room: u64) -> bool {
    let room = max_bytes.saturating_sub(log.len).min(usage_room);
    let Some(Record::Read { stderr, at, bytes }) = log.held.front_mut() else { return false };
    let overhead = frame_size.saturating_sub(bytes.len() as u64);
    if room <= overhead {
        return false;
    }
    let keep = usize::try_from(room - overhead).unwrap_or(usize::MAX).min(bytes.len());
    if keep == 0 || keep >= bytes.len() {
        return false;
    }
    let rest = Record::Read { stderr: *stderr, at: *at, bytes: bytes.split_off(keep) };
    log.held_bytes += 32; // one more record's overhead (see Record::weight)
    log.held.insert(1, rest);
    true
}

impl Log {
    fn new(file: Option<File>, len: u64, on_disk: u64, holding: Holding) -> Self {
        Self {
            file,
            len,
            torn: false,
            on_disk,
            held: VecDeque::new(),
            held_bytes: 0,
            consumed: 0,
            holding,
            last_attempt: None,
            last_sync: None,
            warned_drop: false,
        }
    }

    fn total(&self) -> u64 {
        self.on_disk + self.held.len() as u64
    }
}

impl Shared {
    fn new(id: ExecutionId, path: PathBuf, opts: &SpoolOptions, log: Log) -> Self {
        let unacknowledged = watch::channel(0).0;
        Self { id, path, opts: opts.clone(), log: Mutex::new(log), appended: Notify::new(), unacknowledged }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.locked()
    }

    /// Adds a record after every other: to the file if it can, else held.
    fn append(&self, record: Record) {
        let mut log = self.lock();
        log.held_bytes += record.weight();
        log.held.push_back(record);
        self.write_held(&mut log, false);
        self.bound_held(&mut log);
        drop(log);
        self.appended.notify_one();
    }

    /// Moves held records to the file, in order, while there is room.
    fn write_held(&self, log: &mut Log, now: bool) {
        if log.held.is_empty() {
            return;
        }
        if log.holding != Holding::No
            && !now
            && log.last_attempt.is_some_and(|at| at.elapsed() < RETRY_WRITE_EVERY)
        {
            return;
        }
        log.last_attempt = Some(Instant::now());
        if let Err(error) = self.prepare_file(log) {
            return self.hold_for_disk(log, &error);
        }
        while let Some(record) = log.held.front() {
            let frame = record.frame();
            let size = frame.len() as u64;
            if log.len + size > self.opts.max_bytes || !self.opts.usage.try_reserve(size) {
                if split_to_fit(log, size, self.opts.max_bytes, self.opts.usage.room()) {
                    continue;
                }
                if log.holding != Holding::OverCap {
                    tracing::warn!(execution = %self.id, "the output log reached its cap (runner.spool_max_bytes / runner.state_dir_max_bytes); holding output in memory");
                    log.holding = Holding::OverCap;
                }
                return;
            }
            let file = log.file.as_mut().expect("prepared");
            if let Err(error) = file.write_all(&frame) {
                self.opts.usage.release(size);
                log.torn = true;
                return self.hold_for_disk(log, &error);
            }
            log.len += size;
            log.on_disk += 1;
            let written = log.held.pop_front().expect("front exists");
            log.held_bytes -= written.weight();
        }
        if log.holding == Holding::DiskError {
            tracing::warn!(execution = %self.id, "the output log is written again");
        }
        if log.holding != Holding::No {
            self.opts.usage.writes_working();
        }
        log.holding = Holding::No;
    }

    /// An open file whose end is the end of its last good record.
    fn prepare_file(&self, log: &mut Log) -> std::io::Result<()> {
        if log.file.is_none() {
            log.file = Some(create_log(&self.path)?);
            log.len = 0;
            log.torn = false;
        }
        if log.torn {
            log.file.as_ref().expect("just set").set_len(log.len)?;
            log.torn = false;
        }
        Ok(())
    }

    fn hold_for_disk(&self, log: &mut Log, error: &std::io::Error) {
        if log.holding != Holding::DiskError {
            tracing::error!(execution = %self.id, "cannot write the output log {}: {error}; holding output in memory", self.path.display());
            log.holding = Holding::DiskError;
        }
        self.opts.usage.writes_failing(error);
    }

    /// Beyond the memory limit, output the follower has not taken yet is
    /// dropped, oldest first (what came last is the tail worth keeping), and
    /// a notice of how much takes its place.
    fn bound_held(&self, log: &mut Log) {
        while log.held_bytes > self.opts.memory_limit {
            let first = log.consumed.saturating_sub(log.on_disk) as usize;
            // The newest output is the tail: never dropped.
            let newest = log.held.iter().rposition(|r| matches!(r, Record::Read { .. })).unwrap_or(0);
            let Some(mut at) = (first..newest).find(|&i| matches!(log.held[i], Record::Read { .. })) else {
                return;
            };
            let Some(Record::Read { bytes, .. }) = log.held.remove(at) else { return };
            log.held_bytes -= 32 + bytes.len();
            let mut dropped = bytes.len() as u64;
            // One notice for a run of dropped output, before or after it.
            for neighbour in [at, at.wrapping_sub(1)] {
                if neighbour < first || neighbour >= log.held.len() {
                    continue;
                }
                if let Record::Meta(Meta::Dropped { bytes }) = log.held[neighbour] {
                    dropped += bytes;
                    log.held.remove(neighbour);
                    log.held_bytes -= Record::meta(Meta::Dropped { bytes }).weight();
                    at = neighbour;
                }
            }
            let marker = Record::meta(Meta::Dropped { bytes: dropped });
            log.held_bytes += marker.weight();
            log.held.insert(at, marker);
            if !std::mem::replace(&mut log.warned_drop, true) {
                tracing::error!(execution = %self.id, "output held in memory exceeds runner.outbox_memory_bytes; dropping from the middle");
            }
        }
    }

    /// The record at `index`, from the file or from memory; `None` if it
    /// has not been appended yet.
    fn record_at(&self, index: u64, cursor: &mut Cursor) -> Option<Record> {
        let on_disk = {
            let log = self.lock();
            if index >= log.on_disk {
                return log.held.get((index - log.on_disk) as usize).cloned();
            }
            log.on_disk
        };
        debug_assert!(index < on_disk);
        cursor.read(&self.path, index)
    }

    /// Makes the completion durable before it is sent: its record is on
    /// disk, or else (disk full, log over its cap) it is written beside the
    /// log, a tiny file of its own. A runner stopped after that always finds
    /// the real completion, so it never sends a contradicting one. While
    /// neither can be written, the completion waits.
    async fn make_durable(&self, records: u64, completion: &CompleteRequest) {
        let mut told = false;
        loop {
            if self.lock().on_disk >= records {
                return;
            }
            match write_completion(&self.path, completion) {
                Ok(()) => return,
                Err(error) if !std::mem::replace(&mut told, true) => {
                    tracing::error!("the completion waits until it can be written to disk: {error}")
                }
                Err(_) => {}
            }
            tokio::time::sleep(RETRY_WRITE_EVERY).await;
        }
    }

    fn mark_consumed(&self, consumed: u64) {
        self.lock().consumed = consumed;
    }

    /// Flushes the log to the device (the fsync policy: at the end of each
    /// execution and at each compaction), off the async threads.
    fn sync(&self) {
        let file = {
            let mut log = self.lock();
            log.last_sync = Some(Instant::now());
            log.file.as_ref().and_then(|f| f.try_clone().ok())
        };
        if let Some(file) = file {
            tokio::task::spawn_blocking(move || file.sync_data());
        }
    }
}

/// What a recovered log says was already delivered.
#[derive(Debug, Default, Clone, Copy)]
struct Resume {
    acked_through: u64,
}

/// The follower's position in the file.
#[derive(Default)]
struct Cursor {
    reader: Option<WalReader<BufReader<File>>>,
    /// The index of the record the reader returns next.
    next: u64,
}

impl Cursor {
    fn read(&mut self, path: &Path, index: u64) -> Option<Record> {
        if self.reader.is_none() || self.next > index {
            self.reader = Some(WalReader::new(BufReader::new(File::open(path).ok()?), 0));
            self.next = 0;
        }
        let reader = self.reader.as_mut()?;
        loop {
            match reader.next_record() {
                Ok(Some(record)) => {
                    self.next += 1;
                    if self.next > index {
                        return Some(record);
                    }
                }
                Ok(None) => return None,
                Err(error) => {
                    tracing::error!("the output log {} cannot be read back: {error}", path.display());
                    self.reader = None;
                    return None;
                }
            }
        }
    }
}

/// The delivery task: replays the log as it grows and delivers each message.
async fn follow(shared: Arc<Shared>, client: Client, gate: AuthGate, shaping: Shaping, resume: Resume) {
    let mut pipeline = Pipeline::new(shaping.clone());
    let mut acked_through = resume.acked_through;
    let mut cursor = Cursor::default();
    let mut index = 0u64;
    loop {
        let Some(record) = shared.record_at(index, &mut cursor) else {
            let _ = tokio::time::timeout(RETRY_WRITE_EVERY, shared.appended.notified()).await;
            continue;
        };
        index += 1;
        shared.mark_consumed(index);
        let flushed = matches!(record, Record::Meta(Meta::Flush { .. }));
        if let Record::Meta(Meta::Checkpoint(checkpoint)) = &record {
            pipeline = Pipeline::resume(shaping.clone(), checkpoint);
            acked_through = acked_through.max(checkpoint.next_chunk.saturating_sub(1));
        }
        for message in pipeline.apply(record) {
            match &message {
                Message::Output(chunk) if chunk.chunk_number <= acked_through => continue,
                Message::Output(chunk) => {
                    deliver(&client, &gate, &shared.id, &message).await;
                    acked_through = chunk.chunk_number;
                    shared.append(Record::meta(Meta::Acked { chunk: acked_through }));
                }
                Message::Complete(completion) => {
                    shared.make_durable(index, completion).await;
                    deliver(&client, &gate, &shared.id, &message).await;
                    // The owner removes the log, after the journal entry: a
                    // runner stopped in between finds the entry and this
                    // record, never an entry without its log.
                    shared.append(Record::meta(Meta::AckedEnd));
                    return;
                }
            }
        }
        if flushed {
            shared.unacknowledged.send_modify(|count| *count = count.saturating_sub(1));
        }
        index = compact(&shared, &pipeline, &mut cursor, index);
    }
}

/// Offers held records to the disk again now and then, even while the
/// follower waits on the network and the command writes nothing; ends with
/// the outbox.
async fn retry_held_writes(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(RETRY_WRITE_EVERY).await;
        let Some(shared) = shared.upgrade() else { return };
        let mut log = shared.lock();
        shared.write_held(&mut log, false);
    }
}

/// Once everything appended was delivered and nothing is half-cut, what
/// came before can be replaced by a checkpoint: in memory (records held),
/// or by starting the file afresh when it has grown. Returns the follower's
/// new index.
fn compact(shared: &Shared, pipeline: &Pipeline, cursor: &mut Cursor, index: u64) -> u64 {
    let mut log = shared.lock();
    if index != log.total() || !pipeline.is_clean() {
        return index;
    }
    let checkpoint = Record::meta(Meta::Checkpoint(pipeline.checkpoint()));
    if !log.held.is_empty() {
        log.held.clear();
        log.held_bytes = checkpoint.weight();
        log.held.push_back(checkpoint);
        log.consumed = log.total();
        return log.total();
    }
    if log.len < COMPACT_ABOVE {
        return index;
    }
    let frame = checkpoint.frame();
    let fresh = shared.path.with_extension("compacting");
    let written = create_log(&fresh).and_then(|mut file| {
        file.write_all(&frame)?;
        file.sync_data()?;
        std::fs::rename(&fresh, &shared.path)?;
        Ok(file)
    });
    match written {
        Ok(file) => {
            shared.opts.usage.release(log.len);
            shared.opts.usage.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
            log.file = Some(file);
            log.len = frame.len() as u64;
            log.torn = false;
            log.on_disk = 1;
            log.consumed = 1;
            *cursor = Cursor::default();
            1
        }
        Err(error) => {
            let _ = std::fs::remove_file(&fresh);
            tracing::debug!(execution = %shared.id, "could not compact the output log: {error}");
            index
        }
    }
}

/// What a log left by a previous run holds.
struct Scan {
    /// Bytes and records up to the last good one.
    len: u64,
    records: u64,
    acked_through: u64,
    ended: bool,
    end_acked: bool,
}

/// Reads a log through once (one record in memory at a time) and cuts off a
/// torn tail. `Ok(None)` when there is no log.
fn scan_log(path: &Path) -> std::io::Result<Option<Scan>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut reader = WalReader::new(BufReader::new(file), 0);
    let mut scan = Scan { len: 0, records: 0, acked_through: 0, ended: false, end_acked: false };
    loop {
        match reader.next_record() {
            Ok(Some(record)) => {
                scan.records += 1;
                match record {
                    Record::Meta(Meta::Acked { chunk }) => scan.acked_through = scan.acked_through.max(chunk),
                    Record::Meta(Meta::Checkpoint(c)) => {
                        scan.acked_through = scan.acked_through.max(c.next_chunk.saturating_sub(1))
                    }
                    Record::Meta(Meta::End { .. }) => scan.ended = true,
                    Record::Meta(Meta::AckedEnd) => scan.end_acked = true,
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(torn) => {
                tracing::warn!("{}: {torn}; the rest of the log is discarded", path.display());
                OpenOptions::new().write(true).open(path)?.set_len(reader.offset())?;
                break;
            }
        }
    }
    scan.len = reader.offset();
    Ok(Some(scan))
}

fn bytes_in(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|listing| total_len(listing.flatten().filter_map(|f| f.metadata().ok()).map(|m| m.len())))
        .unwrap_or(0)
}

/// The sum of file lengths, saturating: sparse files (on tmpfs, up to
/// 2^63 - 1 bytes each) that someone left in the state directory would
/// overflow a plain sum.
pub(crate) fn total_len(lengths: impl Iterator<Item = u64>) -> u64 {
    lengths.fold(0, u64::saturating_add)
}

/// In append mode: after a failed write is cut back, the next one lands at
/// the new end, not past it (which would leave a hole of zeros).
fn create_log(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    file.set_len(0)?;
    Ok(file)
}

impl SpoolOptions {
    /// Removes an execution's log once it is delivered and forgotten.
    pub fn remove_log(&self, id: &ExecutionId) {
        remove_log(&self.log_path(id), &self.usage);
    }
}

fn remove_log(path: &Path, usage: &SpoolUsage) {
    if let Ok(metadata) = std::fs::metadata(path) {
        usage.release(metadata.len());
    }
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(completion_path(path));
}

/// Where a completion that could not go into its log is kept.
fn completion_path(log: &Path) -> PathBuf {
    log.with_extension(COMPLETION_EXTENSION)
}

/// Writes the completion atomically (temporary file, fsync, rename).
fn write_completion(log: &Path, completion: &CompleteRequest) -> std::io::Result<()> {
    let path = completion_path(log);
    let temporary = path.with_extension("tmp");
    let mut file = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&temporary)?;
    file.write_all(&serde_json::to_vec(completion).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)
}

fn read_completion(log: &Path) -> Option<CompleteRequest> {
    serde_json::from_slice(&std::fs::read(completion_path(log)).ok()?).ok()
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Record {
        Record::Read { stderr: false, at: 1.0, bytes: text.as_bytes().to_vec() }
    }

    #[test]
    fn a_read_bigger_than_the_room_left_is_split_so_its_head_fills_the_log() {
        let mut log = Log::new(None, 0, 0, Holding::No);
        let big = read(&"x".repeat(100));
        let size = big.frame().len() as u64;
        log.held_bytes = big.weight();
        log.held.push_back(big);
        // 60 bytes of room: the head fills it (frame overhead included), the rest waits.
        assert!(split_to_fit(&mut log, size, 60, u64::MAX));
        let lengths: Vec<usize> = log
            .held
            .iter()
            .map(|r| match r {
                Record::Read { bytes, .. } => bytes.len(),
                Record::Meta(_) => 0,
            })
            .collect();
        assert_eq!(lengths.iter().sum::<usize>(), 100, "no byte lost: {lengths:?}");
        assert_eq!(log.held[0].frame().len(), 60, "the head fills the room exactly");
        // The state directory's cap counts too; no room at all: no split.
        let mut full = Log::new(None, 0, 0, Holding::No);
        full.held.push_back(read("abc"));
        assert!(!split_to_fit(&mut full, 1_000, 1_000, 0));
    }

    #[test]
    fn recovery_scans_what_was_acknowledged_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        let mut bytes: Vec<u8> = [
            read("one\n"),
            Record::meta(Meta::Flush { stderr: None }),
            Record::meta(Meta::Acked { chunk: 1 }),
            read("two\n"),
        ]
        .iter()
        .flat_map(Record::frame)
        .collect();
        let good = bytes.len() as u64;
        let torn = Record::meta(Meta::End {
            completion: CompleteRequest { exit_code: 0, status: CompletionStatus::Success },
            at: 2.0,
        })
        .frame();
        bytes.extend_from_slice(&torn[..torn.len() - 3]);
        std::fs::write(&path, &bytes).unwrap();
        let scan = scan_log(&path).unwrap().unwrap();
        assert_eq!((scan.len, scan.records, scan.acked_through), (good, 4, 1));
        assert!(!scan.ended, "the torn completion does not count");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "the torn tail is cut off");
        assert!(scan_log(&dir.path().join("none.wal")).unwrap().is_none());
    }

    #[test]
    fn a_completion_the_log_cannot_take_is_kept_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.wal");
        let completion = CompleteRequest { exit_code: 3, status: CompletionStatus::Failed };
        assert_eq!(read_completion(&log), None);
        write_completion(&log, &completion).unwrap();
        assert_eq!(read_completion(&log), Some(completion));
        remove_log(&log, &SpoolUsage::scan(dir.path(), u64::MAX));
        assert_eq!(read_completion(&log), None, "removed with the log");
    }

    /// Failed before the fix ("attempt to add with overflow" in bytes_in):
    /// three sparse files of 2^63 - 1 bytes in the spool directory. Needs a
    /// file system that takes them (tmpfs at /dev/shm); skipped elsewhere.
    #[test]
    fn huge_sparse_files_in_the_state_directory_are_counted_without_overflow() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else { return };
        for name in ["a.wal", "b.wal", "c.wal"] {
            let file = File::create(dir.path().join(name)).unwrap();
            if file.set_len(i64::MAX as u64).is_err() {
                return;
            }
        }
        let usage = SpoolUsage::scan(dir.path(), u64::MAX);
        assert_eq!(usage.bytes(), u64::MAX);
        assert!(!usage.try_reserve(1), "full, without overflowing");
        assert_eq!(total_len([u64::MAX, 1, 2].into_iter()), u64::MAX);
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(256))]

        /// A log left by a crash or tampered with (records of any content,
        /// then cut, flipped or spliced): recovery reads it up to the
        /// damage, cuts the damage off, and what stays reads cleanly.
        #[test]
        fn recovery_reads_any_log_up_to_the_damage_and_cuts_it(
            records in proptest::collection::vec(crate::supervisor::wal::strategies::hostile_record(), 0..10),
            changes in crate::proptest_support::mutations(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.wal");
            let bytes: Vec<u8> = records.iter().flat_map(Record::frame).collect();
            std::fs::write(&path, crate::proptest_support::mutate(bytes, &changes)).unwrap();
            let scan = scan_log(&path).unwrap().unwrap();
            proptest::prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), scan.len);
            let mut reader = WalReader::new(BufReader::new(File::open(&path).unwrap()), 0);
            while let Some(_record) = reader.next_record().map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))? {}
            proptest::prop_assert_eq!(reader.offset(), scan.len);
        }
    }
}
