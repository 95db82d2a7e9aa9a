//! Seeded property test of replication with mixed permissions: 3 to 6 nodes, some of them
//! read-only members (every node grants them read access only, or — in half the cases — the
//! map's own permission entries list them as readers), random links that come and go,
//! random writes by everyone, pushes that get lost. Where the map's entries make the readers,
//! a hostile writer also passes readers' changes on as its own messages (with the reader's
//! signature, or with one forged in its own name). After healing, every writer holds the same
//! items, every reader holds all of them plus only its own writes, and no write of a reader is
//! present on any other node.
//!
//! `SYNCMESH_SEED=<n>` replays one case; `SYNCMESH_PERM_CASES=<n>` sets how many run
//! (default 150).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

#[path = "support/wire_net.rs"]
mod wire_net;
use wire_net::*;

use serde_json::json;
use syncmesh_core::replication::Grant;

use syncmesh_core::testing::Rng;

const NAMES: &[&str] = &["n0", "n1", "n2", "n3", "n4", "n5"];

fn run_case(seed: u64) {
    let mut rng = Rng(seed);
    let n = 3 + rng.below(4) as usize;
    let names: Vec<&str> = NAMES[..n].to_vec();
    // n0 is always a writer (someone creates the map); the others are readers with 35 %.
    let reader: Vec<bool> = (0..n).map(|i| i > 0 && rng.chance(35)).collect();
    let mut net = Net::new(&names, &[]);
    let by_policy = rng.chance(50);
    write(&mut net, "n0", "m", "seed", json!({"v": 0}));
    if by_policy {
        // The map's entries: writers read and write, readers read (n0 manages).
        let sid = syncmesh_core::MapSid::for_name("m");
        let n0 = net.id("n0");
        for (j, b) in names.iter().enumerate().skip(1) {
            let p = syncmesh_core::Permission {
                identity: net.id(b),
                read: true,
                write: !reader[j],
                manage: false,
            };
            net.node("n0")
                .host
                .by_sid(&sid)
                .unwrap()
                .set_permission(&p, &n0, now())
                .unwrap();
        }
    } else {
        for (i, a) in names.iter().enumerate() {
            for (j, b) in names.iter().enumerate() {
                if i != j && reader[j] {
                    let b = net.id(b);
                    net.node(a).rep.set_grant(
                        &b,
                        Grant {
                            maps: None,
                            write: false,
                        },
                    );
                }
            }
        }
    }
    net.flush();
    for name in &names[1..] {
        hold(&mut net, name, "m");
    }
    // Writers linked in a line, each reader to some writer (a reader passes nothing on: its
    // peers cannot tell whose changes it relays), then random extra links that come and go.
    let writers: Vec<usize> = (0..n).filter(|i| !reader[*i]).collect();
    let mut spanning = Vec::new();
    for w in writers.windows(2) {
        spanning.push((w[0], w[1]));
    }
    for r in (0..n).filter(|i| reader[*i]) {
        let w = writers[rng.below(writers.len() as u64) as usize];
        spanning.push((w, r));
    }
    for (a, b) in &spanning {
        net.connect(names[*a], names[*b]);
    }
    net.run();
    let steps = 10 + rng.below(40);
    for step in 0..steps {
        let who = rng.below(n as u64) as usize;
        // A reader opens the map it was given only once it has arrived (creating one of its
        // own would be a write that only it keeps).
        let sid = syncmesh_core::MapSid::for_name("m");
        if reader[who]
            && !net
                .node(names[who])
                .host
                .by_sid(&sid)
                .is_some_and(|m| m.exists())
        {
            net.run();
            continue;
        }
        let key = format!("{}_{}", if reader[who] { "r" } else { "w" }, rng.below(6));
        write(
            &mut net,
            names[who],
            "m",
            &key,
            json!({"by": names[who], "step": step}),
        );
        if by_policy && reader[who] && rng.chance(40) {
            // A hostile writer passes the reader's change on as its own message.
            let w = writers[rng.below(writers.len() as u64) as usize];
            relay_as(&mut net, names[who], names[w], rng.chance(50));
        }
        if rng.chance(15) {
            let (a, b) = (rng.below(n as u64) as usize, rng.below(n as u64) as usize);
            if a != b {
                if net.linked(names[a], names[b]) {
                    // Keep the spanning links: only extra links are cut.
                    if !spanning.contains(&(a, b)) && !spanning.contains(&(b, a)) {
                        net.disconnect(names[a], names[b]);
                    }
                } else {
                    net.connect(names[a], names[b]);
                }
            }
        }
        net.drop_every = if rng.chance(30) { 3 } else { 0 };
        net.run();
    }
    net.drop_every = 0;
    net.tick();
    net.tick();
    assert!(net.violations.is_empty(), "{:?}", net.violations);

    let writer_items: Vec<Vec<(String, serde_json::Value, String)>> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| !reader[*i])
        .map(|(_, name)| net.items(name, "m"))
        .collect();
    for (k, w) in writer_items.iter().enumerate().skip(1) {
        assert_eq!(w, &writer_items[0], "writer replicas differ ({k})");
    }
    let base = &writer_items[0];
    assert!(
        base.iter()
            .all(|(k, _, _)| k.starts_with("w_") || k == "seed"),
        "a reader's write reached a writer: {base:?}"
    );
    for (i, name) in names.iter().enumerate() {
        if !reader[i] {
            continue;
        }
        let mine = net.items(name, "m");
        let theirs: Vec<_> = mine
            .iter()
            .filter(|(k, _, _)| !k.starts_with("r_"))
            .cloned()
            .collect();
        assert_eq!(&theirs, base, "reader {name} differs from the writers");
        for (k, v, _) in &mine {
            if k.starts_with("r_") {
                assert_eq!(v["by"], *name, "reader {name} holds another reader's write");
            }
        }
    }
}

