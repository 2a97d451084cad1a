//! MIG (Multi-Instance GPU) geometry of the GPUs Atrium partitions: which
//! profiles a model offers and where each may start.
//!
//! A MIG-capable GPU has eight memory slices and seven compute slices. An
//! instance of a profile occupies a contiguous run of memory slices that
//! must start at one of the profile's allowed positions (NVIDIA's placement
//! table: 3g only at 0 or 4, 4g and 7g only at 0, …), and a GPU holds at
//! most seven instances and seven compute slices in all.

use std::fmt;
use std::str::FromStr;

/// A MIG profile by its name's two numbers: `3g.40gb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MigProfile {
    pub compute: u8,
    pub memory_gb: u16,
}

impl FromStr for MigProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("MIG profile {s:?}: use <slices>g.<memory>gb, e.g. 3g.40gb");
        let (g, mem) = s.trim().split_once("g.").ok_or_else(bad)?;
        let mem = mem.strip_suffix("gb").ok_or_else(bad)?;
        Ok(MigProfile {
            compute: g.parse().map_err(|_| bad())?,
            memory_gb: mem.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for MigProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}g.{}gb", self.compute, self.memory_gb)
    }
}

/// One profile of a GPU model: its size and where it may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigSpec {
    pub profile: MigProfile,
    /// Memory slices (of eight) it occupies, contiguously.
    pub memory_slices: u8,
    /// Memory slice indices it may start at.
    pub starts: &'static [u8],
}

const fn spec(compute: u8, memory_gb: u16, memory_slices: u8, starts: &'static [u8]) -> MigSpec {
    MigSpec {
        profile: MigProfile { compute, memory_gb },
        memory_slices,
        starts,
    }
}

/// H100 80GB (SXM and PCIe).
pub const H100_80GB: &[MigSpec] = &[
    spec(1, 10, 1, &[0, 1, 2, 3, 4, 5, 6]),
    spec(1, 20, 2, &[0, 2, 4, 6]),
    spec(2, 20, 2, &[0, 2, 4]),
    spec(3, 40, 4, &[0, 4]),
    spec(4, 40, 4, &[0]),
    spec(7, 80, 8, &[0]),
];

/// H200 141GB.
pub const H200_141GB: &[MigSpec] = &[
    spec(1, 18, 1, &[0, 1, 2, 3, 4, 5, 6]),
    spec(1, 35, 2, &[0, 2, 4, 6]),
    spec(2, 35, 2, &[0, 2, 4]),
    spec(3, 71, 4, &[0, 4]),
    spec(4, 71, 4, &[0]),
    spec(7, 141, 8, &[0]),
];

/// Every profile of every geometry, for compact sets of profiles.
pub const ALL_PROFILES: [MigProfile; 12] = [
    H100_80GB[0].profile,
    H100_80GB[1].profile,
    H100_80GB[2].profile,
    H100_80GB[3].profile,
    H100_80GB[4].profile,
    H100_80GB[5].profile,
    H200_141GB[0].profile,
    H200_141GB[1].profile,
    H200_141GB[2].profile,
    H200_141GB[3].profile,
    H200_141GB[4].profile,
    H200_141GB[5].profile,
];

/// The MIG geometry of a GPU model, if Atrium knows how to partition it.
pub fn geometry(model: &str) -> Option<&'static [MigSpec]> {
    let m = model.to_ascii_uppercase();
    if m.contains("H200") {
        Some(H200_141GB)
    } else if m.contains("H100") {
        Some(H100_80GB)
    } else {
        None
    }
}

/// Most instances, and compute slices, one GPU holds.
pub const MAX_INSTANCES: u8 = 7;
pub const COMPUTE_SLICES: u8 = 7;

/// The memory-slice mask an instance of `spec` at `start` occupies.
pub fn mask(spec: &MigSpec, start: u8) -> u8 {
    let run: u16 = (1u16 << spec.memory_slices) - 1;
    (run << start) as u8
}

/// What is in use on one GPU in MIG mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MigUse {
    pub mask: u8,
    pub compute: u8,
    pub instances: u8,
}

