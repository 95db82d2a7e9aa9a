//! The replication machine's own rules, input by input: maps held in storage only (parked),
//! what waits for them, fetches and their timers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::collections::BTreeSet;

use syncmesh_core::replication::{
    FetchOutcome, Grant, Input, Output, Parked, ParkedMap, Replicator, Shelf, Timer, Wire,
};
use syncmesh_core::{Catalog, Identity, MapReplica, MapSid, NodeId, Timestamp};

macro_rules! shelf {
    ($cat:ident, $park:ident) => {
        Shelf {
            maps: &mut $cat,
            parked: &$park,
        }
    };
}

fn t(ms: i64) -> Timestamp {
    Timestamp::from_millis(1_700_000_000_000 + ms)
}

fn catalog() -> Catalog {
    Catalog::new(Identity::new(NodeId([1; 16]), b"machine"))
}

fn parked(sid: &MapSid) -> Parked {
    let mut p = Parked::new();
    p.insert(
        sid.clone(),
        ParkedMap {
            digest: Some(1),
            policy: Default::default(),
        },
    );
    p
}

fn docs(sid: &MapSid) -> Vec<u8> {
    Wire::Docs {
        sid: sid.clone(),
        docs: Vec::new(),
    }
    .encode()
}

fn hello(sid: &MapSid, digest: u64) -> Vec<u8> {
    Wire::Hello {
        hold_all: false,
        maps: vec![(sid.clone(), digest)],
    }
    .encode()
}

fn msg(peer: &str, bytes: Vec<u8>) -> Input<String> {
    Input::Message {
        peer: peer.to_string(),
        bytes,
    }
}

fn up(peer: &str, grant: Grant) -> Input<String> {
    Input::PeerUp {
        peer: peer.to_string(),
        grant,
    }
}

fn loads(out: &[Output<String>]) -> Vec<MapSid> {
    out.iter()
        .filter_map(|o| match o {
            Output::Load(s) => Some(s.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn sends_to(out: &[Output<String>], peer: &str) -> usize {
    out.iter()
        .filter(|o| matches!(o, Output::Send(s) if s.peer == peer))
        .count()
}

fn fetched(out: &[Output<String>]) -> Option<FetchOutcome> {
    out.iter().find_map(|o| match o {
        Output::Fetched { outcome, .. } => Some(*outcome),
        _ => None,
    })
}

#[test]
fn a_parked_map_is_loaded_only_for_a_peer_that_may_read_it() {
    let sid = MapSid::for_name("secret");
    let mut cat = catalog();
    let park = parked(&sid);
    let mut m: Replicator<String> = Replicator::new(false);
    let other = Grant {
        maps: Some(BTreeSet::from([MapSid::for_name("other")])),
        write: true,
    };
    m.handle(shelf!(cat, park), up("q", other), t(0));
    for bytes in [docs(&sid), hello(&sid, 99)] {
        let out = m.handle(shelf!(cat, park), msg("q", bytes), t(1));
        assert!(
            loads(&out).is_empty(),
            "loaded for a peer outside its grant"
        );
    }
    // A peer given the map has it loaded when it asks.
    m.handle(shelf!(cat, park), up("p", Grant::full()), t(2));
    let out = m.handle(shelf!(cat, park), msg("p", docs(&sid)), t(3));
    assert_eq!(loads(&out), vec![sid.clone()]);
    // A read-only peer's changes are refused without loading anything.
    let ro = Grant {
        maps: None,
        write: false,
    };
    let mut m2: Replicator<String> = Replicator::new(false);
    m2.handle(shelf!(cat, park), up("r", ro), t(0));
    let changes = Wire::Changes {
        sid: sid.clone(),
        docs: Vec::new(),
        sigs: Vec::new(),
    }
    .encode();
    assert!(loads(&m2.handle(shelf!(cat, park), msg("r", changes), t(1))).is_empty());
}

#[test]
fn inputs_wait_in_order_for_a_load_and_a_forgotten_peer_s_messages_are_dropped() {
    let sid = MapSid::for_name("m");
    let mut cat = catalog();
    let park = parked(&sid);
    let mut m: Replicator<String> = Replicator::new(false);
    m.handle(shelf!(cat, park), up("p", Grant::full()), t(0));
    m.handle(shelf!(cat, park), up("s", Grant::full()), t(0));
    // p's message needs the map: it waits, and so does everything after it.
    let out = m.handle(shelf!(cat, park), msg("p", docs(&sid)), t(1));
    assert_eq!(loads(&out), vec![sid.clone()]);
    assert!(m.is_waiting());
    let out = m.handle(shelf!(cat, park), msg("p", hello(&sid, 1)), t(2));
    assert_eq!(
        sends_to(&out, "p"),
        0,
        "a later input ran ahead of a waiting one"
    );
    m.handle(shelf!(cat, park), Input::Forget("p".to_string()), t(3));
    let out = m.handle(
        shelf!(cat, park),
        msg("s", hello(&MapSid::for_name("x"), 0)),
        t(4),
    );
    // The load failed (the map stays parked): the queue runs on, without p's messages.
    let out2 = m.handle(shelf!(cat, park), Input::Loaded(vec![sid.clone()]), t(5));
    assert!(!m.is_waiting());
    assert_eq!(sends_to(&out, "p") + sends_to(&out2, "p"), 0);
    assert!(!m.peers().any(|p| p == "p"), "a forgotten peer came back");
    // s's Hello ran once the queue moved: it names a map s fetches, answered "none here".
    assert_eq!(sends_to(&out2, "s"), 1);
}

#[test]
fn a_fetch_deadline_that_fires_early_is_asked_for_again_and_ends_the_fetch_when_due() {
    let sid = MapSid::for_name("far");
    let mut cat = catalog();
    let id = cat.identity().clone();
    cat.insert(MapReplica::empty(id, sid.clone()));
    let mut m: Replicator<String> = Replicator::new(false);
    let deadline = t(10_000);
    let out = m.handle(
        Shelf::loaded(&mut cat),
        Input::Fetch {
            sid: sid.clone(),
            deadline,
        },
        t(0),
    );
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Schedule { timer: Timer::FetchDeadline(s), at } if *s == sid && *at == deadline
    )));
    let timer = || Input::Timer(Timer::FetchDeadline(sid.clone()));
    let out = m.handle(Shelf::loaded(&mut cat), timer(), t(9_995));
    assert_eq!(fetched(&out), None);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Schedule { at, .. } if *at == deadline)),
        "an early deadline timer must be asked for again: {out:?}"
    );
    let out = m.handle(Shelf::loaded(&mut cat), timer(), t(10_000));
    assert_eq!(
        fetched(&out),
        Some(FetchOutcome::TimedOut { partial: false })
    );
}

