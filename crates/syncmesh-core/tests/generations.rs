//! History generations (issue 17) under random schedules: three replicas write, merge in
//! random order, and cut their documents twice, each on its own at its own moment, one of
//! them staying away across both cuts. Whatever the schedule, the generations they end on
//! are the same bytes, and no write is lost (see `syncmesh_core::generation`).
//! `SYNCMESH_SEED` replays one schedule; `SYNCMESH_GEN_CASES` sets how many run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::collections::BTreeMap;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ChangeHash, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use syncmesh_core::generation::{self, Clock, CutRecord, Origin};
use syncmesh_core::testing::Rng;

const SEED: &[u8] = b"map/shard-3";

/// What a replica last did to a key only it writes.
#[derive(Debug, Clone, PartialEq)]
enum Last {
    Str(String),
    Gone,
    Count(i64),
}

struct Replica {
    doc: Automerge,
    gen: u64,
    actor: ActorId,
    /// Keys only this replica writes, and what it last did to each.
    own: BTreeMap<String, Last>,
}

impl Replica {
    fn new(n: u8) -> Self {
        let actor = ActorId::from(&[n; 16][..]);
        Replica {
            doc: Automerge::new().with_actor(actor.clone()),
            gen: 0,
            actor,
            own: BTreeMap::new(),
        }
    }

    fn write(&mut self, rng: &mut Rng, me: usize, time: i64) {
        let own = rng.chance(70);
        let key = if own {
            format!("r{me}-{}", rng.below(4))
        } else {
            format!("shared-{}", rng.below(3))
        };
        let value = format!("{me}:{}", rng.next() % 1000);
        let kind = rng.below(10);
        let counting = own && matches!(self.own.get(&key), Some(Last::Count(_)));
        self.doc
            .transact_with(
                |_| CommitOptions::default().with_time(time),
                |tx| -> Result<(), automerge::AutomergeError> {
                    if counting && kind < 5 {
                        tx.increment(ROOT, key.as_str(), 2)?;
                    } else if kind < 2 && tx.get(ROOT, key.as_str())?.is_some() {
                        tx.delete(ROOT, key.as_str())?;
                    } else if own && kind == 2 && !counting {
                        tx.put(ROOT, key.as_str(), ScalarValue::counter(10))?;
                    } else if kind < 5 {
                        let m = tx.put_object(ROOT, key.as_str(), ObjType::Map)?;
                        tx.put(&m, "v", value.as_str())?;
                    } else {
                        tx.put(ROOT, key.as_str(), value.as_str())?;
                    }
                    Ok(())
                },
            )
            .unwrap();
        if own {
            let now = match self.doc.get(ROOT, key.as_str()).unwrap() {
                None => Last::Gone,
                Some((Value::Scalar(s), _)) => match s.as_ref() {
                    ScalarValue::Counter(c) => Last::Count(i64::from(c)),
                    ScalarValue::Str(v) => Last::Str(v.to_string()),
                    other => panic!("{other:?}"),
                },
                Some((Value::Object(_), id)) => match self.doc.get(&id, "v").unwrap() {
                    Some((Value::Scalar(s), _)) => {
                        Last::Str(format!("obj {}", s.to_str().unwrap()))
                    }
                    other => panic!("{other:?}"),
                },
            };
            self.own.insert(key, now);
        }
    }

    /// Moves this replica to generation `gen` cut at `heads` of its current generation.
    fn cut(&mut self, gen: u64, heads: &[ChangeHash]) {
        assert_eq!(self.gen + 1, gen);
        let (mut doc, _) =
            generation::rebase(SEED, gen, &self.doc, heads, &generation::automerge_winners)
                .unwrap();
        doc.set_actor(self.actor.clone());
        self.doc = doc;
        self.gen = gen;
    }

    /// Moves a replica still on generation `from` onto `target` (a copy of a replica that
    /// is there), carrying what the cuts it missed did not include.
    fn catch_up(&mut self, target: &Automerge, gen: u64, clocks: &[Clock]) {
        let mut doc = target.clone();
        let base = generation::genesis_heads(&doc);
        let missed = &clocks[self.gen as usize..gen as usize];
        let gen_now = self.gen;
        generation::carry_all(&mut doc, &self.doc, &base, |c| {
            if gen_now > 0 && c.deps().is_empty() {
                return true; // this generation's genesis is in every later one
            }
            let origin = Origin::of(c);
            missed[0].includes_change(c)
                || missed[1..].iter().any(|k| k.includes(&origin.carrier(), 1))
        })
        .unwrap();
        doc.set_actor(self.actor.clone());
        self.doc = doc;
        self.gen = gen;
    }
}

fn merge(to: &mut Replica, from: &Replica) {
    assert_eq!(to.gen, from.gen);
    let theirs: Vec<_> = from.doc.get_changes(&[]).into_iter().cloned().collect();
    to.doc.apply_changes(theirs).unwrap();
}

fn seen(d: &Automerge) -> Vec<(String, Vec<String>)> {
    d.keys(ROOT)
        .filter(|k| k != generation::CUT_KEY)
        .map(|k| {
            let vals = d
                .get_all(ROOT, k.as_str())
                .unwrap()
                .into_iter()
                .map(|(v, id)| match v {
                    Value::Scalar(s) => match s.as_ref() {
                        ScalarValue::Counter(c) => format!("count {}", i64::from(c)),
                        s => format!("{s:?}"),
                    },
                    Value::Object(_) => format!("obj {:?}", d.get(&id, "v").unwrap().map(|v| v.0)),
                })
                .collect();
            (k, vals)
        })
        .collect()
}

