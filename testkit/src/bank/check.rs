//! The bank checker: pure, no I/O, no clock. It judges a history of
//! transfers and reads (times in ms since the workload began) together with
//! one last read of the database after the clients stopped, and measures
//! the outage a client saw after a fault.
//!
//! It must never excuse anything by timing: an acknowledged COMMIT is in
//! the final table or the run is broken. Only outcomes the client could not
//! know (the connection was lost during COMMIT) may go either way.

use std::collections::BTreeMap;
use std::fmt;

/// One transfer as the client attempted it (and as the `transfers` table
/// records it when it was made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub id: i64,
    pub from: i32,
    pub to: i32,
    pub amount: i64,
}

/// What the client knows of a transfer it attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The COMMIT was acknowledged: the transfer must survive anything.
    Ok,
    /// The balance did not cover it: rolled back by the client, not made.
    Declined,
    /// An error (or a timeout) before COMMIT was sent: the server cannot
    /// have committed it.
    Failed,
    /// The connection was lost (or timed out) during COMMIT, or COMMIT
    /// answered an error: it may or may not have been made.
    Unknown,
}

/// One operation of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Transfer {
        transfer: Transfer,
        outcome: Outcome,
        invoke_ms: u64,
        answer_ms: u64,
    },
    /// Every account's balance (index = account id), from one snapshot.
    Read {
        balances: Vec<i64>,
        invoke_ms: u64,
        answer_ms: u64,
    },
}

/// The database after the clients stopped: balances (index = account id)
/// and every row of `transfers`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub balances: Vec<i64>,
    pub transfers: Vec<Transfer>,
}

/// What the checker found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A read (or the final state) whose balances do not add up to the total.
    TotalChanged,
    /// A read with fewer or more accounts than were created.
    AccountsChanged,
    /// A balance below zero.
    Negative,
    /// A transfer whose COMMIT was acknowledged is not in the final table.
    AcknowledgedLost,
    /// A row of `transfers` no client attempted, or attempted with other
    /// accounts or amount, or a row twice.
    UnknownTransfer,
    /// A transfer the client knows was not committed is in the table.
    NotCommittedPresent,
    /// The final balances are not the initial ones plus the effect of
    /// exactly the transfers present.
    BalancesMismatch,
    /// A row one read of the table found, a later read did not.
    Vanished,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::TotalChanged => "bank total changed",
            Kind::AccountsChanged => "bank accounts changed",
            Kind::Negative => "bank balance negative",
            Kind::AcknowledgedLost => "acknowledged transfer lost",
            Kind::UnknownTransfer => "unknown transfer present",
            Kind::NotCommittedPresent => "uncommitted transfer present",
            Kind::BalancesMismatch => "final balances do not match the transfers",
            Kind::Vanished => "committed transfer vanished",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub kind: Kind,
    /// When it was seen (the read's answer; 0 for the final state).
    pub t_ms: u64,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {} ms: {}", self.kind.name(), self.t_ms, self.detail)
    }
}

/// Counts of the history, for a report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: usize,
    pub declined: usize,
    pub failed: usize,
    pub unknown: usize,
    /// Unknown transfers found made in the final table.
    pub unknown_present: usize,
    pub reads: usize,
}

/// Counts the history's outcomes against the final state.
pub fn counts(history: &[Op], last: &State) -> Counts {
    let present: std::collections::BTreeSet<i64> = last.transfers.iter().map(|t| t.id).collect();
    let mut c = Counts::default();
    for op in history {
        match op {
            Op::Read { .. } => c.reads += 1,
            Op::Transfer { transfer, outcome, .. } => match outcome {
                Outcome::Ok => c.ok += 1,
                Outcome::Declined => c.declined += 1,
                Outcome::Failed => c.failed += 1,
                Outcome::Unknown => {
                    c.unknown += 1;
                    c.unknown_present += usize::from(present.contains(&transfer.id));
                }
            },
        }
    }
    c
}

