//! What Automerge itself costs, to explain the engine's figures and design: per-put cost and
//! remote-apply cost against document size, with and without history, on the line the engine
//! uses (0.6) and on the newest (0.12), side by side.
//!
//! `cargo bench -p syncmesh-core --bench automerge_costs`

#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the report

/// The same measurements against one Automerge crate (`$am`: `automerge` or `automerge012`), in module `$module`.
macro_rules! costs {
    ($module:ident, $am:ident) => {
        mod $module {
            use std::time::Instant;

            use $am::transaction::Transactable;
            use $am::{ActorId, Automerge, Change, ScalarValue, ROOT};

            fn fill(doc: &mut Automerge, items: usize) {
                for i in 0..items {
                    let mut tx = doc.transaction();
                    let _ = tx.put(ROOT, format!("m{i}"), ScalarValue::Bytes(vec![1; 66]));
                    for f in ["a", "b", "c"] {
                        let _ = tx.put(ROOT, format!("f{i}{f}"), i as i64);
                    }
                    tx.commit();
                }
            }

            /// Overwrites existing slots `rounds` times (history that Automerge keeps forever).
            fn churn(doc: &mut Automerge, items: usize, rounds: usize) {
                for r in 0..rounds {
                    let mut tx = doc.transaction();
                    let i = r % items.max(1);
                    let _ = tx.put(
                        ROOT,
                        format!("m{i}"),
                        ScalarValue::Bytes(vec![(r % 250) as u8; 66]),
                    );
                    let _ = tx.put(ROOT, format!("f{i}a"), (r + 10_000) as i64);
                    tx.commit();
                }
            }

            pub fn run(label: &str) {
                println!("automerge {label}: cost of one overwrite put, and of applying a peer's 2-op change");
                println!(
                    "{:>7} {:>9} {:>16} {:>16} {:>18}",
                    "items", "history", "put (µs/op)", "new key (µs/op)", "apply (µs/change)"
                );
                for &(items, history) in &[
                    (4usize, 0usize),
                    (4, 2000),
                    (100, 0),
                    (100, 2000),
                    (1000, 0),
                    (1000, 2000),
                    (4000, 0),
                ] {
                    let mut doc = Automerge::new();
                    doc.set_actor(ActorId::from(vec![1u8; 16]));
                    fill(&mut doc, items);
                    churn(&mut doc, items, history);

                    let iters = 300;
                    let mut d = doc.clone();
                    let t = Instant::now();
                    for k in 0..iters {
                        let mut tx = d.transaction();
                        let _ = tx.put(ROOT, format!("f{}a", k % items), (k + 50_000) as i64);
                        tx.commit();
                    }
                    let put = t.elapsed().as_secs_f64() * 1e6 / iters as f64;

                    let mut d = doc.clone();
                    let t = Instant::now();
                    for k in 0..iters {
                        let mut tx = d.transaction();
                        let _ = tx.put(ROOT, format!("new{k}"), k as i64);
                        tx.commit();
                    }
                    let new_key = t.elapsed().as_secs_f64() * 1e6 / iters as f64;

                    let mut other = doc.fork();
                    other.set_actor(ActorId::from(vec![2u8; 16]));
                    let mut changes = Vec::new();
                    for k in 0..iters {
                        let heads = other.get_heads();
                        let mut tx = other.transaction();
                        let i = k % items;
                        let _ = tx.put(
                            ROOT,
                            format!("m{i}"),
                            ScalarValue::Bytes(vec![(k % 250) as u8; 66]),
                        );
                        let _ = tx.put(ROOT, format!("f{i}b"), (k + 70_000) as i64);
                        tx.commit();
                        changes.extend(
                            other
                                .get_changes(&heads)
                                .into_iter()
                                .map(|c| c.raw_bytes().to_vec()),
                        );
                    }
                    let mut d = doc.clone();
                    let t = Instant::now();
                    for c in &changes {
                        if let Ok(ch) = Change::from_bytes(c.clone()) {
                            let _ = d.apply_changes([ch]);
                        }
                    }
                    let apply = t.elapsed().as_secs_f64() * 1e6 / changes.len().max(1) as f64;
                    println!("{items:>7} {history:>9} {put:>16.1} {new_key:>16.1} {apply:>18.1}");
                }
            }
        }
    };
}

costs!(line_06, automerge);
costs!(line_012, automerge012);

fn main() {
    line_06::run("0.6.1 (the engine's line)");
    println!();
    line_012::run("0.12");
}
