//! The read view and the event feed, stored so that each item version is kept once.
//!
//! An event does not copy the item it is about: its record names the item key and how to find
//! the version it wrote (the view entry while that version is current, else the `versions` row
//! under the event's own id) and the version it replaced (a `versions` row under that
//! version's event id). A version leaves `versions` when the event that replaced it is pruned
//! (one moved there by a map removal, when that removal is pruned), so the feed costs a few
//! bytes per event plus the versions its retained events still name.
//!
//! Every row is keyed by a map *number* (given out once per sid and never reused) rather than
//! by the 34-byte sid: see `tables`.
//!
//! Writes go through a [`Sink`], which can record each write as a plain [`Op`]: a file
//! rewrite replays those blindly instead of re-deriving them from a copy that may hold some
//! tables as of later commits than others.

use std::collections::HashMap;

use redb::{ReadableTable, Table, WriteTransaction};
use syncmesh_core::{
    entry_data, entry_item, version_entry, Event, EventKind, JsonObject, MapSid, Timestamp,
    ViewChanges,
};

use crate::tables::{ids_of, view_of, FEED, FEED_BYTES, MAP_NUMBERS, VERSIONS, VIEW};
use crate::{Result, Store};

/// Events pruned at a time: retention is kept to within this many events.
const PRUNE_STEP: u64 = 1024;

/// Bytes counted per event record or item version besides its value (its key and the
/// B-tree's own share), so that a feed of tiny records is bounded in bytes too.
pub(crate) const ROW_BYTES: u64 = 24;

/// One event as the store keeps it ([`crate::MapWrite::events`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEvent {
    /// Its id (per map, increasing).
    pub id: u64,
    /// Whether this replica made the change.
    pub is_local: bool,
    /// When this replica observed it (ms since the epoch).
    pub date: i64,
    /// What happened.
    pub kind: FeedKind,
}

/// What a [`FeedEvent`] says happened.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedKind {
    /// An item appeared; `version` is its view entry ([`syncmesh_core::version_entry`]).
    Added {
        /// The item key.
        key: String,
        /// The item as written.
        version: Vec<u8>,
    },
    /// An item changed.
    Updated {
        /// The item key.
        key: String,
        /// The item as written.
        version: Vec<u8>,
        /// Its data before (JSON text), kept only when the replaced version cannot be named.
        previous: String,
    },
    /// An item went away.
    Removed {
        /// The item key.
        key: String,
        /// Its data before (JSON text), kept only when the replaced version cannot be named.
        previous: String,
    },
    /// The map was removed.
    MapRemoved,
}

impl FeedEvent {
    /// The stored form of an event; `None` for an item whose revision this build did not make.
    pub fn from_event(e: &Event) -> Option<FeedEvent> {
        let text = |d: &JsonObject| serde_json::to_string(d).ok();
        let kind = match &e.kind {
            EventKind::ItemAdded { item } => FeedKind::Added {
                key: item.key.clone(),
                version: version_entry(item)?,
            },
            EventKind::ItemUpdated {
                item,
                previous_data,
            } => FeedKind::Updated {
                key: item.key.clone(),
                version: version_entry(item)?,
                previous: text(previous_data)?,
            },
            EventKind::ItemRemoved { key, previous_data } => FeedKind::Removed {
                key: key.clone(),
                previous: text(previous_data)?,
            },
            EventKind::MapRemoved => FeedKind::MapRemoved,
        };
        Some(FeedEvent {
            id: e.id,
            is_local: e.is_local,
            date: e.date.millis(),
            kind,
        })
    }

    /// Bytes it carries, roughly.
    pub fn bytes(&self) -> usize {
        24 + match &self.kind {
            FeedKind::Added { key, version } => key.len() + version.len(),
            FeedKind::Updated {
                key,
                version,
                previous,
            } => key.len() + version.len() + previous.len(),
            FeedKind::Removed { key, previous } => key.len() + previous.len(),
            FeedKind::MapRemoved => 0,
        }
    }
}

/// One write to the feed's tables, as recorded for a file rewrite's replay.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// A map's number (the empty sid: the next number to give).
    Number { sid: String, num: u32 },
    /// A view row put (`Some`) or deleted.
    View {
        num: u32,
        key: String,
        row: Option<Vec<u8>>,
    },
    /// Every view row of a map deleted.
    ViewClear { num: u32 },
    /// An event record.
    Event { num: u32, id: u64, record: Vec<u8> },
    /// A map's events below `below` deleted.
    EventsBelow { num: u32, below: u64 },
    /// A version put (`Some`) or deleted.
    Version {
        num: u32,
        id: u64,
        entry: Option<Vec<u8>>,
    },
    /// A map's versions below `below` deleted.
    VersionsBelow { num: u32, below: u64 },
    /// The bytes a map's feed takes ([`FEED_BYTES`]).
    FeedBytes { num: u32, bytes: u64 },
}

impl Op {
    pub(crate) fn bytes(&self) -> usize {
        16 + match self {
            Op::Number { sid, .. } => sid.len() + 4,
            Op::View { key, row, .. } => key.len() + row.as_ref().map_or(0, Vec::len),
            Op::Event { record, .. } => 12 + record.len(),
            Op::Version { entry, .. } => 12 + entry.as_ref().map_or(0, Vec::len),
            Op::ViewClear { .. }
            | Op::EventsBelow { .. }
            | Op::VersionsBelow { .. }
            | Op::FeedBytes { .. } => 12,
        }
    }
}

