//! The replication simulator's schedules (`syncmesh_core::testing::sim`, feature `test-utils`):
//! `SYNCMESH_SEED=<n>` replays one schedule; `SYNCMESH_SIM_CASES`, `SYNCMESH_SIM_LARGE` and
//! `SYNCMESH_SIM_SALT` choose how many and which.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use syncmesh_core::testing::sim::{env, report, run, run_all, seeds, Fault};
use syncmesh_core::testing::Rng;

#[test]
fn small_meshes_converge_under_faults() {
    let seeds = seeds(env("SYNCMESH_SIM_CASES", 10_000), 1);
    let n = run_all(seeds, |seed| (2 + (seed % 3) as usize, 40));
    report(&format!(
        "{n} schedules of 2-4 nodes, 40 steps each, passed"
    ));
}

#[test]
fn a_large_mesh_converges_under_faults() {
    let seeds = seeds(env("SYNCMESH_SIM_LARGE", 3), 2);
    let n = run_all(seeds, |_| (50, 400));
    report(&format!(
        "{n} schedules of 50 nodes, 400 steps each, passed"
    ));
}

/// The first of `tries` schedules that a planted fault makes fail, if any.
fn caught(fault: Fault, tries: u64) -> Option<u64> {
    let mut r = Rng(0xFA17 ^ fault as u64);
    (0..tries).map(|_| r.next()).find(|&seed| {
        let nodes = 2 + (seed % 3) as usize;
        std::panic::catch_unwind(|| run(seed, nodes, 40, fault)).is_err()
    })
}

/// The checks have teeth: each planted bug fails some schedule (and the same schedules pass
/// without it, above).
#[test]
fn a_dropped_anti_entropy_timer_is_caught() {
    let seed = caught(Fault::NoAntiEntropy, 200).expect("no schedule caught it");
    report(&format!("no anti-entropy caught by schedule {seed}"));
}

#[test]
fn a_digest_that_is_never_updated_is_caught() {
    let seed = caught(Fault::StaleDigest, 200).expect("no schedule caught it");
    report(&format!("a stale digest caught by schedule {seed}"));
}

#[test]
fn event_ids_reused_after_a_restart_are_caught() {
    let seed = caught(Fault::EventIdsFromZero, 200).expect("no schedule caught it");
    report(&format!(
        "event ids from 1 after a restart caught by schedule {seed}"
    ));
}

#[test]
fn cuts_without_agreement_on_heads_are_caught() {
    let seed = caught(Fault::CutWithoutAgreement, 400).expect("no schedule caught it");
    report(&format!(
        "history cuts without agreement caught by schedule {seed}"
    ));
}
