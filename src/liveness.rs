//! Node liveness over every network path, by UDP heartbeats.
//!
//! Every agent sends a small datagram to every peer on every address the peer
//! declares, from its own socket on the matching path, each heartbeat
//! interval. A path is up while datagrams arrive from it within the node
//! timeout; a node is offline only when all its paths are silent. Liveness is
//! observed, never replicated: each node keeps its own view, and the leader's
//! view drives decisions. Heartbeats also carry the agent's pid and version,
//! and which peers the sender hears (how long ago): a node keeps its lease
//! while a majority of voters hears it, so the leader counts it offline only
//! when no such majority can have heard it — also when the leader itself
//! cannot hear it but another voter can (two sites and a witness, the link
//! between the sites cut). This module must never decide anything from what
//! it observes.
//!
//! Heartbeats are authenticated. Once the replicated state holds a
//! heartbeat key, every datagram is a frame sealed with HMAC-SHA256
//! ([`frame`]); the receiver checks the tag before it parses anything, then
//! cluster and target, then replays and freshness ([`freshness`]): a
//! datagram counts as hearing its sender only if it echoes a heartbeat this
//! agent sent within the node timeout, by this agent's own clock and
//! incarnation. Forged, malformed, replayed and stale datagrams are dropped
//! and counted ([`HeartbeatDrops`]), and logged at most once per reason and
//! source address per 30 s. A node whose state has no key does not hold an
//! authenticated view: a node that has not applied its membership yet
//! drops everything (it has no identity); a cluster bootstrapped before
//! heartbeats were authenticated keeps plain JSON heartbeats, sent and
//! heard as before, until its leader — once every node is heard running a
//! version that seals — proposes a key (`Command::RotateHeartbeatKey`); a
//! node that has it refuses unsealed datagrams from then on. A stepped-out
//! node sends probes: never heard, they let it hear the others again. A
//! datagram whose sender does not know this agent's nonce yet is answered
//! at once ([`answer`]), so that a restart costs round trips, not rounds.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use tandem_raft::state::{socket_addr, NodeRecord};
use tandem_raft::NodeId;
use tokio::net::UdpSocket;

pub mod frame;
pub mod freshness;

use frame::{KeyRing, Refusal};
use freshness::{Freshness, Verdict};

/// Largest heartbeat datagram accepted (32 nodes' reports fit well below a
/// 1500-byte MTU).
pub const MAX_DATAGRAM: usize = 1400;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Heartbeat {
    pub cluster_id: String,
    pub from: NodeId,
    pub to: NodeId,
    pub pid: u32,
    pub version: String,
    /// When the sender sent it (its CLOCK_BOOTTIME, ms): echoed back.
    #[serde(default)]
    pub sent_ms: u64,
    /// The newest `sent_ms` the sender has received from the receiver: the
    /// receiver learns that it was heard (the lease needs both directions).
    #[serde(default)]
    pub echo_ms: u64,
    /// The peers the sender heard within the node timeout: (node, ms since).
    #[serde(default)]
    pub heard: Vec<(NodeId, u32)>,
    /// A number the sending agent drew at its start: with the pid, it tells
    /// a new agent (whose clock values start over) from the old one, also
    /// after a reboot that gave it the same pid.
    #[serde(default)]
    pub incarnation: u64,
    /// The receiver's incarnation that `echo_ms` belongs to: an echo counts
    /// only within the receiver's own incarnation.
    #[serde(default)]
    pub echo_incarnation: u64,
    /// The newest `sent_ms` of the receiver that the sender counted as
    /// hearing it (`echo_ms` may be newer: learnt from a datagram that
    /// proved nothing yet). The lease counts this one, so that an echo
    /// always means the peer heard us.
    #[serde(default)]
    pub ack_ms: u64,
    /// The sender's address this datagram left from: its path. Covered by
    /// the tag, so a datagram cannot be made to count for another path.
    #[serde(default)]
    pub via: Option<IpAddr>,
    /// The receiver's address it was sent to (replays are told apart per
    /// path and destination).
    #[serde(default)]
    pub to_addr: Option<IpAddr>,
    /// Sent by a stepped-out node: proves its incarnation fresh and teaches
    /// its nonce, but never counts as hearing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probe: bool,
    /// The sender seals heartbeats once the cluster has a key: the leader
    /// gives a cluster without one a key only when every node does.
    #[serde(default)]
    pub authenticates: bool,
    /// How long the sender (its site's leader) still holds the ticket
    /// between two sites, ms, counted from when it looked — after it had
    /// heard `ack_ms` (0: it does not hold it). See `crate::ticket::Gate`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ticket_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// This agent process's incarnation (see [`Heartbeat::incarnation`]).
pub fn incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(crate::clock::boot_id().as_bytes());
        h.write_u32(std::process::id());
        h.finish()
    })
}

#[derive(Debug, Clone)]
struct PeerSeen {
    pid: u32,
    incarnation: u64,
    version: String,
    authenticates: bool,
    /// The newest of our `sent_ms` it echoed: it heard us then.
    acked_ms: u64,
    /// From our heartbeat at `acked_ms` to its first heartbeat that
    /// acknowledged it (for the metrics; its sending period included).
    round_trip_ms: Option<u64>,
    /// The acknowledgement `round_trip_ms` was measured on.
    round_trip_ack: u64,
    /// Last heartbeat per source address.
    paths: HashMap<IpAddr, Instant>,
    /// When (our clock, latest possible) it last heard each other node, as
    /// it reported: the report's arrival minus the age it gave.
    hears: HashMap<NodeId, Instant>,
    /// When this agent (pid, incarnation) was first heard: a report of one
    /// that started less than a node timeout ago says nothing of who it
    /// has not heard (it has not been listening that long).
    since: Instant,
}

/// What this node has heard from its peers.
pub struct Liveness {
    started: Instant,
    timeout: Duration,
    seen: Mutex<HashMap<NodeId, PeerSeen>>,
    /// The newest `sent_ms` this agent put in a heartbeat: an echo of a
    /// later one was never sent by this agent (a peer still echoing what
    /// the agent of a previous boot sent) and proves nothing.
    sent_ms: std::sync::atomic::AtomicU64,
    /// Replays, freshness, and the peers' nonces we echo.
    freshness: Mutex<Freshness>,
    drops: DropCounters,
    /// The site's ticket as heartbeats carry it.
    ticket: Mutex<TicketBeacon>,
}

/// What this node's heartbeats say about the ticket, and what the
/// leader's told it.
#[derive(Debug, Default)]
struct TicketBeacon {
    /// Held here (this node leads its site and holds it) until then,
    /// CLOCK_BOOTTIME ms; 0: not.
    held_until_ms: u64,
    gate: crate::ticket::Gate,
}

/// Why a received datagram was dropped, counted per reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Its tag is wrong, or it is unsealed while this node holds a key.
    Forged,
    /// Not newer than the last datagram of its sender on its path.
    Replayed,
    /// It proves no recent exchange (see `freshness`).
    Stale,
    /// Not a frame, or not a heartbeat.
    Malformed,
    /// Sealed under a key this node does not hold (yet).
    UnknownKey,
    /// Authentic, but for another cluster or node.
    Misdirected,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Forged => "forged",
            DropReason::Replayed => "replayed",
            DropReason::Stale => "stale",
            DropReason::Malformed => "malformed",
            DropReason::UnknownKey => "unknown_key",
            DropReason::Misdirected => "misdirected",
        }
    }
}

impl From<Refusal> for DropReason {
    fn from(r: Refusal) -> DropReason {
        match r {
            Refusal::Malformed => DropReason::Malformed,
            Refusal::UnknownKey => DropReason::UnknownKey,
            Refusal::Forged => DropReason::Forged,
        }
    }
}

/// Datagrams dropped since this agent started, per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeartbeatDrops {
    pub forged: u64,
    pub replayed: u64,
    pub stale: u64,
    pub malformed: u64,
    pub unknown_key: u64,
    pub misdirected: u64,
}

#[derive(Default)]
struct DropCounters([std::sync::atomic::AtomicU64; 6]);

