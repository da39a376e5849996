//! The history checker for the resource workload: pure, no I/O.
//!
//! Input is what the sampler saw: at each sample time, which copies of the
//! group were alive (node, epoch, pid). It proves no two copies were ever
//! alive at once, that no copy started at an epoch older than one already
//! started, and measures every outage (a time with no copy alive, after the
//! first start) as a failover's downtime.

use serde::Serialize;

/// One copy of the group, as its start line in the event log names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copy {
    pub node: String,
    pub epoch: u64,
    pub pid: i32,
}

/// What was alive at one moment (milliseconds since the run began).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub t_ms: u64,
    pub alive: Vec<Copy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub kind: String,
    pub t_ms: u64,
    /// The history excerpt that shows it.
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    /// Each outage: (start ms, length ms).
    pub outages: Vec<(u64, u64)>,
}

/// Checks the samples (in time order) and the starts (in log order).
pub fn check(samples: &[Sample], starts: &[Copy]) -> Verdict {
    let mut v = Verdict::default();
    let mut down_since: Option<u64> = None;
    let mut seen_alive = false;
    // One violation per stretch of the same copies alive together.
    let mut overlap: Option<(usize, u64, &[Copy])> = None;
    for s in samples {
        match overlap {
            Some((i, since, copies)) if s.alive.len() > 1 && s.alive == copies => {
                v.violations[i].detail = format!("{copies:?} for {} ms", s.t_ms - since);
            }
            _ if s.alive.len() > 1 => {
                v.violations.push(Violation {
                    kind: "two copies alive".into(),
                    t_ms: s.t_ms,
                    detail: format!("{:?}", s.alive),
                });
                overlap = Some((v.violations.len() - 1, s.t_ms, &s.alive));
            }
            _ => overlap = None,
        }
        match (s.alive.is_empty(), down_since) {
            (true, None) if seen_alive => down_since = Some(s.t_ms),
            (false, Some(t)) => {
                v.outages.push((t, s.t_ms - t));
                down_since = None;
            }
            _ => {}
        }
        seen_alive |= !s.alive.is_empty();
    }
    let mut newest = 0;
    for c in starts {
        if c.epoch < newest {
            v.violations.push(Violation {
                kind: "start at a stale epoch".into(),
                t_ms: 0,
                detail: format!("{c:?} started after epoch {newest}"),
            });
        }
        newest = newest.max(c.epoch);
    }
    v
}

/// The p-th percentile (0..=100) of `values`, nearest rank.
pub fn percentile(values: &[u64], p: usize) -> Option<u64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = (p * v.len()).div_ceil(100).max(1);
    v.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(node: &str, epoch: u64, pid: i32) -> Copy {
        Copy { node: node.into(), epoch, pid }
    }

    fn s(t_ms: u64, alive: Vec<Copy>) -> Sample {
        Sample { t_ms, alive }
    }

    #[test]
    fn a_clean_failover_is_an_outage_not_a_violation() {
        let h = [s(0, vec![]), s(10, vec![c("n1", 1, 5)]), s(20, vec![]), s(30, vec![]), s(40, vec![c("n2", 2, 6)])];
        let v = check(&h, &[c("n1", 1, 5), c("n2", 2, 6)]);
        assert!(v.violations.is_empty(), "{v:?}");
        assert_eq!(v.outages, vec![(20, 20)], "the wait before the first start is no outage");
    }

    #[test]
    fn two_live_copies_are_a_violation() {
        let two = vec![c("n1", 1, 5), c("n2", 2, 6)];
        let h = [s(0, vec![c("n1", 1, 5)]), s(10, two.clone()), s(20, two.clone()), s(30, two.clone())];
        let v = check(&h, &[]);
        assert_eq!(v.violations.len(), 1, "one stretch, one violation: {v:?}");
        assert_eq!(v.violations[0].t_ms, 10);
        assert!(v.violations[0].detail.contains("n2") && v.violations[0].detail.ends_with("for 20 ms"));
        // Apart again, then together again: a second one.
        let h = [s(10, two.clone()), s(20, vec![c("n2", 2, 6)]), s(30, two.clone())];
        assert_eq!(check(&h, &[]).violations.len(), 2);
    }

    #[test]
    fn a_start_at_an_older_epoch_is_a_violation() {
        let v = check(&[], &[c("n1", 1, 5), c("n2", 3, 6), c("n1", 3, 7), c("n1", 2, 8)]);
        assert_eq!(v.violations.len(), 1, "{v:?}");
        assert!(v.violations[0].detail.contains("epoch 3"));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v = [50, 10, 40, 20, 30];
        assert_eq!(percentile(&v, 50), Some(30));
        assert_eq!(percentile(&v, 99), Some(50));
        assert_eq!(percentile(&v, 0), Some(10));
        assert_eq!(percentile(&[], 50), None);
    }
}
