//! Whether an authenticated heartbeat is news: the replay and freshness
//! rule, on no clock but this node's own.
//!
//! - Replays: per sender, path (`via`) and destination address (`to_addr`),
//!   the `sent_ms` of a sending agent (pid, incarnation) must strictly grow;
//!   an equal or older one of the same agent is a replay.
//! - Freshness: a heartbeat counts as hearing its sender only if it echoes
//!   a `sent_ms` of this node's own incarnation sent at most `window` ago
//!   (our clock; the echo may have been learned over any path). Every
//!   start draws a new incarnation, so nothing recorded before a restart
//!   ever counts again.
//! - A heartbeat that is not fresh may still teach the sender's nonce (its
//!   incarnation and `sent_ms`, which we echo back): the handshake after
//!   either side starts, or after a silence. Once an incarnation of a peer
//!   was proven fresh, only a fresh heartbeat can replace it, so replays of
//!   an older incarnation neither count nor change what we echo.
//!
//! Pure: the caller passes its clock and what it sent; no I/O here.

use std::collections::HashMap;
use std::net::IpAddr;

use tandem_raft::NodeId;

use super::Heartbeat;

/// A sender, its path (`via`) and the destination address.
type PathKey = (NodeId, IpAddr, Option<IpAddr>);
/// A sending agent: (pid, incarnation).
type Agent = (u32, u64);

/// Incarnations of a peer whose replays are still recognised per path.
const INCARNATIONS_KEPT: usize = 4;

/// What a heartbeat (already authenticated) is to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fresh: it counts as hearing the sender on its path.
    Heard,
    /// Not fresh (or a probe), but no replay: it taught us the sender's
    /// nonce, or is a new agent's first word (a peer's start). Counts as
    /// nothing.
    Handshake,
    /// Its (incarnation, sent_ms) is not newer than the last one seen on
    /// its path: dropped.
    Replayed,
    /// It echoes nothing fresh and comes from an incarnation other than the
    /// one proven fresh: dropped.
    Stale,
}

/// The sender's nonce: what we echo back to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Nonce {
    pid: u32,
    incarnation: u64,
    sent_ms: u64,
    /// Proven fresh: a heartbeat of this incarnation echoed ours in time.
    confirmed: bool,
    /// The `sent_ms` of its newest heartbeat that counted as hearing it
    /// (0: none yet): what we acknowledge back.
    heard_ms: u64,
}

/// Replay and freshness state for every peer.
#[derive(Debug, Clone)]
pub struct Freshness {
    incarnation: u64,
    window_ms: u64,
    nonces: HashMap<NodeId, Nonce>,
    /// Newest sent_ms of each of the last few incarnations seen per
    /// (sender, path, destination), newest last: a replay of an incarnation
    /// just replaced is still recognised.
    last: HashMap<PathKey, Vec<(Agent, u64)>>,
}

