//! Gangs: every member placed or none, optionally within one leaf (rail)
//! group.

use std::collections::BTreeSet;

use super::types::{Amount, Binding, Node, Refusal, Request};
use super::Fleet;

impl Fleet {
    /// Places every member of a gang or none. With `leaf`, all members go
    /// to nodes of one leaf group (tried in name order).
    pub fn place_gang(
        &mut self,
        members: &[Request],
        same_leaf: bool,
    ) -> Result<Vec<Binding>, Refusal> {
        let Some(first) = members.first() else {
            return Ok(Vec::new());
        };
        if members.iter().any(|m| m.tenant != first.tenant) {
            return Err(Refusal::Gang(
                "all members must belong to one tenant".into(),
            ));
        }
        let policy = self
            .tenants
            .get(&first.tenant)
            .cloned()
            .ok_or_else(|| Refusal::UnknownTenant(first.tenant.clone()))?;
        let total = members
            .iter()
            .fold(Amount::default(), |a, m| a.plus(m.amount()));
        self.check_quota(&first.tenant, &policy, total)?;
        let leaves: Vec<Option<String>> = if same_leaf {
            let set: BTreeSet<Option<String>> = self
                .nodes
                .iter()
                .map(|n| n.leaf.clone())
                .filter(Option::is_some)
                .collect();
            set.into_iter().collect()
        } else {
            vec![None]
        };
        let mut last = String::from("no leaf group");
        for leaf in leaves {
            let within = |n: &Node| leaf.is_none() || n.leaf == leaf;
            let mut placed: Vec<Binding> = Vec::new();
            let mut failed = None;
            for m in members {
                let attempt = self.prepare(m).and_then(|(t, policy)| {
                    let borrowed = self.check_quota(&m.tenant, &policy, m.amount())?;
                    let c = self.choose(m, t, &policy, &within)?;
                    Ok(self.bind(m, t, borrowed, c))
                });
                match attempt {
                    Ok(b) => placed.push(b),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => return Ok(placed),
                Some(e) => {
                    // All or nothing: undo this attempt exactly.
                    for b in placed.iter().rev() {
                        self.release(&b.request);
                    }
                    last = match &leaf {
                        Some(l) => format!("leaf {l}: {e}"),
                        None => e.to_string(),
                    };
                }
            }
        }
        Err(Refusal::Gang(last))
    }
}
