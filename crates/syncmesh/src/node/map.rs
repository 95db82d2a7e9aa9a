//! [`Map`]: a cheap handle on one map, whose operations the engine runs.

use super::*;

/// What [`Node::map`] accepts: a name or sid (open-or-create) or a [`MapSpec`].
#[derive(Debug, Clone)]
pub struct MapOpen(pub(super) MapSpec);

impl From<&str> for MapOpen {
    fn from(s: &str) -> Self {
        MapOpen(MapSpec::named(s))
    }
}

impl From<String> for MapOpen {
    fn from(s: String) -> Self {
        MapOpen(MapSpec::named(s))
    }
}

impl From<MapSpec> for MapOpen {
    fn from(s: MapSpec) -> Self {
        MapOpen(s)
    }
}

/// A handle on one map. Cheap to clone; use it from any number of tasks.
#[derive(Clone)]
pub struct Map {
    pub(super) node: Node,
    pub(super) sid: MapSid,
    pub(super) id: String,
}

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map").field("sid", &self.sid).finish()
    }
}

fn object(v: Value) -> Result<JsonObject> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(Error::Map(syncmesh_core::Error::InvalidData(format!(
            "expected a JSON object, got {other}"
        )))),
    }
}

impl Map {
    /// The map's sid.
    pub fn sid(&self) -> &MapSid {
        &self.sid
    }

