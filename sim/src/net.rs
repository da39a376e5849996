//! The simulated network: two paths per node (one address each), faults
//! that cut links (partitions, one-way loss, a path down, a cut between two
//! sites), and the random loss, delay and duplication of messages.
//!
//! Heartbeats are datagrams on one path; everything else (Raft, claims,
//! reports) rides TCP, which works while any path works both ways and
//! turns loss into retransmission delay.

use std::collections::BTreeMap;

use tandem_raft::NodeId;

/// Network paths per node.
pub const PATHS: usize = 2;

/// Which side of a two-site cluster a node is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    None,
    A,
    B,
    /// The witness: reaches both sites.
    Witness,
}

/// The random quality of the links, fixed per scenario.
#[derive(Debug, Clone)]
pub struct Quality {
    /// One-way latency range, µs.
    pub latency_us: (u64, u64),
    /// Chance that a datagram is lost, per million.
    pub loss_ppm: u32,
    /// Chance that a message arrives twice, per million.
    pub dup_ppm: u32,
    /// Chance that a message is held up (a queue, a retransmission), per
    /// million, and by how much at most (µs).
    pub slow_ppm: u32,
    pub slow_max_us: u64,
}

#[derive(Debug, Clone)]
pub struct Net {
    /// Per node (index id - 1): its site.
    pub sites: Vec<Site>,
    /// Per node: one bit per partition in force that cuts it from the
    /// rest; two nodes talk only when their bits agree (all 0: none).
    pub side: Vec<u64>,
    /// Faults in force, counted (they may overlap): the cut between the
    /// sites, (node, path) interfaces down, (from, to) links lost one way.
    pub site_cut: u32,
    pub path_down: BTreeMap<(NodeId, usize), u32>,
    pub one_way: BTreeMap<(NodeId, NodeId), u32>,
    pub quality: Quality,
}

impl Net {
    pub fn new(sites: Vec<Site>, quality: Quality) -> Net {
        let n = sites.len();
        Net { sites, side: vec![0; n], site_cut: 0, path_down: BTreeMap::new(), one_way: BTreeMap::new(), quality }
    }

    fn site(&self, id: NodeId) -> Site {
        self.sites[(id - 1) as usize]
    }

    /// Whether a datagram from `a` on path `p` can reach `b` now.
    pub fn link(&self, a: NodeId, b: NodeId, p: usize) -> bool {
        if a == b {
            return true;
        }
        if self.side[(a - 1) as usize] != self.side[(b - 1) as usize] {
            return false;
        }
        if self.site_cut > 0 {
            let (sa, sb) = (self.site(a), self.site(b));
            if (sa == Site::A && sb == Site::B) || (sa == Site::B && sb == Site::A) {
                return false;
            }
        }
        !self.path_down.contains_key(&(a, p))
            && !self.path_down.contains_key(&(b, p))
            && !self.one_way.contains_key(&(a, b))
    }

    /// Whether a TCP connection between `a` and `b` works now: some path
    /// carries both directions.
    pub fn tcp(&self, a: NodeId, b: NodeId) -> bool {
        (0..PATHS).any(|p| self.link(a, b, p) && self.link(b, a, p))
    }

    /// Partition number `bit` (0-63) cuts `nodes` from the rest, or ends.
    pub fn partition(&mut self, bit: usize, nodes: &[NodeId], on: bool) {
        for id in nodes {
            let s = &mut self.side[(id - 1) as usize];
            if on {
                *s |= 1 << (bit % 64);
            } else {
                *s &= !(1 << (bit % 64));
            }
        }
    }

    /// Counts a fault in (`on`) or out.
    pub fn toggle<K: Ord>(map: &mut BTreeMap<K, u32>, key: K, on: bool) {
        if on {
            *map.entry(key).or_default() += 1;
        } else if let Some(c) = map.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                map.remove(&key);
            }
        }
    }

    /// Clears every fault (the links' quality stays).
    pub fn heal(&mut self) {
        self.side.iter_mut().for_each(|s| *s = 0);
        self.site_cut = 0;
        self.path_down.clear();
        self.one_way.clear();
    }

    pub fn healthy(&self) -> bool {
        self.side.iter().all(|s| *s == 0) && self.site_cut == 0 && self.path_down.is_empty() && self.one_way.is_empty()
    }

    /// A message's one-way delay, µs; `tcp` turns loss into a
    /// retransmission (200 ms, TCP's least timeout).
    pub fn delay(&self, rng: &mut fastrand::Rng, tcp: bool) -> Option<u64> {
        let q = &self.quality;
        let mut d = rng.u64(q.latency_us.0..=q.latency_us.1);
        if rng.u32(0..1_000_000) < q.slow_ppm {
            d += rng.u64(0..=q.slow_max_us);
        }
        if rng.u32(0..1_000_000) < q.loss_ppm {
            if !tcp {
                return None;
            }
            d += 200_000;
        }
        Some(d)
    }

    /// Whether this message also arrives a second time.
    pub fn duplicate(&self, rng: &mut fastrand::Rng) -> bool {
        rng.u32(0..1_000_000) < self.quality.dup_ppm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> Quality {
        Quality { latency_us: (100, 100), loss_ppm: 0, dup_ppm: 0, slow_ppm: 0, slow_max_us: 0 }
    }

    #[test]
    fn faults_cut_the_links_they_name() {
        let mut net = Net::new(vec![Site::A, Site::A, Site::B, Site::Witness], quiet());
        assert!(net.tcp(1, 3) && net.link(1, 3, 1));
        net.site_cut = 1;
        assert!(!net.tcp(1, 3) && !net.link(3, 1, 0));
        assert!(net.tcp(1, 2) && net.tcp(1, 4) && net.tcp(3, 4), "the witness hears both sites");
        net.heal();
        Net::toggle(&mut net.one_way, (1, 2), true);
        Net::toggle(&mut net.one_way, (1, 2), true);
        Net::toggle(&mut net.one_way, (1, 2), false);
        assert!(!net.link(1, 2, 0) && net.link(2, 1, 0));
        assert!(!net.tcp(1, 2), "TCP needs both directions; the other fault still holds");
        net.heal();
        Net::toggle(&mut net.path_down, (1, 0), true);
        assert!(!net.link(1, 2, 0) && net.link(1, 2, 1) && net.tcp(1, 2), "the other path carries it");
        net.heal();
        net.partition(0, &[3, 4], true);
        net.partition(1, &[2, 4], true);
        assert!(!net.tcp(1, 3) && !net.tcp(3, 4) && !net.tcp(1, 2) && !net.tcp(2, 4));
        net.partition(1, &[2, 4], false);
        assert!(!net.tcp(1, 3) && net.tcp(3, 4) && net.tcp(1, 2), "the first partition still holds");
        assert!(!net.healthy());
        net.partition(0, &[3, 4], false);
        assert!(net.healthy());
    }
}