/// The feed's tables, open in one write transaction.
pub(crate) struct Tables<'tx> {
    numbers: Table<'tx, &'static str, u32>,
    view: Table<'tx, (u32, &'static str), &'static [u8]>,
    feed: Table<'tx, (u32, u64), &'static [u8]>,
    versions: Table<'tx, (u32, u64), &'static [u8]>,
    bytes: Table<'tx, u32, u64>,
}

impl<'tx> Tables<'tx> {
    pub(crate) fn open(tx: &'tx WriteTransaction) -> std::result::Result<Self, redb::TableError> {
        Ok(Tables {
            numbers: tx.open_table(MAP_NUMBERS)?,
            view: tx.open_table(VIEW)?,
            feed: tx.open_table(FEED)?,
            versions: tx.open_table(VERSIONS)?,
            bytes: tx.open_table(FEED_BYTES)?,
        })
    }

    /// The map numbers table.
    pub(crate) fn numbers(&self) -> &Table<'tx, &'static str, u32> {
        &self.numbers
    }

    /// Puts a map number (the upgrade from schema 7).
    pub(crate) fn put_number(
        &mut self,
        sid: &str,
        num: u32,
    ) -> std::result::Result<(), redb::StorageError> {
        self.numbers.insert(sid, num).map(|_| ())
    }

    /// Puts a view row (the upgrade from schema 7).
    pub(crate) fn put_view(
        &mut self,
        num: u32,
        key: &str,
        row: &[u8],
    ) -> std::result::Result<(), redb::StorageError> {
        self.view.insert((num, key), row).map(|_| ())
    }

    /// Puts an event record (the upgrade from schema 7).
    pub(crate) fn put_event(
        &mut self,
        num: u32,
        id: u64,
        record: &[u8],
    ) -> std::result::Result<(), redb::StorageError> {
        self.feed.insert((num, id), record).map(|_| ())
    }

    /// Puts a version (the upgrade from schema 7).
    pub(crate) fn put_version(
        &mut self,
        num: u32,
        id: u64,
        entry: &[u8],
    ) -> std::result::Result<(), redb::StorageError> {
        self.versions.insert((num, id), entry).map(|_| ())
    }

    /// Applies one recorded write. Returns how it changed the bytes its map's feed takes
    /// (event records and versions: [`ROW_BYTES`] plus the value per row).
    pub(crate) fn apply(&mut self, op: &Op) -> std::result::Result<i64, redb::StorageError> {
        let row = |v: &[u8]| (v.len() as u64 + ROW_BYTES) as i64;
        let mut gone = 0i64;
        let mut count = |v: &[u8]| {
            gone += row(v);
            false
        };
        Ok(match op {
            Op::Number { sid, num } => self.numbers.insert(sid.as_str(), *num).map(|_| 0)?,
            Op::View {
                num,
                key,
                row: Some(r),
            } => self
                .view
                .insert((*num, key.as_str()), r.as_slice())
                .map(|_| 0)?,
            Op::View {
                num,
                key,
                row: None,
            } => self.view.remove((*num, key.as_str())).map(|_| 0)?,
            Op::ViewClear { num } => self
                .view
                .retain_in(view_of(*num), |_, _| false)
                .map(|_| 0)?,
            Op::Event { num, id, record } => {
                let old = self.feed.insert((*num, *id), record.as_slice())?;
                row(record) - old.map_or(0, |o| row(o.value()))
            }
            Op::EventsBelow { num, below } => {
                self.feed
                    .retain_in((*num, 0)..(*num, *below), |_, v| count(v))?;
                -gone
            }
            Op::Version {
                num,
                id,
                entry: Some(e),
            } => {
                let old = self.versions.insert((*num, *id), e.as_slice())?;
                row(e) - old.map_or(0, |o| row(o.value()))
            }
            Op::Version {
                num,
                id,
                entry: None,
            } => -self
                .versions
                .remove((*num, *id))?
                .map_or(0, |o| row(o.value())),
            Op::VersionsBelow { num, below } => {
                self.versions
                    .retain_in((*num, 0)..(*num, *below), |_, v| count(v))?;
                -gone
            }
            Op::FeedBytes { num, bytes } => self.bytes.insert(*num, *bytes).map(|_| 0)?,
        })
    }

    /// The bytes a map's feed takes, counted row by row.
    fn count_bytes(&self, num: u32) -> std::result::Result<u64, redb::StorageError> {
        let mut n = 0;
        for r in self.feed.range(ids_of(num, 0))? {
            n += r?.1.value().len() as u64 + ROW_BYTES;
        }
        for r in self.versions.range(ids_of(num, 0))? {
            n += r?.1.value().len() as u64 + ROW_BYTES;
        }
        Ok(n)
    }
}

/// Writes to the feed's tables, recording each when a file rewrite needs them.
pub(crate) struct Sink<'a, 'tx> {
    pub(crate) t: &'a mut Tables<'tx>,
    pub(crate) record: Option<&'a mut Vec<Op>>,
    /// How the writes so far changed each map's feed bytes (settled into [`FEED_BYTES`] when
    /// the map's writes end).
    delta: HashMap<u32, i64>,
}

impl<'a, 'tx> Sink<'a, 'tx> {
    /// Writes to `t`, recorded into `record` if given.
    pub(crate) fn new(t: &'a mut Tables<'tx>, record: Option<&'a mut Vec<Op>>) -> Self {
        Sink {
            t,
            record,
            delta: HashMap::new(),
        }
    }