/// Checks the bank's invariants over `history` (any order), starting from
/// `initial` balances, against `last`, the database after the clients
/// stopped. Returns every violation (empty: the run kept them all).
pub fn check(initial: &[i64], history: &[Op], last: &State) -> Vec<Violation> {
    let mut out = Vec::new();
    let total: i64 = initial.iter().sum();
    let mut reads: Vec<(u64, &[i64])> = history
        .iter()
        .filter_map(|op| match op {
            Op::Read { balances, answer_ms, .. } => Some((*answer_ms, balances.as_slice())),
            Op::Transfer { .. } => None,
        })
        .collect();
    reads.sort_by_key(|(t, _)| *t);
    reads.push((0, &last.balances));
    for (t_ms, balances) in reads {
        let what = if std::ptr::eq(balances, last.balances.as_slice()) { "final state" } else { "read" };
        if balances.len() != initial.len() {
            out.push(Violation {
                kind: Kind::AccountsChanged,
                t_ms,
                detail: format!("{what} saw {} accounts, {} were created: {balances:?}", balances.len(), initial.len()),
            });
            continue;
        }
        let sum: i64 = balances.iter().sum();
        if sum != total {
            out.push(Violation {
                kind: Kind::TotalChanged,
                t_ms,
                detail: format!("{what} totals {sum}, not {total}: {balances:?}"),
            });
        }
        if let Some((account, b)) = balances.iter().enumerate().find(|(_, b)| **b < 0) {
            out.push(Violation {
                kind: Kind::Negative,
                t_ms,
                detail: format!("{what}: account {account} at {b}: {balances:?}"),
            });
        }
    }

    // What each id was attempted as; a client never reuses an id.
    let attempted: BTreeMap<i64, (Transfer, Outcome, u64)> = history
        .iter()
        .filter_map(|op| match op {
            Op::Transfer { transfer, outcome, answer_ms, .. } => Some((transfer.id, (*transfer, *outcome, *answer_ms))),
            Op::Read { .. } => None,
        })
        .collect();
    let mut present: BTreeMap<i64, Transfer> = BTreeMap::new();
    for row in &last.transfers {
        if present.insert(row.id, *row).is_some() {
            out.push(Violation { kind: Kind::UnknownTransfer, t_ms: 0, detail: format!("transfer {} twice", row.id) });
        }
        match attempted.get(&row.id) {
            None => out.push(Violation {
                kind: Kind::UnknownTransfer,
                t_ms: 0,
                detail: format!("{row:?} was never attempted"),
            }),
            Some((tried, _, _)) if tried != row => out.push(Violation {
                kind: Kind::UnknownTransfer,
                t_ms: 0,
                detail: format!("{row:?} was attempted as {tried:?}"),
            }),
            Some((_, outcome @ (Outcome::Failed | Outcome::Declined), at)) => out.push(Violation {
                kind: Kind::NotCommittedPresent,
                t_ms: *at,
                detail: format!("{row:?} is present, but the client saw it {outcome:?}"),
            }),
            Some(_) => {}
        }
    }
    for (id, (t, outcome, at)) in &attempted {
        if *outcome == Outcome::Ok && !present.contains_key(id) {
            out.push(Violation {
                kind: Kind::AcknowledgedLost,
                t_ms: *at,
                detail: format!("{t:?}, acknowledged at {at} ms, is not in the final table"),
            });
        }
    }

    // The final balances are the initial ones moved by exactly the rows
    // present (whatever the checks above found of those rows).
    let mut expected = initial.to_vec();
    for t in present.values() {
        for (account, delta) in [(t.from, -t.amount), (t.to, t.amount)] {
            match usize::try_from(account).ok().and_then(|a| expected.get_mut(a)) {
                Some(b) => *b += delta,
                None => out.push(Violation {
                    kind: Kind::UnknownTransfer,
                    t_ms: 0,
                    detail: format!("{t:?} names account {account}, which does not exist"),
                }),
            }
        }
    }
    if last.balances.len() == expected.len() && last.balances != expected {
        let differ: Vec<String> = expected
            .iter()
            .zip(&last.balances)
            .enumerate()
            .filter(|(_, (e, b))| e != b)
            .map(|(a, (e, b))| format!("account {a}: {b}, expected {e}"))
            .collect();
        out.push(Violation {
            kind: Kind::BalancesMismatch,
            t_ms: 0,
            detail: format!("{} transfers present; {}", present.len(), differ.join("; ")),
        });
    }
    out
}

/// Rows an earlier read of the table found that a later one does not:
/// nothing deletes a transfer, so a row once read was committed,
/// acknowledged or not, and must stay.
pub fn vanished(earlier: &State, later: &State) -> Vec<Violation> {
    let now: std::collections::BTreeSet<i64> = later.transfers.iter().map(|t| t.id).collect();
    earlier
        .transfers
        .iter()
        .filter(|t| !now.contains(&t.id))
        .map(|t| Violation {
            kind: Kind::Vanished,
            t_ms: 0,
            detail: format!("{t:?} was in the table at an earlier read and is gone"),
        })
        .collect()
}

/// The ms from `fault_ms` until the first COMMIT acknowledged of a
/// transfer begun at or after it (the outage a client saw: a transaction
/// already under way when the fault came says nothing of the service
/// after it); None when none came.
pub fn first_commit_after(history: &[Op], fault_ms: u64) -> Option<u64> {
    history
        .iter()
        .filter_map(|op| match op {
            Op::Transfer { outcome: Outcome::Ok, invoke_ms, answer_ms, .. } if *invoke_ms >= fault_ms => {
                Some(answer_ms - fault_ms)
            }
            _ => None,
        })
        .min()
}

