//! The adaptive resync controller: how many resync bytes a link may send in
//! the next step, and how many it may have in flight, so that the resync
//! takes what the application leaves (DRBD's dynamic resync controller:
//! `c-plan-ahead`, `c-fill-target`, `c-min-rate`, `c-max-rate`).
//!
//! It owns only arithmetic: measurements of the last step go in (resync
//! bytes the peer acknowledged, bytes still in flight, the application's
//! writes and their latency), a [`Plan`] comes out. It must never read a
//! clock, touch a disk or a socket, or block: the resync loop
//! (`super::resync`) measures and paces, and the same inputs always give
//! the same plan (the tests below drive it step by step).
//!
//! Two loops, one inside the other:
//! - the *share* of the fill target the resync may use is an AIMD loop on
//!   the application's write latency: halved when a step's mean write
//!   latency is above twice the application's best (what it sees with the
//!   resync at its smallest), raised by one plan-ahead's worth when it is
//!   not, doubled back when the application is idle;
//! - DRBD's fill-target loop turns that window into a send budget per step:
//!   what the peer acknowledged, plus the gap between the bytes it wants in
//!   flight and those in flight (or already planned), spread over the
//!   plan-ahead horizon so one slow acknowledgement does not make it lurch.
//!
//! Bounds, whatever the measurements: the budget is never below the minimum
//! rate (a busy application slows the resync, never stops it: the peer
//! must become up to date) and never above the maximum (the volume's
//! `rate`); the window stays between [`Settings::min_window`] and the fill
//! target; the share only falls while the resync gets more than its minimum
//! rate.

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
    /// Resync bytes in flight it aims for with an idle application (DRBD's
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
    /// Their total latency (client request to acknowledgement).
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

/// Above this multiple of its best, the application is being slowed.
const LATENCY_FACTOR: f64 = 2.0;
/// Below this, latency differences are noise (a scheduler tick on a loaded
/// machine): never a reason to back off.
const LATENCY_FLOOR: Duration = Duration::from_micros(500);
/// How fast the application's best latency is forgotten, per busy step: a
/// disk that became slower for good is accepted after a while (0.1 %:
/// doubles in about 70 s at 100 ms steps). Faster lets the resync creep
/// into the application's latency (the best is rarely measured again once
/// the window stays above its smallest).
const BASELINE_DRIFT: f64 = 1.001;

/// One link's controller, for as long as its resync loop runs.
#[derive(Debug, Clone)]
pub struct Controller {
    s: Settings,
    /// Corrections still to apply, one slot per step of the horizon.
    plan: VecDeque<f64>,
    /// Their sum.
    planned: f64,
    /// Fraction of the fill target the resync may use, in
    /// `[min_window / fill_target, 1]`.
    share: f64,
    /// The application's best mean write latency, seconds: measured with
    /// the window at its smallest, drifting up otherwise.
    baseline: Option<f64>,
    /// The window of the step being measured.
    window: u64,
}