    fn run(&mut self, op: Op) -> std::result::Result<(), redb::StorageError> {
        let d = self.t.apply(&op)?;
        if d != 0 {
            if let Op::Event { num, .. }
            | Op::EventsBelow { num, .. }
            | Op::Version { num, .. }
            | Op::VersionsBelow { num, .. } = &op
            {
                *self.delta.entry(*num).or_default() += d;
            }
        }
        if let Some(r) = self.record.as_deref_mut() {
            r.push(op);
        }
        Ok(())
    }

    fn number(&self, sid: &str) -> std::result::Result<Option<u32>, redb::StorageError> {
        Ok(self.t.numbers.get(sid)?.map(|v| v.value()))
    }

    fn view_row(
        &self,
        num: u32,
        key: &str,
    ) -> std::result::Result<Option<Vec<u8>>, redb::StorageError> {
        Ok(self.t.view.get((num, key))?.map(|v| v.value().to_vec()))
    }
}

use syncmesh_core::varint::{get as get_varint, put as put_varint};

/// A view row: the version's event id, then the entry.
fn view_row(version: u64, entry: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entry.len() + 4);
    put_varint(&mut v, version);
    v.extend_from_slice(entry);
    v
}

/// A view row's version and entry.
pub(crate) fn split_view_row(row: &[u8]) -> Option<(u64, &[u8])> {
    let mut at = 0;
    let v = get_varint(row, &mut at)?;
    Some((v, &row[at..]))
}

// Event records: a flag byte (kind in bits 0-1, local in bit 2, how the replaced version is
// found in bits 3-4), the date (zigzag LEB128), for item events the key (LEB128 length, then
// UTF-8), then the replaced version: its event id (LEB128) or its data's JSON text.
const ADDED: u8 = 0;
const UPDATED: u8 = 1;
const REMOVED: u8 = 2;
const MAP_REMOVED: u8 = 3;
const LOCAL: u8 = 4;
const PREV_REF: u8 = 8;
const PREV_INLINE: u8 = 16;

/// How an event's record finds the version it replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prev<'a> {
    None,
    /// The `versions` row of this event id.
    Ref(u64),
    /// Its data, as JSON text (the version cannot be named: it predates the feed's history).
    Inline(&'a str),
}

#[derive(Debug, PartialEq, Eq)]
struct Record<'a> {
    kind: u8,
    is_local: bool,
    date: i64,
    key: &'a str,
    prev: Prev<'a>,
}

fn encode_record(r: &Record<'_>) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + r.key.len());
    let prev = match r.prev {
        Prev::None => 0,
        Prev::Ref(_) => PREV_REF,
        Prev::Inline(_) => PREV_INLINE,
    };
    b.push(r.kind | if r.is_local { LOCAL } else { 0 } | prev);
    syncmesh_core::varint::put_signed(&mut b, r.date);
    if r.kind != MAP_REMOVED {
        put_varint(&mut b, r.key.len() as u64);
        b.extend_from_slice(r.key.as_bytes());
    }
    match r.prev {
        Prev::None => {}
        Prev::Ref(id) => put_varint(&mut b, id),
        Prev::Inline(text) => b.extend_from_slice(text.as_bytes()),
    }
    b
}

fn decode_record(b: &[u8]) -> Option<Record<'_>> {
    let flags = *b.first()?;
    if flags & !0x1f != 0 {
        return None;
    }
    let kind = flags & 3;
    let mut at = 1;
    let date = syncmesh_core::varint::get_signed(b, &mut at)?;
    let key = if kind == MAP_REMOVED {
        ""
    } else {
        let n = usize::try_from(get_varint(b, &mut at)?).ok()?;
        let key = std::str::from_utf8(b.get(at..at.checked_add(n)?)?).ok()?;
        at += n;
        key
    };
    let prev = match flags & (PREV_REF | PREV_INLINE) {
        0 => Prev::None,
        PREV_REF => Prev::Ref(get_varint(b, &mut at)?),
        PREV_INLINE => Prev::Inline(std::str::from_utf8(b.get(at..)?).ok()?),
        _ => return None,
    };
    if !matches!(prev, Prev::Inline(_)) && at != b.len() {
        return None;
    }
    Some(Record {
        kind,
        is_local: flags & LOCAL != 0,
        date,
        key,
        prev,
    })
}

/// What one map's writes know of its items while a batch is written: the current version of
/// each key touched so far (`None`: no such item).
struct MapFeed {
    num: u32,
    touched: HashMap<String, Option<(u64, Vec<u8>)>>,
    /// The batch removed every item: keys not touched since hold none.
    cleared: bool,
}

impl Store {
    /// A map's number, given out now if it has none.
    pub(crate) fn number_for(&self, sink: &mut Sink<'_, '_>, sid: &MapSid) -> Result<u32> {
        if let Some(n) = sink.number(sid.as_str()).map_err(|e| self.err(e))? {
            return Ok(n);
        }
        let next = sink.number("").map_err(|e| self.err(e))?.unwrap_or(1);
        let after = next
            .checked_add(1)
            .ok_or_else(|| self.corrupt("map number counter (exhausted)"))?;
        sink.run(Op::Number {
            sid: String::new(),
            num: after,
        })
        .map_err(|e| self.err(e))?;
        sink.run(Op::Number {
            sid: sid.as_str().to_string(),
            num: next,
        })
        .map_err(|e| self.err(e))?;
        Ok(next)
    }

    /// A map's number, if it has one.
    pub(crate) fn number_of(
        &self,
        numbers: &impl ReadableTable<&'static str, u32>,
        sid: &MapSid,
    ) -> Result<Option<u32>> {
        Ok(numbers
            .get(sid.as_str())
            .map_err(|e| self.err(e))?
            .map(|v| v.value()))
    }

