//! The adaptive resync controller: how many resync bytes a link may send in
//! the next step, and how many it may have in flight, so that the resync
//! takes what the application leaves (DRBD's dynamic resync controller:
//! `c-plan-ahead`, `c-fill-target`, `c-min-rate`, `c-max-rate`).
//!
//! It owns only arithmetic: measurements of the last step go in (resync
//! bytes the peer acknowledged, bytes still in flight, the application's
//! writes and their p99 latency), a [`Plan`] comes out. It must never read
//! a clock, touch a disk or a socket, or block: the resync loop
//! (`super::resync`) measures and paces, and the same inputs always give
//! the same plan (the tests below drive it step by step).
//!
//! Two loops, one inside the other:
//! - a *cap* on the resync's rate, AIMD on the application's write p99: a
//!   step whose p99 is above twice the application's own (and at least
//!   [`LATENCY_SLACK`] above it) halves the cap from what the resync
//!   achieved; a step below raises it (by a fixed amount, or an eighth of
//!   it when more); an idle
//!   application doubles it back to the maximum. The application's own p99
//!   is learned from steps where the resync added nothing (nothing moving)
//!   or the least it can (at its minimum rate). A single slow step is not
//!   acted on (neighbours on a shared disk make those too): two in a row. The lever is the rate, not
//!   only the bytes in flight: on a fast link the application waits less
//!   for the resync's frames than for the disk the resync fills;
//! - DRBD's fill-target loop turns it into a send budget per step: what the
//!   peer acknowledged, plus the gap between the bytes it wants in flight
//!   and those in flight (or already planned), spread over the plan-ahead
//!   horizon so one slow acknowledgement does not make it lurch.
//!
//! Bounds, whatever the measurements: the budget is never below the minimum
//! rate (a busy application slows the resync, never stops it: the peer must
//! become up to date) and never above the maximum (the volume's `rate`);
//! the window stays between [`Settings::min_window`] and the fill target;
//! the cap only falls while the resync gets more than its minimum rate.

use std::collections::VecDeque;
use std::time::Duration;

/// The controller's fixed parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Bytes per second the resync always gets while there is work (DRBD's
    /// `c-min-rate`).
    pub min_rate: u64,
    /// Bytes per second it never exceeds (the volume's `rate`); none:
    /// unlimited.
    pub max_rate: Option<u64>,
    /// Resync bytes in flight it aims for at full speed (DRBD's
    /// `c-fill-target`).
    pub fill_target: u64,
    /// The smallest window: one frame that still moves the resync along.
    pub min_window: u64,
    /// Over how long a correction is spread (DRBD's `c-plan-ahead`).
    pub plan_ahead: Duration,
    /// How often [`Controller::step`] is called.
    pub step: Duration,
}

/// What the last step measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Resync bytes the peer acknowledged during the step.
    pub acked: u64,
    /// Resync bytes in flight at its end.
    pub in_flight: u64,
    /// Application writes completed during the step.
    pub app_writes: u64,
    /// Their 99th percentile latency (client request to acknowledgement).
    pub app_latency: Duration,
}

/// What the next step may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Resync bytes it may send.
    pub budget: u64,
    /// Resync bytes it may have in flight.
    pub window: u64,
    /// The budget as a rate, bytes per second (shown in the volume's view).
    pub rate: u64,
}

/// Above this multiple of its own, the application is being slowed.
const LATENCY_FACTOR: f64 = 2.0;
/// ... and by at least this much: below it, differences are noise (a
/// scheduler tick, a neighbour's burst on a shared machine), never a
/// reason to back off. Also what a resync may add to a fast disk's p99.
pub const LATENCY_SLACK: Duration = Duration::from_millis(2);
/// Weight of a new measurement of the application's own p99 (an average:
/// one lucky step must not set the bar for good).
const BASELINE_WEIGHT: f64 = 0.25;

