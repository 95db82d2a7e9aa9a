//! The maps one replica holds, and opening them by sid or unique name.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::event::MapInfo;
use crate::ids::{MapSid, Timestamp};
use crate::limits::{self, Ttl};
use crate::map::{DocAddr, Identity, MapReplica};

/// How [`Catalog::open`] treats an existing or missing map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenMode {
    /// Create the map; fail with 54301 if this replica already holds a live map of that name.
    CreateNew,
    /// Open the map; fail with 54200 if this replica holds no live map of that id.
    OpenExisting,
    /// Open the map, creating it if needed.
    #[default]
    OpenOrCreate,
}

/// What to open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapSpec {
    /// A sid or a unique name; `None` creates a new unnamed map.
    pub id: Option<String>,
    /// Open mode.
    pub mode: OpenMode,
    /// TTL, applied only when the map is created.
    pub ttl: Option<Ttl>,
    /// Permission entries, set only when the map is created and before any peer hears of it
    /// (so a map meant for some peers never reaches the others, not even by name).
    pub permissions: Vec<crate::policy::Permission>,
}

impl MapSpec {
    /// Open-or-create by sid or name.
    pub fn named(id: impl Into<String>) -> Self {
        MapSpec {
            id: Some(id.into()),
            ..MapSpec::default()
        }
    }

    /// With this mode.
    pub fn mode(mut self, mode: OpenMode) -> Self {
        self.mode = mode;
        self
    }

    /// With this TTL (used only if the map is created).
    pub fn ttl(mut self, ttl: Ttl) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// With these permission entries (used only if the map is created; see
    /// [`crate::policy`]).
    pub fn permissions(mut self, p: impl IntoIterator<Item = crate::policy::Permission>) -> Self {
        self.permissions = p.into_iter().collect();
        self
    }
}

/// How an id given by a client names a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapRef {
    /// By system id.
    Sid(MapSid),
    /// By unique name (its sid is derived from it).
    Name(String),
}

impl MapRef {
    /// Classifies and validates a client's id.
    pub fn parse(id: &str) -> Result<Self> {
        if let Some(sid) = MapSid::parse(id) {
            return Ok(MapRef::Sid(sid));
        }
        limits::validate_name(id)?;
        Ok(MapRef::Name(id.to_string()))
    }

    /// The sid this reference resolves to.
    pub fn sid(&self) -> MapSid {
        match self {
            MapRef::Sid(s) => s.clone(),
            MapRef::Name(n) => MapSid::for_name(n),
        }
    }
}

/// Every map held by one replica, in memory.
#[derive(Debug)]
pub struct Catalog {
    id: Identity,
    maps: BTreeMap<MapSid, MapReplica>,
}

impl Catalog {
    /// An empty catalog writing as `id`.
    pub fn new(id: Identity) -> Self {
        Catalog {
            id,
            maps: BTreeMap::new(),
        }
    }

    /// The identity this replica writes as.
    pub fn identity(&self) -> &Identity {
        &self.id
    }

    /// Opens (or creates) a map. `random` seeds the sid of a new unnamed map. Returns the map
    /// and whether it was created by this call.
    pub fn open(
        &mut self,
        spec: &MapSpec,
        random: [u8; 16],
        now: Timestamp,
    ) -> Result<(&mut MapReplica, bool)> {
        let Some(id) = &spec.id else {
            if spec.mode == OpenMode::OpenExisting {
                return Err(Error::MapNotFound("(no id given)".into()));
            }
            let sid = MapSid::from_random(random);
            if self.maps.contains_key(&sid) {
                // 128 random bits collided: the random source is broken; never reuse a map.
                return Err(Error::MapNameTaken(sid.to_string()));
            }
            let m = MapReplica::create(self.id.clone(), sid.clone(), None, spec.ttl, now)?;
            return Ok((self.maps.entry(sid).or_insert(m), true));
        };
        let r = MapRef::parse(id)?;
        let sid = r.sid();
        let live = self.maps.get(&sid).is_some_and(|m| m.is_live(now));
        match (&r, spec.mode, live) {
            (MapRef::Name(n), OpenMode::CreateNew, true) => Err(Error::MapNameTaken(n.clone())),
            (MapRef::Sid(_), OpenMode::CreateNew, true) => Err(Error::MapNameTaken(id.clone())),
            (_, _, true) => Ok((self.expect_map(&sid)?, false)),
            (MapRef::Sid(_), _, false) | (MapRef::Name(_), OpenMode::OpenExisting, false) => {
                Err(Error::MapNotFound(id.clone()))
            }
            (MapRef::Name(n), _, false) => {
                match self.maps.get_mut(&sid) {
                    Some(m) => m.recreate(Some(n), spec.ttl, now)?,
                    None => {
                        let m = MapReplica::create(
                            self.id.clone(),
                            sid.clone(),
                            Some(n),
                            spec.ttl,
                            now,
                        )?;
                        self.maps.insert(sid.clone(), m);
                    }
                }
                Ok((self.expect_map(&sid)?, true))
            }
        }
    }

    fn expect_map(&mut self, sid: &MapSid) -> Result<&mut MapReplica> {
        self.maps
            .get_mut(sid)
            .ok_or_else(|| Error::MapNotFound(sid.to_string()))
    }

    /// A live map by sid or unique name.
    pub fn get_mut(&mut self, id: &str, now: Timestamp) -> Result<&mut MapReplica> {
        let sid = MapRef::parse(id)?.sid();
        match self.maps.get_mut(&sid) {
            Some(m) if m.is_live(now) => Ok(m),
            Some(m) if m.exists() => Err(Error::MapRemoved(id.to_string())),
            _ => Err(Error::MapNotFound(id.to_string())),
        }
    }

    /// Adds a map (e.g. restored from storage); replaces one with the same sid.
    pub fn insert(&mut self, map: MapReplica) {
        self.maps.insert(map.sid().clone(), map);
    }

    /// Stops holding a map (one that never arrived, for instance); returns it.
    pub fn remove(&mut self, sid: &MapSid) -> Option<MapReplica> {
        self.maps.remove(sid)
    }

    /// Whether this catalog holds the map, whatever its state.
    pub fn contains(&self, sid: &MapSid) -> bool {
        self.maps.contains_key(sid)
    }

    /// A map by sid, whatever its state, to read.
    pub fn get(&self, sid: &MapSid) -> Option<&MapReplica> {
        self.maps.get(sid)
    }

    /// A map by sid, whatever its state.
    pub fn by_sid(&mut self, sid: &MapSid) -> Option<&mut MapReplica> {
        self.maps.get_mut(sid)
    }

    /// Live maps, in sid order.
    pub fn list(&self, now: Timestamp) -> Vec<MapInfo> {
        self.maps
            .values()
            .filter_map(|m| m.info(now).ok())
            .collect()
    }

    /// Every map held, live or not.
    pub fn maps(&self) -> impl Iterator<Item = &MapReplica> {
        self.maps.values()
    }

    /// Every map held, live or not, for changing.
    pub fn maps_mut(&mut self) -> impl Iterator<Item = &mut MapReplica> {
        self.maps.values_mut()
    }

    /// Merges a peer's changes into a map, starting to hold it if this replica did not.
    pub fn apply_changes(
        &mut self,
        sid: &MapSid,
        doc: DocAddr,
        changes: &[Vec<u8>],
        now: Timestamp,
    ) -> Result<()> {
        let id = self.id.clone();
        self.maps
            .entry(sid.clone())
            .or_insert_with(|| MapReplica::empty(id, sid.clone()))
            .apply_changes(doc, changes, now)
    }
}