    /// Writes the view changes and events of the map numbered `num`.
    pub(crate) fn write_feed(
        &self,
        sink: &mut Sink<'_, '_>,
        num: u32,
        view: &ViewChanges,
        events: &[FeedEvent],
    ) -> Result<()> {
        let mut w = MapFeed {
            num,
            touched: HashMap::new(),
            cleared: false,
        };
        if view.reset && !events.iter().any(|e| e.kind == FeedKind::MapRemoved) {
            self.clear_view(sink, &mut w)?;
        }
        let mut prune_below = None;
        for ev in events {
            let (kind, key, prev) = match &ev.kind {
                FeedKind::MapRemoved => {
                    self.clear_view(sink, &mut w)?;
                    (MAP_REMOVED, "", Prev::None)
                }
                FeedKind::Added { key, version } => {
                    // An item added over one that is still there (it should not be): the
                    // replaced version is named, so it goes when this event is pruned.
                    let prev = self.supersede(sink, &mut w, key, ev.id, None)?;
                    w.touched
                        .insert(key.clone(), Some((ev.id, version.clone())));
                    (ADDED, key.as_str(), prev)
                }
                FeedKind::Updated {
                    key,
                    version,
                    previous,
                } => {
                    let prev = self.supersede(sink, &mut w, key, ev.id, Some(previous))?;
                    w.touched
                        .insert(key.clone(), Some((ev.id, version.clone())));
                    (UPDATED, key.as_str(), prev)
                }
                FeedKind::Removed { key, previous } => {
                    let prev = self.supersede(sink, &mut w, key, ev.id, Some(previous))?;
                    w.touched.insert(key.clone(), None);
                    (REMOVED, key.as_str(), prev)
                }
            };
            let rec = encode_record(&Record {
                kind,
                is_local: ev.is_local,
                date: ev.date,
                key,
                prev,
            });
            sink.run(Op::Event {
                num,
                id: ev.id,
                record: rec,
            })
            .map_err(|e| self.err(e))?;
            if ev.id % PRUNE_STEP == 0 && ev.id > self.opts.event_retention {
                prune_below = Some(ev.id - self.opts.event_retention);
            }
        }
        if view.reset {
            sink.run(Op::ViewClear { num }).map_err(|e| self.err(e))?;
        }
        for (key, entry) in &view.entries {
            match entry {
                Some(e) => {
                    let version = match w.touched.get(key) {
                        Some(Some((v, _))) => *v,
                        Some(None) => 0,
                        None if view.reset || w.cleared => 0,
                        // A view change no event announced (bookkeeping): same version.
                        None => match sink.view_row(num, key).map_err(|e| self.err(e))? {
                            Some(row) => split_view_row(&row).map_or(0, |(v, _)| v),
                            None => 0,
                        },
                    };
                    sink.run(Op::View {
                        num,
                        key: key.clone(),
                        row: Some(view_row(version, e)),
                    })
                    .map_err(|e| self.err(e))?;
                }
                None => sink
                    .run(Op::View {
                        num,
                        key: key.clone(),
                        row: None,
                    })
                    .map_err(|e| self.err(e))?,
            }
        }
        if let Some(below) = prune_below {
            self.prune(sink, num, below)?;
        }
        let bytes = self.settle_bytes(sink, num)?;
        if bytes > self.opts.event_retention_bytes {
            self.prune_bytes(sink, num, bytes)?;
            self.settle_bytes(sink, num)?;
        }
        Ok(())
    }

    /// Records what a map's feed takes now ([`FEED_BYTES`]: its stored count plus this
    /// transaction's changes, or counted afresh if it has none) and returns it.
    fn settle_bytes(&self, sink: &mut Sink<'_, '_>, num: u32) -> Result<u64> {
        let delta = sink.delta.remove(&num).unwrap_or(0);
        let stored = sink
            .t
            .bytes
            .get(num)
            .map_err(|e| self.err(e))?
            .map(|v| v.value());
        let bytes = match stored {
            Some(b) => u64::try_from(i64::try_from(b).unwrap_or(i64::MAX).saturating_add(delta))
                .unwrap_or(0),
            None => sink.t.count_bytes(num).map_err(|e| self.err(e))?,
        };
        if stored != Some(bytes) {
            sink.run(Op::FeedBytes { num, bytes })
                .map_err(|e| self.err(e))?;
        }
        Ok(bytes)
    }

