//! Vector search for tenants: distances (`distance`), the HNSW index
//! (`hnsw`), payload filters (`filter`) and collections that tie them
//! together (`collection`).

pub mod collection;
pub mod distance;
pub mod durable;
pub mod filter;
pub mod hnsw;