impl DropCounters {
    fn count(&self, r: DropReason) {
        self.0[r as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self) -> HeartbeatDrops {
        let g = |r: DropReason| self.0[r as usize].load(std::sync::atomic::Ordering::Relaxed);
        HeartbeatDrops {
            forged: g(DropReason::Forged),
            replayed: g(DropReason::Replayed),
            stale: g(DropReason::Stale),
            malformed: g(DropReason::Malformed),
            unknown_key: g(DropReason::UnknownKey),
            misdirected: g(DropReason::Misdirected),
        }
    }
}

/// At most one log line per (reason, source address) per `period`, for at
/// most `MAX_SOURCES` sources at once: a flood of dropped datagrams, even
/// from spoofed addresses, cannot flood the log. Pure: `now` is passed in.
pub struct LogLimiter {
    period: Duration,
    last: HashMap<(DropReason, IpAddr), Instant>,
}

impl LogLimiter {
    const MAX_SOURCES: usize = 256;

    pub fn new(period: Duration) -> LogLimiter {
        LogLimiter { period, last: HashMap::new() }
    }

    /// Whether a drop for `reason` from `from` at `now` gets a log line.
    pub fn allow(&mut self, reason: DropReason, from: IpAddr, now: Instant) -> bool {
        if let Some(t) = self.last.get(&(reason, from)) {
            if now.saturating_duration_since(*t) < self.period {
                return false;
            }
        }
        if self.last.len() >= Self::MAX_SOURCES {
            let period = self.period;
            self.last.retain(|_, t| now.saturating_duration_since(*t) < period);
            if self.last.len() >= Self::MAX_SOURCES {
                return false;
            }
        }
        self.last.insert((reason, from), now);
        true
    }
}

/// One peer's liveness as seen from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub alive: bool,
    /// Silence so far (zero when alive); counted from this agent's start
    /// when never heard.
    pub down_for: Duration,
    pub pid: Option<u32>,
    pub version: Option<String>,
    /// For each declared address: time since its last heartbeat.
    pub paths: Vec<(String, Option<Duration>)>,
    /// In a view by quorum: since a majority of voters last heard it (its
    /// lease can last at most `lease_ms` past that). None otherwise, or
    /// never heard so.
    pub heard_by_quorum_ago: Option<Duration>,
}

impl Liveness {
    pub fn new(timeout: Duration) -> Arc<Liveness> {
        Liveness::new_at(timeout, Instant::now(), incarnation())
    }

    /// A view that starts at `started` (a never-heard peer counts its
    /// silence from there), for an agent of `incarnation`: the simulator's
    /// clock and agents.
    pub fn new_at(timeout: Duration, started: Instant, incarnation: u64) -> Arc<Liveness> {
        Arc::new(Liveness {
            started,
            timeout,
            seen: Mutex::new(HashMap::new()),
            sent_ms: 0.into(),
            // An echo older than the node timeout proves nothing: a
            // datagram delayed (or held back and replayed) longer is stale.
            freshness: Mutex::new(Freshness::new(incarnation, timeout)),
            drops: DropCounters::default(),
            ticket: Mutex::default(),
        })
    }

    fn freshness(&self) -> std::sync::MutexGuard<'_, Freshness> {
        self.freshness.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in an authenticated heartbeat that arrived from `observed` at
    /// `now` (`now_ms` on CLOCK_BOOTTIME): it counts as hearing its sender
    /// on its path (`via`, which the tag covers) only if fresh and no
    /// replay (see [`freshness`]). Replays and stale ones are counted.
    /// Also says whether to answer the sender at once
    /// ([`Freshness::judge_and_reply`]).
    pub fn receive(&self, hb: Heartbeat, observed: IpAddr, now: Instant, now_ms: u64) -> (Verdict, bool) {
        let path = hb.via.unwrap_or(observed);
        let max_sent = self.sent_ms.load(std::sync::atomic::Ordering::SeqCst);
        let (verdict, reply) = self.freshness().judge_and_reply(&hb, path, now_ms, max_sent);
        match verdict {
            Verdict::Heard => {
                let (ack, from) = (hb.ack_ms, hb.from);
                if hb.ticket_ms > 0 && ack <= max_sent {
                    self.ticket().gate.heard(ack, hb.ticket_ms);
                }
                self.hear(hb, path, ack, now);
                self.note_round_trip(from, ack, now_ms);
            }
            Verdict::Replayed => self.count_drop(DropReason::Replayed),
            Verdict::Stale => self.count_drop(DropReason::Stale),
            Verdict::Handshake => {}
        }
        (verdict, reply)
    }

    fn ticket(&self) -> std::sync::MutexGuard<'_, TicketBeacon> {
        self.ticket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node leads its site and holds the ticket until `until_ms`
    /// (CLOCK_BOOTTIME; 0: it does not): its heartbeats say so, and its own
    /// gate opens as far.
    pub fn set_ticket_held_until(&self, until_ms: u64, now_ms: u64) {
        let mut t = self.ticket();
        t.held_until_ms = until_ms;
        if until_ms > now_ms {
            t.gate.held_here(now_ms, until_ms - now_ms);
        }
    }

    /// The ticket gate as heartbeats (and the holder here) opened it.
    pub fn ticket_gate(&self) -> crate::ticket::Gate {
        self.ticket().gate
    }

    /// Reopens the gate as far as an agent before this one had it open.
    pub fn restore_ticket_gate(&self, open_until_ms: u64) {
        self.ticket().gate = crate::ticket::Gate::new(open_until_ms);
    }

    /// Takes `now_ms` as the `sent_ms` of heartbeats about to be sent, if
    /// it is later than every one sent so far: a receiver drops a `sent_ms`
    /// it already saw on a path as a replay. None: one went out this very
    /// millisecond.
    pub fn claim_sent_ms(&self, now_ms: u64) -> Option<u64> {
        let prev = self.sent_ms.fetch_max(now_ms, std::sync::atomic::Ordering::SeqCst);
        (now_ms > prev).then_some(now_ms)
    }

    /// Counts a dropped datagram.
    pub fn count_drop(&self, reason: DropReason) {
        self.drops.count(reason);
    }

    /// The datagrams dropped so far, per reason.
    pub fn drops(&self) -> HeartbeatDrops {
        self.drops.get()
    }

    /// Whether every one of `ids` is heard now, sending a version that
    /// authenticates heartbeats once the cluster has a key.
    pub fn all_authenticate(&self, ids: impl IntoIterator<Item = NodeId>, now: Instant) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        ids.into_iter().all(|id| {
            seen.get(&id).is_some_and(|p| {
                p.authenticates
                    && p.paths.values().max().is_some_and(|t| now.saturating_duration_since(*t) < self.timeout)
            })
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Takes in an unauthenticated heartbeat received from address `from`
    /// at `now`, as heard: only in a cluster that has no heartbeat key yet
    /// (bootstrapped by an older version, until the leader gives it one).
    pub fn record(&self, hb: Heartbeat, from: IpAddr, now: Instant) {
        self.freshness().learn_unauthenticated(&hb);
        let ack = hb.echo_ms;
        self.hear(hb, from, ack, now)
    }

    /// Counts `hb` as hearing its sender on path `from` at `now`; it heard
    /// our heartbeat sent at `ack_ms`.
    fn hear(&self, hb: Heartbeat, from: IpAddr, ack_ms: u64, now: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let entry = seen.entry(hb.from).or_insert_with(|| PeerSeen {
            pid: hb.pid,
            incarnation: hb.incarnation,
            version: hb.version.clone(),
            authenticates: hb.authenticates,
            acked_ms: 0,
            round_trip_ms: None,
            round_trip_ack: 0,
            paths: HashMap::new(),
            hears: HashMap::new(),
            since: now,
        });
        if entry.pid != hb.pid || entry.incarnation != hb.incarnation {
            // A restarted agent: its clock values start over (after a
            // reboot, CLOCK_BOOTTIME itself does).
            entry.since = now;
        }
        entry.pid = hb.pid;
        entry.incarnation = hb.incarnation;
        entry.version = hb.version;
        entry.authenticates = hb.authenticates;
        if ack_ms <= self.sent_ms.load(std::sync::atomic::Ordering::SeqCst) {
            entry.acked_ms = entry.acked_ms.max(ack_ms);
        }
        entry.paths.insert(from, now);
        for (about, ago) in hb.heard {
            let at = now.checked_sub(Duration::from_millis(ago.into())).unwrap_or(now);
            let t = entry.hears.entry(about).or_insert(at);
            *t = (*t).max(at);
        }
    }

    /// Notes the round trip of our heartbeat sent at `ack_ms` (CLOCK_BOOTTIME)
    /// if `from`'s heartbeat arriving at `now_ms` is the first to acknowledge it.
    fn note_round_trip(&self, from: NodeId, ack_ms: u64, now_ms: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = seen.get_mut(&from) {
            if ack_ms > 0 && ack_ms == p.acked_ms && p.round_trip_ack != ack_ms {
                p.round_trip_ack = ack_ms;
                p.round_trip_ms = Some(now_ms.saturating_sub(ack_ms));
            }
        }
    }

    /// The last measured heartbeat round trip to `id`.
    pub fn round_trip(&self, id: NodeId) -> Option<Duration> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&id).and_then(|p| p.round_trip_ms).map(Duration::from_millis)
    }

