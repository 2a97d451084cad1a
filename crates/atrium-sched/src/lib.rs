//! Placement science for Atrium, pure and deterministic (no IO; the same
//! inputs and seed give the same placements).
//!
//! Today: the GPU cluster model of the Alibaba `openb` traces
//! (`trace`), the fragmentation measure of FGD ("Beware of Fragmentation",
//! ATC'23) (`frag`), scoring policies — random, best-fit, packing,
//! dot-product, FGD as its authors' simulator computes it, and Atrium's own
//! (`policy`) — and the trace replay that compares them (`sim`).

pub mod frag;
pub mod policy;
pub mod sim;
pub mod trace;
