//! Exponential backoff with jitter, for clients that reconnect.

use std::time::Duration;

use rand::Rng;

/// Doubling delays from `initial` up to `max`, each randomized to between half and all of its
/// nominal value so that many clients dropped at once do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The nominal (un-jittered) delay of the next attempt.
    pub fn nominal(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt; advances the attempt counter.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.nominal();
        self.attempt = self.attempt.saturating_add(1);
        let jitter = rand::rng().random_range(0.5..=1.0);
        nominal.mul_f64(jitter)
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let nominal = [500, 1000, 2000, 4000, 4000, 4000];
        for ms in nominal {
            let delay = backoff.next_delay();
            let ms = Duration::from_millis(ms);
            assert!(delay >= ms / 2 && delay <= ms, "{delay:?} outside {ms:?}");
        }
        backoff.reset();
        assert_eq!(backoff.nominal(), Duration::from_millis(500));
    }
}
