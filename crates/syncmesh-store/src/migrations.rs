//! The store's schema and its upgrades: an older store is brought to [`SCHEMA_VERSION`] in
//! the transaction that opens it (all or nothing), a newer or unknown one is refused.

use redb::{ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use syncmesh_core::{Event, MapSid, ViewChanges};

use crate::feed::{FeedEvent, Sink, Tables};
use crate::{
    prefix_end, Result, Store, StoreError, CHANGES, DIGESTS, FEED, INVITES, MAPS, MAP_NUMBERS,
    META, POLICIES, SCHEMA_VERSION, SIGS, SNAPSHOTS, TRUST, VERSIONS, VIEW,
};

/// The oldest schema this build upgrades in place. The history: 3 added the `digests` table,
/// 4 the `trust`, `invites` and `policies` tables, 5 the `sigs` table; 6 changed no table (its
/// documents hold items written whole, which older builds would read as empty, so they must
/// refuse it); 7 replaced `items` and `events` (keyed by sid, events as JSON holding whole
/// items) by `map_numbers`, `view`, `feed` and `versions`.
const OLDEST_UPGRADABLE: u32 = 2;

/// Up to schema 6: sid, then the item key → view entry.
const OLD_ITEMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("items");
/// Up to schema 6: sid, then the event id (u64 BE) → the event as JSON.
const OLD_EVENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("events");

/// Checks the schema version recorded in the store, upgrades an older one, and makes sure
/// every table exists.
pub(crate) fn upgrade(store: &Store, tx: &WriteTransaction) -> Result<()> {
    let mut meta = tx.open_table(META).map_err(|e| store.err(e))?;
    let found = meta
        .get("schema_version")
        .map_err(|e| store.err(e))?
        .map(|v| v.value().to_vec());
    let (record, from) = match found {
        None => (true, SCHEMA_VERSION),
        Some(v) => {
            let found = <[u8; 4]>::try_from(v.as_slice())
                .map(u32::from_le_bytes)
                .map_err(|_| StoreError::Corrupt {
                    path: store.path.clone(),
                    detail: "schema version record is malformed".into(),
                })?;
            if found != SCHEMA_VERSION && !(OLDEST_UPGRADABLE..SCHEMA_VERSION).contains(&found) {
                return Err(StoreError::UnknownSchema {
                    path: store.path.clone(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            (found != SCHEMA_VERSION, found)
        }
    };
    if record {
        meta.insert("schema_version", SCHEMA_VERSION.to_le_bytes().as_slice())
            .map_err(|e| store.err(e))?;
    }
    drop(meta);
    for t in [
        MAPS,
        SNAPSHOTS,
        CHANGES,
        INVITES,
        POLICIES,
        SIGS,
        MAP_NUMBERS,
        VIEW,
        FEED,
        VERSIONS,
    ] {
        tx.open_table(t).map_err(|e| store.err(e))?;
    }
    if from < 7 {
        feed_from_json(store, tx)?;
    }
    tx.open_table(DIGESTS).map_err(|e| store.err(e))?;
    tx.open_table(TRUST).map_err(|e| store.err(e))?;
    Ok(())
}

/// Schema 7: every map's view entries and JSON events move to the tables of `feed`, each
/// event naming the versions it wrote and replaced where the retained events allow.
fn feed_from_json(store: &Store, tx: &WriteTransaction) -> Result<()> {
    let sids = {
        let maps = tx.open_table(MAPS).map_err(|e| store.err(e))?;
        let mut sids = Vec::new();
        for row in maps.iter().map_err(|e| store.err(e))? {
            let (k, _) = row.map_err(|e| store.err(e))?;
            sids.push(store.sid_key(k.value(), "a map catalog key")?);
        }
        sids
    };
    let mut moved = 0usize;
    for sid in &sids {
        let (entries, events) = old_rows(store, tx, sid)?;
        moved += entries.len() + events.len();
        let mut tables = Tables::open(tx).map_err(|e| store.err(e))?;
        let mut sink = Sink {
            t: &mut tables,
            record: None,
        };
        let view = ViewChanges {
            reset: false,
            entries: entries.into_iter().map(|(k, e)| (k, Some(e))).collect(),
        };
        let num = store.number_for(&mut sink, sid)?;
        store.write_feed(&mut sink, num, &view, &events)?;
    }
    for t in [OLD_ITEMS, OLD_EVENTS] {
        tx.delete_table(t).map_err(|e| store.err(e))?;
    }
    for t in [SNAPSHOTS, CHANGES, SIGS] {
        moved += rekey(store, tx, t)?;
    }
    tracing::info!(
        "store upgraded to schema 7: {moved} rows of {} maps rewritten",
        sids.len()
    );
    Ok(())
}

/// A map's rows in the schema 6 tables: view entries, and events (oldest first).
#[allow(clippy::type_complexity)]
fn old_rows(
    store: &Store,
    tx: &WriteTransaction,
    sid: &MapSid,
) -> Result<(Vec<(String, Vec<u8>)>, Vec<FeedEvent>)> {
    let start = sid.as_str().as_bytes().to_vec();
    let end = prefix_end(&start);
    let mut entries = Vec::new();
    let items = tx.open_table(OLD_ITEMS).map_err(|e| store.err(e))?;
    for row in items
        .range(start.as_slice()..end.as_slice())
        .map_err(|e| store.err(e))?
    {
        let (k, v) = row.map_err(|e| store.err(e))?;
        // A damaged row costs that item, as it did when the map was loaded, not the store.
        match std::str::from_utf8(&k.value()[start.len()..]) {
            Ok(key) => entries.push((key.to_string(), v.value().to_vec())),
            Err(_) => tracing::warn!(map = %sid, "a view entry with a damaged key was dropped"),
        }
    }
    let mut events = Vec::new();
    let old = tx.open_table(OLD_EVENTS).map_err(|e| store.err(e))?;
    for row in old
        .range(start.as_slice()..end.as_slice())
        .map_err(|e| store.err(e))?
    {
        let (_, v) = row.map_err(|e| store.err(e))?;
        // One unreadable event was skipped by every reader before; it still is.
        match serde_json::from_slice::<Event>(v.value())
            .ok()
            .and_then(|e| FeedEvent::from_event(&e))
        {
            Some(e) => events.push(e),
            None => tracing::warn!(map = %sid, "an unreadable stored event was dropped"),
        }
    }
    Ok((entries, events))
}

/// Schema 7: the rows of a table keyed by a map's sid (34 bytes, `MP` then hex) are keyed by
/// its number instead, a chunk at a time (numbers stay far below `MP` as big-endian bytes, so
/// rekeyed rows never fall back into the range still to do).
fn rekey(
    store: &Store,
    tx: &WriteTransaction,
    def: TableDefinition<&[u8], &[u8]>,
) -> Result<usize> {
    let mut nums: std::collections::HashMap<Vec<u8>, u32> = Default::default();
    let mut moved = 0;
    loop {
        let chunk: Vec<(Vec<u8>, Vec<u8>)> = {
            let t = tx.open_table(def).map_err(|e| store.err(e))?;
            let rows = t
                .range(b"MP".as_slice()..b"MQ".as_slice())
                .map_err(|e| store.err(e))?
                .take(4096);
            let mut chunk = Vec::new();
            for row in rows {
                let (k, v) = row.map_err(|e| store.err(e))?;
                chunk.push((k.value().to_vec(), v.value().to_vec()));
            }
            chunk
        };
        if chunk.is_empty() {
            return Ok(moved);
        }
        moved += chunk.len();
        let mut tables = Tables::open(tx).map_err(|e| store.err(e))?;
        let mut t = tx.open_table(def).map_err(|e| store.err(e))?;
        for (k, v) in chunk {
            let sid = k
                .get(..34)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(MapSid::parse);
            let Some(sid) = sid else {
                // No map's row (no reader ever found it): dropped rather than left in the
                // range this loop empties.
                tracing::warn!("a row of {} keyed by no map sid was dropped", def.name());
                t.remove(k.as_slice()).map_err(|e| store.err(e))?;
                continue;
            };
            let sid_bytes = sid.as_str().as_bytes();
            let num = match nums.get(sid_bytes) {
                Some(n) => *n,
                None => {
                    let mut sink = Sink {
                        t: &mut tables,
                        record: None,
                    };
                    let n = store.number_for(&mut sink, &sid)?;
                    nums.insert(sid_bytes.to_vec(), n);
                    n
                }
            };
            let mut nk = num.to_be_bytes().to_vec();
            nk.extend_from_slice(&k[34..]);
            t.insert(nk.as_slice(), v.as_slice())
                .map_err(|e| store.err(e))?;
            t.remove(k.as_slice()).map_err(|e| store.err(e))?;
        }
    }
}
