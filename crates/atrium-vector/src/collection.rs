//! A collection: points (an id, a vector, a JSON payload) in an HNSW index,
//! a keyword index over top-level payload scalars, and the planner that
//! picks how a filtered search runs.
//!
//! Filtered search stays accurate under selective filters the way Qdrant
//! keeps it: when few points match (at most `EXACT_SCAN_FLOATS` floats to
//! compare), they are compared exactly — a graph walk that must skip 99 of
//! 100 points it reaches loses its way; otherwise the graph is walked with
//! the filter applied to results and `ef` widened by the filter's
//! selectivity, so enough matching points are met.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::distance::{prepare, Metric};
use crate::filter::{Filter, Scalar};
use crate::hnsw::{Hnsw, Params, Scratch};

/// Above this many floats to compare, a filtered search walks the graph.
pub const EXACT_SCAN_FLOATS: usize = 1_000_000;
/// The widest `ef` a filtered graph walk is given.
pub const MAX_FILTERED_EF: usize = 2_000;
pub const MAX_DIM: usize = 4_096;
pub const MAX_ID_BYTES: usize = 64;

/// A point's id: an unsigned integer or a string (as in Qdrant, which
/// takes integers and UUIDs).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PointId {
    Num(u64),
    Str(String),
}

impl std::fmt::Display for PointId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointId::Num(n) => write!(f, "{n}"),
            PointId::Str(s) => write!(f, "{s:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub dim: usize,
    pub metric: Metric,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    pub id: PointId,
    pub vector: Vec<f32>,
    #[serde(default)]
    pub payload: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub id: PointId,
    pub score: f32,
    pub payload: Map<String, Value>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PointError {
    #[error("point {id}: the vector has {got} dimensions; the collection's have {want}")]
    Dimension { id: String, got: usize, want: usize },
    #[error("point {id}: the vector holds a NaN or an infinity")]
    NotFinite { id: String },
    #[error("a point id string must be 1 to {MAX_ID_BYTES} bytes")]
    BadId,
}

/// How a filtered search ran, for the caller's and the benchmark's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    Graph,
    Exact,
    FilteredGraph,
}

#[derive(Debug)]
pub struct Collection {
    shape: Shape,
    index: Hnsw,
    ids: HashMap<PointId, u32>,
    slot_ids: Vec<PointId>,
    payloads: Vec<Map<String, Value>>,
    /// (top-level key, scalar) → slots holding it (dead ones too, skipped
    /// on read).
    terms: HashMap<String, HashMap<Scalar, Vec<u32>>>,
    /// The live points' payloads, as JSON bytes (for [`Collection::bytes`]).
    payload_bytes: u64,
}

/// A payload's size as JSON: what a tenant's stored bytes count.
pub fn payload_bytes(payload: &Map<String, Value>) -> u64 {
    if payload.is_empty() {
        return 0;
    }
    serde_json::to_vec(payload).map_or(0, |b| b.len() as u64)
}

impl Collection {
    pub fn new(shape: Shape, params: Params) -> Collection {
        Collection {
            shape,
            index: Hnsw::new(shape.metric, shape.dim, params),
            ids: HashMap::new(),
            slot_ids: Vec::new(),
            payloads: Vec::new(),
            terms: HashMap::new(),
            payload_bytes: 0,
        }
    }

    /// What the points hold, as a tenant is charged for it: each vector's
    /// floats and each payload's JSON.
    pub fn bytes(&self) -> u64 {
        let vectors = (self.len() as u64).saturating_mul(self.vector_bytes());
        vectors.saturating_add(self.payload_bytes)
    }

    /// One vector's floats, as charged.
    pub fn vector_bytes(&self) -> u64 {
        self.shape.dim as u64 * 4
    }

