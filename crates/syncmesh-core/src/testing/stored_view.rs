//! What a store keeps of a map's read view, as the tests' in-memory stores keep it.

use std::collections::BTreeMap;

use crate::ViewChanges;

/// Applies a map's view changes to the entries a store holds for it.
pub fn apply(view: &mut BTreeMap<String, Vec<u8>>, vc: ViewChanges) {
    if vc.reset {
        view.clear();
    }
    for (k, e) in vc.entries {
        match e {
            Some(e) => view.insert(k, e),
            None => view.remove(&k),
        };
    }
}
