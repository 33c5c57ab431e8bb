//! The one retry rhythm of the process: how long to wait before trying
//! again after a failure. Delivery of output, polling, the heartbeat (both
//! its ordinary failures and the authentication schedule), starting an
//! execution and restarting the worker all use [`Backoff`]; nothing else
//! sleeps between retries, so there are never two retry loops nested.
//!
//! Waits grow exponentially (or follow a fixed schedule), a server's
//! `Retry-After` is honoured (capped, so the runner keeps its rhythm), and a
//! random 0–20 % is added so a fleet of runners that failed together does
//! not retry in lockstep. The sleep is tokio's, so tests drive it with
//! tokio's paused clock.

use std::time::Duration;

/// A server's `Retry-After` above this is capped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Jitter is up to 1/JITTER_DIVISOR of the wait, added (never subtracted, so
/// a documented schedule stays a minimum).
const JITTER_DIVISOR: u32 = 5;

#[derive(Debug, Clone)]
enum Steps {
    /// `first`, doubling each time, up to `max`.
    Exponential { first: Duration, max: Duration },
    /// These waits in turn, the last one repeated.
    Schedule(&'static [Duration]),
}

/// Successive waits after consecutive failures; [`Backoff::reset`] after a
/// success starts again from the first.
#[derive(Debug, Clone)]
pub struct Backoff {
    steps: Steps,
    failures: u32,
    jitter: bool,
}

impl Backoff {
    pub fn exponential(first: Duration, max: Duration) -> Self {
        Self { steps: Steps::Exponential { first, max: max.max(first) }, failures: 0, jitter: true }
    }

    /// `steps` must not be empty (a constant in every use).
    pub fn schedule(steps: &'static [Duration]) -> Self {
        Self { steps: Steps::Schedule(steps), failures: 0, jitter: true }
    }

    /// Exactly the nominal waits, for a caller that is alone in waiting (the
    /// worker restarts: one supervisor, one worker; jitter spreads a fleet).
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts a failure and says how long to wait before the next attempt:
    /// the server's `retry_after` if it gave one (capped), else the next step.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let nominal = self.nominal(self.failures);
        self.failures = self.failures.saturating_add(1);
        let base = retry_after.map_or(nominal, |asked| asked.min(MAX_RETRY_AFTER));
        if self.jitter {
            // Saturating: a step near `Duration::MAX` (an unbounded `max`,
            // many failures) must give the longest wait, not an overflow panic.
            base.saturating_add(jitter(base))
        } else {
            base
        }
    }

    /// Counts a failure and sleeps for [`Self::next_delay`]; returns the wait.
    pub async fn wait(&mut self, retry_after: Option<Duration>) -> Duration {
        let delay = self.next_delay(retry_after);
        tokio::time::sleep(delay).await;
        delay
    }

    fn nominal(&self, failures: u32) -> Duration {
        match &self.steps {
            Steps::Exponential { first, max } => {
                first.saturating_mul(2u32.saturating_pow(failures.min(31))).min(*max)
            }
            Steps::Schedule(steps) => {
                let last = steps.len().saturating_sub(1);
                steps.get((failures as usize).min(last)).copied().unwrap_or_default()
            }
        }
    }
}

fn jitter(base: Duration) -> Duration {
    let span = u64::try_from((base / JITTER_DIVISOR).as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn within_jitter(delay: Duration, nominal: Duration) -> bool {
        delay >= nominal && delay <= nominal + nominal / JITTER_DIVISOR
    }

    #[test]
    fn exponential_waits_double_up_to_the_maximum_with_added_jitter() {
        let mut backoff = Backoff::exponential(SECOND, 8 * SECOND);
        for nominal in [1, 2, 4, 8, 8, 8] {
            let delay = backoff.next_delay(None);
            assert!(within_jitter(delay, nominal * SECOND), "{delay:?} for {nominal} s");
        }
        backoff.reset();
        assert!(within_jitter(backoff.next_delay(None), SECOND));
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let mut backoff = Backoff::exponential(SECOND, 8 * SECOND).without_jitter();
        assert_eq!(backoff.next_delay(Some(7 * SECOND)), 7 * SECOND);
        assert_eq!(backoff.next_delay(Some(Duration::from_secs(3600))), MAX_RETRY_AFTER);
        assert_eq!(backoff.next_delay(None), 4 * SECOND, "the failures still count");
    }

    #[test]
    fn a_schedule_repeats_its_last_step_and_never_overflows() {
        const STEPS: [Duration; 2] = [SECOND, Duration::from_secs(5)];
        let mut backoff = Backoff::schedule(&STEPS).without_jitter();
        let waits: Vec<_> = (0..4).map(|_| backoff.next_delay(None)).collect();
        assert_eq!(waits, [SECOND, 5 * SECOND, 5 * SECOND, 5 * SECOND]);
        let mut long = Backoff::exponential(SECOND, Duration::MAX);
        for _ in 0..100 {
            long.next_delay(None);
        }
        assert_eq!(long.failures(), 100);
    }

    /// Failed before the fix: `base + jitter(base)` overflowed once the
    /// doubled step reached `Duration::MAX`.
    #[test]
    fn a_step_at_the_largest_duration_does_not_overflow_with_jitter() {
        let mut backoff = Backoff::exponential(Duration::from_secs(1 << 40), Duration::MAX);
        for _ in 0..40 {
            backoff.next_delay(None);
        }
        assert_eq!(backoff.next_delay(None), Duration::MAX);
        assert_eq!(Backoff::exponential(Duration::MAX, Duration::MAX).next_delay(None), Duration::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_on_tokios_clock() {
        let mut backoff = Backoff::exponential(SECOND, 8 * SECOND).without_jitter();
        let before = tokio::time::Instant::now();
        backoff.wait(None).await;
        backoff.wait(None).await;
        assert_eq!(before.elapsed(), 3 * SECOND);
    }

    fn duration() -> impl proptest::strategy::Strategy<Value = Duration> {
        use proptest::prelude::*;
        prop_oneof![
            (0u64..100_000).prop_map(Duration::from_millis),
            any::<u64>().prop_map(Duration::from_secs),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
            Just(Duration::MAX),
            Just(Duration::ZERO),
        ]
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        /// Whatever the steps and whatever a server's `Retry-After` says
        /// (u64::MAX seconds included), a delay is computed, never a panic,
        /// and a `Retry-After` never makes the runner wait over the cap.
        #[test]
        fn any_steps_and_retry_after_give_a_delay(
            first in duration(),
            max in duration(),
            asked in proptest::option::of(duration()),
            failures in 0u32..80,
            jitter in proptest::prelude::any::<bool>(),
        ) {
            let mut backoff = Backoff::exponential(first, max);
            if !jitter {
                backoff = backoff.without_jitter();
            }
            for _ in 0..failures {
                backoff.next_delay(None);
            }
            let delay = backoff.next_delay(asked);
            if let Some(asked) = asked {
                let cap = asked.min(MAX_RETRY_AFTER);
                proptest::prop_assert!(delay >= cap && delay <= cap + cap / JITTER_DIVISOR, "{:?}", delay);
            }
        }
    }
}