    /// What point `id` is charged now (its vector and payload), if held.
    pub fn bytes_of(&self, id: &PointId) -> Option<u64> {
        let slot = *self.ids.get(id)?;
        let payload = self.payloads.get(slot as usize).map_or(0, payload_bytes);
        Some(self.vector_bytes().saturating_add(payload))
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Checks a point against the collection without changing anything.
    pub fn check(&self, p: &Point) -> Result<(), PointError> {
        if let PointId::Str(s) = &p.id {
            if s.is_empty() || s.len() > MAX_ID_BYTES {
                return Err(PointError::BadId);
            }
        }
        if p.vector.len() != self.shape.dim {
            return Err(PointError::Dimension {
                id: p.id.to_string(),
                got: p.vector.len(),
                want: self.shape.dim,
            });
        }
        if !p.vector.iter().all(|x| x.is_finite()) {
            return Err(PointError::NotFinite {
                id: p.id.to_string(),
            });
        }
        Ok(())
    }

    /// Adds or replaces a point (checked first; nothing changes on error).
    pub fn upsert(&mut self, p: Point, scratch: &mut Scratch) -> Result<(), PointError> {
        self.check(&p)?;
        self.delete(&p.id);
        let v = prepare(&p.vector, self.shape.metric == Metric::Cosine);
        let slot = self.index.insert(&v, scratch);
        for (key, value) in &p.payload {
            let scalars: Vec<Scalar> = match value {
                Value::Array(items) => items.iter().filter_map(Scalar::of).collect(),
                v => Scalar::of(v).into_iter().collect(),
            };
            for s in scalars {
                self.terms
                    .entry(key.clone())
                    .or_default()
                    .entry(s)
                    .or_default()
                    .push(slot);
            }
        }
        self.ids.insert(p.id.clone(), slot);
        self.slot_ids.push(p.id);
        self.payload_bytes = self.payload_bytes.saturating_add(payload_bytes(&p.payload));
        self.payloads.push(p.payload);
        Ok(())
    }

    /// Removes a point; false if there was none.
    pub fn delete(&mut self, id: &PointId) -> bool {
        let Some(slot) = self.ids.remove(id) else {
            return false;
        };
        self.index.remove(slot);
        if let Some(p) = self.payloads.get_mut(slot as usize) {
            self.payload_bytes = self.payload_bytes.saturating_sub(payload_bytes(p));
            *p = Map::new();
        }
        true
    }

    pub fn get(&self, id: &PointId) -> Option<Point> {
        let slot = *self.ids.get(id)?;
        Some(self.point_at(slot))
    }

    fn point_at(&self, slot: u32) -> Point {
        let v = self.index.vector(slot);
        Point {
            id: self.slot_ids[slot as usize].clone(),
            vector: v[..self.shape.dim].to_vec(),
            payload: self.payloads[slot as usize].clone(),
        }
    }

    /// Every live point, in id order (for snapshots and scrolling).
    pub fn points(&self) -> impl Iterator<Item = Point> + '_ {
        let ordered: BTreeMap<&PointId, u32> = self.ids.iter().map(|(k, v)| (k, *v)).collect();
        ordered.into_values().map(|slot| self.point_at(slot))
    }

    /// Up to `limit` points with ids after `after`, in id order, that the
    /// filter accepts; and the id to continue after, if more may follow.
    pub fn scroll(
        &self,
        after: Option<&PointId>,
        limit: usize,
        filter: Option<&Filter>,
    ) -> (Vec<Point>, Option<PointId>) {
        let mut ordered: Vec<(&PointId, u32)> = self
            .ids
            .iter()
            .filter(|(id, _)| after.is_none_or(|a| *id > a))
            .map(|(k, v)| (k, *v))
            .filter(|(_, slot)| filter.is_none_or(|f| f.accepts(&self.payloads[*slot as usize])))
            .collect();
        ordered.sort();
        let more = ordered.len() > limit;
        let page: Vec<Point> = ordered
            .iter()
            .take(limit)
            .map(|(_, slot)| self.point_at(*slot))
            .collect();
        let next = if more {
            page.last().map(|p| p.id.clone())
        } else {
            None
        };
        (page, next)
    }

    /// Live slots the filter accepts, using the keyword index when the
    /// filter has an exact term.
    fn matching(&self, f: &Filter) -> Vec<u32> {
        let accept =
            |slot: &u32| !self.index.is_dead(*slot) && f.accepts(&self.payloads[*slot as usize]);
        match f.indexed_term() {
            Some((key, value)) => self
                .terms
                .get(key)
                .and_then(|values| values.get(value))
                .map(|slots| slots.iter().copied().filter(accept).collect())
                .unwrap_or_default(),
            None => (0..self.index.slots() as u32).filter(accept).collect(),
        }
    }

    pub fn count(&self, filter: Option<&Filter>) -> usize {
        match filter {
            None => self.len(),
            Some(f) => self.matching(f).len(),
        }
    }

