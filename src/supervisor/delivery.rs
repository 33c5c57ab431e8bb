//! Getting each execution's output chunks and completion to the control
//! plane in order, whatever the network does.
//!
//! Every execution has an [`Outbox`]: a bounded queue drained by one task
//! that sends each message until the server acknowledges it, retrying with
//! backoff through timeouts, 5xx answers and outages of any length, and
//! waiting while authentication is failing (nothing is sent until a
//! heartbeat succeeds again). A retried chunk keeps its number, so the
//! server de-duplicates. Only a definitive refusal (a 4xx other than
//! 401/403/429) drops a message, with an error in the log. Beyond a memory
//! limit, waiting messages go to a file in the state directory, so a long
//! outage neither blocks the command nor grows the supervisor's memory.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::api::{CompleteRequest, ExecutionId, OutputRequest};
use super::client::{ApiError, Client};

const MAX_REDELIVERY_DELAY: Duration = Duration::from_secs(30);

/// Whether the control plane currently accepts our key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthState {
    /// Before the first heartbeat answered.
    Unknown,
    Valid,
    /// A call was refused with 401/403: only heartbeats go out until one succeeds.
    Failed,
}

/// Shared view of [`AuthState`], updated by whichever call learns something.
#[derive(Clone)]
pub struct AuthGate {
    state: Arc<watch::Sender<AuthState>>,
}

impl Default for AuthGate {
    fn default() -> Self {
        Self { state: Arc::new(watch::channel(AuthState::Unknown).0) }
    }
}

impl AuthGate {
    pub fn get(&self) -> AuthState {
        *self.state.borrow()
    }

    /// Returns whether the state changed.
    pub fn set(&self, state: AuthState) -> bool {
        crate::health::metrics().set_authenticated(state == AuthState::Valid);
        self.state.send_if_modified(|current| std::mem::replace(current, state) != state)
    }

    pub fn subscribe(&self) -> watch::Receiver<AuthState> {
        self.state.subscribe()
    }

    pub async fn wait_valid(&self) {
        let mut state = self.state.subscribe();
        let _ = state.wait_for(|s| *s == AuthState::Valid).await;
    }