    /// Prunes a map's oldest events (and the versions only they name) until its feed takes
    /// at most three quarters of the byte retention, so it is not pruned again at once.
    fn prune_bytes(&self, sink: &mut Sink<'_, '_>, num: u32, bytes: u64) -> Result<()> {
        let target = self.opts.event_retention_bytes / 4 * 3;
        let mut freed = 0u64;
        let mut below = None;
        for row in sink.t.feed.range(ids_of(num, 0)).map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            freed += v.value().len() as u64 + ROW_BYTES;
            if let Some(Record {
                prev: Prev::Ref(p), ..
            }) = decode_record(v.value())
            {
                if let Some(e) = sink.t.versions.get((num, p)).map_err(|e| self.err(e))? {
                    freed += e.value().len() as u64 + ROW_BYTES;
                }
            }
            below = Some(k.value().1 + 1);
            if bytes.saturating_sub(freed) <= target {
                break;
            }
        }
        if let Some(below) = below {
            self.prune(sink, num, below)?;
        }
        Ok(())
    }

    /// The current version of an item as of the events written so far.
    fn current(
        &self,
        sink: &Sink<'_, '_>,
        w: &MapFeed,
        key: &str,
    ) -> Result<Option<(u64, Vec<u8>)>> {
        if let Some(t) = w.touched.get(key) {
            return Ok(t.clone());
        }
        if w.cleared {
            return Ok(None);
        }
        let row = sink.view_row(w.num, key).map_err(|e| self.err(e))?;
        Ok(row.and_then(|r| split_view_row(&r).map(|(v, e)| (v, e.to_vec()))))
    }

    /// Keeps the version an event with id `id` replaces, and says how its record finds it.
    fn supersede<'p>(
        &self,
        sink: &mut Sink<'_, '_>,
        w: &mut MapFeed,
        key: &str,
        id: u64,
        previous: Option<&'p str>,
    ) -> Result<Prev<'p>> {
        let fallback = previous.map_or(Prev::None, Prev::Inline);
        match self.current(sink, w, key)? {
            Some((v, entry)) if v > 0 && v < id => {
                sink.run(Op::Version {
                    num: w.num,
                    id: v,
                    entry: Some(entry),
                })
                .map_err(|e| self.err(e))?;
                Ok(Prev::Ref(v))
            }
            _ => Ok(fallback),
        }
    }

    /// Every item goes at once (the map was removed): the versions retained events still name
    /// move to `versions`, where they stay until a later map removal is pruned.
    fn clear_view(&self, sink: &mut Sink<'_, '_>, w: &mut MapFeed) -> Result<()> {
        let first = sink
            .t
            .feed
            .range(ids_of(w.num, 0))
            .map_err(|e| self.err(e))?
            .next()
            .transpose()
            .map_err(|e| self.err(e))?
            .map(|(k, _)| k.value().1);
        let Some(first) = first else {
            // No event is retained: none names a version.
            w.touched.clear();
            w.cleared = true;
            return Ok(());
        };
        let mut keep: Vec<(u64, Vec<u8>)> = w
            .touched
            .values()
            .flatten()
            .filter(|(v, _)| *v >= first)
            .cloned()
            .collect();
        if !w.cleared {
            for row in sink.t.view.range(view_of(w.num)).map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                if w.touched.contains_key(k.value().1) {
                    continue;
                }
                if let Some((version, entry)) = split_view_row(v.value()) {
                    if version >= first {
                        keep.push((version, entry.to_vec()));
                    }
                }
            }
        }
        for (version, entry) in keep {
            sink.run(Op::Version {
                num: w.num,
                id: version,
                entry: Some(entry),
            })
            .map_err(|e| self.err(e))?;
        }
        w.touched.clear();
        w.cleared = true;
        Ok(())
    }

    /// Deletes a map's events below `below`, and the versions only they named.
    fn prune(&self, sink: &mut Sink<'_, '_>, num: u32, below: u64) -> Result<()> {
        let mut named = Vec::new();
        let mut removals = Vec::new();
        for row in sink
            .t
            .feed
            .range((num, 0)..(num, below))
            .map_err(|e| self.err(e))?
        {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match decode_record(v.value()) {
                Some(r) if r.kind == MAP_REMOVED => removals.push(k.value().1),
                Some(Record {
                    prev: Prev::Ref(p), ..
                }) => named.push(p),
                _ => {}
            }
        }
        sink.run(Op::EventsBelow { num, below })
            .map_err(|e| self.err(e))?;
        for p in named {
            sink.run(Op::Version {
                num,
                id: p,
                entry: None,
            })
            .map_err(|e| self.err(e))?;
        }
        if let Some(last) = removals.last() {
            sink.run(Op::VersionsBelow { num, below: *last })
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// A map's view rows: item key and entry.
    pub(crate) fn read_view(
        &self,
        tx: &redb::ReadTransaction,
        num: u32,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let view = tx.open_table(VIEW).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in view.range(view_of(num)).map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let key = k.value().1;
            let (_, entry) = split_view_row(v.value()).ok_or_else(|| self.corrupt("view row"))?;
            out.push((key.to_string(), entry.to_vec()));
        }
        Ok(out)
    }

    /// The first or last event id a map's feed holds.
    pub(crate) fn feed_end(
        &self,
        tx: &redb::ReadTransaction,
        sid: &MapSid,
        last: bool,
    ) -> Result<Option<u64>> {
        let numbers = tx.open_table(MAP_NUMBERS).map_err(|e| self.err(e))?;
        let Some(num) = self.number_of(&numbers, sid)? else {
            return Ok(None);
        };
        let feed = tx.open_table(FEED).map_err(|e| self.err(e))?;
        let mut rows = feed.range(ids_of(num, 0)).map_err(|e| self.err(e))?;
        let row = if last { rows.next_back() } else { rows.next() };
        Ok(row
            .transpose()
            .map_err(|e| self.err(e))?
            .map(|(k, _)| k.value().1))
    }

    /// Events of a map after `after`, oldest first: at most `limit`, and once `max_bytes` are
    /// read no more (at least one). Each comes with the bytes it took to read.
    pub(crate) fn read_events(
        &self,
        tx: &redb::ReadTransaction,
        sid: &MapSid,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Event, usize)>> {
        let numbers = tx.open_table(MAP_NUMBERS).map_err(|e| self.err(e))?;
        let Some(num) = self.number_of(&numbers, sid)? else {
            return Ok(Vec::new());
        };
        let feed = tx.open_table(FEED).map_err(|e| self.err(e))?;
        let view = tx.open_table(VIEW).map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for row in feed
            .range(ids_of(num, after.saturating_add(1)))
            .map_err(|e| self.err(e))?
            .take(limit)
        {
            if bytes >= max_bytes {
                break;
            }
            let (k, v) = row.map_err(|e| self.err(e))?;
            match self.event_at(&view, &versions, num, sid, k.value().1, v.value()) {
                Ok((event, size)) => {
                    bytes = bytes.saturating_add(size);
                    out.push((event, size));
                }
                // One damaged event must not stop every subscriber at it for good.
                Err(crate::StoreError::Corrupt { detail, .. }) => {
                    tracing::warn!(map = %sid, "a stored event was skipped: {detail}");
                    bytes = bytes.saturating_add(v.value().len());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// One stored event, and the bytes read for it.
    fn event_at(
        &self,
        view: &redb::ReadOnlyTable<(u32, &'static str), &'static [u8]>,
        versions: &redb::ReadOnlyTable<(u32, u64), &'static [u8]>,
        num: u32,
        sid: &MapSid,
        id: u64,
        v: &[u8],
    ) -> Result<(Event, usize)> {
        let rec = decode_record(v).ok_or_else(|| self.corrupt("event record"))?;
        let mut size = v.len();
        // The version the event wrote: in the view while current, else kept under its id.
        let mut version = || -> Result<syncmesh_core::Item> {
            let current = view
                .get((num, rec.key))
                .map_err(|e| self.err(e))?
                .and_then(|r| {
                    split_view_row(r.value())
                        .filter(|(v, _)| *v == id)
                        .map(|(_, e)| e.to_vec())
                });
            let entry = match current {
                Some(e) => e,
                None => versions
                    .get((num, id))
                    .map_err(|e| self.err(e))?
                    .map(|v| v.value().to_vec())
                    .ok_or_else(|| self.missing(sid, id))?,
            };
            size += entry.len();
            entry_item(rec.key, &entry).ok_or_else(|| self.corrupt("item version"))
        };
        let kind = match rec.kind {
            MAP_REMOVED => EventKind::MapRemoved,
            ADDED => EventKind::ItemAdded { item: version()? },
            UPDATED => {
                let item = version()?;
                EventKind::ItemUpdated {
                    item,
                    previous_data: self.previous(versions, num, sid, id, rec.prev)?,
                }
            }
            _ => EventKind::ItemRemoved {
                key: rec.key.to_string(),
                previous_data: self.previous(versions, num, sid, id, rec.prev)?,
            },
        };
        let event = Event {
            id,
            map: sid.clone(),
            kind,
            is_local: rec.is_local,
            date: Timestamp::from_millis(rec.date),
        };
        Ok((event, size))
    }

    /// The data an event's item had before it.
    fn previous(
        &self,
        versions: &redb::ReadOnlyTable<(u32, u64), &'static [u8]>,
        num: u32,
        sid: &MapSid,
        id: u64,
        prev: Prev<'_>,
    ) -> Result<JsonObject> {
        let parse = |text: &str| {
            serde_json::from_str::<JsonObject>(text).map_err(|_| self.corrupt("previous item data"))
        };
        match prev {
            Prev::Inline(text) => parse(text),
            Prev::Ref(p) => {
                let row = versions
                    .get((num, p))
                    .map_err(|e| self.err(e))?
                    .ok_or_else(|| self.missing(sid, id))?;
                parse(entry_data(row.value()).ok_or_else(|| self.corrupt("item version"))?)
            }
            Prev::None => Err(self.corrupt("event record without its previous data")),
        }
    }

    fn missing(&self, sid: &MapSid, id: u64) -> crate::StoreError {
        crate::StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!("event {id} of map {sid} names an item version the store lacks"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{Batch, MapWrite, StoreOptions};
    use redb::ReadableDatabase;
    use syncmesh_core::{Item, NodeId, Revision};

    /// Writes random item events in random batches and keeps what a replica would: the events
    /// it emitted and its view, to compare with what the store gives back.
    pub(crate) struct Model {
        pub(crate) sid: MapSid,
        pub(crate) items: std::collections::BTreeMap<String, Item>,
        pub(crate) events: Vec<Event>,
        rng: syncmesh_core::testing::Rng,
        next_id: u64,
        /// Whether a batch may remove the map.
        pub(crate) removals: bool,
    }

    impl Model {
        pub(crate) fn new(name: &str, seed: u64) -> Model {
            Model {
                sid: MapSid::for_name(name),
                items: Default::default(),
                events: Vec::new(),
                rng: syncmesh_core::testing::Rng(seed),
                next_id: 1,
                removals: true,
            }
        }

        fn rand(&mut self, n: u64) -> u64 {
            self.rng.below(n)
        }

        fn emit(&mut self, kind: EventKind) -> Event {
            let e = Event {
                id: self.next_id,
                map: self.sid.clone(),
                kind,
                is_local: self.next_id.is_multiple_of(3),
                date: Timestamp::from_millis(1_765_000_000_000 + self.next_id as i64),
            };
            self.next_id += 1;
            self.events.push(e.clone());
            e
        }

        /// Commits `rounds` batches of `n` changes over 40 keys.
        pub(crate) fn commit_rounds(&mut self, s: &Store, rounds: usize, n: usize) {
            for _ in 0..rounds {
                s.commit(&crate::Batch {
                    maps: vec![self.batch(n, 40)],
                    ..crate::Batch::default()
                })
                .unwrap();
            }
        }

        /// One batch of `n` random changes over `keys` keys (a map removal now and then),
        /// as the engine would hand it to the store.
        pub(crate) fn batch(&mut self, n: usize, keys: u64) -> MapWrite {
            let mut events = Vec::new();
            let mut dirty = std::collections::BTreeSet::new();
            let mut reset = false;
            for _ in 0..n {
                if self.removals && self.rand(500) == 0 {
                    self.items.clear();
                    dirty.clear();
                    reset = true;
                    events.push(self.emit(EventKind::MapRemoved));
                    continue;
                }
                let key = format!("k{}", self.rand(keys));
                dirty.insert(key.clone());
                let id = self.next_id;
                let item = Item {
                    key: key.clone(),
                    data: serde_json::json!({"v": id, "s": "x".repeat(self.rand(20) as usize)})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    revision: Revision::from_client(format!("{:016x}", id * 7919)),
                    date_created: Timestamp::from_millis(id as i64),
                    date_updated: Timestamp::from_millis(id as i64 + 1),
                    date_expires: id
                        .is_multiple_of(5)
                        .then(|| Timestamp::from_millis(9_000_000)),
                    created_by: NodeId([(id % 7) as u8; 16]),
                };
                let kind = match self.items.get(&key).cloned() {
                    None => EventKind::ItemAdded { item: item.clone() },
                    Some(old) if self.rand(4) == 0 => {
                        self.items.remove(&key);
                        events.push(self.emit(EventKind::ItemRemoved {
                            key,
                            previous_data: old.data,
                        }));
                        continue;
                    }
                    Some(old) => EventKind::ItemUpdated {
                        item: item.clone(),
                        previous_data: old.data,
                    },
                };
                self.items.insert(key, item);
                events.push(self.emit(kind));
            }
            let entries = dirty
                .into_iter()
                .map(|k| {
                    let e = self.items.get(&k).and_then(version_entry);
                    (k, e)
                })
                .collect();
            MapWrite {
                sid: Some(self.sid.clone()),
                name: Some(String::new()),
                next_expiry: None,
                changes: Vec::new(),
                view: ViewChanges { reset, entries },
                events: events.iter().filter_map(FeedEvent::from_event).collect(),
                sigs: Vec::new(),
            }
        }

        /// Asserts the store holds this model's view, and its events from the first retained.
        pub(crate) fn check(&self, s: &Store) {
            let m = s.load_map(&self.sid).unwrap().unwrap();
            let view: Vec<(String, Item)> = m
                .entries
                .iter()
                .map(|(k, e)| (k.clone(), entry_item(k, e).unwrap()))
                .collect();
            let want: Vec<(String, Item)> = self
                .items
                .iter()
                .map(|(k, i)| (k.clone(), i.clone()))
                .collect();
            assert_eq!(view, want);
            assert_eq!(m.last_event_id, self.next_id - 1);
            let got = s.events_after(&self.sid, 0, usize::MAX).unwrap();
            let first = got.first().map_or(self.next_id, |e| e.id);
            let tail: Vec<&Event> = self.events.iter().filter(|e| e.id >= first).collect();
            assert_eq!(got.iter().collect::<Vec<_>>(), tail);
            assert_eq!(
                s.first_event_id(&self.sid).unwrap(),
                got.first().map(|e| e.id)
            );
        }
    }

    /// The `versions` rows of a map, by version id.
    fn version_ids(s: &Store, sid: &MapSid) -> std::collections::BTreeSet<u64> {
        let db = s.db();
        let tx = db.begin_read().unwrap();
        let numbers = tx.open_table(MAP_NUMBERS).unwrap();
        let num = s.number_of(&numbers, sid).unwrap().unwrap();
        let t = tx.open_table(VERSIONS).unwrap();
        t.range(ids_of(num, 0))
            .unwrap()
            .map(|r| r.unwrap().0.value().1)
            .collect()
    }

    /// The versions a model's retained events need kept outside the view (the model never
    /// removes its map): those they replaced, and those they wrote that are no longer current.
    fn needed_versions(m: &Model, first: u64) -> std::collections::BTreeSet<u64> {
        let mut writer: HashMap<&str, u64> = HashMap::new();
        let mut needed = std::collections::BTreeSet::new();
        for e in &m.events {
            let key = e.kind.key().unwrap_or_default();
            let prev = writer.get(key).copied();
            match &e.kind {
                EventKind::ItemAdded { .. } | EventKind::ItemUpdated { .. } => {
                    writer.insert(key, e.id);
                }
                _ => {
                    writer.remove(key);
                }
            }
            if e.id >= first && !matches!(e.kind, EventKind::ItemAdded { .. }) {
                needed.extend(prev);
            }
        }
        let current: std::collections::BTreeSet<u64> = writer.values().copied().collect();
        for e in &m.events {
            let wrote = matches!(
                e.kind,
                EventKind::ItemAdded { .. } | EventKind::ItemUpdated { .. }
            );
            if e.id >= first && wrote && !current.contains(&e.id) {
                needed.insert(e.id);
            }
        }
        needed
    }

    #[test]
    fn events_read_back_exactly_and_versions_go_with_the_events_that_name_them() {
        for seed in 1..3u64 {
            let opts = StoreOptions {
                event_retention: 1500,
                ..StoreOptions::default()
            };
            let s = Store::in_memory(opts).unwrap();
            let mut a = Model::new("a", seed);
            let mut b = Model::new("b", seed * 31);
            b.removals = false;
            let mut c = Model::new("c", seed * 17);
            c.removals = false;
            for round in 0..700 {
                let n = 1 + (round % 7);
                let batch = Batch {
                    maps: vec![a.batch(n, 40), b.batch(1, 5_000), c.batch(n, 30)],
                    ..Batch::default()
                };
                s.commit(&batch).unwrap();
            }
            a.check(&s);
            b.check(&s);
            c.check(&s);
            // c's feed was pruned: exactly the versions its retained events need are kept.
            let first = s.first_event_id(&c.sid).unwrap().unwrap();
            assert!(first > 1);
            assert_eq!(version_ids(&s, &c.sid), needed_versions(&c, first));
            // b's items were nearly all written once: the view alone holds those.
            assert_eq!(version_ids(&s, &b.sid), needed_versions(&b, 1));
        }
    }

    /// A map's feed bytes as recorded, and as counted row by row.
    fn feed_bytes(s: &Store, sid: &MapSid) -> (Option<u64>, u64) {
        let db = s.db();
        let tx = db.begin_read().unwrap();
        let numbers = tx.open_table(MAP_NUMBERS).unwrap();
        let num = s.number_of(&numbers, sid).unwrap().unwrap();
        let recorded = tx
            .open_table(FEED_BYTES)
            .unwrap()
            .get(num)
            .unwrap()
            .map(|v| v.value());
        let mut counted = 0;
        for t in [FEED, VERSIONS] {
            for r in tx.open_table(t).unwrap().range(ids_of(num, 0)).unwrap() {
                counted += r.unwrap().1.value().len() as u64 + ROW_BYTES;
            }
        }
        (recorded, counted)
    }

    #[test]
    fn a_feed_stays_within_its_byte_retention_and_its_count_is_exact() {
        let limit = 24 << 10;
        let opts = StoreOptions {
            event_retention: 1500,
            event_retention_bytes: limit,
            ..StoreOptions::default()
        };
        let s = Store::in_memory(opts).unwrap();
        // Many keys rewritten (versions kept for retained events), with map removals, and a
        // map of a few keys whose count bound prunes first.
        let mut a = Model::new("a", 5);
        let mut b = Model::new("b", 6);
        b.removals = false;
        let mut most = 0;
        for round in 0..600 {
            let batch = Batch {
                maps: vec![a.batch(1 + round % 5, 60), b.batch(3, 4)],
                ..Batch::default()
            };
            s.commit(&batch).unwrap();
            for m in [&a, &b] {
                let (recorded, counted) = feed_bytes(&s, &m.sid);
                assert_eq!(recorded, Some(counted), "round {round}");
                most = most.max(counted);
            }
        }
        // One batch may take the feed past the bound before it is pruned back.
        assert!(most <= limit + 4096, "{most}");
        a.check(&s);
        b.check(&s);
        let first = s.first_event_id(&a.sid).unwrap().unwrap();
        assert!(first > 1500, "pruned for bytes, not only count: {first}");
        // What is kept is exactly what the retained events need.
        let mut c = Model::new("c", 7);
        c.removals = false;
        for _ in 0..300 {
            s.commit(&Batch {
                maps: vec![c.batch(4, 50)],
                ..Batch::default()
            })
            .unwrap();
        }
        let first = s.first_event_id(&c.sid).unwrap().unwrap();
        assert!(first > 1);
        assert_eq!(version_ids(&s, &c.sid), needed_versions(&c, first));
        c.check(&s);
    }

    #[test]
    fn a_damaged_event_is_skipped_and_the_rest_still_read() {
        let s = Store::in_memory(StoreOptions::default()).unwrap();
        let mut m = Model::new("d", 9);
        m.removals = false;
        for _ in 0..20 {
            s.commit(&Batch {
                maps: vec![m.batch(3, 5)],
                ..Batch::default()
            })
            .unwrap();
        }
        let num = {
            let db = s.db();
            let tx = db.begin_read().unwrap();
            let numbers = tx.open_table(MAP_NUMBERS).unwrap();
            s.number_of(&numbers, &m.sid).unwrap().unwrap()
        };
        {
            let db = s.db();
            let tx = db.begin_write().unwrap();
            tx.open_table(FEED)
                .unwrap()
                .insert((num, 7), [0xffu8, 1, 2].as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let got: Vec<u64> = s
            .events_after(&m.sid, 0, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        let want: Vec<u64> = m
            .events
            .iter()
            .map(|e| e.id)
            .filter(|id| *id != 7)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        for r in [
            Record {
                kind: ADDED,
                is_local: true,
                date: 1_765_000_000_000,
                key: "k",
                prev: Prev::None,
            },
            Record {
                kind: UPDATED,
                is_local: false,
                date: -5,
                key: "a:b",
                prev: Prev::Ref(300),
            },
            Record {
                kind: REMOVED,
                is_local: false,
                date: i64::MAX,
                key: "",
                prev: Prev::Inline("{\"x\":1}"),
            },
            Record {
                kind: MAP_REMOVED,
                is_local: true,
                date: i64::MIN,
                key: "",
                prev: Prev::None,
            },
        ] {
            let b = encode_record(&r);
            assert_eq!(decode_record(&b), Some(r));
            for cut in 0..b.len() {
                if let Some(d) = decode_record(&b[..cut]) {
                    // Only an inline previous value can be cut and still parse; it is then
                    // refused as JSON by the reader.
                    assert!(matches!(d.prev, Prev::Inline(_)));
                }
            }
        }
        assert!(decode_record(&[0xff, 0]).is_none());
        assert!(decode_record(&[PREV_REF | PREV_INLINE, 0, 0]).is_none());
    }
}
