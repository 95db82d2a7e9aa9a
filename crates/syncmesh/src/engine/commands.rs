//! What the engine is asked to do: commands with typed answers, and how each is run.

use super::*;

/// A user's mutation function, run on the engine thread.
pub(crate) type Mutator = Box<dyn FnOnce(Option<&JsonObject>) -> Option<JsonObject> + Send>;

/// Where the answer to a command goes: each command names its own answer's type.
pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// An operation on one map, with the channel its answer goes to.
pub(crate) enum Op {
    Info(Reply<MapInfo>),
    Get(String, Reply<Item>),
    Items(PageRequest, Reply<Page>),
    Listing(Reply<(Vec<Item>, u64)>),
    Conflicts(String, Reply<ItemConflicts>),
    Set(String, JsonObject, WriteOptions, Reply<Item>),
    Create(String, JsonObject, WriteOptions, Reply<Item>),
    Update(String, JsonObject, WriteOptions, Reply<Item>),
    Mutate(String, WriteOptions, Mutator, Reply<Option<Item>>),
    Remove(String, Option<Revision>, Reply<()>),
    SetTtl(Ttl, Reply<MapInfo>),
    SetItemTtl(String, Ttl, Reply<Item>),
    RemoveMap(Reply<()>),
    Permissions(Reply<Vec<syncmesh_core::Permission>>),
    SetPermission(syncmesh_core::Permission, Reply<syncmesh_core::Permission>),
    RemovePermission(String, Reply<()>),
    /// The id of the map's newest event, published or not.
    LastEventId(Reply<u64>),
}

impl Op {
    /// The durability the write asked for (`None`: the node's).
    fn durability(&self) -> Option<Durability> {
        match self {
            Op::Set(_, _, o, _)
            | Op::Create(_, _, o, _)
            | Op::Update(_, _, o, _)
            | Op::Mutate(_, o, _, _) => o.durability,
            _ => None,
        }
    }

    fn is_write(&self) -> bool {
        !matches!(
            self,
            Op::Info(_)
                | Op::Get(..)
                | Op::Items(..)
                | Op::Listing(_)
                | Op::Conflicts(..)
                | Op::Permissions(_)
                | Op::LastEventId(_)
        )
    }

    /// Answers with `e` without running.
    fn fail(self, e: Error) -> Answer {
        match self {
            Op::Info(r) | Op::SetTtl(_, r) => answer(r, Err(e)),
            Op::Get(_, r)
            | Op::Set(_, _, _, r)
            | Op::Create(_, _, _, r)
            | Op::Update(_, _, _, r)
            | Op::SetItemTtl(_, _, r) => answer(r, Err(e)),
            Op::Items(_, r) => answer(r, Err(e)),
            Op::Listing(r) => answer(r, Err(e)),
            Op::Conflicts(_, r) => answer(r, Err(e)),
            Op::Mutate(_, _, _, r) => answer(r, Err(e)),
            Op::Remove(_, _, r) | Op::RemoveMap(r) | Op::RemovePermission(_, r) => {
                answer(r, Err(e))
            }
            Op::Permissions(r) => answer(r, Err(e)),
            Op::SetPermission(_, r) => answer(r, Err(e)),
            Op::LastEventId(r) => answer(r, Err(e)),
        }
    }
}

/// An operation's outcome, to be sent once the commit it waits for (if any) is done: the
/// commit's failure replaces a success.
pub(crate) struct Answer {
    send: Box<dyn FnOnce(Result<()>) + Send>,
    ok: bool,
}

impl Answer {
    pub(super) fn send(self, commit: Result<()>) {
        (self.send)(commit)
    }
}

pub(super) fn answer<T: Send + 'static>(reply: Reply<T>, r: Result<T>) -> Answer {
    Answer {
        ok: r.is_ok(),
        send: Box::new(move |commit: Result<()>| {
            let _ = reply.send(commit.and(r));
        }),
    }
}

