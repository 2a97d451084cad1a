//! Where there is still room: the most each run of nodes (in name order)
//! could take, kept in a segment tree of maxima over the node summaries,
//! so the candidate walk jumps over runs of nodes none of which admits a
//! request. On a full fleet most nodes admit nothing, and walking them
//! one by one was a fifth of a decision's time at 10,000 nodes.
//!
//! `Caps::may_admit` is implied by `Summary::admits` (each field is the
//! maximum, or for MIG the union, of the nodes'), so a skipped node is one
//! the walk would have passed over anyway: the decisions are the same.

use super::classes::Summary;
use super::types::{GpuAsk, Request};
use crate::mig;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Caps {
    cpu: u64,
    memory: u64,
    whole: u8,
    share: u16,
    mig: u16,
}

impl Caps {
    fn of(s: &Summary) -> Caps {
        Caps {
            cpu: s.cpu_free,
            memory: s.memory_free,
            whole: s.whole_in_domain,
            share: s.share_max,
            mig: s.mig_open,
        }
    }

    fn merge(a: Caps, b: Caps) -> Caps {
        Caps {
            cpu: a.cpu.max(b.cpu),
            memory: a.memory.max(b.memory),
            whole: a.whole.max(b.whole),
            share: a.share.max(b.share),
            mig: a.mig | b.mig,
        }
    }

    /// Whether some node of the run may admit `r` (never false when one
    /// does).
    fn may_admit(&self, r: &Request) -> bool {
        if self.cpu < r.cpu_milli || self.memory < r.memory_mib {
            return false;
        }
        match r.gpu {
            GpuAsk::Whole(n) => u32::from(self.whole) >= n,
            GpuAsk::Share(m) => u32::from(self.share) >= m,
            GpuAsk::Mig(p) => mig::ALL_PROFILES
                .iter()
                .position(|x| *x == p)
                .is_some_and(|k| self.mig & (1 << k) != 0),
            GpuAsk::None => true,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Room {
    /// Leaves from `leaves`; node `k` of the tree has children 2k, 2k+1.
    tree: Vec<Caps>,
    leaves: usize,
    nodes: usize,
}

impl Room {
    pub(super) fn new(nodes: usize) -> Room {
        let leaves = nodes.max(1).next_power_of_two();
        Room {
            tree: vec![Caps::default(); 2 * leaves],
            leaves,
            nodes,
        }
    }

    pub(super) fn set(&mut self, i: usize, s: &Summary) {
        let mut k = self.leaves + i;
        let Some(leaf) = self.tree.get_mut(k) else {
            return;
        };
        *leaf = Caps::of(s);
        while k > 1 {
            k /= 2;
            self.tree[k] = Caps::merge(self.tree[2 * k], self.tree[2 * k + 1]);
        }
    }

    /// Whether any node may admit `r`.
    pub(super) fn anywhere(&self, r: &Request) -> bool {
        self.tree.get(1).is_some_and(|c| c.may_admit(r))
    }

    /// The first node at or after `from` that may admit `r`: `from`
    /// itself at the cost of one check when it may, else up from its
    /// leaf to the first right sibling with room and down to that
    /// sibling's first leaf with room — a cost in the logarithm of the
    /// distance jumped, not of the fleet.
    pub(super) fn next(&self, from: usize, r: &Request) -> Option<usize> {
        if from >= self.nodes {
            return None;
        }
        let mut k = self.leaves + from;
        if self.tree[k].may_admit(r) {
            return Some(from);
        }
        loop {
            if k <= 1 {
                return None;
            }
            if k.is_multiple_of(2) && self.tree[k + 1].may_admit(r) {
                k += 1;
                break;
            }
            k /= 2;
        }
        while k < self.leaves {
            k = if self.tree[2 * k].may_admit(r) {
                2 * k
            } else {
                2 * k + 1
            };
        }
        let i = k - self.leaves;
        (i < self.nodes).then_some(i)
    }
}
