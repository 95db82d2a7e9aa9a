//! What syncmesh needs of Automerge that differs between its release lines (this build: the
//! 0.6 line, see docs/benchmarks.md for why): kept here so the line can be changed in one place.

use automerge::{Automerge, Change, ChangeHash, PatchLog, ReadDoc};

/// Operations a document holds, history included (0.6 keeps every change in memory, so this
/// walks them without decoding).
pub(crate) fn op_count(doc: &Automerge) -> u64 {
    let mut n = 0;
    for_each_change_since(doc, &[], |c| n += c.len() as u64);
    n
}

// The 0.6 and 0.12 lines differ in what these return (borrowed changes on 0.6, owned on
// 0.7+; a text representation for patch logs on 0.6 only): callers use these and never the
// methods themselves, so changing the line changes only this file.

/// Runs `f` on the change this document committed last itself, if any.
pub(crate) fn with_last_local_change<T>(
    doc: &Automerge,
    f: impl FnOnce(&Change) -> T,
) -> Option<T> {
    doc.get_last_local_change().map(f)
}

/// Whether the document holds the change.
pub(crate) fn has_change(doc: &Automerge, hash: &ChangeHash) -> bool {
    doc.get_change_by_hash(hash).is_some()
}

/// Runs `f` on one change the document holds, if it does.
pub(crate) fn with_change<T>(
    doc: &Automerge,
    hash: &ChangeHash,
    f: impl FnOnce(&Change) -> T,
) -> Option<T> {
    doc.get_change_by_hash(hash).map(f)
}

/// Runs `f` on every change the document holds that is not an ancestor of `heads` (all of
/// them for no heads), dependencies first.
pub(crate) fn for_each_change_since(doc: &Automerge, heads: &[ChangeHash], f: impl FnMut(&Change)) {
    doc.get_changes(heads).into_iter().for_each(f);
}

/// Every change the document holds, owned, dependencies first.
pub(crate) fn all_changes(doc: &Automerge) -> Vec<Change> {
    doc.get_changes(&[]).into_iter().cloned().collect()
}

/// A patch log that records (string text, as syncmesh never makes text objects).
pub(crate) fn patch_log() -> PatchLog {
    PatchLog::active(automerge::patches::TextRepresentation::String(
        automerge::TextEncoding::UnicodeCodePoint,
    ))
}

/// A sync message reduced to version 1 without capability flags: a peer that never learns we
/// could take version 2 messages never sends one (their single chunk, possibly a whole saved
/// document, could not be checked change by change before it is applied).
pub(crate) fn plain_sync_message(msg: &mut automerge::sync::Message) {
    msg.supported_capabilities = None;
    msg.version = automerge::sync::MessageVersion::V1;
}

/// Whether two operations were made by the same actor.
pub(crate) fn same_actor(a: &automerge::ObjId, b: &automerge::ObjId) -> bool {
    match (a, b) {
        (automerge::ObjId::Id(_, x, _), automerge::ObjId::Id(_, y, _)) => x == y,
        _ => false,
    }
}

/// An operation of a change on the document's root object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootOp {
    /// On a map key (a put or a delete).
    Key(String),
    /// A sequence operation (never valid on a map root).
    Seq,
}

/// The operations a change makes on the root object, in order (operations inside nested
/// objects are left out); `None` if the change is malformed in a way Automerge only finds by
/// panicking (0.6's `decode` unwraps the actor index of every operation, and `Change::from_bytes`
/// does not check them: a peer can name an actor the change does not list).
pub(crate) fn root_ops(c: &Change) -> Option<Vec<RootOp>> {
    let ops =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.decode().operations)).ok()?;
    let mut out = Vec::new();
    for op in ops {
        // 0.6 keeps its expanded-change types private: their serde forms are "_root" for the
        // root object and the key's string for a map key.
        let root = serde_json::to_value(&op.obj).is_ok_and(|o| o == "_root");
        if !root {
            continue;
        }
        if !op.key.is_map_key() {
            out.push(RootOp::Seq);
            continue;
        }
        match serde_json::to_value(&op.key) {
            Ok(serde_json::Value::String(k)) => out.push(RootOp::Key(k)),
            _ => out.push(RootOp::Seq),
        }
    }
    Some(out)
}

/// The root-level map keys a change writes (puts and deletes), in order, repeats included;
/// `None` for a malformed change (see [`root_ops`]).
pub(crate) fn root_map_keys(c: &Change) -> Option<Vec<String>> {
    Some(
        root_ops(c)?
            .into_iter()
            .filter_map(|o| match o {
                RootOp::Key(k) => Some(k),
                RootOp::Seq => None,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ObjType, ROOT};

    #[test]
    fn root_keys_of_a_change_leave_nested_operations_out() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, "a", 1).unwrap();
        let m = tx.put_object(ROOT, "b", ObjType::Map).unwrap();
        tx.put(&m, "inner", 2).unwrap();
        tx.delete(ROOT, "a").unwrap();
        tx.commit();
        let c = doc.get_last_local_change().unwrap().clone();
        assert_eq!(root_map_keys(&c).unwrap(), vec!["a", "b", "a"]);
    }
}