/// Takes `reader`'s unsent changes and has `relay` push them to each of its peers, signed by
/// the reader or (`forge`) with a signature that claims the relay wrote them.
fn relay_as(net: &mut Net, reader: &str, relay: &str, forge: bool) {
    use syncmesh_core::replication::{Bytes, Wire};
    let sid = syncmesh_core::MapSid::for_name("m");
    let relay_id = net.id(relay);
    let m = net.node(reader).host.by_sid(&sid).unwrap();
    m.flush(now()).unwrap();
    let changes = m.take_outgoing();
    let sigs = m.take_signatures();
    let mut msg_sigs = Vec::new();
    for (h, mut s) in sigs {
        if forge {
            s.author = relay_id.clone();
        }
        msg_sigs.push((Bytes(h.0.to_vec()), s));
    }
    let bytes = Wire::Changes {
        sigs: msg_sigs,
        sid: sid.clone(),
        docs: changes
            .into_iter()
            .map(|c| (c.doc, vec![Bytes(c.bytes)]))
            .collect(),
    }
    .encode();
    let peers: Vec<String> = net
        .names
        .values()
        .filter(|p| p.as_str() != relay && net.linked(relay, p))
        .cloned()
        .collect();
    for p in peers {
        net.queue
            .push_back(Msg::Direct(relay.to_string(), p, bytes.clone()));
    }
}

#[test]
fn mixed_permissions_converge_and_refused_writes_stay_with_their_author() {
    if let Some(seed) = std::env::var("SYNCMESH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_case(seed);
        return;
    }
    let cases: u64 = std::env::var("SYNCMESH_PERM_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    for c in 0..cases {
        let seed = 0x9e27_0000_u64.wrapping_add(c);
        let r = std::panic::catch_unwind(|| run_case(seed));
        if let Err(e) = r {
            eprintln!("permissions case failed; replay with SYNCMESH_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
}