pub(crate) enum Cmd {
    Open {
        spec: MapSpec,
        reply: oneshot::Sender<Result<MapInfo>>,
    },
    List {
        reply: oneshot::Sender<Result<Vec<MapInfo>>>,
    },
    Op {
        id: String,
        op: Op,
    },
    /// Replies once every earlier write is on disk.
    Sync {
        reply: oneshot::Sender<Result<()>>,
    },
    /// Replaces every stored change log by a snapshot of its document, then replies.
    Compact {
        reply: oneshot::Sender<Result<()>>,
        /// Told what compacting the file did, once it is done.
        file: oneshot::Sender<Result<FileCompaction>>,
    },
    /// Commits what is queued, stops both threads, then replies.
    Shutdown {
        reply: oneshot::Sender<Result<()>>,
    },
    /// How many maps are loaded in memory.
    Loaded {
        reply: oneshot::Sender<Result<usize>>,
    },
    /// The estimated memory of live shard documents and how many there are.
    LiveDocuments {
        reply: oneshot::Sender<Result<(u64, usize)>>,
    },
    /// The history held by loaded maps.
    History {
        reply: oneshot::Sender<Result<Vec<MapHistory>>>,
    },
    /// Invitations, joins, trust.
    Trust(TrustCmd),
}

/// Someone waiting for a commit: a write's acknowledgement, an open, or a read that saw
/// what the commit stores.
pub(super) struct Ack {
    pub(super) answer: Answer,
    /// A write (or an open that created a map) rather than a read held for the commit.
    pub(super) write: bool,
    /// The map written and its epoch then: a map reloaded since (see `epochs`) lost the write.
    pub(super) map: Option<(MapSid, u64)>,
    /// A write acknowledged before its commit ([`Durability::Relaxed`]).
    pub(super) relaxed: bool,
}

