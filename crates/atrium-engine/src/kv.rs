//! The paged key/value cache: fixed-size blocks of [`BLOCK_TOKENS`] token
//! positions, drawn from one pool with a memory budget, so many sequences
//! share a replica's memory without reserving their whole context up front.
//!
//! Full blocks of a prompt are registered by their exact prefix and reused
//! by later sequences that start the same way (a shared system prompt, a
//! few-shot preamble), after their last user has gone too, until the pool
//! needs the memory back (least recently used first). A prefix is keyed by
//! the exact tokens of its last block and the identity of the block before
//! it, never by a hash alone: a collision would hand one request another's
//! keys and values. The gateway's per-tenant `cache_salt` roots the chain,
//! so requests with different salts never share a block.

use std::collections::{BTreeMap, HashMap};

/// Token positions per block.
pub const BLOCK_TOKENS: usize = 16;

/// Where a prefix continues from: the start (under a salt) or a block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Parent {
    Root(Option<String>),
    /// A block and its generation: a block's generation changes when it is
    /// reused, so children keyed under its old contents never match again.
    Block(usize, u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PrefixKey {
    parent: Parent,
    tokens: [u32; BLOCK_TOKENS],
}

/// Shape of one block: every layer's keys and values for its positions.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    pub fn block_floats(&self) -> usize {
        self.layers * 2 * self.kv_heads * BLOCK_TOKENS * self.head_dim
    }

    pub fn block_bytes(&self) -> usize {
        self.block_floats() * std::mem::size_of::<f32>()
    }

    /// Offset of one head's vector at a slot; `value` picks V over K.
    fn offset(&self, layer: usize, value: bool, head: usize, slot: usize) -> usize {
        (((layer * 2 + usize::from(value)) * self.kv_heads + head) * BLOCK_TOKENS + slot)
            * self.head_dim
    }
}

/// Counts an operator reads on `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvUsage {
    pub capacity_blocks: usize,
    /// Held by at least one running sequence.
    pub used_blocks: usize,
    /// Unused but kept for the prefix cache.
    pub cached_blocks: usize,
}

pub struct KvPool {
    shape: KvShape,
    capacity: usize,
    blocks: Vec<Vec<f32>>,
    refs: Vec<u32>,
    generation: Vec<u64>,
    key_of: Vec<Option<PrefixKey>>,
    free: Vec<usize>,
    cached: HashMap<PrefixKey, usize>,
    /// Unreferenced cached blocks by the tick they were last released.
    evictable: BTreeMap<u64, usize>,
    released_at: Vec<u64>,
    tick: u64,
}