    /// The `k` points nearest `query` that `filter` accepts, nearest
    /// first, and how the search ran.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
        scratch: &mut Scratch,
    ) -> Result<(Vec<Hit>, Plan), PointError> {
        if query.len() != self.shape.dim {
            return Err(PointError::Dimension {
                id: "query".into(),
                got: query.len(),
                want: self.shape.dim,
            });
        }
        if !query.iter().all(|x| x.is_finite()) {
            return Err(PointError::NotFinite { id: "query".into() });
        }
        let q = prepare(query, self.shape.metric == Metric::Cosine);
        let (found, plan) = match filter {
            None => (
                self.index.search(&q, k, ef, &|_| true, scratch),
                Plan::Graph,
            ),
            Some(f) => {
                let matching = self.matching(f);
                if matching.len().saturating_mul(self.shape.dim) <= EXACT_SCAN_FLOATS {
                    let mut all: Vec<(f32, u32)> = matching
                        .iter()
                        .map(|&s| (self.shape.metric.distance(&q, self.index.vector(s)), s))
                        .collect();
                    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    all.truncate(k);
                    (all, Plan::Exact)
                } else {
                    let mut allowed = vec![false; self.index.slots()];
                    for s in &matching {
                        allowed[*s as usize] = true;
                    }
                    let share = matching.len() as f64 / self.index.live().max(1) as f64;
                    let wide = ((ef.max(k) as f64) / share.max(1e-3)).ceil() as usize;
                    let found = self.index.search(
                        &q,
                        k,
                        wide.min(MAX_FILTERED_EF).max(ef),
                        &|s| allowed[s as usize],
                        scratch,
                    );
                    (found, Plan::FilteredGraph)
                }
            }
        };
        let hits = found
            .into_iter()
            .map(|(d, slot)| Hit {
                id: self.slot_ids[slot as usize].clone(),
                score: self.shape.metric.score(d),
                payload: self.payloads[slot as usize].clone(),
            })
            .collect();
        Ok((hits, plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn point(id: u64, v: Vec<f32>, payload: Value) -> Point {
        Point {
            id: PointId::Num(id),
            vector: v,
            payload: payload.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn upsert_replaces_and_delete_removes_and_bad_points_change_nothing() {
        let shape = Shape {
            dim: 3,
            metric: Metric::Cosine,
        };
        let mut c = Collection::new(shape, Params::default());
        let mut s = Scratch::default();
        c.upsert(point(1, vec![1.0, 0.0, 0.0], json!({"lang": "de"})), &mut s)
            .unwrap();
        c.upsert(point(2, vec![0.0, 1.0, 0.0], json!({"lang": "fr"})), &mut s)
            .unwrap();
        c.upsert(point(1, vec![0.0, 0.0, 1.0], json!({"lang": "en"})), &mut s)
            .unwrap();
        assert_eq!(c.len(), 2);
        // Two vectors of 3 floats, and {"lang":"en"} and {"lang":"fr"}.
        assert_eq!(c.bytes(), 2 * 12 + 2 * 13);
        assert_eq!(c.bytes_of(&PointId::Num(1)), Some(12 + 13));
        let (hits, plan) = c.search(&[0.0, 0.0, 2.0], 1, 10, None, &mut s).unwrap();
        assert_eq!((hits[0].id.clone(), plan), (PointId::Num(1), Plan::Graph));
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        let de: Filter =
            serde_json::from_value(json!({"must": [{"key": "lang", "match": {"value": "de"}}]}))
                .unwrap();
        assert_eq!(c.count(Some(&de)), 0, "the replaced payload is gone");
        assert_eq!(
            c.upsert(point(3, vec![1.0, 2.0], json!({})), &mut s),
            Err(PointError::Dimension {
                id: "3".into(),
                got: 2,
                want: 3
            })
        );
        assert!(c
            .upsert(point(3, vec![f32::NAN, 0.0, 0.0], json!({})), &mut s)
            .is_err());
        assert!(c.delete(&PointId::Num(2)));
        assert!(!c.delete(&PointId::Num(2)));
        assert_eq!(c.bytes(), 12 + 13);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(&PointId::Num(1)).unwrap().vector.len(), 3);
    }

    #[test]
    fn selective_filters_are_answered_exactly() {
        let shape = Shape {
            dim: 4,
            metric: Metric::L2,
        };
        let mut c = Collection::new(shape, Params::default());
        let mut s = Scratch::default();
        for i in 0..2000u64 {
            let x = i as f32;
            c.upsert(
                point(
                    i,
                    vec![x, x.sin(), x.cos(), 1.0],
                    json!({"bucket": i % 100, "even": i % 2 == 0}),
                ),
                &mut s,
            )
            .unwrap();
        }
        let one: Filter =
            serde_json::from_value(json!({"must": [{"key": "bucket", "match": {"value": 7}}]}))
                .unwrap();
        let (hits, plan) = c
            .search(&[1000.0, 0.0, 0.0, 1.0], 3, 10, Some(&one), &mut s)
            .unwrap();
        assert_eq!(plan, Plan::Exact);
        let ids: Vec<PointId> = hits.iter().map(|h| h.id.clone()).collect();
        assert_eq!(
            ids,
            vec![PointId::Num(1007), PointId::Num(907), PointId::Num(1107)]
        );
        let (page, next) = c.scroll(None, 5, Some(&one));
        assert_eq!(page.len(), 5);
        assert_eq!(next, Some(PointId::Num(407)));
        assert_eq!(c.count(Some(&one)), 20);
    }
}