    /// What this node reports hearing: every peer heard within the timeout.
    pub fn heard_report(&self, now: Instant) -> Vec<(NodeId, u32)> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(NodeId, u32)> = seen
            .iter()
            .filter_map(|(id, p)| {
                let ago = now.saturating_duration_since(*p.paths.values().max()?);
                (ago < self.timeout).then(|| (*id, ago.as_millis().min(u32::MAX as u128) as u32))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// The newest time by which enough voters had heard `id` for it to hold
    /// its lease (a majority of `voters`, `id` itself counting when it is
    /// one): this node's own hearing for itself (`me`), the others' reports
    /// for them. None if no such majority ever heard it.
    pub fn heard_by_quorum(&self, id: NodeId, voters: &[NodeId], me: NodeId, now: Instant) -> Option<Instant> {
        self.heard_by_quorum_within(id, voters, me, None, now)
    }

    /// Whether a voter whose last report came at `last_report` is taken as
    /// unknown (it may have heard anyone since): `stale_after` is the bound
    /// and whether a voter never heard counts as stale.
    fn stale_reporter(&self, reporter: Option<&PeerSeen>, stale_after: Option<(Duration, bool)>, now: Instant) -> bool {
        let Some((d, never_heard_is_stale)) = stale_after else { return false };
        match reporter.and_then(|p| Some((p.paths.values().max().copied()?, p.since))) {
            None => never_heard_is_stale,
            // A new agent has not listened long enough for its reports to
            // say whom it does not hear.
            Some((last, since)) => {
                now.saturating_duration_since(last) >= d || now.saturating_duration_since(since) < self.timeout
            }
        }
    }

    /// As [`heard_by_quorum`](Self::heard_by_quorum); with `stale_after`,
    /// a voter from which nothing arrived for that long (or ever, with the
    /// flag) may have heard `id` since, unknown to us: it counts as hearing
    /// it now.
    fn heard_by_quorum_within(
        &self,
        id: NodeId,
        voters: &[NodeId],
        me: NodeId,
        stale_after: Option<(Duration, bool)>,
        now: Instant,
    ) -> Option<Instant> {
        let majority = voters.len() / 2 + 1;
        let need = majority - usize::from(voters.contains(&id));
        if need == 0 {
            return Some(now);
        }
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut times: Vec<Instant> = voters
            .iter()
            .filter(|v| **v != id)
            .filter_map(|v| match *v == me {
                true => seen.get(&id).and_then(|p| p.paths.values().max().copied()),
                false => {
                    let reporter = seen.get(v);
                    match self.stale_reporter(reporter, stale_after, now) {
                        true => Some(now),
                        false => reporter.and_then(|p| p.hears.get(&id).copied()),
                    }
                }
            })
            .collect();
        times.sort_unstable_by(|a, b| b.cmp(a));
        times.get(need - 1).copied()
    }

    /// The heartbeat `me` sends to `to` in a round sent at `sent_ms`
    /// (CLOCK_BOOTTIME), with `heard`, the round's `heard_report`.
    pub fn heartbeat_to(
        &self,
        cluster_id: &str,
        me: NodeId,
        to: NodeId,
        pid: u32,
        sent_ms: u64,
        heard: &[(NodeId, u32)],
    ) -> Heartbeat {
        self.sent_ms.fetch_max(sent_ms, std::sync::atomic::Ordering::SeqCst);
        let (echo_incarnation, echo_ms, ack_ms) = self.freshness().echo_for(to);
        // Read after the echo: the receiver counts it from `ack_ms`.
        let held_until = self.ticket().held_until_ms;
        let ticket_ms = if held_until > 0 { held_until.saturating_sub(crate::clock::now_boot_ms()) } else { 0 };
        Heartbeat {
            cluster_id: cluster_id.to_string(),
            from: me,
            to,
            pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            sent_ms,
            echo_ms,
            heard: heard.to_vec(),
            incarnation: self.freshness().incarnation(),
            echo_incarnation,
            ack_ms,
            via: None,
            to_addr: None,
            probe: false,
            authenticates: true,
            ticket_ms,
        }
    }

    /// What to echo to `id`: the newest `sent_ms` learnt from it.
    pub fn echo_for(&self, id: NodeId) -> u64 {
        self.freshness().echo_for(id).1
    }

    /// The heartbeat a stepped-out node sends `to` instead of
    /// [`heartbeat_to`](Self::heartbeat_to)'s: a probe is never heard (the
    /// node stays silent: its lease lapses, its groups move), but it
    /// teaches its nonce, so that the node can hear the others again.
    pub fn probe_to(&self, cluster_id: &str, me: NodeId, to: NodeId, pid: u32, sent_ms: u64) -> Heartbeat {
        Heartbeat { probe: true, ..self.heartbeat_to(cluster_id, me, to, pid, sent_ms, &[]) }
    }

    /// When (our CLOCK_BOOTTIME, ms) we sent the newest heartbeat `id` has
    /// told us it heard; None if it never has.
    pub fn acked_ms(&self, id: NodeId) -> Option<u64> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&id).map(|p| p.acked_ms).filter(|ms| *ms > 0)
    }

