//! A node's simulated CLOCK_BOOTTIME: it counts from the node's boot, at
//! the node's own rate (a drift of a few hundred ppm), and starts over when
//! the node loses power. Simulated (global) time and node time are both in
//! microseconds; the product's lease deadlines are node milliseconds.

use std::time::{Duration, Instant};

/// The largest drift between a node's clock and true time, in parts per
/// million: 500 ppm is the most the kernel's NTP discipline slews a clock,
/// far above a quartz oscillator's tolerance.
pub const MAX_DRIFT_PPM: i64 = 500;

#[derive(Debug, Clone)]
pub struct Clock {
    /// Global time of the last boot.
    origin_us: u64,
    /// The node's clock at `origin_us`.
    boot0_us: u64,
    /// How much faster than true time the node's clock runs.
    ppm: i64,
}

impl Clock {
    pub fn new(origin_us: u64, boot0_us: u64, ppm: i64) -> Clock {
        Clock { origin_us, boot0_us, ppm }
    }

    /// The node's clock at global time `g` (never before its boot).
    pub fn local_us(&self, g: u64) -> u64 {
        // Well within i64: a scenario lasts minutes, the drift is < 1000 ppm.
        let d = g.saturating_sub(self.origin_us) as i64;
        (self.boot0_us as i64 + d + d * self.ppm / 1_000_000) as u64
    }

    pub fn local_ms(&self, g: u64) -> u64 {
        self.local_us(g) / 1000
    }

    /// The first global time at which the node's clock reads `l` or more.
    pub fn global_us(&self, l: u64) -> u64 {
        let d = l.saturating_sub(self.boot0_us) as i64;
        let mut g = self.origin_us + (d * 1_000_000 / (1_000_000 + self.ppm)) as u64;
        while self.local_us(g) < l {
            g += 1;
        }
        g
    }

    /// The node's clock as an `Instant` for the product's liveness code.
    pub fn instant(&self, base: Instant, g: u64) -> Instant {
        base + Duration::from_micros(self.local_us(g))
    }

    pub fn ppm(&self) -> i64 {
        self.ppm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_time_drifts_and_converts_back() {
        let fast = Clock::new(1_000_000, 50_000_000, 500);
        assert_eq!(fast.local_us(1_000_000), 50_000_000);
        assert_eq!(fast.local_us(2_000_000), 51_000_500, "500 ppm fast: half a millisecond per second");
        let slow = Clock::new(0, 0, -500);
        assert_eq!(slow.local_us(1_000_000), 999_500);
        for c in [fast, slow] {
            for l in [60_000_000u64, 60_000_001, 61_234_567] {
                let g = c.global_us(l);
                assert!(c.local_us(g) >= l && c.local_us(g - 1) < l, "{c:?} {l}");
            }
        }
    }
}