    pub(super) async fn op<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        let id = self.id.clone();
        self.node
            .call(|reply| Cmd::Op {
                id,
                op: make(reply),
            })
            .await
    }

    /// The map's description.
    pub async fn info(&self) -> Result<MapInfo> {
        self.op(Op::Info).await
    }

    /// Replaces an item's data (creating it). `data` must be a JSON object.
    pub async fn set(&self, key: &str, data: Value) -> Result<Item> {
        self.set_with(key, data, WriteOptions::default()).await
    }

    /// [`Map::set`] with a TTL and/or an If-Match revision.
    pub async fn set_with(&self, key: &str, data: Value, opts: WriteOptions) -> Result<Item> {
        let d = object(data)?;
        self.op(|r| Op::Set(key.into(), d, opts, r)).await
    }

    /// Creates an item; 409/54208 if the key exists.
    pub async fn create_item(&self, key: &str, data: Value, ttl: Option<Ttl>) -> Result<Item> {
        let opts = WriteOptions {
            ttl,
            ..WriteOptions::default()
        };
        self.create_item_with(key, data, opts).await
    }

    /// [`Map::create_item`] with options: a TTL, a durability. (`if_match` is not used: a
    /// create already requires the key to be absent.)
    pub async fn create_item_with(
        &self,
        key: &str,
        data: Value,
        opts: WriteOptions,
    ) -> Result<Item> {
        let d = object(data)?;
        self.op(|r| Op::Create(key.into(), d, opts, r)).await
    }

    /// Shallow-merges `patch` into the item (creating it).
    pub async fn update(&self, key: &str, patch: Value) -> Result<Item> {
        self.update_with(key, patch, WriteOptions::default()).await
    }

    /// [`Map::update`] with a TTL and/or an If-Match revision.
    pub async fn update_with(&self, key: &str, patch: Value, opts: WriteOptions) -> Result<Item> {
        let d = object(patch)?;
        self.op(|r| Op::Update(key.into(), d, opts, r)).await
    }

    /// Runs `f` on the current data (`None` if absent) and writes what it returns; returning
    /// `None` cancels (`Ok(None)`). `f` runs on the node's engine thread: keep it quick and pure.
    pub async fn mutate<F>(&self, key: &str, f: F) -> Result<Option<Item>>
    where
        F: FnOnce(Option<&JsonObject>) -> Option<JsonObject> + Send + 'static,
    {
        self.op(|r| Op::Mutate(key.into(), WriteOptions::default(), Box::new(f), r))
            .await
    }

    /// [`Map::mutate`] with a TTL and/or an If-Match revision.
    pub async fn mutate_with<F>(&self, key: &str, opts: WriteOptions, f: F) -> Result<Option<Item>>
    where
        F: FnOnce(Option<&JsonObject>) -> Option<JsonObject> + Send + 'static,
    {
        self.op(|r| Op::Mutate(key.into(), opts, Box::new(f), r))
            .await
    }

    /// Reads an item; 404/54201 if absent or expired.
    pub async fn get(&self, key: &str) -> Result<Item> {
        self.op(|r| Op::Get(key.into(), r)).await
    }

    /// Removes an item; 404/54201 if absent.
    pub async fn remove(&self, key: &str) -> Result<()> {
        self.op(|r| Op::Remove(key.into(), None, r)).await
    }

    /// Removes an item only if its revision is `rev` (412/54205 otherwise).
    pub async fn remove_if(&self, key: &str, rev: Revision) -> Result<()> {
        self.op(|r| Op::Remove(key.into(), Some(rev), r)).await
    }

    /// A page of items in key order.
    pub async fn items(&self, req: PageRequest) -> Result<Page> {
        self.op(|r| Op::Items(req, r)).await
    }

    /// Every live item and the event stream that continues exactly after them: each change
    /// the items do not show arrives on the stream, and none they show does. This is the way
    /// to mirror a map (read it, then follow it) without missing or repeating anything. The
    /// items are copied in one step of the engine (other maps' operations wait meanwhile), so
    /// for a very large map prefer paging with [`Map::items`], whose pages carry
    /// [`Page::last_event_id`].
    pub async fn snapshot_and_subscribe(&self) -> Result<(Snapshot, EventStream)> {
        let (items, last_event_id) = self.op(Op::Listing).await?;
        let events = self.stream(Some(last_event_id)).await?;
        Ok((
            Snapshot {
                items,
                last_event_id,
            },
            events,
        ))
    }

    /// Every concurrent value of an item's fields.
    pub async fn conflicts(&self, key: &str) -> Result<ItemConflicts> {
        self.op(|r| Op::Conflicts(key.into(), r)).await
    }

    /// The map's permission entries (empty: the map is shared with every trusted peer, read
    /// and write). See [`Map::set_permission`].
    pub async fn permissions(&self) -> Result<Vec<Permission>> {
        self.op(Op::Permissions).await
    }

    /// One identity's permission entry (404/20404 if it has none).
    pub async fn permission(&self, identity: &str) -> Result<Permission> {
        self.permissions()
            .await?
            .into_iter()
            .find(|p| p.identity == identity)
            .ok_or_else(|| {
                Error::Map(syncmesh_core::Error::PermissionNotFound(
                    identity.to_string(),
                ))
            })
    }

    /// Sets a peer's permissions on the map (its identity is its peer id). Once a map has
    /// entries, only the listed peers receive it, only those with `write` can change it, and
    /// only those with `manage` can change its permissions or remove it — on every node that
    /// holds the map, since the entries travel with it. The first entry also lists this node
    /// as a manager. Needs a network (entries name peers) and, on a map with entries,
    /// `manage` for this node (403/20403 otherwise).
    pub async fn set_permission(&self, p: Permission) -> Result<Permission> {
        self.op(|r| Op::SetPermission(p, r)).await
    }

    /// Removes a peer's entry (404/20404 if it has none). Removing the last entry shares the
    /// map with every trusted peer again.
    pub async fn remove_permission(&self, identity: &str) -> Result<()> {
        self.op(|r| Op::RemovePermission(identity.into(), r)).await
    }

    /// Sets the map's TTL from now (0 clears it).
    pub async fn set_ttl(&self, ttl: Ttl) -> Result<MapInfo> {
        self.op(|r| Op::SetTtl(ttl, r)).await
    }

    /// Sets an item's TTL from now (0 clears it).
    pub async fn set_item_ttl(&self, key: &str, ttl: Ttl) -> Result<Item> {
        self.op(|r| Op::SetItemTtl(key.into(), ttl, r)).await
    }

    /// Removes the map (a replicated tombstone); later writes fail with 54200.
    pub async fn remove_map(&self) -> Result<()> {
        self.op(Op::RemoveMap).await
    }

    /// Live events of this map from now on (a consumer that falls behind is caught up from
    /// storage, so it misses nothing after subscribing).
    pub async fn subscribe(&self) -> Result<EventStream> {
        self.stream(None).await
    }

    /// Every event of this map after event id `after` (0 = from the first retained event),
    /// replayed from storage, then live: a consumer that restarts and resumes from the last
    /// id it processed misses nothing and sees nothing twice. A slow consumer never holds up
    /// writers; when it falls behind the live feed it is caught up from storage.
    pub async fn subscribe_from(&self, after: u64) -> Result<EventStream> {
        self.stream(Some(after)).await
    }
}

/// Every live item of a map at one moment, from [`Map::snapshot_and_subscribe`].
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The items, in key order.
    pub items: Vec<syncmesh_core::Item>,
    /// The id of the newest event of the map the items reflect (0: none yet); the stream
    /// returned with them starts after it.
    pub last_event_id: u64,
}
