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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use tandem_raft::state::{socket_addr, NodeRecord};
use tandem_raft::NodeId;
use tokio::net::UdpSocket;

/// Largest heartbeat datagram accepted (32 nodes' reports fit well below a
/// 1500-byte MTU).
const MAX_DATAGRAM: usize = 1400;

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
    /// Its newest `sent_ms`, to echo back to it.
    their_sent_ms: u64,
    /// The newest of our `sent_ms` it echoed: it heard us then.
    acked_ms: u64,
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
}

impl Liveness {
    pub fn new(timeout: Duration) -> Arc<Liveness> {
        Liveness::new_at(timeout, Instant::now())
    }

    /// A view that starts at `started` (a never-heard peer counts its
    /// silence from there): the simulator's clock.
    pub fn new_at(timeout: Duration, started: Instant) -> Arc<Liveness> {
        Arc::new(Liveness { started, timeout, seen: Mutex::new(HashMap::new()), sent_ms: 0.into() })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Takes in a heartbeat received from address `from` at `now`.
    pub fn record(&self, hb: Heartbeat, from: IpAddr, now: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let entry = seen.entry(hb.from).or_insert_with(|| PeerSeen {
            pid: hb.pid,
            incarnation: hb.incarnation,
            version: hb.version.clone(),
            their_sent_ms: 0,
            acked_ms: 0,
            paths: HashMap::new(),
            hears: HashMap::new(),
            since: now,
        });
        if entry.pid != hb.pid || entry.incarnation != hb.incarnation {
            // A restarted agent: its clock values start over (after a
            // reboot, CLOCK_BOOTTIME itself does).
            entry.their_sent_ms = 0;
            entry.since = now;
        }
        entry.pid = hb.pid;
        entry.incarnation = hb.incarnation;
        entry.version = hb.version;
        entry.their_sent_ms = entry.their_sent_ms.max(hb.sent_ms);
        if hb.echo_ms <= self.sent_ms.load(std::sync::atomic::Ordering::SeqCst) {
            entry.acked_ms = entry.acked_ms.max(hb.echo_ms);
        }
        entry.paths.insert(from, now);
        for (about, ago) in hb.heard {
            let at = now.checked_sub(Duration::from_millis(ago.into())).unwrap_or(now);
            let t = entry.hears.entry(about).or_insert(at);
            *t = (*t).max(at);
        }
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
        Heartbeat {
            cluster_id: cluster_id.to_string(),
            from: me,
            to,
            pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            sent_ms,
            echo_ms: self.echo_for(to),
            heard: heard.to_vec(),
            incarnation: incarnation(),
        }
    }

    /// What to echo to `id`: the newest `sent_ms` heard from it.
    pub fn echo_for(&self, id: NodeId) -> u64 {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&id).map(|p| p.their_sent_ms).unwrap_or(0)
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

    /// Receives heartbeats for `me` in `cluster` forever.
    pub fn spawn_receivers(
        &self,
        liveness: Arc<Liveness>,
        identity: impl Fn() -> Option<(String, NodeId)> + Send + Sync + Clone + 'static,
    ) {
        for s in &self.sockets {
            let s = s.clone();
            let liveness = liveness.clone();
            let identity = identity.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_DATAGRAM];
                loop {
                    let Ok((n, from)) = s.recv_from(&mut buf).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Ok(hb) = serde_json::from_slice::<Heartbeat>(&buf[..n]) else {
                        continue;
                    };
                    match identity() {
                        Some((cluster, me)) if cluster == hb.cluster_id && me == hb.to => {
                            liveness.record(hb, from.ip(), Instant::now())
                        }
                        _ => {}
                    }
                }
            });
        }
    }

    /// Sends one round of heartbeats to every peer on every path.
    pub async fn send_round(
        &self,
        nodes: &BTreeMap<NodeId, NodeRecord>,
        cluster_id: &str,
        me: NodeId,
        liveness: &Liveness,
    ) {
        let pid = std::process::id();
        let sent_ms = crate::clock::now_boot_ms();
        let heard = liveness.heard_report(Instant::now());
        for node in nodes.values().filter(|n| n.id != me) {
            let hb = liveness.heartbeat_to(cluster_id, me, node.id, pid, sent_ms, &heard);
            let Ok(bytes) = serde_json::to_vec(&hb) else {
                continue;
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
                // A send error on one path is that path being down: the
                // receiver will notice the silence.
                let _ = sock.send_to(&bytes, dest).await;
            }
        }
    }
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

    #[tokio::test]
    async fn heartbeats_cross_real_udp_sockets() {
        use tandem_raft::state::{ClusterState, Command, NodeSpec};
        let a = HeartbeatSockets::bind(&["127.0.0.1".into()], 0).await.unwrap();
        let b = HeartbeatSockets::bind(&["127.0.0.1".into()], 0).await.unwrap();
        let b_port = b.sockets[0].local_addr().unwrap().port();
        let lb = Liveness::new(Duration::from_secs(5));
        b.spawn_receivers(lb.clone(), || Some(("c".to_string(), 2)));
        let mut state = ClusterState::default();
        let spec = |name: &str, port| NodeSpec {
            name: name.into(),
            addresses: vec!["127.0.0.1".into()],
            port,
            site: None,
            witness: false,
        };
        state.apply(&Command::Bootstrap { cluster_id: "c".into(), node_id: 1, node: spec("a", 1) }).unwrap();
        state.apply(&Command::AddNode { node: spec("b", b_port) }).unwrap();
        let la = Liveness::new(Duration::from_secs(5));
        for _ in 0..50 {
            a.send_round(&state.nodes, "c", 1, &la).await;
            if lb.status(1, &["127.0.0.1".into()], Instant::now()).alive {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("heartbeat never arrived");
    }
}
