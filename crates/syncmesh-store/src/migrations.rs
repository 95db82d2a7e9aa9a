//! The store's schema and its upgrades: an older store is brought to [`SCHEMA_VERSION`] in
//! the transaction that opens it (all or nothing), a newer or unknown one is refused.

use redb::{ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use syncmesh_core::{Event, MapSid, ViewChanges};

use crate::feed::{FeedEvent, Sink, Tables};
use crate::tables::{
    change_key, doc_of, CHANGES, DIGESTS, INVITES, MAPS, META, POLICIES, SIGS, SNAPSHOTS, TRUST,
};
use crate::{Result, Store, StoreError, SCHEMA_VERSION};

/// The oldest schema this build upgrades in place. The history: 3 added the `digests` table,
/// 4 the `trust`, `invites` and `policies` tables, 5 the `sigs` table; 6 changed no table (its
/// documents hold items written whole, which older builds would read as empty, so they must
/// refuse it); 7 replaced `items` and `events` (keyed by sid, events as JSON holding whole
/// items) by `map_numbers`, `view`, `feed` and `versions`, and keyed every per-map row by a
/// map number; 8 gave those rows typed keys, in tables of new names (`numbers`, `view_rows`,
/// `event_feed`, `item_versions`, `doc_snapshots`, `doc_changes`, `change_sigs`).
const OLDEST_UPGRADABLE: u32 = 2;

/// Up to schema 6: sid, then the item key → view entry.
const OLD_ITEMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("items");
/// Up to schema 6: sid, then the event id (u64 BE) → the event as JSON.
const OLD_EVENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("events");
/// Schema 7: sid → map number (u32 BE); the empty key → the next number.
const V7_NUMBERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("map_numbers");
/// Schema 7: map number (u32 BE), then the item key → view row.
const V7_VIEW: TableDefinition<&[u8], &[u8]> = TableDefinition::new("view");
/// Schema 7: map number, then the event id (u64 BE) → event record.
const V7_FEED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("feed");
/// Schema 7: map number, then an event id (u64 BE) → view entry.
const V7_VERSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("versions");
/// Up to schema 7: a document key (the map's sid up to 6, its number (u32 BE) in 7, then 0 or 1,
/// the incarnation (u64 BE) and the shard index (u16 BE)) → snapshot.
const OLD_SNAPSHOTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("snapshots");
/// Up to schema 7: a document key, then the sequence number (u64 BE) → change.
const OLD_CHANGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("changes");
/// Up to schema 7: the map's sid (number in 7), then the change hash → signature.
const OLD_SIGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sigs");

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
    for t in [MAPS, INVITES, POLICIES] {
        tx.open_table(t).map_err(|e| store.err(e))?;
    }
    drop(Tables::open(tx).map_err(|e| store.err(e))?);
    tx.open_table(SNAPSHOTS).map_err(|e| store.err(e))?;
    tx.open_table(CHANGES).map_err(|e| store.err(e))?;
    tx.open_table(SIGS).map_err(|e| store.err(e))?;
    if from < 7 {
        feed_from_json(store, tx)?;
    }
    if from == 7 {
        feed_from_v7(store, tx)?;
    }
    if from < 8 {
        docs_retyped(store, tx, from)?;
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
        let mut sink = Sink::new(&mut tables, None);
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
    tracing::info!(
        "store upgrade: {moved} view entries and events of {} maps rewritten",
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

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// Every row of an old byte-keyed table, a chunk at a time from `after` on.
fn chunk_of(
    store: &Store,
    tx: &WriteTransaction,
    def: TableDefinition<&[u8], &[u8]>,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let t = tx.open_table(def).map_err(|e| store.err(e))?;
    let mut chunk = Vec::new();
    for row in t.iter().map_err(|e| store.err(e))?.take(4096) {
        let (k, v) = row.map_err(|e| store.err(e))?;
        chunk.push((k.value().to_vec(), v.value().to_vec()));
    }
    Ok(chunk)
}

/// Moves every row of an old byte-keyed table through `put` (false: a damaged row, dropped
/// with a warning), a chunk at a time, then deletes the table. Returns how many rows moved.
fn drain(
    store: &Store,
    tx: &WriteTransaction,
    def: TableDefinition<&[u8], &[u8]>,
    mut put: impl FnMut(&[u8], &[u8]) -> Result<bool>,
) -> Result<usize> {
    let mut moved = 0;
    loop {
        let chunk = chunk_of(store, tx, def)?;
        if chunk.is_empty() {
            break;
        }
        for (k, v) in &chunk {
            if put(k, v)? {
                moved += 1;
            } else {
                tracing::warn!("a damaged row of {} was dropped by the upgrade", def.name());
            }
        }
        let mut t = tx.open_table(def).map_err(|e| store.err(e))?;
        for (k, _) in &chunk {
            t.remove(k.as_slice()).map_err(|e| store.err(e))?;
        }
    }
    tx.delete_table(def).map_err(|e| store.err(e))?;
    Ok(moved)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Schema 8: schema 7's map numbers, view, feed and versions get typed keys.
fn feed_from_v7(store: &Store, tx: &WriteTransaction) -> Result<()> {
    let mut t = Tables::open(tx).map_err(|e| store.err(e))?;
    let mut moved = drain(store, tx, V7_NUMBERS, |k, v| {
        let (Ok(sid), Ok(num)) = (std::str::from_utf8(k), <[u8; 4]>::try_from(v)) else {
            return Ok(false);
        };
        t.put_number(sid, u32::from_be_bytes(num))
            .map_err(|e| store.err(e))?;
        Ok(true)
    })?;
    moved += drain(store, tx, V7_VIEW, |k, v| {
        let (Some(num), Some(Ok(key))) = (u32_at(k, 0), k.get(4..).map(std::str::from_utf8)) else {
            return Ok(false);
        };
        t.put_view(num, key, v).map_err(|e| store.err(e))?;
        Ok(true)
    })?;
    moved += drain(store, tx, V7_FEED, |k, v| {
        let (Some(num), Some(id), 12) = (u32_at(k, 0), u64_at(k, 4), k.len()) else {
            return Ok(false);
        };
        t.put_event(num, id, v).map_err(|e| store.err(e))?;
        Ok(true)
    })?;
    moved += drain(store, tx, V7_VERSIONS, |k, v| {
        let (Some(num), Some(id), 12) = (u32_at(k, 0), u64_at(k, 4), k.len()) else {
            return Ok(false);
        };
        t.put_version(num, id, v).map_err(|e| store.err(e))?;
        Ok(true)
    })?;
    tracing::info!("store upgrade: {moved} rows of the event feed given typed keys");
    Ok(())
}

/// Schema 8: documents' snapshots, changes and signatures get typed keys (rows of schema 6
/// and before, keyed by sid, get their map's number on the way).
fn docs_retyped(store: &Store, tx: &WriteTransaction, from: u32) -> Result<()> {
    let mut tables = Tables::open(tx).map_err(|e| store.err(e))?;
    let mut nums: std::collections::HashMap<String, u32> = Default::default();
    // A row's map number and the rest of its key.
    let mut split = |k: &[u8]| -> Result<Option<(u32, usize)>> {
        if from >= 7 {
            return Ok(u32_at(k, 0).map(|n| (n, 4)));
        }
        let Some(sid) = k
            .get(..34)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(MapSid::parse)
        else {
            return Ok(None);
        };
        let num = match nums.get(sid.as_str()) {
            Some(n) => *n,
            None => {
                let mut sink = Sink::new(&mut tables, None);
                let n = store.number_for(&mut sink, &sid)?;
                nums.insert(sid.as_str().to_string(), n);
                n
            }
        };
        Ok(Some((num, 34)))
    };
    let doc = |num: u32, rest: &[u8]| -> Option<(u32, u8, u64, u16)> {
        let kind = *rest.first()?;
        let inc = u64_at(rest, 1)?;
        let index = u16::from_be_bytes(rest.get(9..11)?.try_into().ok()?);
        let k = (num, kind, inc, index);
        doc_of(k).map(|_| k)
    };
    let mut snaps = tx.open_table(SNAPSHOTS).map_err(|e| store.err(e))?;
    let mut moved = drain(store, tx, OLD_SNAPSHOTS, |k, v| {
        let Some((num, at)) = split(k)? else {
            return Ok(false);
        };
        let Some(d) = doc(num, &k[at..]).filter(|_| k.len() == at + 11) else {
            return Ok(false);
        };
        snaps.insert(d, v).map_err(|e| store.err(e))?;
        Ok(true)
    })?;
    let mut changes = tx.open_table(CHANGES).map_err(|e| store.err(e))?;
    moved += drain(store, tx, OLD_CHANGES, |k, v| {
        let Some((num, at)) = split(k)? else {
            return Ok(false);
        };
        let (Some(d), Some(seq), true) =
            (doc(num, &k[at..]), u64_at(k, at + 11), k.len() == at + 19)
        else {
            return Ok(false);
        };
        changes
            .insert(change_key(d, seq), v)
            .map_err(|e| store.err(e))?;
        Ok(true)
    })?;
    let mut sigs = tx.open_table(SIGS).map_err(|e| store.err(e))?;
    moved += drain(store, tx, OLD_SIGS, |k, v| {
        let Some((num, at)) = split(k)? else {
            return Ok(false);
        };
        let Some(hash) = k.get(at..).and_then(|h| <[u8; 32]>::try_from(h).ok()) else {
            return Ok(false);
        };
        sigs.insert((num, &hash), v).map_err(|e| store.err(e))?;
        Ok(true)
    })?;
    tracing::info!("store upgrade: {moved} rows of documents given typed keys");
    Ok(())
}
