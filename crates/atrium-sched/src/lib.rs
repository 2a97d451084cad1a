//! Placement science for Atrium, pure and deterministic (no IO; the same
//! inputs and seed give the same placements).
//!
//! `fleet` is the scheduler of Atrium's own fleet (tenancy, MIG, NVLink,
//! gangs, quotas, fair share, preemption), scoring with the Atrium policy
//! (`mig` holds the MIG geometry it places on). The rest reproduces the FGD
//! paper's experiment: the GPU cluster model of the Alibaba `openb` traces
//! (`trace`), the fragmentation measure of FGD ("Beware of Fragmentation",
//! ATC'23) (`frag`), scoring policies — random, best-fit, packing,
//! dot-product, FGD as its authors' simulator computes it, and Atrium's own
//! (`policy`) — and the trace replay that compares them (`sim`); `online`
//! replays a trace with arrivals and departures (the policies and the
//! fleet scheduler, preemption and gangs included), `sample` makes trace
//! variants the way the paper's authors made theirs.

pub mod fleet;
pub mod frag;
pub mod mig;
pub mod online;
pub mod policy;
pub mod sample;
pub mod sim;
pub mod trace;
