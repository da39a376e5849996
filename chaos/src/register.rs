//! Linearizability of one register with unique written values: pure, no
//! I/O.
//!
//! The control-plane workload writes unique values to one key and reads it
//! back through different nodes; each operation has the time it was invoked
//! and the time its answer came (none when the outcome is unknown: a write
//! that timed out may or may not have happened). With unique values each
//! read names the write it saw, and linearizability is decided exactly by
//! "zones" (Gibbons & Korach; Golab, Li & Shah): group each write with the
//! reads of its value (a cluster); a cluster's zone runs from the earliest
//! answer in it to the latest invocation in it — a *forward* zone when that
//! answer comes first, else a *backward* one. The history is linearizable
//! iff no read answers before its write was invoked, no two forward zones
//! overlap, and no backward zone lies inside another cluster's forward zone.
//! Linear in practice, so hour-long histories check in moments.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Write(String),
    /// What the read returned (None: the key was absent).
    Read(Option<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub client: u32,
    pub kind: Kind,
    pub invoke_ms: u64,
    /// None: no answer (only for writes; a read without an answer says nothing).
    pub answer_ms: Option<u64>,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Linearizable,
    /// Why no order exists, with the operations that show it.
    Violation(String),
}

/// A register value as a person reads it: quoted, or "(absent)".
fn shown(v: &Option<String>) -> String {
    match v {
        Some(v) => format!("{v:?}"),
        None => "(absent)".into(),
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Write(v) => write!(f, "client {} wrote {v:?} (invoked {} ms, ", self.client, self.invoke_ms)?,
            Kind::Read(v) => write!(f, "client {} read {} (invoked {} ms, ", self.client, shown(v), self.invoke_ms)?,
        }
        match self.answer_ms {
            Some(a) => write!(f, "answered {a} ms)"),
            None => write!(f, "no answer)"),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Linearizable => write!(f, "linearizable"),
            Outcome::Violation(why) => write!(f, "not linearizable: {why}"),
        }
    }
}

struct Zone {
    value: Option<String>,
    /// Earliest answer, latest invocation in the cluster.
    first_answer: u64,
    last_invoke: u64,
}

impl Zone {
    fn forward(&self) -> bool {
        self.first_answer < self.last_invoke
    }
}

