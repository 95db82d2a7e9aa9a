//! The store writer: the thread that commits the engine's batches in order (merging those
//! queued together into one transaction), acknowledges their writes and publishes their
//! events once they are stored, and between commits stores compaction's snapshots and starts
//! file rewrites.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use syncmesh_core::{DocAddr, MapSid};
use syncmesh_store::{DocReplacement, FileCompaction, Store};
use tokio::sync::oneshot;

use super::{Shared, StoreJob, MAX_QUEUED_BYTES};
use crate::error::{Error, Result};

/// Queued commits the store writer merges into one transaction, at most.
const MAX_MERGED_COMMITS: usize = 256;
/// Most snapshots or forgotten documents stored in one transaction.
const MAX_MERGED_REPLACEMENTS: usize = 256;
/// Most snapshot bytes stored in one transaction: a commit queued behind it waits that long.
const MAX_REPLACEMENT_BYTES: usize = 1 << 20;

/// Work the store writer does between commits: snapshots replacing change logs, and file
/// rewrites, in the order they were asked for.
enum Deferred {
    Replace(DocReplacement),
    File(Vec<oneshot::Sender<Result<FileCompaction>>>),
}

pub(super) fn store_writer(
    shared: Arc<Shared>,
    store: Arc<Store>,
    jobs: std::sync::mpsc::Receiver<StoreJob>,
) {
    let mut next = None;
    // Compaction waits behind commits: a queued commit waits for one group of snapshots at
    // most, never for all of them.
    let mut deferred: std::collections::VecDeque<Deferred> = Default::default();
    let mut rewrites: Vec<std::thread::JoinHandle<()>> = Vec::new();
    loop {
        let job = match next.take() {
            Some(j) => j,
            None if deferred.is_empty() => match jobs.recv() {
                Ok(j) => j,
                Err(_) => break,
            },
            None => match jobs.try_recv() {
                Ok(j) => j,
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    run_deferred(&shared, &store, &mut deferred, &mut rewrites);
                    continue;
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            },
        };
        let was_commit = matches!(job, StoreJob::Commit { .. });
        match job {
            StoreJob::Commit {
                mut batch,
                mut acks,
                mut barriers,
                mut events,
                mut durable,
                mut seq,
                mut bytes,
            } => {
                // Commits queued behind this one share its transaction (and fsync).
                let mut merged = 1;
                while merged < MAX_MERGED_COMMITS && bytes < MAX_QUEUED_BYTES {
                    match jobs.try_recv() {
                        Ok(StoreJob::Commit {
                            batch: b,
                            acks: a,
                            barriers: w,
                            events: e,
                            durable: d,
                            seq: s,
                            bytes: n,
                        }) => {
                            batch.append(b);
                            acks.extend(a);
                            barriers.extend(w);
                            events.extend(e);
                            durable |= d;
                            seq = seq.max(s);
                            bytes += n;
                            merged += 1;
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let stopped = shared
                    .failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let result = match stopped {
                    Some(e) => Err(Error::WritesStopped(e)),
                    None => if durable {
                        store.commit_durable(&batch)
                    } else {
                        store.commit_relaxed(&batch)
                    }
                    .map_err(|e| {
                        let e = Arc::new(e);
                        tracing::error!("commit failed, stopping writes: {e}");
                        *shared.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                        Error::Store(e)
                    }),
                };
                shared.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                match result {
                    Ok(()) => {
                        // Events first: whoever is answered next and subscribes then finds
                        // them behind it, not in front.
                        for e in events {
                            // No subscriber is not an error.
                            let _ = shared.events.send(e);
                        }
                        // Settled before anyone is answered (a read that follows an answer is
                        // not held for this commit) and after the events are out (a reader not
                        // held then subscribes behind them).
                        shared.committed.store(seq, Ordering::Release);
                        for a in acks {
                            a.send(Ok(()));
                        }
                        for b in barriers {
                            let _ = b.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        for a in acks {
                            a.send(Err(e.clone()));
                        }
                        for b in barriers {
                            let _ = b.send(Err(e.clone()));
                        }
                    }
                }
            }
            StoreJob::Fence(tx) => {
                let _ = tx.send(());
            }
            StoreJob::CompactFile(waiting) => deferred.push_back(Deferred::File(waiting)),
            StoreJob::Compact { sid, doc, snapshot } => {
                deferred.push_back(replacement(&store, sid, doc, Some(snapshot)));
            }
            StoreJob::Drop { sid, doc } => {
                deferred.push_back(replacement(&store, sid, doc, None));
            }
        }
        if was_commit && !deferred.is_empty() {
            run_deferred(&shared, &store, &mut deferred, &mut rewrites);
        }
    }
    // Closing: snapshots already taken are stored; a file rewrite not begun is not begun.
    while let Some(d) = deferred.front() {
        if let Deferred::File(_) = d {
            if let Some(Deferred::File(waiting)) = deferred.pop_front() {
                for w in waiting {
                    let _ = w.send(Ok(FileCompaction::Busy));
                }
            }
            continue;
        }
        run_deferred(&shared, &store, &mut deferred, &mut rewrites);
    }
    store.abort_compaction();
    for r in rewrites {
        let _ = r.join();
    }
}

/// A snapshot (or a forgotten document) as the store writer takes it: it covers every change
/// of the document stored so far (the engine queued it after their commits).
fn replacement(store: &Store, sid: MapSid, doc: DocAddr, snapshot: Option<Vec<u8>>) -> Deferred {
    // Unknown: cover nothing, so no change is deleted (the snapshot is merely redundant).
    let through = store.last_change_seq(&sid, doc).unwrap_or(0);
    Deferred::Replace(DocReplacement {
        sid,
        doc,
        snapshot,
        through,
    })
}

/// Does the next piece of deferred work: one group of replacements (bounded in bytes), or
/// starts a file rewrite on its own thread.
fn run_deferred(
    shared: &Arc<Shared>,
    store: &Arc<Store>,
    deferred: &mut std::collections::VecDeque<Deferred>,
    rewrites: &mut Vec<std::thread::JoinHandle<()>>,
) {
    if let Some(Deferred::File(_)) = deferred.front() {
        let Some(Deferred::File(waiting)) = deferred.pop_front() else {
            return;
        };
        rewrites.retain(|h| !h.is_finished());
        let (shared, store) = (shared.clone(), store.clone());
        let spawned = std::thread::Builder::new()
            .name("syncmesh-rewrite".into())
            .spawn(move || {
                let r = compact_file(&shared, &store);
                for w in waiting {
                    let _ = w.send(r.clone());
                }
            });
        match spawned {
            Ok(h) => rewrites.push(h),
            // The waiters were dropped with the closure: they hear that the node is closing.
            Err(e) => tracing::warn!("file compaction cannot start a thread: {e}"),
        }
        return;
    }
    let mut group = Vec::new();
    let mut bytes = 0;
    while group.len() < MAX_MERGED_REPLACEMENTS && bytes < MAX_REPLACEMENT_BYTES {
        match deferred.front() {
            Some(Deferred::Replace(_)) => {}
            _ => break,
        }
        if let Some(Deferred::Replace(r)) = deferred.pop_front() {
            bytes += r.snapshot.as_ref().map_or(0, Vec::len);
            group.push(r);
        }
    }
    replace_docs(shared, store, &group);
    shared.snapshot_bytes.fetch_sub(bytes, Ordering::AcqRel);
}

/// Rewrites the database file (in the background: see [`Store::compact_file`]).
fn compact_file(shared: &Shared, store: &Store) -> Result<FileCompaction> {
    if let Some(e) = shared
        .failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        return Err(Error::WritesStopped(e));
    }
    let before = store.disk_bytes();
    match store.compact_file() {
        Ok(done) => {
            tracing::info!(
                "file compaction: {done:?}; {before} bytes before, {} after",
                store.disk_bytes()
            );
            Ok(done)
        }
        Err(e) => {
            tracing::warn!("{e}");
            Err(Error::Store(Arc::new(e)))
        }
    }
}

/// Stores a group of snapshots and forgotten documents as one transaction.
fn replace_docs(shared: &Shared, store: &Store, group: &[DocReplacement]) {
    if group.is_empty()
        || shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    {
        // The commits these snapshots cover may not all be on disk.
        return;
    }
    if let Err(e) = store.replace_docs(group) {
        tracing::warn!(
            "compaction of {} documents failed (their change logs are kept): {e}",
            group.len()
        );
    }
}
