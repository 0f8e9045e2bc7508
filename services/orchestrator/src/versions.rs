//! The engine's cache of workflow versions. A version never changes once made, so an entry is never
//! stale; the cache is bounded by the encoded size of what it holds and evicts the versions least
//! used, so a server that has run many workflows keeps only those it runs now.

use std::sync::Arc;

use meshflow_proto::workflow::v1 as wpb;
use prost::Message;
use quick_cache::Weighter;
use quick_cache::sync::Cache;

/// Bytes of encoded versions the cache holds by default.
pub const DEFAULT_BUDGET_BYTES: u64 = 16 << 20;

#[derive(Clone)]
struct EncodedSize;

impl Weighter<(String, i64), Arc<wpb::WorkflowVersion>> for EncodedSize {
    fn weight(&self, key: &(String, i64), version: &Arc<wpb::WorkflowVersion>) -> u64 {
        (key.0.len() + version.encoded_len()).max(1) as u64
    }
}

/// Workflow versions by (workflow id, version number), within a byte budget.
pub struct Versions(Cache<(String, i64), Arc<wpb::WorkflowVersion>, EncodedSize>);

impl Versions {
    /// A cache of at most `budget_bytes` of encoded versions.
    pub fn new(budget_bytes: u64) -> Self {
        // quick_cache sizes its tables from an estimate of the number of entries.
        let estimated_items = (budget_bytes / 2048).clamp(16, 65_536) as usize;
        Self(Cache::with_weighter(
            estimated_items,
            budget_bytes,
            EncodedSize,
        ))
    }

    /// The cached version, if any.
    pub fn get(&self, workflow_id: &str, version: i64) -> Option<Arc<wpb::WorkflowVersion>> {
        self.0.get(&(workflow_id.to_string(), version))
    }

    /// Caches a version (one larger than the whole budget is not kept).
    pub fn insert(&self, version: Arc<wpb::WorkflowVersion>) {
        self.0
            .insert((version.workflow_id.clone(), version.version), version);
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn weight(&self) -> u64 {
        self.0.weight()
    }

    /// Versions held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the cache holds nothing.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(id: usize, version: i64, pad: usize) -> Arc<wpb::WorkflowVersion> {
        Arc::new(wpb::WorkflowVersion {
            workflow_id: format!("wf-{id}"),
            version,
            steps: vec![wpb::Step {
                id: "s".repeat(pad),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    #[test]
    fn stays_within_its_byte_budget_and_evicts() {
        let cache = Versions::new(64 * 1024);
        for i in 0..1_000 {
            cache.insert(version(i, 1, 1_000));
        }
        assert!(cache.weight() <= 64 * 1024, "{} bytes", cache.weight());
        assert!(
            cache.len() < 1_000 && cache.len() >= 30,
            "{} entries",
            cache.len()
        );
        let newest = version(999, 1, 1_000);
        cache.insert(newest.clone());
        assert_eq!(cache.get("wf-999", 1), Some(newest));
        assert_eq!(cache.get("wf-999", 2), None);
    }

    #[test]
    fn a_version_larger_than_the_budget_is_not_kept() {
        let cache = Versions::new(4 * 1024);
        cache.insert(version(1, 1, 10_000));
        assert!(cache.get("wf-1", 1).is_none());
        assert!(cache.is_empty());
    }
}