/// The longest time between `from_ms` and `to_ms` with no COMMIT
/// acknowledged, counting from `from_ms` to the first and between
/// consecutive ones (not after the last). None when none came in the window.
/// After a partition the old primary may still commit for a while before
/// its lease lapses: this is the outage the failover itself caused.
pub fn longest_gap(history: &[Op], from_ms: u64, to_ms: u64) -> Option<u64> {
    let mut acks: Vec<u64> = history
        .iter()
        .filter_map(|op| match op {
            Op::Transfer { outcome: Outcome::Ok, answer_ms, .. } if (from_ms..=to_ms).contains(answer_ms) => {
                Some(*answer_ms)
            }
            _ => None,
        })
        .collect();
    acks.sort_unstable();
    let first = *acks.first()?;
    let between = acks.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    Some(between.max(first - from_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INITIAL: [i64; 3] = [100, 100, 100];

    fn t(id: i64, from: i32, to: i32, amount: i64) -> Transfer {
        Transfer { id, from, to, amount }
    }

    fn op(transfer: Transfer, outcome: Outcome, answer_ms: u64) -> Op {
        Op::Transfer { transfer, outcome, invoke_ms: answer_ms.saturating_sub(5), answer_ms }
    }

    fn read(balances: &[i64], answer_ms: u64) -> Op {
        Op::Read { balances: balances.to_vec(), invoke_ms: answer_ms.saturating_sub(2), answer_ms }
    }

    /// A history of every outcome, with the final state it leads to when
    /// the unknown transfer was made.
    fn good() -> (Vec<Op>, State) {
        let history = vec![
            read(&[100, 100, 100], 1),
            op(t(1, 0, 1, 30), Outcome::Ok, 10),
            read(&[70, 130, 100], 12),
            op(t(2, 1, 2, 500), Outcome::Declined, 20),
            op(t(3, 2, 0, 10), Outcome::Failed, 30),
            op(t(4, 2, 0, 40), Outcome::Unknown, 40),
            op(t(5, 1, 2, 5), Outcome::Unknown, 45),
            read(&[110, 130, 60], 50),
            op(t(6, 0, 2, 110), Outcome::Ok, 60),
            read(&[0, 130, 170], 70),
        ];
        let last =
            State { balances: vec![0, 130, 170], transfers: vec![t(1, 0, 1, 30), t(4, 2, 0, 40), t(6, 0, 2, 110)] };
        (history, last)
    }

    fn kinds(v: &[Violation]) -> Vec<Kind> {
        let mut k: Vec<Kind> = v.iter().map(|v| v.kind).collect();
        k.sort();
        k.dedup();
        k
    }

    #[test]
    fn a_good_history_passes() {
        let (history, last) = good();
        assert_eq!(check(&INITIAL, &history, &last), vec![]);
        let c = counts(&history, &last);
        assert_eq!((c.ok, c.declined, c.failed, c.unknown, c.unknown_present, c.reads), (2, 1, 1, 2, 1, 4));
    }

    #[test]
    fn an_unknown_transfer_may_be_absent_or_present() {
        let (mut history, _) = good();
        // Up to 45 ms: transfers 4 and 5 unknown, nothing read after them.
        history.retain(|o| match o {
            Op::Transfer { answer_ms, .. } | Op::Read { answer_ms, .. } => *answer_ms <= 45,
        });
        let absent = State { balances: vec![70, 130, 100], transfers: vec![t(1, 0, 1, 30)] };
        assert_eq!(check(&INITIAL, &history, &absent), vec![]);
        let both =
            State { balances: vec![110, 125, 65], transfers: vec![t(1, 0, 1, 30), t(4, 2, 0, 40), t(5, 1, 2, 5)] };
        assert_eq!(check(&INITIAL, &history, &both), vec![]);
        assert_eq!(counts(&history, &both).unknown_present, 2);
    }

    #[test]
    fn a_read_with_another_total_is_caught() {
        let (mut history, last) = good();
        history.push(read(&[70, 100, 100], 80));
        let v = check(&INITIAL, &history, &last);
        assert_eq!(kinds(&v), vec![Kind::TotalChanged]);
        assert_eq!(v[0].t_ms, 80);
    }

    #[test]
    fn a_negative_balance_is_caught() {
        let (mut history, last) = good();
        history.push(read(&[-10, 140, 170], 80));
        assert_eq!(kinds(&check(&INITIAL, &history, &last)), vec![Kind::Negative]);
    }

    #[test]
    fn a_read_missing_an_account_is_caught() {
        let (mut history, last) = good();
        history.push(read(&[130, 170], 80));
        assert_eq!(kinds(&check(&INITIAL, &history, &last)), vec![Kind::AccountsChanged]);
    }

    #[test]
    fn a_lost_acknowledged_transfer_is_caught() {
        let (history, mut last) = good();
        // Transfer 6 gone, balances consistent with the rows left.
        last.transfers.retain(|t| t.id != 6);
        last.balances = vec![110, 130, 60];
        let v = check(&INITIAL, &history, &last);
        assert_eq!(kinds(&v), vec![Kind::AcknowledgedLost]);
        assert!(v[0].detail.contains("id: 6"), "{v:?}");
    }

    #[test]
    fn a_transfer_never_attempted_is_caught() {
        let (history, mut last) = good();
        last.transfers.push(t(99, 1, 2, 10));
        last.balances = vec![0, 120, 180];
        assert_eq!(kinds(&check(&INITIAL, &history, &last)), vec![Kind::UnknownTransfer]);
    }

    #[test]
    fn a_transfer_with_other_accounts_or_amount_is_caught() {
        let (history, mut last) = good();
        last.transfers[1] = t(4, 2, 0, 41);
        last.balances = vec![1, 130, 169];
        assert_eq!(kinds(&check(&INITIAL, &history, &last)), vec![Kind::UnknownTransfer]);
    }

    #[test]
    fn a_failed_or_declined_transfer_present_is_caught() {
        let (history, mut last) = good();
        last.transfers.push(t(3, 2, 0, 10));
        last.balances = vec![10, 130, 160];
        let v = check(&INITIAL, &history, &last);
        assert_eq!(kinds(&v), vec![Kind::NotCommittedPresent]);
        let (history, mut last) = good();
        last.transfers.push(t(2, 1, 2, 500));
        last.balances = vec![0, -370, 670];
        assert_eq!(kinds(&check(&INITIAL, &history, &last)), vec![Kind::Negative, Kind::NotCommittedPresent]);
    }

    #[test]
    fn final_balances_that_do_not_match_the_rows_are_caught() {
        let (history, mut last) = good();
        // Same total, but as if transfer 6 had gone to account 1.
        last.balances = vec![0, 240, 60];
        let v = check(&INITIAL, &history, &last);
        assert_eq!(kinds(&v), vec![Kind::BalancesMismatch]);
        assert!(v[0].detail.contains("account 1: 240, expected 130"), "{v:?}");
    }

    #[test]
    fn a_final_state_with_another_total_is_caught() {
        let (history, mut last) = good();
        last.balances = vec![0, 130, 171];
        assert_eq!(kinds(&check(&INITIAL, &history, &last)), vec![Kind::TotalChanged, Kind::BalancesMismatch]);
    }

    #[test]
    fn a_row_twice_is_caught() {
        let (history, mut last) = good();
        last.transfers.push(t(1, 0, 1, 30));
        assert!(kinds(&check(&INITIAL, &history, &last)).contains(&Kind::UnknownTransfer));
    }

    #[test]
    fn a_row_gone_since_an_earlier_read_is_caught() {
        let (_, last) = good();
        let mut later = last.clone();
        later.transfers.push(t(7, 1, 0, 1));
        assert_eq!(vanished(&last, &later), vec![]);
        later.transfers.retain(|t| t.id != 4);
        let v = vanished(&last, &later);
        assert_eq!(kinds(&v), vec![Kind::Vanished]);
        assert!(v[0].detail.contains("id: 4"), "{v:?}");
    }

    #[test]
    fn the_outage_runs_from_the_fault_to_the_first_commit_begun_after_it() {
        let (history, _) = good();
        // Transfer 1 runs from 5 to 10 ms, transfer 6 from 55 to 60 ms.
        assert_eq!(first_commit_after(&history, 0), Some(10));
        assert_eq!(first_commit_after(&history, 5), Some(5));
        // Under way when the fault came: not counted.
        assert_eq!(first_commit_after(&history, 6), Some(54));
        // Unknown, failed and declined transfers are no sign of service.
        assert_eq!(first_commit_after(&history, 15), Some(45));
        assert_eq!(first_commit_after(&history, 56), None);
    }

    #[test]
    fn the_longest_gap_counts_from_the_fault_and_between_commits() {
        let mut history = vec![op(t(1, 0, 1, 1), Outcome::Ok, 105), op(t(2, 0, 1, 1), Outcome::Ok, 110)];
        history.push(op(t(3, 0, 1, 1), Outcome::Unknown, 500));
        history.push(op(t(4, 0, 1, 1), Outcome::Ok, 2110));
        history.push(op(t(5, 0, 1, 1), Outcome::Ok, 2115));
        assert_eq!(longest_gap(&history, 100, 5000), Some(2000));
        assert_eq!(longest_gap(&history, 0, 5000), Some(2000));
        assert_eq!(longest_gap(&history, 2112, 5000), Some(3));
        assert_eq!(longest_gap(&history, 2116, 5000), None);
    }
}