    /// When any path of `id` was last heard.
    pub fn last_heard(&self, id: NodeId) -> Option<Instant> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&id).and_then(|p| p.paths.values().max().copied())
    }

    /// Forgets a peer (after it is removed).
    pub fn forget(&self, id: NodeId) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        self.freshness().forget(id);
    }

    /// Whether this node (`me`) is cut off from `leader`: it has not heard
    /// it within the timeout, while a majority of voters has.
    /// A voter whose reports stopped coming (`stale_after`) may hear the
    /// leader: with five voters and two sites, the voters across the cut
    /// are only heard of through the witness, and without them no majority
    /// would ever be seen hearing the leader — the far side would keep its
    /// leases (through its own voters and the witness) while the leader's
    /// side moved its groups.
    pub fn cut_off_from(
        &self,
        leader: NodeId,
        addresses: &[String],
        voters: &[NodeId],
        me: NodeId,
        stale_after: Duration,
        now: Instant,
    ) -> bool {
        // A voter never heard is not counted: at start nobody is heard yet.
        leader != me
            && !self.status(leader, addresses, now).alive
            && self.status_by_quorum(leader, addresses, voters, me, Some((stale_after, false)), now).alive
    }

    /// The leader's view of `id`: its paths as heard from here, but alive
    /// (and silent since) by what a majority of voters heard.
    pub fn quorum_status(
        &self,
        id: NodeId,
        addresses: &[String],
        voters: &[NodeId],
        me: NodeId,
        now: Instant,
    ) -> PeerStatus {
        self.status_by_quorum(id, addresses, voters, me, None, now)
    }

    /// The view the leader's failover acts on: as
    /// [`quorum_status`](Self::quorum_status), but a voter whose reports
    /// stopped arriving `stale_after` ago (or never came) may have heard
    /// `id` since, and so counts as hearing it now. A leader that heard
    /// nobody for a while — its own inbound traffic lost, or back from an
    /// isolation shorter than an election — then takes nobody for silent
    /// (and fences nobody) until fresh reports say so; its stale view would
    /// otherwise show every node silent while they all held their leases.
    /// A dead voter costs nothing where a quorum remains: the others'
    /// reports still make a majority.
    pub fn failover_status(
        &self,
        id: NodeId,
        addresses: &[String],
        voters: &[NodeId],
        me: NodeId,
        stale_after: Duration,
        now: Instant,
    ) -> PeerStatus {
        // Never heard counts as stale too: a leader that just started has
        // heard nobody yet, and must take nobody for silent.
        self.status_by_quorum(id, addresses, voters, me, Some((stale_after, true)), now)
    }

    /// `id`'s paths as heard from here, alive (and silent since) by what a
    /// majority of voters heard, stale reporters taken as
    /// [`heard_by_quorum_within`](Self::heard_by_quorum_within) says.
    fn status_by_quorum(
        &self,
        id: NodeId,
        addresses: &[String],
        voters: &[NodeId],
        me: NodeId,
        stale_after: Option<(Duration, bool)>,
        now: Instant,
    ) -> PeerStatus {
        let mut s = self.status(id, addresses, now);
        let heard = self.heard_by_quorum_within(id, voters, me, stale_after, now);
        let since = now.saturating_duration_since(heard.unwrap_or(self.started));
        s.alive = heard.is_some() && since < self.timeout;
        s.down_for = if s.alive { Duration::ZERO } else { since };
        s.heard_by_quorum_ago = heard.map(|h| now.saturating_duration_since(h));
        s
    }

    pub fn status(&self, id: NodeId, addresses: &[String], now: Instant) -> PeerStatus {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let peer = seen.get(&id);
        let paths: Vec<(String, Option<Duration>)> = addresses
            .iter()
            .map(|a| {
                let last = a.parse::<IpAddr>().ok().and_then(|ip| peer.and_then(|p| p.paths.get(&ip)));
                (a.clone(), last.map(|t| now.saturating_duration_since(*t)))
            })
            .collect();
        let newest = peer.and_then(|p| p.paths.values().max().copied());
        let since = now.saturating_duration_since(newest.unwrap_or(self.started));
        let alive = newest.is_some() && since < self.timeout;
        PeerStatus {
            alive,
            down_for: if alive { Duration::ZERO } else { since },
            pid: peer.map(|p| p.pid),
            version: peer.map(|p| p.version.clone()),
            paths,
            heard_by_quorum_ago: None,
        }
    }
}

/// The TOS / traffic class byte of heartbeats: DSCP CS6 (48, "network
/// control"), which routers with QoS serve before bulk traffic.
const HEARTBEAT_TOS: libc::c_int = 48 << 2;
/// The socket priority of heartbeats: TC_PRIO_INTERACTIVE, the first band
/// of Linux's default pfifo_fast and of prio qdiscs (the highest a process
/// may set without CAP_NET_ADMIN).
const HEARTBEAT_PRIORITY: libc::c_int = 6;

/// Marks a heartbeat socket's datagrams so that a queue that can tell them
/// apart sends them before bulk data (volume replication, Raft snapshots)
/// on a slow link: late heartbeats end leases of live nodes. A plain FIFO
/// bottleneck cannot tell them apart; nothing on the hosts helps there.
fn mark_urgent(s: &UdpSocket, v6: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: a valid socket fd and a pointer to an int that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // The TOS first: setting it also resets the priority (from its old
    // TOS bits, which CS6 does not use).
    match v6 {
        true => set(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, HEARTBEAT_TOS)?,
        false => set(libc::IPPROTO_IP, libc::IP_TOS, HEARTBEAT_TOS)?,
    }
    set(libc::SOL_SOCKET, libc::SO_PRIORITY, HEARTBEAT_PRIORITY)
}

/// The UDP side: one socket per local path.
pub struct HeartbeatSockets {
    sockets: Vec<Arc<UdpSocket>>,
}

