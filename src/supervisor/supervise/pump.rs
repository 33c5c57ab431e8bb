//! The output pump: reads the job's stdout and stderr as bytes arrive,
//! appends them to the execution's output log at once, and decides when
//! they go out as chunks — the adaptive flush:
//!
//! * output after a quiet spell goes out at once, so a person watching sees
//!   each line as it is printed;
//! * under sustained output, flushes are at least [`MIN_FLUSH_GAP`] apart
//!   (at most 4 a second, each one chunk per stream with output), and a new
//!   flush waits until the previous chunks are acknowledged, so chunks grow
//!   toward `chunk_max_bytes` instead of multiplying; a slow or throttling
//!   control plane (429, `Retry-After`) therefore slows the flushes too;
//! * a stream reaching `chunk_max_bytes` is sent at once, and nothing waits
//!   longer than `output_flush_interval`, whatever the above says.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::supervisor::outbox::Outbox;

/// The shortest time between two flushes of one execution under sustained
/// output (docs/protocol.md states the resulting bound, 4 flushes a second).
pub const MIN_FLUSH_GAP: Duration = Duration::from_millis(250);
const READ_BUFFER: usize = 64 * 1024;
/// Far enough in the future to stand for "never" in a timer.
const NEVER: Duration = Duration::from_secs(100 * 365 * 86400);

/// When buffered output should be sent: the adaptive-flush rule, kept apart
/// from the I/O so it can be tested on its own.
#[derive(Debug, Clone)]
pub struct Pacer {
    flush_interval: Duration,
    min_gap: Duration,
    last_flush: Option<Instant>,
    /// When the oldest output not yet flushed arrived.
    oldest_unflushed: Option<Instant>,
}

impl Pacer {
    pub fn new(flush_interval: Duration) -> Self {
        Self {
            flush_interval,
            min_gap: MIN_FLUSH_GAP.min(flush_interval),
            last_flush: None,
            oldest_unflushed: None,
        }
    }

    pub fn on_output(&mut self, now: Instant) {
        self.oldest_unflushed.get_or_insert(now);
    }

    /// `still_buffered`: a flush of one stream left the other one's output.
    pub fn on_flush(&mut self, now: Instant, still_buffered: bool) {
        self.last_flush = Some(now);
        if !still_buffered {
            self.oldest_unflushed = None;
        }
    }

    /// When to flush what is buffered (`None`: nothing is). `delivered`:
    /// every chunk sent so far has been acknowledged.
    pub fn due(&self, delivered: bool) -> Option<Instant> {
        let oldest = self.oldest_unflushed?;
        // An absurd configured interval means "never": no overflow panic.
        let latest = oldest.checked_add(self.flush_interval).unwrap_or(oldest + NEVER);
        if !delivered {
            return Some(latest);
        }
        let early = self.last_flush.map_or(oldest, |last| (last + self.min_gap).max(oldest));
        // min_gap ≤ flush_interval, so `early` cannot overflow where `latest` did not.
        Some(early.min(latest))
    }
}

/// One of the job's output streams.
struct Stream {
    pipe: Option<pipe::Receiver>,
    is_stderr: bool,
}

/// Reads both streams until they close, appending what it reads to the
/// execution's output log at once; the log's replay cuts the chunks (at
/// `chunk_max_bytes` too), the pump only says when to flush.
pub struct Pump<'o> {
    outbox: &'o Outbox,
    out: Stream,
    err: Stream,
    pacer: Pacer,
    /// Flushes not yet delivered to the control plane.
    unacknowledged: watch::Receiver<usize>,
}

impl<'o> Pump<'o> {
    pub fn new(
        outbox: &'o Outbox,
        pipes: (Option<pipe::Receiver>, Option<pipe::Receiver>),
        flush_interval: Duration,
    ) -> Self {
        Self {
            outbox,
            out: Stream { pipe: pipes.0, is_stderr: false },
            err: Stream { pipe: pipes.1, is_stderr: true },
            pacer: Pacer::new(flush_interval),
            unacknowledged: outbox.unacknowledged(),
        }
    }