/// One schedule: returns nothing, panics on a broken invariant.
fn schedule(seed: u64) {
    let mut rng = Rng(seed);
    let mut reps: Vec<Replica> = (1..=3).map(Replica::new).collect();
    let mut time = 0i64;
    // Replica 2 stays on generation 0 across both cuts (merging with the others only until
    // they have all cut the first time).
    let away = rng.chance(50);
    let mut clocks: Vec<Clock> = Vec::new();
    for gen in 1..=2u64 {
        // Writes and merges among the replicas on the previous generation.
        for _ in 0..rng.below(25) + 5 {
            time += 1;
            let i = rng.below(3) as usize;
            if away && gen == 2 && i == 2 {
                reps[2].write(&mut rng, 2, time); // offline, still on generation 0
                continue;
            }
            if rng.chance(30) {
                let j = rng.below(3) as usize;
                if i != j && reps[i].gen == reps[j].gen && !(away && (i == 2 || j == 2) && gen == 2)
                {
                    let (a, b) = two(&mut reps, i, j);
                    merge(a, b);
                }
            } else {
                reps[i].write(&mut rng, i, time);
            }
        }
        // The cut: heads every holder has (the proposer's, after a round of merges).
        let holders: Vec<usize> = if away { vec![0, 1] } else { vec![0, 1, 2] };
        for &i in &holders {
            for &j in &holders {
                if i != j {
                    let (a, b) = two(&mut reps, i, j);
                    merge(a, b);
                }
            }
        }
        let heads = reps[holders[0]].doc.get_heads();
        let (_, rec): (Automerge, CutRecord) = generation::genesis(
            SEED,
            gen,
            &reps[holders[0]].doc,
            &heads,
            &generation::automerge_winners,
        )
        .unwrap();
        clocks.push(rec.clock);
        // Late writes on the old generation, merges among those still on it, each holder
        // moving on at its own moment.
        let mut pending = holders.clone();
        while !pending.is_empty() {
            time += 1;
            let i = rng.below(3) as usize;
            if rng.chance(25) {
                if let Some(pos) = pending.iter().position(|&p| p == i) {
                    pending.remove(pos);
                    reps[i].cut(gen, &heads);
                    continue;
                }
            }
            if rng.chance(30) {
                let j = rng.below(3) as usize;
                let same = reps[i].gen == reps[j].gen;
                let away_pair = away && gen == 2 && (i == 2 || j == 2) && i != j;
                if i != j && same && !away_pair {
                    let (a, b) = two(&mut reps, i, j);
                    merge(a, b);
                }
            } else {
                reps[i].write(&mut rng, i, time);
            }
        }
    }
    // The one that was away catches up onto generation 2.
    if away {
        let target = reps[0].doc.clone();
        reps[2].catch_up(&target, 2, &clocks);
    }
    // Everyone merges with everyone.
    for _ in 0..2 {
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    let (a, b) = two(&mut reps, i, j);
                    merge(a, b);
                }
            }
        }
    }
    let heads = reps[0].doc.get_heads();
    for r in &reps {
        assert_eq!(r.doc.get_heads(), heads, "seed {seed}: replicas differ");
        assert_eq!(seen(&r.doc), seen(&reps[0].doc), "seed {seed}");
    }
    // No write lost: each key only one replica writes ends as that replica left it.
    let end = &reps[0].doc;
    for (i, r) in reps.iter().enumerate() {
        for (k, last) in &r.own {
            let now = match end.get(ROOT, k.as_str()).unwrap() {
                None => Last::Gone,
                Some((Value::Scalar(s), _)) => match s.as_ref() {
                    ScalarValue::Counter(c) => Last::Count(i64::from(c)),
                    ScalarValue::Str(v) => Last::Str(v.to_string()),
                    other => panic!("{other:?}"),
                },
                Some((Value::Object(_), id)) => match end.get(&id, "v").unwrap() {
                    Some((Value::Scalar(s), _)) => {
                        Last::Str(format!("obj {}", s.to_str().unwrap()))
                    }
                    other => panic!("{other:?}"),
                },
            };
            assert_eq!(&now, last, "seed {seed}: replica {i}'s last write of {k}");
        }
    }
}

fn two<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &T) {
    assert_ne!(i, j);
    if i < j {
        let (a, b) = v.split_at_mut(j);
        (&mut a[i], &b[0])
    } else {
        let (a, b) = v.split_at_mut(i);
        (&mut b[0], &a[j])
    }
}

#[test]
fn replicas_that_cut_on_their_own_converge_and_lose_no_write() {
    if let Ok(s) = std::env::var("SYNCMESH_SEED") {
        schedule(s.parse().expect("SYNCMESH_SEED is a number"));
        return;
    }
    let cases: u64 = std::env::var("SYNCMESH_GEN_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for seed in 0..cases {
        let r = std::panic::catch_unwind(|| schedule(seed));
        assert!(
            r.is_ok(),
            "schedule failed; replay with SYNCMESH_SEED={seed}"
        );
    }
    println!("{cases} generation schedules");
}