/// One link's controller, for as long as its resync loop runs.
#[derive(Debug, Clone)]
pub struct Controller {
    s: Settings,
    /// Corrections still to apply, one slot per step of the horizon.
    plan: VecDeque<f64>,
    /// Their sum.
    planned: f64,
    /// The rate cap, bytes per second (infinite: none yet).
    cap: f64,
    /// The application's own p99 write latency, seconds.
    baseline: Option<f64>,
    /// Whether the last step's p99 was above the limit already.
    slowed: bool,
}

impl Controller {
    pub fn new(s: Settings) -> Controller {
        let s = Settings {
            fill_target: s.fill_target.max(1),
            min_window: s.min_window.clamp(1, s.fill_target.max(1)),
            max_rate: s.max_rate.map(|m| m.max(s.min_rate)),
            step: s.step.max(Duration::from_millis(1)),
            ..s
        };
        let steps = (s.plan_ahead.as_secs_f64() / s.step.as_secs_f64()).round().max(1.0) as usize;
        Controller {
            plan: std::iter::repeat_n(0.0, steps).collect(),
            planned: 0.0,
            cap: s.max_rate.map_or(f64::INFINITY, |m| m as f64),
            baseline: None,
            slowed: false,
            s,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.s
    }

    /// The plan before any measurement: fill the window, at no more than
    /// the maximum rate.
    pub fn first(&self) -> Plan {
        let dt = self.s.step.as_secs_f64();
        let budget = (self.s.fill_target as f64).clamp(self.floor(dt), self.ceiling(dt));
        Plan { budget: budget as u64, window: self.s.fill_target, rate: (budget / dt) as u64 }
    }

    fn floor(&self, dt: f64) -> f64 {
        self.s.min_rate as f64 * dt
    }

    fn ceiling(&self, dt: f64) -> f64 {
        (self.cap * dt).max(self.floor(dt))
    }

    fn max_rate(&self) -> f64 {
        self.s.max_rate.map_or(f64::INFINITY, |m| m as f64)
    }

    /// One step: what the last one measured in, what the next may do out.
    pub fn step(&mut self, m: Sample) -> Plan {
        let dt = self.s.step.as_secs_f64();
        self.adapt_cap(&m, dt);
        // A step's worth of bytes at the cap may be in flight.
        let window = (self.cap * dt).clamp(self.s.min_window as f64, self.s.fill_target as f64) as u64;

        // DRBD's fill-target loop: aim for `window` bytes in flight; what
        // is missing (or too much) beyond what is already planned is spread
        // evenly over the horizon, and this step gets its slot.
        let steps = self.plan.len() as f64;
        let correction = window as f64 - m.in_flight as f64 - self.planned;
        let per_step = correction / steps;
        for slot in self.plan.iter_mut() {
            *slot += per_step;
        }
        self.planned += correction;
        let now = self.plan.pop_front().unwrap_or(0.0);
        self.plan.push_back(0.0);
        self.planned -= now;
        let budget = (m.acked as f64 + now).clamp(self.floor(dt), self.ceiling(dt));
        Plan { budget: budget as u64, window, rate: (budget / dt) as u64 }
    }

    /// The AIMD loop on the application's latency (see the module doc).
    fn adapt_cap(&mut self, m: &Sample, dt: f64) {
        if m.app_writes == 0 {
            // Idle: take the link back quickly.
            self.cap = (self.cap * 2.0).min(self.max_rate());
            return;
        }
        let latency = m.app_latency.as_secs_f64();
        // The application's own latency shows where the resync added
        // nothing, or the least it may.
        // Any step shows that it is no higher than what it measured.
        let own = (m.acked == 0 && m.in_flight == 0) || self.cap <= self.s.min_rate as f64;
        self.baseline = match self.baseline {
            Some(b) if own || latency < b => Some(b + (latency - b) * BASELINE_WEIGHT),
            None if own => Some(latency),
            kept => kept,
        };
        let Some(base) = self.baseline else {
            // No idea yet what the application sees without us: back off
            // to find out (the first steps of a resync under load).
            self.back_off(m, dt);
            return;
        };
        let limit = (base * LATENCY_FACTOR).max(base + LATENCY_SLACK.as_secs_f64());
        let slowed = latency > limit;
        if slowed && self.slowed {
            // Two slow steps in a row: one alone is as often a neighbour's
            // burst on a shared disk as it is us.
            self.back_off(m, dt);
        } else if !slowed && self.cap.is_finite() {
            // Additive increase: a fill target per plan-ahead horizon each
            // step (4 MiB/s with the defaults), at least the minimum rate,
            // or an eighth of the cap when that is more (from 100 MiB/s
            // back to 200 in about 0.6 s).
            let step = (self.s.fill_target as f64 / self.s.plan_ahead.as_secs_f64())
                .max(self.s.min_rate as f64)
                .max(self.cap / 8.0);
            self.cap = (self.cap + step).min(self.max_rate());
        }
        self.slowed = slowed;
    }

    /// Halves the cap from what the resync achieved, unless it is down to
    /// its minimum rate already (c-min-rate: below it the application waits
    /// for us).
    fn back_off(&mut self, m: &Sample, dt: f64) {
        let achieved = m.acked as f64 / dt;
        if achieved > self.s.min_rate as f64 {
            self.cap = (self.cap.min(achieved) * 0.5).max(self.s.min_rate as f64);
        }
    }
}

/// Write latencies counted in buckets a quarter of an octave wide (about
/// 19 %), from 1 µs to hours: running totals that any number of readers
/// diff (each resync loop keeps its own last reading).
pub const LATENCY_BUCKETS: usize = 128;

/// The bucket a latency falls in.
pub fn latency_bucket(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us <= 1.0 {
        return 0;
    }
    ((us.log2() * 4.0).floor() as usize).min(LATENCY_BUCKETS - 1)
}

/// Counts per bucket (what [`latency_bucket`] says), e.g. the difference
/// of two readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latencies(pub [u64; LATENCY_BUCKETS]);

impl Latencies {
    /// Writes counted here and not in `earlier`.
    pub fn since(&self, earlier: &Latencies) -> Latencies {
        let mut d = [0; LATENCY_BUCKETS];
        for (i, x) in d.iter_mut().enumerate() {
            *x = self.0[i].saturating_sub(earlier.0[i]);
        }
        Latencies(d)
    }

    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The upper bound of the bucket holding the `q` quantile (zero when
    /// nothing was counted).
    pub fn quantile(&self, q: f64) -> Duration {
        let n = self.count();
        let want = ((n as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.0.iter().enumerate() {
            seen += c;
            if seen >= want && n > 0 {
                return Duration::from_secs_f64(2f64.powf((i + 1) as f64 / 4.0) * 1e-6);
            }
        }
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    const STEP: Duration = Duration::from_millis(100);

    fn settings(max_rate: Option<u64>) -> Settings {
        Settings {
            min_rate: 4 * MIB,
            max_rate,
            fill_target: 8 * MIB,
            min_window: 256 << 10,
            plan_ahead: Duration::from_secs(2),
            step: STEP,
        }
    }

    /// A peer that acknowledges up to `capacity` bytes a step of what was
    /// sent. The loop sends at most the budget, and refills the window as
    /// acknowledgements come: at most the window's room plus what the peer
    /// takes meanwhile. The application's p99 in that step, if it writes,
    /// is `app` of the resync bytes acknowledged.
    struct Peer {
        in_flight: u64,
        capacity: u64,
    }

    impl Peer {
        fn run(&mut self, plan: Plan, app: Option<&dyn Fn(u64) -> Duration>) -> Sample {
            let room = plan.window.saturating_sub(self.in_flight) + self.capacity;
            self.in_flight += plan.budget.min(room);
            let acked = self.in_flight.min(self.capacity);
            self.in_flight -= acked;
            let (app_writes, app_latency) = app.map_or((0, Duration::ZERO), |f| (100, f(acked)));
            Sample { acked, in_flight: self.in_flight, app_writes, app_latency }
        }
    }

    #[test]
    fn an_idle_application_gets_the_maximum_rate() {
        let mut c = Controller::new(settings(Some(200 * MIB)));
        let mut peer = Peer { in_flight: 0, capacity: 100 * MIB };
        let mut plan = c.first();
        for _ in 0..100 {
            plan = c.step(peer.run(plan, None));
        }
        assert_eq!(plan.rate, 200 * MIB);
        assert_eq!(plan.window, 8 * MIB);
    }

    #[test]
    fn a_slowed_application_keeps_its_latency_near_its_own() {
        let mut c = Controller::new(settings(None));
        let mut peer = Peer { in_flight: 0, capacity: 50 * MIB };
        // The application's p99 grows with the resync's rate (it fills the
        // disk both write to): 0.3 ms, plus 1 ms per 20 MiB/s.
        let latency = |acked: u64| Duration::from_micros(300 + acked * 10 / (20 * MIB) * 100);
        let own = latency(4 * MIB / 10);
        let mut plan = c.first();
        let mut seen = Vec::new();
        for _ in 0..300 {
            let m = peer.run(plan, Some(&latency));
            seen.push((m.acked * 10, m.app_latency));
            plan = c.step(m);
        }
        // AIMD: a sawtooth up to about its limit (twice its own, and at
        // least 1 ms more), far below the 25 ms the resync would add at the
        // peer's full 500 MiB/s; the resync keeps at least its minimum.
        let tail = &seen[100..];
        let limit = (own * 2).max(own + LATENCY_SLACK);
        let mean = tail.iter().map(|(_, l)| l.as_secs_f64()).sum::<f64>() / tail.len() as f64;
        assert!(mean <= limit.as_secs_f64(), "mean {mean} {tail:?}");
        assert!(tail.iter().all(|(_, l)| *l <= limit * 2), "{tail:?}");
        assert!(tail.iter().all(|(r, _)| *r >= 4 * MIB - 10), "{tail:?}");
        let rate = tail.iter().map(|(r, _)| *r as f64).sum::<f64>() / tail.len() as f64;
        assert!(rate >= 8.0 * MIB as f64, "the resync takes what the application leaves: {rate}");
    }

    #[test]
    fn a_latency_that_does_not_depend_on_the_resync_keeps_the_full_window() {
        let mut c = Controller::new(settings(None));
        let mut peer = Peer { in_flight: 0, capacity: 50 * MIB };
        let mut plan = c.first();
        for _ in 0..200 {
            plan = c.step(peer.run(plan, Some(&|_| Duration::from_millis(1))));
        }
        assert_eq!(plan.window, 8 * MIB);
        assert!(plan.rate >= 100 * MIB, "{plan:?}");
    }

    #[test]
    fn the_plan_is_the_same_for_the_same_inputs() {
        let mut a = Controller::new(settings(Some(100 * MIB)));
        let mut b = a.clone();
        let m = Sample { acked: MIB, in_flight: 3 * MIB, app_writes: 4, app_latency: Duration::from_millis(9) };
        assert_eq!(a.step(m), b.step(m));
    }

    #[test]
    fn latencies_give_their_quantiles_by_bucket() {
        let mut l = Latencies([0; LATENCY_BUCKETS]);
        assert_eq!(l.quantile(0.99), Duration::ZERO);
        for us in (1..=100).map(|i| i * 10) {
            l.0[latency_bucket(Duration::from_micros(us))] += 1;
        }
        let p99 = l.quantile(0.99);
        // 990 µs, within its bucket's 19 %.
        assert!(p99 >= Duration::from_micros(990) && p99 <= Duration::from_micros(1190), "{p99:?}");
        let p50 = l.quantile(0.5);
        assert!(p50 >= Duration::from_micros(500) && p50 <= Duration::from_micros(600), "{p50:?}");
        assert_eq!(l.since(&l).count(), 0);
        assert_eq!(latency_bucket(Duration::from_secs(1 << 40)), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket(Duration::ZERO), 0);
    }

    fn sample() -> impl Strategy<Value = Sample> {
        (0u64..64 * MIB, 0u64..64 * MIB, 0u64..1000, 0u64..1_000_000).prop_map(|(acked, in_flight, n, us)| Sample {
            acked,
            in_flight,
            app_writes: n,
            app_latency: Duration::from_micros(us),
        })
    }

    proptest! {
        #[test]
        fn the_budget_stays_within_the_minimum_and_maximum_rates(
            max in proptest::option::of(4u64..1024),
            samples in proptest::collection::vec(sample(), 1..200),
        ) {
            let max = max.map(|m| m * MIB);
            let mut c = Controller::new(settings(max));
            let first = c.first();
            prop_assert!(first.rate >= 4 * MIB);
            for m in samples {
                let p = c.step(m);
                prop_assert!(p.budget as f64 >= 4.0 * MIB as f64 * 0.1 - 1.0, "budget {}", p.budget);
                if let Some(max) = max {
                    prop_assert!(p.budget as f64 <= max as f64 * 0.1 + 1.0, "budget {} above {}", p.budget, max);
                    prop_assert!(p.rate <= max);
                }
                prop_assert!(p.rate >= 4 * MIB - 10);
                prop_assert!((256 << 10..=8 * MIB).contains(&p.window), "window {}", p.window);
            }
        }

        #[test]
        fn an_idle_application_always_gets_the_maximum_back(
            samples in proptest::collection::vec(sample(), 0..100),
            capacity in 1u64..100,
        ) {
            // Whatever happened before, once the application stops writing
            // and the peer takes at least the maximum rate, the resync runs
            // at its maximum with its whole window within a few horizons.
            let mut c = Controller::new(settings(Some(50 * MIB)));
            for m in samples {
                c.step(m);
            }
            let mut peer = Peer { in_flight: 0, capacity: (capacity + 5) * MIB };
            let mut plan = c.first();
            for _ in 0..200 {
                plan = c.step(peer.run(plan, None));
            }
            // A step's worth at the maximum rate in flight.
            prop_assert_eq!(plan.window, 5 * MIB);
            prop_assert_eq!(plan.rate, 50 * MIB);
        }

        #[test]
        fn a_rising_application_latency_halves_the_resync_on_its_second_step(
            own_us in 200u64..5000,
            rise in 3u32..20,
            warm in 30usize..100,
            achieved in 5u64..400,
        ) {
            // Its own latency learned (the resync at its minimum), then
            // steps at that latency (enough for the average to forget the
            // first, slow measurement); then steps several times slower (and
            // well above the slack): after the second, the plan is at most
            // half the rate achieved, never below the minimum.
            let mut c = Controller::new(settings(None));
            let own = Duration::from_micros(own_us);
            let at = |lat: Duration, rate: u64| Sample { acked: rate / 10, in_flight: 0, app_writes: 10, app_latency: lat };
            for _ in 0..10 {
                c.step(at(own * rise, 50 * MIB));
            }
            for _ in 0..warm {
                c.step(at(own, 4 * MIB));
            }
            let slow = (own * rise).max(own + LATENCY_SLACK * 2);
            c.step(at(slow, achieved * MIB));
            let p = c.step(at(slow, achieved * MIB));
            prop_assert!(p.rate as f64 <= (achieved * MIB) as f64 / 2.0 + 1.0 || p.rate <= 4 * MIB, "{:?}", p);
            prop_assert!(p.rate >= 4 * MIB - 10);
        }
    }
}