impl Controller {
    pub fn new(s: Settings) -> Controller {
        let s = Settings {
            fill_target: s.fill_target.max(1),
            min_window: s.min_window.clamp(1, s.fill_target.max(1)),
            step: s.step.max(Duration::from_millis(1)),
            ..s
        };
        let steps = (s.plan_ahead.as_secs_f64() / s.step.as_secs_f64()).round().max(1.0) as usize;
        Controller {
            plan: std::iter::repeat_n(0.0, steps).collect(),
            planned: 0.0,
            share: 1.0,
            baseline: None,
            window: s.fill_target,
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
        self.s.max_rate.map_or(f64::MAX, |r| (r as f64 * dt).max(self.floor(dt)))
    }

    fn min_share(&self) -> f64 {
        self.s.min_window as f64 / self.s.fill_target as f64
    }

    /// One step: what the last one measured in, what the next may do out.
    pub fn step(&mut self, m: Sample) -> Plan {
        let dt = self.s.step.as_secs_f64();
        let steps = self.plan.len() as f64;
        self.adapt_share(&m, dt, steps);
        let window = ((self.s.fill_target as f64 * self.share) as u64).clamp(self.s.min_window, self.s.fill_target);

        // DRBD's fill-target loop: aim for `window` bytes in flight; what
        // is missing (or too much) beyond what is already planned is spread
        // evenly over the horizon, and this step gets its slot.
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
        self.window = window;
        Plan { budget: budget as u64, window, rate: (budget / dt) as u64 }
    }

    /// The AIMD loop on the application's latency (see the module doc).
    fn adapt_share(&mut self, m: &Sample, dt: f64, steps: f64) {
        if m.app_writes == 0 {
            // Idle: take the link back quickly.
            self.share = (self.share * 2.0).min(1.0);
            return;
        }
        let latency = m.app_latency.as_secs_f64() / m.app_writes as f64;
        // Only a step run with the smallest window, or with no resync bytes
        // moving at all, shows the application's own latency.
        let smallest = self.window <= self.s.min_window || (m.acked == 0 && m.in_flight == 0);
        let baseline = match self.baseline {
            // A lower latency is always a truer best; an old best drifts up
            // so that a disk that became slower for good is accepted.
            Some(b) => (b * BASELINE_DRIFT).min(latency),
            None if smallest => latency,
            None => {
                // No idea yet what the application sees without us: back
                // off to find out (the first steps of a resync under load).
                self.back_off(m, dt);
                return;
            }
        };
        self.baseline = Some(baseline);
        let limit = (baseline * LATENCY_FACTOR).max(baseline + LATENCY_FLOOR.as_secs_f64());
        if latency > limit {
            self.back_off(m, dt);
        } else {
            // Additive increase: the whole fill target within one horizon.
            self.share = (self.share + 1.0 / steps).min(1.0);
        }
    }

    /// Halves the share, unless the resync is down to its minimum rate
    /// already (c-min-rate: below it the application waits for us).
    fn back_off(&mut self, m: &Sample, dt: f64) {
        if m.acked as f64 > self.floor(dt) {
            self.share = (self.share * 0.5).max(self.min_share());
        }
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
    /// takes meanwhile.
    struct Peer {
        in_flight: u64,
        capacity: u64,
    }

    impl Peer {
        fn run(&mut self, plan: Plan, app: Option<Duration>) -> Sample {
            let room = plan.window.saturating_sub(self.in_flight) + self.capacity;
            self.in_flight += plan.budget.min(room);
            let acked = self.in_flight.min(self.capacity);
            self.in_flight -= acked;
            let (app_writes, app_latency) = app.map_or((0, Duration::ZERO), |l| (10, l * 10));
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
    fn a_slowed_application_keeps_its_latency_near_its_best() {
        let mut c = Controller::new(settings(None));
        let mut peer = Peer { in_flight: 0, capacity: 50 * MIB };
        let mut plan = c.first();
        // The application's latency grows with what the resync has in
        // flight (it queues behind it on the link): 0.3 ms + 1 µs per KiB.
        let latency = |window: u64| Duration::from_micros(300 + window / 1024);
        let best = latency(256 << 10);
        let mut seen = Vec::new();
        for _ in 0..200 {
            let lat = latency(plan.window);
            seen.push((plan.window, lat));
            plan = c.step(peer.run(plan, Some(lat)));
        }
        // AIMD: a sawtooth around twice the best latency (one additive step
        // above it at most), far below the full window's 8.5 ms; the resync
        // still moves at its minimum rate.
        let tail = &seen[100..];
        assert!(tail.iter().all(|(_, l)| *l <= best * 3), "{tail:?}");
        let mean = tail.iter().map(|(_, l)| l.as_secs_f64()).sum::<f64>() / tail.len() as f64;
        assert!(mean <= best.as_secs_f64() * 2.5, "mean {mean}");
        assert!(tail.iter().all(|(w, _)| *w <= 2 * MIB));
        assert!(plan.rate >= 4 * MIB);
    }

    #[test]
    fn a_latency_that_does_not_depend_on_the_resync_keeps_the_full_window() {
        let mut c = Controller::new(settings(None));
        let mut peer = Peer { in_flight: 0, capacity: 50 * MIB };
        let mut plan = c.first();
        for _ in 0..200 {
            plan = c.step(peer.run(plan, Some(Duration::from_millis(1))));
        }
        assert_eq!(plan.window, 8 * MIB);
    }

    #[test]
    fn the_plan_is_the_same_for_the_same_inputs() {
        let mut a = Controller::new(settings(Some(100 * MIB)));
        let mut b = a.clone();
        let m = Sample { acked: MIB, in_flight: 3 * MIB, app_writes: 4, app_latency: Duration::from_millis(9) };
        assert_eq!(a.step(m), b.step(m));
    }

    fn sample() -> impl Strategy<Value = Sample> {
        (0u64..64 * MIB, 0u64..64 * MIB, 0u64..1000, 0u64..1_000_000).prop_map(|(acked, in_flight, n, us)| Sample {
            acked,
            in_flight,
            app_writes: n,
            app_latency: Duration::from_micros(us * n.min(10)),
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
            prop_assert_eq!(plan.window, 8 * MIB);
            prop_assert_eq!(plan.rate, 50 * MIB);
        }

        #[test]
        fn a_rising_application_latency_never_widens_the_window(
            base_us in 200u64..5000,
            rise in 3u64..20,
            steps in 1usize..30,
        ) {
            // With the baseline learned at the smallest window, a latency
            // several times higher halves the window each step (while the
            // resync runs above its minimum rate) down to the smallest.
            let mut c = Controller::new(settings(None));
            let base = Duration::from_micros(base_us);
            let busy = |lat: Duration| Sample { acked: 2 * MIB, in_flight: 0, app_writes: 10, app_latency: lat * 10 };
            let mut plan = c.first();
            for _ in 0..100 {
                let lat = if plan.window <= 256 << 10 { base } else { base * rise as u32 };
                plan = c.step(busy(lat));
            }
            let mut prev = plan.window;
            for _ in 0..steps {
                let p = c.step(busy(base * rise as u32));
                prop_assert!(p.window <= prev, "window grew {} -> {}", prev, p.window);
                prev = p.window;
            }
        }
    }
}