impl HeartbeatSockets {
    pub async fn bind(addresses: &[String], port: u16) -> std::io::Result<HeartbeatSockets> {
        let mut sockets = Vec::new();
        for a in addresses {
            let addr: SocketAddr = socket_addr(a, port)
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{a}: {e}")))?;
            let s = UdpSocket::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("heartbeat socket udp://{addr}: {e}")))?;
            if let Err(e) = mark_urgent(&s, addr.is_ipv6()) {
                tracing::warn!("heartbeat socket udp://{addr}: cannot mark its datagrams urgent: {e}");
            }
            sockets.push(Arc::new(s));
        }
        Ok(HeartbeatSockets { sockets })
    }

    /// Receives heartbeats forever, for whom `identity` says this node is
    /// now (None: not a member yet, everything is dropped unseen).
    pub fn spawn_receivers(
        &self,
        liveness: Arc<Liveness>,
        identity: impl Fn() -> Option<Identity> + Send + Sync + Clone + 'static,
    ) {
        let limiter = Arc::new(Mutex::new(LogLimiter::new(DROP_LOG_PERIOD)));
        let answered = Arc::new(Mutex::new(AnswerLimiter::default()));
        for s in &self.sockets {
            let s = s.clone();
            let liveness = liveness.clone();
            let identity = identity.clone();
            let limiter = limiter.clone();
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_DATAGRAM + 1];
                loop {
                    let Ok((n, from)) = s.recv_from(&mut buf).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Some(id) = identity() else { continue };
                    let now = Instant::now();
                    let now_ms = crate::clock::now_boot_ms();
                    let dropped = match take_in(&liveness, &id, &buf[..n], from.ip(), now, now_ms) {
                        Ok(false) => continue,
                        Ok(true) => {
                            // Answered on the path it came by, to where it came
                            // from, a few times per peer per round at most.
                            let to = heartbeat_sender(&buf[..n]);
                            let due =
                                to.is_some_and(|to| answered.lock().unwrap_or_else(|e| e.into_inner()).allow(to, now));
                            let via = s.local_addr().map(|a| a.ip());
                            if let (true, Some(to), Ok(via)) = (due, to, via) {
                                let sent_ms = loop {
                                    if let Some(ms) = liveness.claim_sent_ms(crate::clock::now_boot_ms()) {
                                        break ms;
                                    }
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                };
                                let pid = std::process::id();
                                if let Some(d) = answer(&liveness, &id, (to, via, from.ip()), pid, now, sent_ms) {
                                    let _ = s.send_to(&d, from).await;
                                }
                            }
                            continue;
                        }
                        Err(reason) => reason,
                    };
                    if limiter.lock().unwrap_or_else(|e| e.into_inner()).allow(dropped, from.ip(), now) {
                        // Never the datagram's bytes: a log line shows no key material.
                        tracing::warn!(
                            from = %from,
                            reason = dropped.as_str(),
                            "heartbeat dropped ({}); more from this address for this reason are counted, not logged, for {} s",
                            dropped.as_str(),
                            DROP_LOG_PERIOD.as_secs()
                        );
                    }
                }
            });
        }
    }

    /// Sends one round of heartbeats to every peer on every path, sealed
    /// with `key` (unsealed JSON without one: a cluster whose state has no
    /// key yet); `probe`: a stepped-out node's probes instead.
    pub async fn send_round(
        &self,
        nodes: &BTreeMap<NodeId, NodeRecord>,
        cluster_id: &str,
        me: NodeId,
        liveness: &Liveness,
        key: Option<&frame::Key>,
        probe: bool,
    ) {
        let pid = std::process::id();
        // Later than any answer sent in this very millisecond (see
        // `Liveness::claim_sent_ms`).
        let sent_ms = loop {
            if let Some(ms) = liveness.claim_sent_ms(crate::clock::now_boot_ms()) {
                break ms;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let heard = liveness.heard_report(Instant::now());
        for node in nodes.values().filter(|n| n.id != me) {
            let hb = match probe {
                true => liveness.probe_to(cluster_id, me, node.id, pid, sent_ms),
                false => liveness.heartbeat_to(cluster_id, me, node.id, pid, sent_ms, &heard),
            };
            for (i, a) in node.addresses.iter().enumerate() {
                let Ok(dest) = socket_addr(a, node.port).parse::<SocketAddr>() else {
                    continue;
                };
                // Path i goes out of our socket i, so each path is tested on
                // its own wire; extra peer paths share our last socket.
                let Some(sock) = self.sockets.get(i.min(self.sockets.len().saturating_sub(1))) else {
                    continue;
                };
                let hb =
                    Heartbeat { via: sock.local_addr().ok().map(|a| a.ip()), to_addr: Some(dest.ip()), ..hb.clone() };
                let bytes = match key {
                    Some(key) => frame::encode(key, &hb),
                    None => match serde_json::to_vec(&hb) {
                        Ok(b) => b,
                        Err(_) => continue,
                    },
                };
                // A send error on one path is that path being down: the
                // receiver will notice the silence.
                let _ = sock.send_to(&bytes, dest).await;
            }
        }
    }
}

/// Who this node is, as heartbeats are received: its cluster, its id, and
/// the cluster's heartbeat keys (None while the state has none).
#[derive(Debug, Clone)]
pub struct Identity {
    pub cluster_id: String,
    pub me: NodeId,
    pub keys: Option<KeyRing>,
    /// Stepped out (cut off from the leader): answers are probes.
    pub stepped_out: bool,
}

/// How many immediate answers one peer may get per `WINDOW`: a handshake
/// takes two; more only while a path loses one direction (each datagram
/// that comes is answered, and the answer lost).
#[derive(Default)]
pub struct AnswerLimiter {
    last: HashMap<NodeId, (Instant, u8)>,
}

impl AnswerLimiter {
    const WINDOW: Duration = Duration::from_millis(100);
    const PER_WINDOW: u8 = 3;

    /// Whether `to` may be answered at `now` (counted if so).
    pub fn allow(&mut self, to: NodeId, now: Instant) -> bool {
        let e = self.last.entry(to).or_insert((now, 0));
        if now.saturating_duration_since(e.0) >= Self::WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
        e.1 <= Self::PER_WINDOW
    }
}

/// The sender of an authenticated frame that `take_in` accepted (its body
/// is parsed again only to answer, which is rare).
pub fn heartbeat_sender(frame: &[u8]) -> Option<NodeId> {
    let body = frame.get(frame::HEADER_LEN..frame.len().checked_sub(frame::TAG_LEN)?)?;
    serde_json::from_slice::<Heartbeat>(body).ok().map(|hb| hb.from)
}

/// How long a (reason, address) pair stays quiet in the log after a line.
const DROP_LOG_PERIOD: Duration = Duration::from_secs(30);

/// Takes in one datagram received from `from`: with a key, it must be a
/// frame whose tag verifies (before any parsing), for this cluster and
/// node, fresh and no replay; without one, a plain heartbeat (an older
/// cluster). Returns whether to answer its sender at once ([`answer`]), or
/// why it was dropped (already counted).
pub fn take_in(
    liveness: &Liveness,
    id: &Identity,
    datagram: &[u8],
    from: IpAddr,
    now: Instant,
    now_ms: u64,
) -> Result<bool, DropReason> {
    let result = match &id.keys {
        Some(ring) => match frame::looks_framed(datagram) {
            true => frame::decode(ring, datagram).map_err(DropReason::from),
            // Unsealed, where the cluster seals: nobody's word.
            false => Err(DropReason::Forged),
        },
        None => match frame::looks_framed(datagram) {
            true => Err(DropReason::UnknownKey),
            false => serde_json::from_slice::<Heartbeat>(datagram).map_err(|_| DropReason::Malformed),
        },
    };
    let dropped = |r: DropReason| {
        liveness.count_drop(r);
        r
    };
    let hb = match result {
        Ok(hb) if hb.cluster_id == id.cluster_id && hb.to == id.me => hb,
        Ok(_) => return Err(dropped(DropReason::Misdirected)),
        Err(r) => return Err(dropped(r)),
    };
    if id.keys.is_none() {
        liveness.record(hb, from, now);
        return Ok(false);
    }
    match liveness.receive(hb, from, now, now_ms) {
        (Verdict::Heard | Verdict::Handshake, reply) => Ok(reply),
        (Verdict::Replayed, _) => Err(DropReason::Replayed),
        (Verdict::Stale, _) => Err(DropReason::Stale),
    }
}

/// The heartbeat that answers `to` at once (see
/// [`Freshness::judge_and_reply`]), sealed, sent from `via` to `to_addr`
/// at `sent_ms` (claimed with [`Liveness::claim_sent_ms`]: on loopback an
/// answer often comes back within the millisecond the question left in);
/// a probe while stepped out. None without a key.
pub fn answer(
    liveness: &Liveness,
    id: &Identity,
    (to, via, to_addr): (NodeId, IpAddr, IpAddr),
    pid: u32,
    now: Instant,
    sent_ms: u64,
) -> Option<Vec<u8>> {
    let key = &id.keys.as_ref()?.current;
    let hb = match id.stepped_out {
        true => liveness.probe_to(&id.cluster_id, id.me, to, pid, sent_ms),
        false => liveness.heartbeat_to(&id.cluster_id, id.me, to, pid, sent_ms, &liveness.heard_report(now)),
    };
    Some(frame::encode(key, &Heartbeat { via: Some(via), to_addr: Some(to_addr), ..hb }))
}

/// One input of the heartbeat parser's fuzzing (`fuzz/fuzz_targets/
/// heartbeat_frame.rs`, and a long random-bytes property test on stable):
/// `data` as a datagram received (only a frame sealed with one of the keys
/// may open, and no input can forge a tag), and sealed as a body, which
/// must open to exactly itself and then go through the receiver (replays,
/// freshness, counters) three times. Panics on a broken property.
#[doc(hidden)]
pub fn fuzz_datagram(data: &[u8]) {
    let ring = KeyRing { current: frame::Key::new(2, [0x5a; 32]), previous: Some(frame::Key::new(1, [0xa5; 32])) };
    assert!(frame::open(&ring, data).is_err(), "an input forged a tag");
    let _ = frame::decode(&ring, data);
    let sealed = frame::seal(&ring.current, data);
    if let Ok(body) = frame::open(&ring, &sealed) {
        assert_eq!(body, data);
    }
    let t0 = Instant::now();
    let live = Liveness::new_at(Duration::from_millis(500), t0, 99);
    let id = Identity { cluster_id: "c".into(), me: 1, keys: Some(ring), stepped_out: false };
    let from = IpAddr::from([127, 0, 0, 1]);
    for i in 0..3u64 {
        let _ = take_in(&live, &id, &sealed, from, t0 + Duration::from_millis(i), 1_000 + i);
    }
    let _ = take_in(&live, &id, data, from, t0, 1_000);
    let _ = take_in(&live, &Identity { keys: None, ..id }, data, from, t0, 1_000);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports older than this count as stale (the agent: two heartbeat intervals).
    const STALE: Duration = Duration::from_secs(3600);

    fn hb(from: NodeId) -> Heartbeat {
        Heartbeat {
            cluster_id: "c".into(),
            from,
            to: 1,
            pid: 42,
            version: "0.1.0".into(),
            sent_ms: 0,
            echo_ms: 0,
            heard: Vec::new(),
            incarnation: 7,
            echo_incarnation: 0,
            ack_ms: 0,
            via: None,
            to_addr: None,
            probe: false,
            authenticates: true,
            ticket_ms: 0,
        }
    }

    #[test]
    fn a_node_heard_by_another_voter_is_alive_for_the_leader() {
        // Voters 1 (me, the leader), 2 and 3; 1 cannot hear 2, 3 can.
        let l = Liveness::new(Duration::from_millis(500));
        let t0 = Instant::now();
        let voters = [1, 2, 3];
        let addrs = vec!["10.0.0.2".to_string()];
        let ip3: IpAddr = "10.0.0.3".parse().unwrap();
        l.record(Heartbeat { heard: vec![(2, 50)], ..hb(3) }, ip3, t0 + Duration::from_millis(1000));
        let s = l.quorum_status(2, &addrs, &voters, 1, t0 + Duration::from_millis(1100));
        assert!(s.alive && !l.status(2, &addrs, t0 + Duration::from_millis(1100)).alive);
        // The report's time is when 3 heard 2 (arrival minus its age): 950.
        let s = l.quorum_status(2, &addrs, &voters, 1, t0 + Duration::from_millis(1500));
        assert!(!s.alive);
        assert_eq!(s.down_for, Duration::from_millis(550));
        // Five voters: 2 needs two others; 3's report alone is not enough.
        let five = [1, 2, 3, 4, 5];
        assert!(!l.quorum_status(2, &addrs, &five, 1, t0 + Duration::from_millis(1100)).alive);
        // A learner needs a majority of the voters, all of them others.
        assert!(!l.quorum_status(2, &addrs, &[1, 3, 4], 1, t0 + Duration::from_millis(1100)).alive);
        l.record(hb(2), "10.0.0.2".parse().unwrap(), t0 + Duration::from_millis(1050));
        assert!(l.quorum_status(2, &addrs, &five, 1, t0 + Duration::from_millis(1100)).alive);
        assert!(l.quorum_status(2, &addrs, &[1, 3, 4], 1, t0 + Duration::from_millis(1100)).alive);
        // Reports only ever move forward (a late datagram is older news).
        l.record(Heartbeat { heard: vec![(2, 400)], ..hb(3) }, ip3, t0 + Duration::from_millis(1001));
        assert_eq!(
            l.heard_by_quorum(2, &voters, 1, t0 + Duration::from_millis(1100)),
            Some(t0 + Duration::from_millis(1050))
        );
        // What a node reports: peers heard within the timeout, with their age.
        assert_eq!(l.heard_report(t0 + Duration::from_millis(1100)), vec![(2, 50), (3, 99)]);
    }

    #[test]
    fn a_node_is_cut_off_when_others_hear_the_leader_and_it_does_not() {
        // Me = 2; the leader is 1; the witness 3 reports hearing 1.
        let l = Liveness::new(Duration::from_millis(500));
        let t0 = Instant::now();
        let (voters, addrs) = ([1, 2, 3], vec!["10.0.0.1".to_string()]);
        let ip3: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(!l.cut_off_from(1, &addrs, &voters, 2, STALE, t0), "nobody hears the leader: it may be dead, stay");
        l.record(Heartbeat { heard: vec![(1, 10)], ..hb(3) }, ip3, t0 + Duration::from_millis(1000));
        assert!(l.cut_off_from(1, &addrs, &voters, 2, STALE, t0 + Duration::from_millis(1050)));
        assert!(
            !l.cut_off_from(2, &addrs, &voters, 2, STALE, t0 + Duration::from_millis(1050)),
            "the leader is never cut off from itself"
        );
        // Heard directly again: back in.
        l.record(hb(1), "10.0.0.1".parse().unwrap(), t0 + Duration::from_millis(1060));
        assert!(!l.cut_off_from(1, &addrs, &voters, 2, STALE, t0 + Duration::from_millis(1100)));
        // The reports grow old (the leader died): nobody is cut off.
        assert!(!l.cut_off_from(1, &addrs, &voters, 2, STALE, t0 + Duration::from_millis(2000)));
    }

    #[test]
    fn across_a_site_cut_with_five_voters_the_far_side_knows_it_is_cut_off() {
        // Voters 1 (leader) and 2 on site A, 3 and 4 (me) on site B, 5 the
        // witness. The link between the sites is cut at 1 s: 4 hears 3 and
        // the witness, which hears the leader; 2 is heard of no more.
        let l = Liveness::new(Duration::from_millis(500));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let (voters, addrs) = ([1, 2, 3, 4, 5], vec!["10.0.0.1".to_string()]);
        let from = |n: u8| -> IpAddr { format!("10.0.0.{n}").parse().unwrap() };
        for n in [2, 3, 5] {
            l.record(Heartbeat { heard: vec![(1, 0)], ..hb(n as NodeId) }, from(n), at(0));
        }
        l.record(Heartbeat { heard: vec![(1, 0)], ..hb(2) }, from(2), at(900));
        l.record(hb(1), from(1), at(950));
        l.record(Heartbeat { heard: vec![], ..hb(3) }, from(3), at(1_600));
        l.record(Heartbeat { heard: vec![(1, 10)], ..hb(5) }, from(5), at(1_600));
        let stale = Duration::from_millis(200);
        // Only the witness is seen hearing the leader (with the leader, two
        // of five): without counting 2, 4 would never step out, and keep
        // its lease through 3 and the witness while the leader moves its
        // groups.
        assert!(!l.cut_off_from(1, &addrs, &voters, 4, STALE, at(1_650)));
        assert!(l.cut_off_from(1, &addrs, &voters, 4, stale, at(1_650)), "2 may hear the leader");
        // Before the cut, with 2 fresh, nobody is cut off.
        assert!(!l.cut_off_from(1, &addrs, &voters, 4, stale, at(960)));
    }

    #[test]
    fn the_failover_view_takes_nobody_for_silent_on_stale_reports() {
        let l = Liveness::new(Duration::from_millis(500));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let stale = Duration::from_millis(200);
        let (voters, addrs) = (vec![1, 2, 3], vec!["10.0.0.3".to_string()]);
        // Node 2 reports hearing 3 until 100 ms; then 3 goes silent for good.
        let report = |heard: Vec<(NodeId, u32)>| Heartbeat { heard, ..hb(2) };
        l.record(report(vec![(3, 0)]), "10.0.0.2".parse().unwrap(), at(100));
        l.record(report(vec![]), "10.0.0.2".parse().unwrap(), at(1_000));
        let fresh = l.failover_status(3, &addrs, &voters, 1, stale, at(1_100));
        assert!(!fresh.alive, "fresh reports: 3 is silent");
        assert_eq!(fresh.down_for, Duration::from_millis(1_000));
        assert_eq!(fresh, l.quorum_status(3, &addrs, &voters, 1, at(1_100)));
        // This node then hears nothing (its inbound traffic is lost): node
        // 2 may hear 3 again by now, unknown to us. Nobody is silent.
        let deaf = l.failover_status(3, &addrs, &voters, 1, stale, at(1_300));
        assert!(deaf.alive && deaf.down_for.is_zero());
        assert!(!l.quorum_status(3, &addrs, &voters, 1, at(1_300)).alive, "the plain view still says silent");
        // With five voters, one dead (stale) voter does not keep a silent
        // node alive: the fresh reports of the others still make a majority.
        let voters = vec![1, 2, 3, 4, 5];
        l.record(Heartbeat { heard: vec![], ..hb(4) }, "10.0.0.4".parse().unwrap(), at(1_000));
        l.record(report(vec![]), "10.0.0.2".parse().unwrap(), at(2_000));
        l.record(Heartbeat { heard: vec![], ..hb(4) }, "10.0.0.4".parse().unwrap(), at(2_000));
        let s = l.failover_status(3, &addrs, &voters, 1, stale, at(2_050));
        assert!(!s.alive, "5 is stale and 3 counts itself: 2 of 5 may hear 3");
        // A voter that has only just (re)started says nothing of whom it
        // does not hear: until it has listened for a node timeout, it may.
        l.record(Heartbeat { pid: 99, heard: vec![], ..hb(4) }, "10.0.0.4".parse().unwrap(), at(2_040));
        assert!(l.failover_status(3, &addrs, &voters, 1, stale, at(2_050)).alive);
        l.record(Heartbeat { pid: 99, heard: vec![], ..hb(4) }, "10.0.0.4".parse().unwrap(), at(2_540));
        l.record(report(vec![]), "10.0.0.2".parse().unwrap(), at(2_540));
        assert!(!l.failover_status(3, &addrs, &voters, 1, stale, at(2_550)).alive);
    }

    #[test]
    fn node_is_alive_while_any_path_is_heard() {
        let l = Liveness::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let addrs = vec!["10.0.0.2".to_string(), "10.1.0.2".to_string()];
        assert!(!l.status(2, &addrs, t0).alive, "never heard is offline");
        l.record(hb(2), "10.0.0.2".parse().unwrap(), t0);
        l.record(hb(2), "10.1.0.2".parse().unwrap(), t0 + Duration::from_millis(900));
        let s = l.status(2, &addrs, t0 + Duration::from_millis(1500));
        assert!(s.alive, "second path still fresh");
        assert_eq!(s.paths[0].1, Some(Duration::from_millis(1500)));
        assert_eq!(s.paths[1].1, Some(Duration::from_millis(600)));
        assert_eq!(s.pid, Some(42));
        let s = l.status(2, &addrs, t0 + Duration::from_millis(2000));
        assert!(!s.alive, "all paths silent past the timeout");
        assert_eq!(s.down_for, Duration::from_millis(1100));
    }

    #[test]
    fn a_peer_acknowledges_what_it_heard_and_a_restart_starts_over() {
        let l = Liveness::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(l.acked_ms(2), None, "never echoed");
        // An echo of a send time this agent never sent (a previous boot's,
        // still echoed by the peer) proves nothing.
        l.record(Heartbeat { sent_ms: 500, echo_ms: 1200, ..hb(2) }, ip, t0);
        assert_eq!(l.acked_ms(2), None);
        let _ = l.heartbeat_to("c", 1, 2, 1, 1400, &[]);
        l.record(Heartbeat { sent_ms: 500, echo_ms: 1200, ..hb(2) }, ip, t0);
        assert_eq!((l.echo_for(2), l.acked_ms(2)), (500, Some(1200)));
        // A late, reordered datagram never moves either back.
        l.record(Heartbeat { sent_ms: 400, echo_ms: 1100, ..hb(2) }, ip, t0);
        assert_eq!((l.echo_for(2), l.acked_ms(2)), (500, Some(1200)));
        // A new agent (another pid) sends from its own clock.
        l.record(Heartbeat { pid: 43, sent_ms: 10, echo_ms: 1300, ..hb(2) }, ip, t0);
        assert_eq!((l.echo_for(2), l.acked_ms(2)), (10, Some(1300)));
        // Rebooted, with the same pid: a new incarnation starts over too.
        l.record(Heartbeat { pid: 43, incarnation: 8, sent_ms: 5, echo_ms: 1400, ..hb(2) }, ip, t0);
        assert_eq!(l.echo_for(2), 5);
    }

    #[tokio::test]
    async fn heartbeat_datagrams_are_marked_network_control() {
        use std::os::fd::AsRawFd;
        let get = |s: &UdpSocket, level, name| {
            let (mut v, mut len) = (0 as libc::c_int, std::mem::size_of::<libc::c_int>() as libc::socklen_t);
            // SAFETY: a valid socket fd, an int and its length.
            let rc =
                unsafe { libc::getsockopt(s.as_raw_fd(), level, name, (&mut v as *mut libc::c_int).cast(), &mut len) };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            v
        };
        let h = HeartbeatSockets::bind(&["127.0.0.1".into()], 0).await.unwrap();
        assert_eq!(get(&h.sockets[0], libc::IPPROTO_IP, libc::IP_TOS), 0xc0, "DSCP CS6");
        assert_eq!(get(&h.sockets[0], libc::SOL_SOCKET, libc::SO_PRIORITY), 6, "TC_PRIO_INTERACTIVE");
        if let Ok(h6) = HeartbeatSockets::bind(&["::1".into()], 0).await {
            assert_eq!(get(&h6.sockets[0], libc::IPPROTO_IPV6, libc::IPV6_TCLASS), 0xc0);
            assert_eq!(get(&h6.sockets[0], libc::SOL_SOCKET, libc::SO_PRIORITY), 6);
        }
    }

    /// Two agents' sockets and views, node 1 (`a`) and node 2 (`b`).
    async fn two_agents(
        keys: Option<KeyRing>,
    ) -> (HeartbeatSockets, HeartbeatSockets, Arc<Liveness>, Arc<Liveness>, tandem_raft::state::ClusterState) {
        use tandem_raft::state::{ClusterState, Command, NodeSpec};
        let a = HeartbeatSockets::bind(&["127.0.0.1".into()], 0).await.unwrap();
        let b = HeartbeatSockets::bind(&["127.0.0.1".into()], 0).await.unwrap();
        let port = |h: &HeartbeatSockets| h.sockets[0].local_addr().unwrap().port();
        let (la, lb) =
            (Liveness::new_at(Duration::from_secs(5), Instant::now(), 11), Liveness::new(Duration::from_secs(5)));
        let ident = move |me| {
            let keys = keys.clone();
            move || Some(Identity { cluster_id: "c".to_string(), me, keys: keys.clone(), stepped_out: false })
        };
        a.spawn_receivers(la.clone(), ident(1));
        b.spawn_receivers(lb.clone(), ident(2));
        let mut state = ClusterState::default();
        let spec = |name: &str, port| NodeSpec {
            name: name.into(),
            addresses: vec!["127.0.0.1".into()],
            port,
            site: None,
            witness: false,
        };
        state
            .apply(&Command::Bootstrap {
                cluster_id: "c".into(),
                node_id: 1,
                node: spec("a", port(&a)),
                heartbeat_key: None,
            })
            .unwrap();
        state.apply(&Command::AddNode { node: spec("b", port(&b)) }).unwrap();
        (a, b, la, lb, state)
    }

    #[tokio::test]
    async fn heartbeats_cross_real_udp_sockets() {
        // A cluster without a key: plain heartbeats, heard as they come.
        let (a, _b, la, lb, state) = two_agents(None).await;
        for _ in 0..50 {
            a.send_round(&state.nodes, "c", 1, &la, None, false).await;
            if lb.status(1, &["127.0.0.1".into()], Instant::now()).alive {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("heartbeat never arrived");
    }

    #[tokio::test]
    async fn sealed_heartbeats_cross_real_udp_sockets_within_two_rounds() {
        let ring = KeyRing { current: frame::Key::new(1, [3; 32]), previous: None };
        let (a, b, la, lb, state) = two_agents(Some(ring.clone())).await;
        let addrs = ["127.0.0.1".to_string()];
        // a's first word proves nothing, but b answers it at once: a hears
        // b without b's round.
        a.send_round(&state.nodes, "c", 1, &la, Some(&ring.current), false).await;
        for _ in 0..500 {
            if la.status(2, &addrs, Instant::now()).alive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(la.status(2, &addrs, Instant::now()).alive, "b's answer is heard");
        assert!(!lb.status(1, &addrs, Instant::now()).alive, "a's first word is not");
        // Two more rounds each: both heard, both acknowledged.
        for _ in 0..2 {
            b.send_round(&state.nodes, "c", 2, &lb, Some(&ring.current), false).await;
            a.send_round(&state.nodes, "c", 1, &la, Some(&ring.current), false).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = Instant::now();
        assert!(lb.status(1, &addrs, now).alive && la.status(2, &addrs, now).alive);
        assert!(la.acked_ms(2).is_some() && lb.acked_ms(1).is_some());
        assert_eq!(la.drops(), HeartbeatDrops::default());
        assert_eq!(lb.drops(), HeartbeatDrops::default());
    }

    #[test]
    fn forged_replayed_stale_and_misdirected_datagrams_count_for_nothing() {
        let t0 = Instant::now();
        let ring = KeyRing { current: frame::Key::new(1, [3; 32]), previous: None };
        let timeout = Duration::from_millis(500);
        let (la, lb) = (Liveness::new_at(timeout, t0, 11), Liveness::new_at(timeout, t0, 22));
        let id = |me| Identity { cluster_id: "c".into(), me, keys: Some(ring.clone()), stepped_out: false };
        let (ida, idb) = (id(1), id(2));
        let (ip1, ip2): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let addrs1 = ["10.0.0.1".to_string()];
        // Each side's datagram of a round at `ms` (its own clock).
        let from_a = |ms| {
            let hb = la.heartbeat_to("c", 1, 2, 100, ms, &[]);
            frame::encode(&ring.current, &Heartbeat { via: Some(ip1), to_addr: Some(ip2), ..hb })
        };
        let from_b = |lb: &Liveness, ms| {
            let hb = lb.heartbeat_to("c", 2, 1, 200, ms, &[]);
            frame::encode(&ring.current, &Heartbeat { via: Some(ip2), to_addr: Some(ip1), ..hb })
        };
        let mut captured = Vec::new();
        assert_eq!(take_in(&lb, &idb, &from_a(1_000), ip1, at(1_000), 1_000), Ok(true), "answer: learn my nonce");
        assert!(!lb.status(1, &addrs1, at(1_000)).alive, "a first word proves nothing");
        assert_eq!(take_in(&la, &ida, &from_b(&lb, 1_010), ip2, at(1_011), 1_011), Ok(false), "heard: no answer");
        for ms in [1_100, 1_200, 1_300] {
            let d = from_a(ms);
            assert_eq!(take_in(&lb, &idb, &d, ip1, at(ms), ms), Ok(false));
            assert!(lb.status(1, &addrs1, at(ms)).alive);
            assert_eq!(take_in(&la, &ida, &from_b(&lb, ms + 10), ip2, at(ms + 11), ms + 11), Ok(false));
            captured.push(d);
        }
        let drops = lb.drops();
        // a dies at 1 300. Its captured datagrams replayed: nothing.
        for d in &captured {
            assert_eq!(take_in(&lb, &idb, d, ip1, at(1_400), 1_400), Err(DropReason::Replayed));
        }
        // Forged ones: another key, a flipped bit, unsealed JSON.
        let other = frame::Key::new(1, [4; 32]);
        let hb = la.heartbeat_to("c", 1, 2, 100, 5_000, &[]);
        assert_eq!(take_in(&lb, &idb, &frame::encode(&other, &hb), ip1, at(1_400), 1_400), Err(DropReason::Forged));
        let mut flipped = frame::encode(&ring.current, &hb);
        flipped[20] ^= 1;
        assert_eq!(take_in(&lb, &idb, &flipped, ip1, at(1_400), 1_400), Err(DropReason::Forged));
        let plain = serde_json::to_vec(&hb).unwrap();
        assert_eq!(take_in(&lb, &idb, &plain, ip1, at(1_400), 1_400), Err(DropReason::Forged));
        assert_eq!(take_in(&lb, &idb, b"TNHB\x01", ip1, at(1_400), 1_400), Err(DropReason::Malformed));
        let later = frame::Key::new(2, [3; 32]);
        assert_eq!(take_in(&lb, &idb, &frame::encode(&later, &hb), ip1, at(1_400), 1_400), Err(DropReason::UnknownKey));
        // Authentic, but addressed to node 3.
        let to3 = frame::encode(&ring.current, &Heartbeat { to: 3, ..hb });
        assert_eq!(take_in(&lb, &idb, &to3, ip1, at(1_400), 1_400), Err(DropReason::Misdirected));
        // a's last datagram held back and delivered late: its echo is stale.
        let held = from_a(1_350);
        assert_eq!(take_in(&lb, &idb, &held, ip1, at(2_500), 2_500), Ok(true), "taught a nonce only");
        assert!(!lb.status(1, &addrs1, at(2_500)).alive, "a stays offline");
        assert_eq!(
            lb.drops(),
            HeartbeatDrops {
                forged: drops.forged + 3,
                replayed: drops.replayed + 3,
                malformed: drops.malformed + 1,
                unknown_key: drops.unknown_key + 1,
                misdirected: drops.misdirected + 1,
                ..drops
            }
        );
        // b restarts (a new incarnation): whatever was sent to the old one
        // never counts, whenever it comes.
        let lb2 = Liveness::new_at(timeout, at(3_000), 23);
        for (i, d) in captured.iter().enumerate() {
            let ms = 3_000 + i as u64;
            assert!(take_in(&lb2, &idb, d, ip1, at(ms), ms).is_ok_and(|_| !lb2.status(1, &addrs1, at(ms)).alive));
        }
        let _ = from_b(&lb2, 3_100);
        for d in &captured {
            let _ = take_in(&lb2, &idb, d, ip1, at(3_200), 3_200);
            assert!(!lb2.status(1, &addrs1, at(3_200)).alive);
        }
    }

    /// The fuzz target's function on random and mutated datagrams. Cases:
    /// `HEARTBEAT_FUZZ_CASES` (default 2000; the long run in
    /// docs/reliability.md sets millions).
    #[test]
    fn the_datagram_parser_survives_random_bytes() {
        let cases: u64 = std::env::var("HEARTBEAT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000);
        // Seeds worth mutating: real frames (sealed under another key) and bodies.
        let key = frame::Key::new(2, [0x11; 32]);
        let l = Liveness::new(Duration::from_secs(1));
        let hb = Heartbeat { via: Some([10, 0, 0, 2].into()), ..l.heartbeat_to("c", 2, 1, 7, 1_000, &[(3, 5)]) };
        let seeds = [frame::encode(&key, &hb), serde_json::to_vec(&hb).unwrap(), Vec::new()];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..cases {
            let mut d = seeds[(i % 3) as usize].clone();
            match next() % 4 {
                0 => d = (0..next() % 1500).map(|_| next() as u8).collect(),
                1 => {
                    for _ in 0..1 + next() % 8 {
                        if !d.is_empty() {
                            let at = (next() % d.len() as u64) as usize;
                            d[at] = next() as u8;
                        }
                    }
                }
                2 => d.truncate((next() % (d.len() as u64 + 1)) as usize),
                _ => d.extend((0..next() % 64).map(|_| next() as u8)),
            }
            fuzz_datagram(&d);
        }
    }

    #[test]
    fn a_cluster_without_a_key_gets_one_only_once_every_node_seals() {
        // Plain heartbeats (a cluster bootstrapped before keys) are heard
        // as before; whether each sender seals once there is a key is noted.
        let l = Liveness::new(Duration::from_millis(500));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let old = Heartbeat { authenticates: false, ..hb(2) };
        l.record(old, "10.0.0.2".parse().unwrap(), at(0));
        l.record(hb(3), "10.0.0.3".parse().unwrap(), at(0));
        assert!(l.status(2, &["10.0.0.2".into()], at(10)).alive);
        assert!(!l.all_authenticate([2, 3], at(10)), "2 runs an older version");
        l.record(hb(2), "10.0.0.2".parse().unwrap(), at(100));
        assert!(l.all_authenticate([2, 3], at(110)));
        assert!(!l.all_authenticate([2, 3, 4], at(110)), "4 is not heard");
        assert!(!l.all_authenticate([2, 3], at(700)), "nobody heard lately");
    }

    #[test]
    fn a_peer_gets_a_few_immediate_answers_per_round_at_most() {
        let t0 = Instant::now();
        let mut l = AnswerLimiter::default();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(l.allow(2, at(0)) && l.allow(2, at(1)) && l.allow(2, at(2)));
        assert!(!l.allow(2, at(3)) && !l.allow(2, at(99)));
        assert!(l.allow(3, at(3)), "per peer");
        assert!(l.allow(2, at(100)), "a new window");
    }

    #[test]
    fn a_flood_of_drops_logs_one_line_per_reason_and_address_per_period() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(Duration::from_secs(30));
        let ip = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(n));
        assert!(l.allow(DropReason::Forged, ip(1), t0));
        assert!(!l.allow(DropReason::Forged, ip(1), t0 + Duration::from_secs(29)));
        assert!(l.allow(DropReason::Replayed, ip(1), t0), "another reason");
        assert!(l.allow(DropReason::Forged, ip(1), t0 + Duration::from_secs(30)));
        // Spoofed sources: at most MAX_SOURCES lines per period.
        let lines = (0..10_000).filter(|n| l.allow(DropReason::Forged, ip(100 + n), t0)).count();
        assert!(lines <= LogLimiter::MAX_SOURCES, "{lines}");
        assert!(l.allow(DropReason::Forged, ip(5), t0 + Duration::from_secs(61)), "the period over, room again");
    }
}