impl Freshness {
    /// For an agent of `incarnation`, counting an echo older than `window`
    /// as stale.
    pub fn new(incarnation: u64, window: std::time::Duration) -> Freshness {
        Freshness {
            incarnation,
            window_ms: window.as_millis().min(u64::MAX as u128) as u64,
            nonces: HashMap::new(),
            last: HashMap::new(),
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Judges `hb`, arrived on `path`, at `now_ms` (our CLOCK_BOOTTIME),
    /// `max_sent_ms` being the newest `sent_ms` we sent; records what it
    /// teaches.
    pub fn judge(&mut self, hb: &Heartbeat, path: IpAddr, now_ms: u64, max_sent_ms: u64) -> Verdict {
        self.judge_and_reply(hb, path, now_ms, max_sent_ms).0
    }

    /// As [`judge`](Self::judge), and whether to answer the sender at once
    /// rather than at the next round: it does not know our nonce yet, so
    /// its next heartbeat could not count. After a restart the handshake
    /// then takes round trips, not rounds: a peer hears a restarted agent
    /// about as soon as it did before heartbeats were authenticated. Never
    /// for a heartbeat just heard: the acknowledgement it would carry
    /// comes at the next round, as before, so that the agent's lease is
    /// not back before the leader can have heard of it.
    pub fn judge_and_reply(&mut self, hb: &Heartbeat, path: IpAddr, now_ms: u64, max_sent_ms: u64) -> (Verdict, bool) {
        let key = (hb.from, path, hb.to_addr);
        let agent = (hb.pid, hb.incarnation);
        let seen = self.last.get(&key).and_then(|l| l.iter().find(|(a, _)| *a == agent));
        if seen.is_some_and(|(_, sent)| hb.sent_ms <= *sent) {
            return (Verdict::Replayed, false);
        }
        let fresh = hb.echo_incarnation == self.incarnation
            && hb.echo_ms != 0
            && hb.echo_ms <= max_sent_ms
            && now_ms.saturating_sub(hb.echo_ms) <= self.window_ms;
        let known = self.nonces.get(&hb.from).copied();
        let same = known.is_some_and(|n| (n.pid, n.incarnation) == agent);
        if !fresh && !same && known.is_some_and(|n| n.confirmed) {
            // A new agent of the peer says its first word with no echo:
            // it learns ours from our next heartbeat. Anything else is old.
            return if hb.echo_ms == 0 { (Verdict::Handshake, true) } else { (Verdict::Stale, false) };
        }
        let sent_ms = match known {
            Some(n) if same => n.sent_ms.max(hb.sent_ms),
            _ => hb.sent_ms,
        };
        let confirmed = fresh || (same && known.is_some_and(|n| n.confirmed));
        // A stepped-out node's probe proves its agent but is not heard.
        let heard = fresh && !hb.probe;
        let heard_before = known.filter(|_| same).map_or(0, |n| n.heard_ms);
        let heard_ms = if heard { heard_before.max(hb.sent_ms) } else { heard_before };
        let nonce = Nonce { pid: hb.pid, incarnation: hb.incarnation, sent_ms, confirmed, heard_ms };
        self.nonces.insert(hb.from, nonce);
        let l = self.last.entry(key).or_default();
        l.retain(|(a, _)| *a != agent);
        l.push((agent, hb.sent_ms));
        if l.len() > INCARNATIONS_KEPT {
            l.remove(0);
        }
        match heard {
            true => (Verdict::Heard, false),
            false => (Verdict::Handshake, !fresh),
        }
    }

    /// Takes the nonce of an unauthenticated heartbeat (a cluster without a
    /// key): newest wins within an incarnation, a new incarnation resets.
    pub fn learn_unauthenticated(&mut self, hb: &Heartbeat) {
        let new = Nonce { pid: hb.pid, incarnation: hb.incarnation, sent_ms: 0, confirmed: false, heard_ms: 0 };
        let n = self.nonces.entry(hb.from).or_insert(new);
        if (n.pid, n.incarnation) != (hb.pid, hb.incarnation) {
            *n = new;
        }
        n.sent_ms = n.sent_ms.max(hb.sent_ms);
    }

    /// What to echo to `id`: (its incarnation, its newest `sent_ms`, the
    /// `sent_ms` of its newest heartbeat that counted as hearing it).
    pub fn echo_for(&self, id: NodeId) -> (u64, u64, u64) {
        self.nonces.get(&id).map(|n| (n.incarnation, n.sent_ms, n.heard_ms)).unwrap_or((0, 0, 0))
    }

    /// Forgets a removed peer.
    pub fn forget(&mut self, id: NodeId) {
        self.nonces.remove(&id);
        self.last.retain(|(from, _, _), _| *from != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const ME: u64 = 1000;
    const WINDOW: Duration = Duration::from_millis(500);

    fn hb(incarnation: u64, sent_ms: u64, echo: (u64, u64)) -> Heartbeat {
        Heartbeat {
            cluster_id: "c".into(),
            from: 2,
            to: 1,
            pid: 42,
            version: "0.1.0".into(),
            sent_ms,
            echo_ms: echo.1,
            heard: vec![],
            incarnation,
            echo_incarnation: echo.0,
            ack_ms: echo.1,
            via: None,
            to_addr: None,
            probe: false,
            authenticates: true,
            ticket_ms: 0,
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn the_handshake_then_fresh_heartbeats_count_and_replays_do_not() {
        let mut f = Freshness::new(ME, WINDOW);
        // The peer's first word echoes nothing: it teaches its nonce only.
        assert_eq!(f.judge(&hb(7, 100, (0, 0)), ip(2), 5_000, 4_900), Verdict::Handshake);
        assert_eq!(f.echo_for(2), (7, 100, 0), "nothing heard to acknowledge");
        // It echoes what we sent 100 ms ago: heard.
        assert_eq!(f.judge(&hb(7, 200, (ME, 4_900)), ip(2), 5_000, 4_900), Verdict::Heard);
        assert_eq!(f.echo_for(2), (7, 200, 200));
        // The same datagram again, or an older one: replays.
        assert_eq!(f.judge(&hb(7, 200, (ME, 4_900)), ip(2), 5_010, 4_900), Verdict::Replayed);
        assert_eq!(f.judge(&hb(7, 150, (ME, 4_900)), ip(2), 5_010, 4_900), Verdict::Replayed);
        // The same round on another path is no replay.
        assert_eq!(f.judge(&hb(7, 200, (ME, 4_900)), ip(3), 5_010, 4_900), Verdict::Heard);
        // A later datagram whose echo is older than the window: not heard,
        // but its nonce is taught (one-way loss: it does not hear us).
        assert_eq!(f.judge(&hb(7, 300, (ME, 4_400)), ip(2), 5_000, 4_900), Verdict::Handshake);
        assert_eq!(f.echo_for(2), (7, 300, 200), "echoes 300, acknowledges 200 only");
        // An echo of a time we never sent, or of another incarnation of ours.
        assert_eq!(f.judge(&hb(7, 400, (ME, 5_500)), ip(2), 5_000, 4_900), Verdict::Handshake);
        assert_eq!(f.judge(&hb(7, 500, (ME + 1, 4_900)), ip(2), 5_000, 4_900), Verdict::Handshake);
    }

    #[test]
    fn an_old_incarnation_is_refused_once_a_new_one_is_proven() {
        let mut f = Freshness::new(ME, WINDOW);
        assert_eq!(f.judge(&hb(7, 200, (ME, 4_900)), ip(2), 5_000, 4_900), Verdict::Heard);
        // The peer restarts: its first word has no echo; it is not heard and
        // does not replace the proven incarnation.
        assert_eq!(f.judge(&hb(8, 10, (0, 0)), ip(2), 5_100, 5_000), Verdict::Handshake);
        assert_eq!(f.echo_for(2).0, 7);
        assert_eq!(f.echo_for(2).1, 200);
        // Having learnt our nonce, it is heard: incarnation 8 is proven.
        assert_eq!(f.judge(&hb(8, 110, (ME, 5_000)), ip(2), 5_150, 5_000), Verdict::Heard);
        assert_eq!(f.echo_for(2).0, 8);
        assert_eq!(f.echo_for(2).1, 110);
        // A captured datagram of incarnation 7 replayed now: stale.
        assert_eq!(f.judge(&hb(7, 300, (ME, 4_950)), ip(2), 5_600, 5_500), Verdict::Stale);
        assert_eq!(f.echo_for(2).0, 8);
        assert_eq!(f.echo_for(2).1, 110);
    }

    #[test]
    fn a_probe_proves_a_new_agent_but_is_never_heard() {
        let mut f = Freshness::new(ME, WINDOW);
        assert_eq!(f.judge(&hb(7, 200, (ME, 4_900)), ip(2), 5_000, 4_900), Verdict::Heard);
        // The peer restarted and stepped out at once: its probes echo us.
        let probe = |sent, echo| Heartbeat { probe: true, ..hb(8, sent, (ME, echo)) };
        assert_eq!(f.judge(&probe(10, 5_000), ip(2), 5_100, 5_000), Verdict::Handshake);
        assert_eq!(f.echo_for(2), (8, 10, 0), "taught, proven, but nothing to acknowledge");
        assert_eq!(f.judge(&hb(7, 300, (ME, 5_000)), ip(2), 5_600, 5_500), Verdict::Stale, "8 is proven");
        assert_eq!(f.judge(&hb(8, 110, (ME, 5_500)), ip(2), 5_600, 5_500), Verdict::Heard);
        assert_eq!(f.echo_for(2), (8, 110, 110));
    }

    #[test]
    fn a_restart_of_the_receiver_makes_old_datagrams_useless() {
        // Heartbeats the peer sent to our previous incarnation...
        let captured: Vec<Heartbeat> = (1..=5).map(|i| hb(7, i * 100, (ME, 4_000 + i * 100))).collect();
        let mut before = Freshness::new(ME, WINDOW);
        for h in &captured {
            assert_eq!(before.judge(h, ip(2), h.echo_ms + 50, h.echo_ms), Verdict::Heard);
        }
        // ...replayed to the new one, at any time: never heard.
        let mut after = Freshness::new(ME + 1, WINDOW);
        for h in &captured {
            assert_ne!(after.judge(h, ip(2), h.echo_ms + 50, h.echo_ms + 1_000), Verdict::Heard);
        }
    }

    proptest! {
        /// Whatever an attacker replays (any order, any time, to a receiver
        /// of the same or a later incarnation), a datagram counts as heard
        /// at most once per path, and only within the window of the echo.
        #[test]
        fn replays_never_count_twice_nor_late(
            sends in proptest::collection::vec((0u64..3, 1u64..1_000, 0u64..2_000, 0u8..2), 1..40),
            replays in proptest::collection::vec((0usize..40, 0u64..5_000, any::<bool>()), 0..80),
        ) {
            let mut f = Freshness::new(ME, WINDOW);
            let mut heard = std::collections::HashSet::new();
            let mut all = Vec::new();
            for (inc, sent, echo, path) in sends {
                let h = hb(inc, sent, (ME, echo));
                let now = echo + 100;
                let v = f.judge(&h, ip(path), now, now);
                if v == Verdict::Heard {
                    prop_assert!(heard.insert((inc, sent, path)), "heard twice: {inc} {sent} {path}");
                    prop_assert!(now - echo <= 500);
                }
                all.push((h, path));
            }
            let mut restarted = Freshness::new(ME + 1, WINDOW);
            for (i, delay, restart) in replays {
                let (h, path) = &all[i % all.len()];
                let now = h.echo_ms + delay;
                match restart {
                    true => prop_assert_ne!(restarted.judge(h, ip(*path), now, now), Verdict::Heard),
                    false => {
                        let v = f.judge(h, ip(*path), now, now);
                        if v == Verdict::Heard {
                            prop_assert!(heard.insert((h.incarnation, h.sent_ms, *path)), "a replay counted");
                            prop_assert!(delay <= 500);
                        }
                    }
                }
            }
        }
    }
}
