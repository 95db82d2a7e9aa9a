//! What a history cut buys and costs on one shard document shaped like syncmesh's (a meta
//! record and a whole JSON value per item): saved bytes and operations held after the first
//! write of every item, after 30 more writes of each, and after a cut; the time of the cut;
//! and the time to carry late changes onto the new generation.
//!
//! `cargo bench -p syncmesh-core --bench generations`

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code: a panic is the report

use std::time::Instant;

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ScalarValue, ROOT};
use syncmesh_core::generation;

/// One write of item `i`: its meta record and its whole value (~100 bytes of JSON).
fn write(doc: &mut Automerge, i: usize, round: usize) {
    let mut tx = doc.transaction();
    let _ = tx.put(
        ROOT,
        format!("m1:{i}"),
        ScalarValue::Bytes(vec![(round % 250) as u8; 66]),
    );
    let json = format!(
        "{{\"phone_number\":{},\"country\":\"UK\",\"note\":\"round {round} of item {i} padding....\"}}",
        10_000_000 + round * 7 + i
    );
    let _ = tx.put(ROOT, format!("w1:{i}"), json);
    tx.commit();
}

fn ops(doc: &Automerge) -> usize {
    doc.get_changes(&[]).iter().map(|c| c.len()).sum()
}

fn main() {
    println!(
        "one shard document: saved bytes and operations held; cut and carry times (medians of 5)"
    );
    println!(
        "{:>6} {:>22} {:>22} {:>22} {:>10} {:>14}",
        "items", "written once", "+30 writes each", "after the cut", "cut (ms)", "carry 10 (ms)"
    );
    for &items in &[5usize, 50, 500] {
        let mut doc = Automerge::new().with_actor(ActorId::from(vec![1u8; 16]));
        for i in 0..items {
            write(&mut doc, i, 0);
        }
        let once = (doc.save().len(), ops(&doc));
        for round in 1..=30 {
            for i in 0..items {
                write(&mut doc, i, round);
            }
        }
        let full = (doc.save().len(), ops(&doc));
        let heads = doc.get_heads();
        let mut cut_ms = Vec::new();
        let mut cut = None;
        for _ in 0..5 {
            let t = Instant::now();
            let (g, _) = generation::rebase(
                b"bench/shard",
                1,
                &doc,
                &heads,
                &generation::automerge_winners,
            )
            .unwrap();
            cut_ms.push(t.elapsed().as_secs_f64() * 1e3);
            cut = Some(g);
        }
        let g = cut.unwrap();
        let after = (g.save().len(), ops(&g));
        // Ten late writes by another replica, carried onto the cut generation.
        let mut late = doc.fork_at(&heads).unwrap();
        late.set_actor(ActorId::from(vec![2u8; 16]));
        for i in 0..10 {
            write(&mut late, (i * 7) % items, 99 + i);
        }
        let mut carry_ms = Vec::new();
        for _ in 0..5 {
            let mut target = g.clone();
            let base = generation::genesis_heads(&target);
            let clock = generation::Clock::at(&doc, &heads).unwrap();
            let t = Instant::now();
            let n = generation::carry_all(&mut target, &late, &base, |c| clock.includes_change(c))
                .unwrap();
            carry_ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(n, 10);
        }
        cut_ms.sort_by(f64::total_cmp);
        carry_ms.sort_by(f64::total_cmp);
        println!(
            "{:>6} {:>12} B {:>5} ops {:>12} B {:>5} ops {:>12} B {:>5} ops {:>10.2} {:>14.2}",
            items, once.0, once.1, full.0, full.1, after.0, after.1, cut_ms[2], carry_ms[2]
        );
    }
}