    /// Until both pipes are closed. Cancel-safe: what was read is in the log.
    pub async fn run(&mut self) {
        let (mut out_read, mut err_read) = (vec![0u8; READ_BUFFER], vec![0u8; READ_BUFFER]);
        while self.out.pipe.is_some() || self.err.pipe.is_some() {
            let delivered = *self.unacknowledged.borrow() == 0;
            let due = self.pacer.due(delivered);
            tokio::select! {
                read = read_some(&mut self.out.pipe, &mut out_read) => self.take_in(false, read, &out_read),
                read = read_some(&mut self.err.pipe, &mut err_read) => self.take_in(true, read, &err_read),
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.flush_both();
                }
                // Re-evaluate `due` once the previous chunks are acknowledged.
                _ = wait_delivered(&mut self.unacknowledged), if due.is_some() && !delivered => {}
            }
        }
    }

    /// Ends the streams still open (abandoned) and sends everything buffered.
    pub fn finish(&mut self) {
        for stream in [&mut self.out, &mut self.err] {
            if stream.pipe.take().is_some() {
                self.outbox.eof(stream.is_stderr);
            }
        }
        self.flush_both();
    }

    fn take_in(&mut self, is_stderr: bool, read: Option<usize>, bytes: &[u8]) {
        let stream = if is_stderr { &mut self.err } else { &mut self.out };
        match read {
            Some(count) => self.outbox.read(is_stderr, &bytes[..count]),
            None => {
                stream.pipe = None;
                self.outbox.eof(is_stderr);
            }
        }
        self.pacer.on_output(Instant::now());
    }

    /// Both streams, stdout first, as the protocol says.
    fn flush_both(&mut self) {
        self.outbox.flush();
        self.pacer.on_flush(Instant::now(), false);
    }
}

async fn wait_delivered(unacknowledged: &mut watch::Receiver<usize>) {
    if unacknowledged.wait_for(|count| *count == 0).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Reads from a pipe that may already be closed (then waits forever, so the
/// `select!` branch simply never fires). `None` at EOF or on error.
async fn read_some(pipe: &mut Option<pipe::Receiver>, buffer: &mut [u8]) -> Option<usize> {
    match pipe {
        Some(pipe) => match pipe.read(buffer).await {
            Ok(0) | Err(_) => None,
            Ok(bytes) => Some(bytes),
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn output_after_a_quiet_spell_is_due_at_once() {
        let mut pacer = Pacer::new(1500 * MS);
        let start = Instant::now();
        assert_eq!(pacer.due(true), None, "nothing buffered");
        pacer.on_output(start);
        assert_eq!(pacer.due(true), Some(start), "the first output goes at once");
        pacer.on_flush(start, false);
        let later = start + 2000 * MS;
        pacer.on_output(later);
        assert_eq!(pacer.due(true), Some(later), "and so does output after a quiet spell");
    }

    #[tokio::test(start_paused = true)]
    async fn sustained_output_waits_the_gap_and_for_acknowledgement_but_never_past_the_interval() {
        let mut pacer = Pacer::new(1500 * MS);
        let start = Instant::now();
        pacer.on_output(start);
        pacer.on_flush(start, false);
        pacer.on_output(start + 10 * MS);
        assert_eq!(pacer.due(true), Some(start + MIN_FLUSH_GAP), "at most one flush per gap");
        assert_eq!(pacer.due(false), Some(start + 1510 * MS), "unacknowledged: only the interval");
        let mut slow = Pacer::new(100 * MS);
        slow.on_output(start);
        slow.on_flush(start, false);
        slow.on_output(start);
        assert_eq!(slow.due(true), Some(start + 100 * MS), "the gap never exceeds the interval");
        let mut never = Pacer::new(Duration::MAX);
        never.on_output(start);
        assert_eq!(never.due(false), Some(start + NEVER), "an absurd interval does not overflow");
    }
}