#[test]
fn a_fetch_kept_waiting_reports_nobody_only_after_the_next_peer_answers() {
    let sid = MapSid::for_name("nowhere");
    let mut cat = catalog();
    let id = cat.identity().clone();
    cat.insert(MapReplica::empty(id, sid.clone()));
    let mut m: Replicator<String> = Replicator::new(false);
    let deadline = t(10_000);
    m.handle(Shelf::loaded(&mut cat), up("p", Grant::full()), t(0));
    let fetch = Input::Fetch {
        sid: sid.clone(),
        deadline,
    };
    m.handle(Shelf::loaded(&mut cat), fetch, t(0));
    let out = m.handle(Shelf::loaded(&mut cat), msg("p", docs(&sid)), t(1));
    assert_eq!(fetched(&out), Some(FetchOutcome::NobodyHas));
    // The shell knows of a peer not fed in yet: keep waiting, ask nobody again.
    let keep = Input::KeepFetching {
        sid: sid.clone(),
        deadline,
    };
    let out = m.handle(Shelf::loaded(&mut cat), keep, t(2));
    assert_eq!(fetched(&out), None);
    assert_eq!(sends_to(&out, "p"), 0);
    let out = m.handle(Shelf::loaded(&mut cat), msg("p", docs(&sid)), t(3));
    assert_eq!(
        fetched(&out),
        None,
        "nobody reported before the new peer came up"
    );
    let out = m.handle(Shelf::loaded(&mut cat), up("r", Grant::full()), t(4));
    assert_eq!(fetched(&out), None, "r has not answered yet");
    assert_eq!(
        sends_to(&out, "r"),
        1,
        "r is greeted (with the map held empty)"
    );
    let out = m.handle(Shelf::loaded(&mut cat), msg("r", docs(&sid)), t(5));
    assert_eq!(fetched(&out), Some(FetchOutcome::NobodyHas));
}