impl Ack {
    /// A read answered by `answer` with the outcome of the commit it waits for.
    pub(super) fn read(
        map: Option<(MapSid, u64)>,
        answer: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Ack {
        Ack {
            answer: Answer {
                send: Box::new(answer),
                ok: true,
            },
            write: false,
            map,
            relaxed: false,
        }
    }

    /// An open of a map that this round created or fetched: answered with the commit.
    pub(super) fn open(map: Option<(MapSid, u64)>, reply: Reply<MapInfo>, info: MapInfo) -> Ack {
        Ack {
            answer: answer(reply, Ok(info)),
            write: false,
            map,
            relaxed: false,
        }
    }

    pub(super) fn send(self, r: Result<()>) {
        self.answer.send(r)
    }
}

impl Engine {
    pub(super) fn handle(
        &mut self,
        cmd: Cmd,
        now: Timestamp,
        acks: &mut Vec<Ack>,
        barriers: &mut Vec<oneshot::Sender<Result<()>>>,
    ) {
        match cmd {
            Cmd::Sync { reply } => barriers.push(reply),
            Cmd::Loaded { reply } => {
                let _ = reply.send(Ok(self.catalog.maps().count()));
            }
            Cmd::LiveDocuments { reply } => {
                let bytes = self.catalog.maps().map(MapReplica::live_bytes).sum();
                let docs = self.catalog.maps().map(MapReplica::live_shards).sum();
                let _ = reply.send(Ok((bytes, docs)));
            }
            Cmd::History { reply } => {
                let out = self
                    .catalog
                    .maps_mut()
                    .map(|m| {
                        let shards = m.live_history();
                        MapHistory {
                            sid: m.sid().clone(),
                            name: m.unique_name().map(str::to_string),
                            generation: shards.iter().map(|(_, h)| h.gen).max().unwrap_or(0),
                            shards: shards.len(),
                            ops: shards.iter().map(|(_, h)| h.ops).sum(),
                            slots: shards.iter().map(|(_, h)| h.slots).sum(),
                        }
                    })
                    .collect();
                let _ = reply.send(Ok(out));
            }
            Cmd::Shutdown { reply } => self.shutdown = Some(reply),
            Cmd::Trust(c) => self.on_trust_cmd(c, now),
            Cmd::Compact { reply, file } => {
                if let Some(e) = self.write_stop() {
                    let _ = reply.send(Err(e.clone()));
                    let _ = file.send(Err(e));
                    return;
                }
                for ((sid, doc), n) in self.changes_since_snapshot.iter_mut() {
                    if n.0 > 0 {
                        *n = (0, 0);
                        self.compact_queue.push((sid.clone(), *doc));
                    }
                }
                self.compact_file.push(file);
                barriers.push(reply);
            }
            Cmd::List { reply } => {
                let r = self.list(now);
                if self.any_unsettled() {
                    acks.push(Ack::read(None, move |c| {
                        let _ = reply.send(c.and(r));
                    }));
                } else {
                    let _ = reply.send(r);
                }
            }
            Cmd::Open { spec, reply } => {
                let r = self.open(&spec, now);
                if let Err(Error::Map(syncmesh_core::Error::MapNotFound(_))) = &r {
                    if let Some(sid) = self.should_fetch(&spec) {
                        self.fetch(sid, spec, reply);
                        return;
                    }
                }
                match r {
                    Ok((info, true)) => {
                        let map = Some((info.sid.clone(), self.epoch(&info.sid)));
                        acks.push(Ack::open(map, reply, info))
                    }
                    Ok((info, false)) if self.unsettled(&info.sid) => {
                        let map = Some((info.sid.clone(), self.epoch(&info.sid)));
                        acks.push(Ack::read(map, move |c| {
                            let _ = reply.send(c.map(|()| info));
                        }));
                    }
                    Ok((info, false)) => {
                        let _ = reply.send(Ok(info));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Cmd::Op { id, op } => {
                let write = op.is_write();
                let relaxed =
                    op.durability().unwrap_or(self.default_durability()) == Durability::Relaxed;
                if write {
                    if let Some(e) = self.write_stop() {
                        op.fail(e).send(Ok(()));
                        return;
                    }
                }
                let done = self.op(&id, op, now);
                let sid = MapRef::parse(&id).ok().map(|r| r.sid());
                if write && done.ok {
                    let map = sid.map(|sid| {
                        let e = self.epoch(&sid);
                        (sid, e)
                    });
                    acks.push(Ack {
                        answer: done,
                        write: true,
                        map,
                        relaxed,
                    });
                    return;
                }
                match sid {
                    Some(sid) if self.unsettled(&sid) => {
                        let map = Some((sid.clone(), self.epoch(&sid)));
                        acks.push(Ack::read(map, move |c| done.send(c)));
                    }
                    _ => done.send(Ok(())),
                }
            }
        }
    }

    pub(super) fn open(&mut self, spec: &MapSpec, now: Timestamp) -> Result<(MapInfo, bool)> {
        if let Some(id) = &spec.id {
            let sid = MapRef::parse(id)?.sid();
            self.ensure_loaded(&sid)?;
        }
        // Permissions given for a new map are checked first: they must all apply before any
        // peer hears of it.
        let me = if spec.permissions.is_empty() {
            String::new()
        } else {
            if spec.permissions.len() >= syncmesh_core::policy::MAX_ENTRIES {
                return Err(syncmesh_core::Error::InvalidPermission(format!(
                    "a map has at most {} permission entries",
                    syncmesh_core::policy::MAX_ENTRIES
                ))
                .into());
            }
            if let Some(bad) = spec
                .permissions
                .iter()
                .find(|p| !syncmesh_core::policy::valid_identity(&p.identity))
            {
                return Err(syncmesh_core::Error::InvalidPermission(format!(
                    "identity {:?} is not a peer id",
                    bad.identity
                ))
                .into());
            }
            self.net
                .as_ref()
                .map(|n| n.handle.status().peer_id.to_string())
                .ok_or(Error::NoNetwork)?
        };
        let stopped = self.write_stop();
        let (m, created) = self.catalog.open(spec, random16(), now)?;
        if created {
            for p in &spec.permissions {
                m.set_permission(p, &me, now)?;
            }
        }
        let info = m.info(now)?;
        if created {
            if let Some(e) = stopped {
                // Not stored, not acknowledged: not kept either (no reader may see it).
                self.catalog.remove(&info.sid);
                return Err(e);
            }
            self.dirty.insert(info.sid.clone());
            self.announce(&info.sid);
        }
        Ok((info, created))
    }

    pub(super) fn list(&mut self, now: Timestamp) -> Result<Vec<MapInfo>> {
        let sids: Vec<MapSid> = self.on_disk.keys().cloned().collect();
        for sid in sids {
            self.ensure_loaded(&sid)?;
        }
        Ok(self.catalog.list(now))
    }

    /// Runs one operation; its answer, to be sent now or once the commit it waits for ends.
    pub(super) fn op(&mut self, id: &str, op: Op, now: Timestamp) -> Answer {
        let sid = match MapRef::parse(id) {
            Ok(r) => r.sid(),
            Err(e) => return op.fail(e.into()),
        };
        if let Err(e) = self.ensure_loaded(&sid) {
            return op.fail(e);
        }
        // Permission entries name peers: changing them needs this node's own peer id.
        let me = match &op {
            Op::SetPermission(..) | Op::RemovePermission(..) => match self.net.as_ref() {
                Some(n) => n.handle.status().peer_id.to_string(),
                None => return op.fail(Error::NoNetwork),
            },
            _ => String::new(),
        };
        let stopped = self.write_stop().is_some();
        let write = op.is_write();
        let m = match self.catalog.get_mut(id, now) {
            Ok(m) => m,
            Err(e) => return op.fail(e.into()),
        };
        // What is due to expire is removed (with its events) before anything is read, so a
        // read and the events after it agree (a map just loaded has not been through
        // `expire_due` yet).
        if !stopped && m.next_expiry().is_some_and(|t| t <= now) {
            m.expire(now);
            self.dirty.insert(sid.clone());
        }
        let m = match self.catalog.get_mut(id, now) {
            Ok(m) => m,
            Err(e) => return op.fail(e.into()),
        };
        fn a<T: Send + 'static>(r: Reply<T>, v: syncmesh_core::Result<T>) -> Answer {
            answer(r, v.map_err(Error::from))
        }
        let done = match op {
            Op::Info(r) => a(r, m.info(now)),
            Op::Get(k, r) => a(r, m.get(&k, now)),
            Op::Items(req, r) => a(r, m.items(&req, now)),
            Op::Listing(r) => a(r, m.listing(now)),
            Op::LastEventId(r) => a(r, Ok(m.last_event_id())),
            Op::Conflicts(k, r) => a(r, m.conflicts(&k, now)),
            Op::Set(k, d, o, r) => a(r, m.set(&k, d, &o, now)),
            Op::Create(k, d, o, r) => a(r, m.create_item(&k, d, o.ttl, now)),
            Op::Update(k, d, o, r) => a(r, m.update(&k, d, &o, now)),
            Op::Mutate(k, o, f, r) => {
                // A panicking closure is the caller's bug: it must not take the node down.
                let guarded = |cur: Option<&JsonObject>| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(cur)))
                        .map_err(|_| ())
                };
                let mut panicked = false;
                let out = m.mutate(&k, &o, now, |cur| match guarded(cur) {
                    Ok(v) => v,
                    Err(()) => {
                        panicked = true;
                        None
                    }
                });
                if panicked {
                    a(
                        r,
                        Err(syncmesh_core::Error::InvalidData(
                            "the mutate function panicked; nothing was written".into(),
                        )),
                    )
                } else {
                    a(r, out)
                }
            }
            Op::Remove(k, rev, r) => a(r, m.remove(&k, rev.as_ref(), now)),
            Op::SetTtl(t, r) => a(r, m.set_ttl(t, now)),
            Op::SetItemTtl(k, t, r) => a(r, m.set_item_ttl(&k, t, now)),
            Op::RemoveMap(r) => a(r, m.remove_map(now)),
            Op::Permissions(r) => a(r, m.info(now).map(|_| m.policy().permissions())),
            Op::SetPermission(p, r) => a(r, m.set_permission(&p, &me, now)),
            Op::RemovePermission(who, r) => a(r, m.remove_permission(&who, &me, now)),
        };
        if write {
            self.dirty.insert(sid);
        }
        done
    }

    /// How writes that do not choose are acknowledged: as the store was opened.
    pub(super) fn default_durability(&self) -> Durability {
        if self.store.is_durable() {
            Durability::Fsync
        } else {
            Durability::Relaxed
        }
    }
}