    /// Records what an API error says about authentication.
    pub fn observe(&self, error: &ApiError) {
        if error.is_auth() && self.set(AuthState::Failed) {
            tracing::warn!("the control plane refused our key ({error}); pausing all but heartbeats");
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Message {
    Output(OutputRequest),
    Complete(CompleteRequest),
}

impl Message {
    /// Roughly what the message holds in memory.
    fn weight(&self) -> usize {
        match self {
            Message::Output(chunk) => 64 + chunk.segments.iter().map(|s| 32 + s.content.len()).sum::<usize>(),
            Message::Complete(_) => 64,
        }
    }
}

pub struct Outbox {
    id: ExecutionId,
    queue: Arc<Queue>,
    task: JoinHandle<()>,
}

impl Outbox {
    /// `spill_dir` receives what does not fit in memory while the control
    /// plane is unreachable.
    pub fn new(client: Client, gate: AuthGate, id: ExecutionId, spill: &SpillOptions) -> Self {
        let spill_path = spill.dir.join(format!("{id}.jsonl"));
        let queue = Arc::new(Queue::new(spill.memory_limit, spill_path));
        let task = tokio::spawn(deliver_in_order(client, gate, id.clone(), queue.clone()));
        Self { id, queue, task }
    }

    pub fn id(&self) -> &ExecutionId {
        &self.id
    }

    /// Queues a message; never waits (beyond the memory limit, it goes to disk).
    pub async fn push(&self, message: Message) {
        self.queue.push(message);
    }

    /// Waits until everything queued has been delivered (or refused).
    pub async fn flush_and_close(self) {
        self.queue.close();
        let _ = self.task.await;
    }
}

/// Where and when undelivered messages go to disk.
#[derive(Debug, Clone)]
pub struct SpillOptions {
    pub dir: PathBuf,
    /// Bytes of messages kept in memory per execution before spilling.
    pub memory_limit: usize,
}

/// An in-order queue that keeps up to a byte limit in memory and the rest,
/// in order, in a JSON-lines file. Once anything is on disk, newer messages
/// go there too until it is drained, so the order never changes.
struct Queue {
    state: Mutex<QueueState>,
    ready: Notify,
    memory_limit: usize,
    spill_path: PathBuf,
}

#[derive(Default)]
struct QueueState {
    memory: VecDeque<Message>,
    memory_bytes: usize,
    spill: Option<Spill>,
    closed: bool,
}

struct Spill {
    writer: File,
    reader: BufReader<File>,
    waiting: usize,
}

impl Queue {
    fn new(memory_limit: usize, spill_path: PathBuf) -> Self {
        Self { state: Mutex::default(), ready: Notify::new(), memory_limit, spill_path }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, message: Message) {
        let mut state = self.lock();
        let weight = message.weight();
        crate::health::metrics().message_queued(weight);
        let must_spill = state.spill.is_some() || state.memory_bytes + weight > self.memory_limit;
        if must_spill {
            match self.spill(&mut state, &message) {
                Ok(()) => {
                    drop(state);
                    self.ready.notify_one();
                    return;
                }
                // Memory is the last resort: losing output is worse.
                Err(error) => {
                    tracing::error!("cannot spill output to {}: {error}", self.spill_path.display())
                }
            }
        }
        state.memory_bytes += weight;
        state.memory.push_back(message);
        drop(state);
        self.ready.notify_one();
    }

    fn spill(&self, state: &mut QueueState, message: &Message) -> std::io::Result<()> {
        if state.spill.is_none() {
            let writer = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&self.spill_path)?;
            let reader = BufReader::new(File::open(&self.spill_path)?);
            tracing::warn!(
                "output waiting for the control plane exceeds memory; spilling to {}",
                self.spill_path.display()
            );
            state.spill = Some(Spill { writer, reader, waiting: 0 });
        }
        let spill = state.spill.as_mut().expect("just created");
        let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
        line.push(b'\n');
        spill.writer.write_all(&line)?;
        spill.waiting += 1;
        Ok(())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The next message in order; `None` once closed and empty.
    async fn pop(&self) -> Option<Message> {
        loop {
            {
                let mut state = self.lock();
                if let Some(message) = state.memory.pop_front() {
                    state.memory_bytes -= message.weight();
                    return Some(message);
                }
                if let Some(message) = self.unspill(&mut state) {
                    return Some(message);
                }
                if state.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    fn unspill(&self, state: &mut QueueState) -> Option<Message> {
        let spill = state.spill.as_mut()?;
        let mut message = None;
        while message.is_none() && spill.waiting > 0 {
            let mut line = String::new();
            spill.waiting -= 1;
            match spill.reader.read_line(&mut line) {
                Ok(_) => match serde_json::from_str(&line) {
                    Ok(parsed) => message = Some(parsed),
                    Err(error) => tracing::error!("unreadable spilled message skipped: {error}"),
                },
                Err(error) => tracing::error!("cannot read the spill file: {error}"),
            }
        }
        if spill.waiting == 0 {
            state.spill = None;
            let _ = std::fs::remove_file(&self.spill_path);
        }
        message
    }
}

async fn deliver_in_order(client: Client, gate: AuthGate, id: ExecutionId, queue: Arc<Queue>) {
    while let Some(message) = queue.pop().await {
        deliver(&client, &gate, &id, &message).await;
        crate::health::metrics().message_done(message.weight());
    }
}

async fn deliver(client: &Client, gate: &AuthGate, id: &ExecutionId, message: &Message) {
    let mut delay = Duration::from_secs(1);
    loop {
        gate.wait_valid().await;
        let result = match message {
            Message::Output(chunk) => client.output(id, chunk).await,
            Message::Complete(completion) => client.complete(id, completion).await,
        };
        let error = match result {
            Ok(()) => return,
            Err(error) => error,
        };
        gate.observe(&error);
        if error.is_auth() {
            continue; // wait for the gate to reopen
        }
        if !error.is_retryable() {
            tracing::error!(execution = %id, "the control plane refused {}: {error}; not retrying", describe(message));
            return;
        }
        tracing::warn!(execution = %id, "could not deliver {} ({error}); retrying in {delay:?}", describe(message));
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_REDELIVERY_DELAY);
    }
}

fn describe(message: &Message) -> String {
    match message {
        Message::Output(chunk) => format!("output chunk {}", chunk.chunk_number),
        Message::Complete(_) => "the completion".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::api::{CompletionStatus, Segment};

    fn chunk(n: u64) -> Message {
        let segments = vec![Segment { timestamp: Some(1.5), content: format!("line {n} ✓\n") }];
        Message::Output(OutputRequest { chunk_number: n, segments, is_stderr: n % 2 == 0 })
    }

    #[tokio::test]
    async fn beyond_the_memory_limit_messages_spill_to_disk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let queue = Queue::new(300, path.clone());
        for n in 1..=50 {
            queue.push(chunk(n));
        }
        queue.push(Message::Complete(CompleteRequest { exit_code: 0, status: CompletionStatus::Success }));
        assert!(path.exists(), "most of it went to disk");
        assert!(queue.lock().memory_bytes <= 300);
        queue.close();
        for n in 1..=50 {
            assert_eq!(queue.pop().await, Some(chunk(n)));
        }
        assert!(matches!(queue.pop().await, Some(Message::Complete(_))));
        assert_eq!(queue.pop().await, None);
        assert!(!path.exists(), "the spill file is removed once drained");
    }
}
