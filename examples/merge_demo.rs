//! Two replicas of the map `users`, edited apart and merged: the syncmesh engine with no network.
//!
//! Run with `cargo run --example merge_demo`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the report

use serde_json::json;
use syncmesh_core::{
    Catalog, Event, EventKind, Identity, MapReplica, MapSpec, NodeId, PageRequest, Timestamp,
    WriteOptions,
};

fn obj(v: serde_json::Value) -> syncmesh_core::JsonObject {
    v.as_object().cloned().unwrap_or_default()
}

fn show(who: &str, events: Vec<Event>) {
    for e in events {
        let origin = if e.is_local { "local" } else { "merged" };
        match &e.kind {
            EventKind::ItemAdded { item } => {
                println!(
                    "  [{who} #{}] itemAdded   {} = {} ({origin})",
                    e.id,
                    item.key,
                    json!(item.data)
                )
            }
            EventKind::ItemUpdated {
                item,
                previous_data,
            } => println!(
                "  [{who} #{}] itemUpdated {} = {} (was {}) ({origin})",
                e.id,
                item.key,
                json!(item.data),
                json!(previous_data)
            ),
            EventKind::ItemRemoved { key, .. } => {
                println!("  [{who} #{}] itemRemoved {key} ({origin})", e.id)
            }
            EventKind::MapRemoved => println!("  [{who} #{}] removed ({origin})", e.id),
        }
    }
}

/// Delivers every change `from` has made to `to` (what the network layer does).
fn sync(
    from: &mut MapReplica,
    to: &mut Catalog,
    now: Timestamp,
) -> Result<(), syncmesh_core::Error> {
    from.flush(now)?;
    for c in from.take_outgoing() {
        to.apply_changes(&c.map, c.doc, &[c.bytes], now)?;
    }
    Ok(())
}

fn main() -> Result<(), syncmesh_core::Error> {
    let mut now = Timestamp::from_millis(1_700_000_000_000);
    let mut laptop = Catalog::new(Identity::new(NodeId([1; 16]), b"laptop"));
    let mut desktop = Catalog::new(Identity::new(NodeId([2; 16]), b"desktop"));
    let none = WriteOptions::default();

    println!("laptop: open map 'users', set david, update his country, mutate it");
    let (users, _) = laptop.open(&MapSpec::named("users"), [0; 16], now)?;
    users.set(
        "david",
        obj(json!({"phone_number": 12345678, "country": "UK"})),
        &none,
        now,
    )?;
    users.update("david", obj(json!({"country": "IRL"})), &none, now)?;
    users.mutate("david", &none, now, |cur| {
        let mut d = cur.cloned().unwrap_or_default();
        d.insert("country".into(), json!("USA"));
        Some(d)
    })?;
    show("laptop", users.take_events());

    println!("desktop: receives the laptop's changes");
    sync(laptop.get_mut("users", now)?, &mut desktop, now)?;
    show("desktop", desktop.get_mut("users", now)?.take_events());

    println!("both edit david while apart: different fields merge, the same field converges");
    now = now.plus_millis(1000);
    let l = laptop.get_mut("users", now)?;
    l.update(
        "david",
        obj(json!({"country": "FR", "email": "d@example.com"})),
        &none,
        now,
    )?;
    let d = desktop.get_mut("users", now)?;
    d.update(
        "david",
        obj(json!({"country": "DE", "phone_number": 99})),
        &none,
        now,
    )?;
    sync(laptop.get_mut("users", now)?, &mut desktop, now)?;
    sync(desktop.get_mut("users", now)?, &mut laptop, now)?;
    let a = laptop.get_mut("users", now)?.get("david", now)?;
    let b = desktop.get_mut("users", now)?.get("david", now)?;
    println!("  laptop : {} rev {}", json!(a.data), a.revision);
    println!("  desktop: {} rev {}", json!(b.data), b.revision);
    assert_eq!(a, b, "replicas must converge");
    let c = laptop.get_mut("users", now)?.conflicts("david", now)?;
    println!("  concurrent values kept for: {}", json!(c.fields));
    show("laptop", laptop.get_mut("users", now)?.take_events());
    show("desktop", desktop.get_mut("users", now)?.take_events());

    println!("both set david whole while apart: one value wins whole, the other is kept");
    now = now.plus_millis(1000);
    laptop.get_mut("users", now)?.set(
        "david",
        obj(json!({"country": "NL", "city": "Utrecht"})),
        &none,
        now,
    )?;
    desktop.get_mut("users", now)?.set(
        "david",
        obj(json!({"country": "BE", "city": "Ghent"})),
        &none,
        now,
    )?;
    sync(laptop.get_mut("users", now)?, &mut desktop, now)?;
    sync(desktop.get_mut("users", now)?, &mut laptop, now)?;
    let a = laptop.get_mut("users", now)?.get("david", now)?;
    let b = desktop.get_mut("users", now)?.get("david", now)?;
    println!("  laptop : {}", json!(a.data));
    println!("  desktop: {}", json!(b.data));
    assert_eq!(a, b, "replicas must converge");
    let c = laptop.get_mut("users", now)?.conflicts("david", now)?;
    println!("  concurrent values (visible first): {}", json!(c.values));
    laptop.get_mut("users", now)?.take_events();
    desktop.get_mut("users", now)?.take_events();

    println!("list items, remove david, remove the map");
    let l = laptop.get_mut("users", now)?;
    for item in l.items(&PageRequest::default(), now)?.items {
        println!("  item {} = {}", item.key, json!(item.data));
    }
    l.remove("david", None, now)?;
    l.remove_map(now)?;
    show("laptop", l.take_events());
    sync(
        laptop
            .by_sid(&syncmesh_core::MapSid::for_name("users"))
            .ok_or_else(|| syncmesh_core::Error::MapNotFound("users".into()))?,
        &mut desktop,
        now,
    )?;
    show(
        "desktop",
        desktop
            .by_sid(&syncmesh_core::MapSid::for_name("users"))
            .map(|m| m.take_events())
            .unwrap_or_default(),
    );
    Ok(())
}