pub fn check(ops: &[Op]) -> Outcome {
    use std::collections::BTreeMap;
    // The initial (absent) value is a write that answered at time 0.
    let mut writes: BTreeMap<Option<String>, (u64, u64)> = BTreeMap::new();
    writes.insert(None, (0, 0));
    let mut reads: BTreeMap<Option<String>, Vec<&Op>> = BTreeMap::new();
    for o in ops {
        match &o.kind {
            Kind::Write(v) => {
                if writes.insert(Some(v.clone()), (o.invoke_ms, o.answer_ms.unwrap_or(u64::MAX))).is_some() {
                    return Outcome::Violation(format!(
                        "value {v:?} written twice: the workload must write unique values"
                    ));
                }
            }
            Kind::Read(v) => reads.entry(v.clone()).or_default().push(o),
        }
    }
    let mut zones = Vec::new();
    for (value, (w_invoke, w_answer)) in &writes {
        let rs = reads.remove(value).unwrap_or_default();
        // A write nobody read and whose outcome is unknown may never have
        // happened: it constrains nothing.
        if rs.is_empty() && *w_answer == u64::MAX {
            continue;
        }
        let mut z = Zone { value: value.clone(), first_answer: *w_answer, last_invoke: *w_invoke };
        for r in rs {
            let answer = r.answer_ms.unwrap_or(u64::MAX);
            if answer < *w_invoke {
                return Outcome::Violation(format!(
                    "a read of {} answered at {answer} ms, before its write was invoked at {w_invoke} ms: {r}",
                    shown(value)
                ));
            }
            z.first_answer = z.first_answer.min(answer);
            z.last_invoke = z.last_invoke.max(r.invoke_ms);
        }
        zones.push(z);
    }
    if let Some((value, rs)) = reads.into_iter().next() {
        let first = rs.first().map(|r| format!(": {r}")).unwrap_or_default();
        return Outcome::Violation(format!("read {}, a value never written{first}", shown(&value)));
    }
    let forward: Vec<&Zone> = zones.iter().filter(|z| z.forward()).collect();
    for (i, a) in forward.iter().enumerate() {
        for b in &forward[i + 1..] {
            if a.first_answer < b.last_invoke && b.first_answer < a.last_invoke {
                return Outcome::Violation(format!(
                    "values {} ({}..{} ms) and {} ({}..{} ms) were each read after the other was written",
                    shown(&a.value),
                    a.first_answer,
                    a.last_invoke,
                    shown(&b.value),
                    b.first_answer,
                    b.last_invoke
                ));
            }
        }
    }
    for f in &forward {
        for b in zones.iter().filter(|z| !z.forward() && z.value != f.value) {
            if f.first_answer < b.last_invoke && b.first_answer < f.last_invoke {
                return Outcome::Violation(format!(
                    "value {} ran entirely ({}..{} ms) while {} had to stay visible ({}..{} ms)",
                    shown(&b.value),
                    b.last_invoke,
                    b.first_answer,
                    shown(&f.value),
                    f.first_answer,
                    f.last_invoke
                ));
            }
        }
    }
    Outcome::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(client: u32, v: &str, inv: u64, ans: Option<u64>) -> Op {
        Op { client, kind: Kind::Write(v.into()), invoke_ms: inv, answer_ms: ans }
    }

    fn r(client: u32, v: Option<&str>, inv: u64, ans: u64) -> Op {
        Op { client, kind: Kind::Read(v.map(str::to_string)), invoke_ms: inv, answer_ms: Some(ans) }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            r(0, None, 0, 1),
            w(0, "a", 2, Some(3)),
            r(1, Some("a"), 4, 5),
            w(1, "b", 6, Some(7)),
            r(0, Some("b"), 8, 9),
        ];
        assert_eq!(check(&h), Outcome::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_not() {
        let h = [w(0, "a", 0, Some(1)), w(0, "b", 2, Some(3)), r(1, Some("a"), 4, 5)];
        assert!(matches!(check(&h), Outcome::Violation(_)));
    }

    #[test]
    fn concurrent_ops_may_take_either_order() {
        // The read overlaps the write of b: it may see a or b.
        let base = [w(0, "a", 0, Some(1)), w(0, "b", 2, Some(10))];
        for seen in ["a", "b"] {
            let mut h = base.to_vec();
            h.push(r(1, Some(seen), 3, 5));
            assert_eq!(check(&h), Outcome::Linearizable, "read {seen}");
        }
    }

    #[test]
    fn an_unknown_write_may_or_may_not_have_happened() {
        let lost = [w(0, "a", 0, Some(1)), w(0, "b", 2, None), r(1, Some("a"), 5, 6)];
        assert_eq!(check(&lost), Outcome::Linearizable, "b never happened");
        let late = [w(0, "a", 0, Some(1)), w(0, "b", 2, None), r(1, Some("b"), 50, 60)];
        assert_eq!(check(&late), Outcome::Linearizable, "b happened");
        // But it cannot flip back and forth.
        let flip = [w(0, "a", 0, Some(1)), w(0, "b", 2, None), r(1, Some("b"), 5, 6), r(1, Some("a"), 7, 8)];
        assert!(matches!(check(&flip), Outcome::Violation(_)));
    }

    #[test]
    fn a_value_never_written_is_a_violation() {
        assert!(matches!(check(&[r(0, Some("z"), 0, 1)]), Outcome::Violation(_)));
    }

    #[test]
    fn outcomes_read_as_text_not_rust_debug() {
        assert_eq!(check(&[]).to_string(), "linearizable");
        assert_eq!(
            check(&[r(0, Some("z"), 0, 1)]).to_string(),
            "not linearizable: read \"z\", a value never written: client 0 read \"z\" (invoked 0 ms, answered 1 ms)"
        );
        let flip = [w(0, "a", 0, Some(1)), w(0, "b", 2, None), r(1, Some("b"), 5, 6), r(1, None, 7, 8)];
        let why = check(&flip).to_string();
        assert!(why.contains("(absent)") && !why.contains("Some(") && !why.contains("None"), "{why}");
    }
}