impl KvPool {
    /// A pool of at most `capacity` blocks; memory is taken as blocks are
    /// first used.
    pub fn new(shape: KvShape, capacity: usize) -> KvPool {
        KvPool {
            shape,
            capacity,
            blocks: Vec::new(),
            refs: Vec::new(),
            generation: Vec::new(),
            key_of: Vec::new(),
            free: Vec::new(),
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: Vec::new(),
            tick: 0,
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks a new allocation could get, evicting cached ones if need be.
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len() + (self.capacity - self.blocks.len())
    }

    pub fn usage(&self) -> KvUsage {
        KvUsage {
            capacity_blocks: self.capacity,
            used_blocks: self.refs.iter().filter(|r| **r > 0).count(),
            cached_blocks: self.evictable.len(),
        }
    }

    /// A block for one sequence's exclusive use, or `None` when the budget
    /// is spent.
    pub fn allocate(&mut self) -> Option<usize> {
        let block = if let Some(b) = self.free.pop() {
            b
        } else if self.blocks.len() < self.capacity {
            self.blocks.push(vec![0.0; self.shape.block_floats()]);
            self.refs.push(0);
            self.generation.push(0);
            self.key_of.push(None);
            self.released_at.push(0);
            self.blocks.len() - 1
        } else {
            let (_, b) = self.evictable.pop_first()?;
            if let Some(key) = self.key_of[b].take() {
                self.cached.remove(&key);
            }
            self.generation[b] += 1;
            b
        };
        self.refs[block] = 1;
        Some(block)
    }

    /// Gives back one sequence's hold on each block.
    pub fn release(&mut self, blocks: &[usize]) {
        for &b in blocks {
            self.refs[b] = self.refs[b].saturating_sub(1);
            if self.refs[b] > 0 {
                continue;
            }
            if self.key_of[b].is_some() {
                self.tick += 1;
                self.released_at[b] = self.tick;
                self.evictable.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// The cached blocks that begin `tokens` (whole blocks only, at most
    /// `max_blocks`), each now also held by the caller.
    pub fn lookup(&mut self, salt: Option<&str>, tokens: &[u32], max_blocks: usize) -> Vec<usize> {
        let mut parent = Parent::Root(salt.map(str::to_string));
        let mut found = Vec::new();
        for chunk in tokens.chunks_exact(BLOCK_TOKENS).take(max_blocks) {
            let Ok(block_tokens) = <[u32; BLOCK_TOKENS]>::try_from(chunk) else {
                break;
            };
            let key = PrefixKey {
                parent,
                tokens: block_tokens,
            };
            let Some(&b) = self.cached.get(&key) else {
                break;
            };
            if self.refs[b] == 0 {
                self.evictable.remove(&self.released_at[b]);
            }
            self.refs[b] += 1;
            found.push(b);
            parent = Parent::Block(b, self.generation[b]);
        }
        found
    }

    /// Offers a full block of prompt for reuse; `previous` is the block
    /// before it in the same sequence. Returns false when the same prefix
    /// is already cached (two sequences computed it at once): the block
    /// then stays private to its sequence.
    pub fn register(
        &mut self,
        block: usize,
        previous: Option<usize>,
        salt: Option<&str>,
        tokens: &[u32],
    ) -> bool {
        let Ok(tokens) = <[u32; BLOCK_TOKENS]>::try_from(tokens) else {
            return false;
        };
        let parent = match previous {
            None => Parent::Root(salt.map(str::to_string)),
            Some(p) => Parent::Block(p, self.generation[p]),
        };
        let key = PrefixKey { parent, tokens };
        if self.cached.contains_key(&key) || self.key_of[block].is_some() {
            return false;
        }
        self.cached.insert(key.clone(), block);
        self.key_of[block] = Some(key);
        true
    }

    /// Stores one position's key and value for a layer's KV head.
    pub fn write(
        &mut self,
        block: usize,
        slot: usize,
        layer: usize,
        head: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let d = self.shape.head_dim;
        let ko = self.shape.offset(layer, false, head, slot);
        let vo = self.shape.offset(layer, true, head, slot);
        let data = &mut self.blocks[block];
        data[ko..ko + d].copy_from_slice(k);
        data[vo..vo + d].copy_from_slice(v);
    }

    /// One position's key (or value) vector for a layer's KV head.
    /// One head's vectors of every slot of a block, slot after slot.
    pub fn block_vectors(&self, block: usize, layer: usize, head: usize, value: bool) -> &[f32] {
        let o = self.shape.offset(layer, value, head, 0);
        &self.blocks[block][o..o + BLOCK_TOKENS * self.shape.head_dim]
    }

    pub fn vector(
        &self,
        block: usize,
        slot: usize,
        layer: usize,
        head: usize,
        value: bool,
    ) -> &[f32] {
        let o = self.shape.offset(layer, value, head, slot);
        &self.blocks[block][o..o + self.shape.head_dim]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(capacity: usize) -> KvPool {
        KvPool::new(
            KvShape {
                layers: 1,
                kv_heads: 1,
                head_dim: 2,
            },
            capacity,
        )
    }

    fn prompt(start: u32, blocks: usize) -> Vec<u32> {
        (start..start + (blocks * BLOCK_TOKENS) as u32).collect()
    }

    #[test]
    fn budget_is_enforced_and_released_blocks_return() {
        let mut p = pool(2);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        assert_eq!(p.allocate(), None);
        p.release(&[a]);
        assert_eq!(p.available(), 1);
        assert_eq!(p.allocate(), Some(a));
        p.release(&[a, b]);
        assert_eq!(p.usage().used_blocks, 0);
    }

    #[test]
    fn a_shared_prefix_is_found_only_under_the_same_salt_and_parent() {
        let mut p = pool(8);
        let tokens = prompt(100, 2);
        let (b0, b1) = (p.allocate().unwrap(), p.allocate().unwrap());
        assert!(p.register(b0, None, Some("t1"), &tokens[..16]));
        assert!(p.register(b1, Some(b0), Some("t1"), &tokens[16..]));
        assert_eq!(p.lookup(Some("t1"), &tokens, 8), vec![b0, b1]);
        assert!(p.lookup(Some("t2"), &tokens, 8).is_empty(), "another salt");
        assert!(p.lookup(None, &tokens, 8).is_empty(), "no salt");
        // The same second block after a different first block is not a hit.
        let mut other = prompt(500, 1);
        other.extend_from_slice(&tokens[16..]);
        assert!(p.lookup(Some("t1"), &other, 8).is_empty());
        assert_eq!(p.lookup(Some("t1"), &tokens, 1), vec![b0], "max_blocks");
    }

    #[test]
    fn cached_blocks_outlive_their_sequence_until_the_pool_needs_them() {
        let mut p = pool(2);
        let tokens = prompt(7, 1);
        let b = p.allocate().unwrap();
        p.register(b, None, None, &tokens);
        p.release(&[b]);
        assert_eq!(p.usage().cached_blocks, 1);
        assert_eq!(p.lookup(None, &tokens, 1), vec![b]);
        p.release(&[b]);
        // Two more allocations: the second must evict the cached block.
        let x = p.allocate().unwrap();
        let y = p.allocate().unwrap();
        assert_ne!(x, y);
        assert!(p.lookup(None, &tokens, 1).is_empty(), "evicted");
        // A child registered under the evicted block's old generation no
        // longer matches after the block is reused.
        p.release(&[x, y]);
    }

    #[test]
    fn a_duplicate_prefix_stays_private() {
        let mut p = pool(4);
        let tokens = prompt(1, 1);
        let (a, b) = (p.allocate().unwrap(), p.allocate().unwrap());
        assert!(p.register(a, None, None, &tokens));
        assert!(!p.register(b, None, None, &tokens));
        p.release(&[b]);
        assert_eq!(p.usage().cached_blocks, 0, "b went back to the free list");
    }
}