impl MigUse {
    /// Whether an instance of `spec` may start at `start` here.
    pub fn allows(&self, spec: &MigSpec, start: u8) -> bool {
        spec.starts.contains(&start)
            && self.mask & mask(spec, start) == 0
            && self.compute + spec.profile.compute <= COMPUTE_SLICES
            && self.instances < MAX_INSTANCES
    }

    pub fn with(self, spec: &MigSpec, start: u8) -> MigUse {
        MigUse {
            mask: self.mask | mask(spec, start),
            compute: self.compute + spec.profile.compute,
            instances: self.instances + 1,
        }
    }

    pub fn without(self, spec: &MigSpec, start: u8) -> MigUse {
        MigUse {
            mask: self.mask & !mask(spec, start),
            compute: self.compute.saturating_sub(spec.profile.compute),
            instances: self.instances.saturating_sub(1),
        }
    }

    /// How many instances of every profile could still be started, weighted
    /// by their compute: what a placement keeps open for later requests.
    pub fn openness(&self, geometry: &[MigSpec]) -> u32 {
        geometry
            .iter()
            .map(|s| {
                let n = s.starts.iter().filter(|st| self.allows(s, **st)).count() as u32;
                n * u32::from(s.profile.compute)
            })
            .sum()
    }

    /// The best start for `spec`: the allowed one that keeps most open.
    pub fn best_start(&self, geometry: &[MigSpec], spec: &MigSpec) -> Option<u8> {
        let mut best: Option<(u32, u8)> = None;
        for &start in spec.starts {
            if self.allows(spec, start) {
                let open = self.with(spec, start).openness(geometry);
                if best.is_none_or(|(b, _)| open > b) {
                    best = Some((open, start));
                }
            }
        }
        best.map(|(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(g: &[MigSpec], p: &str) -> MigSpec {
        let p: MigProfile = p.parse().unwrap();
        *g.iter().find(|s| s.profile == p).unwrap()
    }

    #[test]
    fn placements_follow_the_table() {
        let three = find(H100_80GB, "3g.40gb");
        let four = find(H100_80GB, "4g.40gb");
        let one = find(H100_80GB, "1g.10gb");
        let empty = MigUse::default();
        assert!(empty.allows(&three, 0) && empty.allows(&three, 4));
        assert!(!empty.allows(&three, 2), "3g never starts at 2");
        assert!(empty.allows(&four, 0) && !empty.allows(&four, 4));
        // 4g at 0 and 3g at 4 fill the GPU: seven compute slices.
        let full = empty.with(&four, 0).with(&three, 4);
        assert_eq!(full.compute, 7);
        assert!((0..8).all(|s| !full.allows(&one, s)));
        // Seven 1g instances at most, though an eighth memory slice is free.
        let mut u = empty;
        for s in 0..7 {
            assert!(u.allows(&one, s));
            u = u.with(&one, s);
        }
        assert_eq!(u.mask, 0x7f);
        assert!(!u.allows(&one, 7), "slice 7 is not a 1g start");
        assert_eq!(u.without(&one, 3).instances, 6);
    }

    #[test]
    fn best_start_keeps_the_big_profiles_open() {
        // A 3g on an empty GPU goes to slice 4, leaving 4g (only at 0) open.
        let three = find(H200_141GB, "3g.71gb");
        assert_eq!(MigUse::default().best_start(H200_141GB, &three), Some(4));
        // A 1g goes next to existing instances, not into the middle of a
        // free half.
        let one = find(H100_80GB, "1g.10gb");
        let used = MigUse::default().with(&find(H100_80GB, "3g.40gb"), 4);
        let s = used.best_start(H100_80GB, &one).unwrap();
        assert!(s == 0 || s == 3, "start {s}");
        assert_eq!(geometry("NVIDIA H100 80GB HBM3"), Some(H100_80GB));
        assert_eq!(geometry("NVIDIA H200"), Some(H200_141GB));
        assert_eq!(geometry("T4"), None);
    }
}
