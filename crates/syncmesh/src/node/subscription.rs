//! Subscriptions: a map's events replayed from storage, then live, through a buffer bounded
//! in events and in bytes.

use super::*;

impl Node {
    /// Live events of every map from now on. A subscriber that falls behind receives
    /// [`Error::Lagged`] once and continues with newer events; to miss nothing, subscribe per
    /// map with [`Map::subscribe_from`].
    pub fn subscribe(&self) -> Result<EventStream> {
        // Checked first: outside a runtime nothing would ever be delivered.
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let mut live = self.inner.shared.events.subscribe();
        let mut closed = self.inner.shared.closed.subscribe();
        let (tx, rx) = queue(self.inner.shared.subscriber_buffer);
        spawn(async move {
            loop {
                let r = tokio::select! {
                    r = live.recv() => r,
                    _ = closed.wait_for(|c| *c) => return,
                    _ = tx.closed() => return,
                };
                let (item, bytes) = match r {
                    Ok(e) => (Ok(e.event.clone()), e.bytes),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        (Err(Error::Lagged { missed: n }), 0)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(item, bytes).await.is_err() {
                    return;
                }
            }
        })?;
        Ok(EventStream {
            rx,
            resume_point: None,
        })
    }
}

impl Map {
    pub(super) async fn stream(&self, after: Option<u64>) -> Result<EventStream> {
        let shared = self.node.inner.shared.clone();
        // Subscribe to the live feed first, so nothing falls between replay and live.
        let live = shared.events.subscribe();
        // Events of writes answered before this call may still be on their way to the live
        // feed (relaxed writes are answered before their commit): a live subscription starts
        // after the newest event the map has, published or not.
        let issued = self.op(Op::LastEventId).await.unwrap_or(0);
        let floor = if after.is_none() { issued } else { 0 };
        let budget = shared.subscriber_buffer;
        let (tx, rx) = queue(budget);
        let sid = self.sid.clone();
        let store = shared.store()?;
        // Where a live-only subscriber resumes from storage if it lags: the newest stored id.
        let lagged_from = {
            let (s2, sid2) = (store.clone(), sid.clone());
            blocking(move || s2.last_event_id(&sid2)).await??
        };
        // An id this node never issued (ids are per node; a client may come from another node
        // or a reset data directory) would silently skip every event up to it.
        if let Some(after) = after {
            let newest = lagged_from.max(issued);
            if after > newest {
                return Err(Error::UnknownEventId {
                    map: sid.to_string(),
                    after,
                    newest,
                });
            }
        }
        // 0 means "from the first retained event"; any other id must still be retained.
        if let Some(after) = after.filter(|a| *a > 0) {
            let (s2, sid2) = (store.clone(), sid.clone());
            let first = blocking(move || s2.first_event_id(&sid2)).await??;
            if let Some(first) = first {
                if first > after.saturating_add(1) {
                    return Err(Error::EventsPruned {
                        map: sid.to_string(),
                        from: after.saturating_add(1),
                        to: first,
                    });
                }
            }
        }
        drop(store);
        let resume_point = after.unwrap_or(lagged_from.max(floor));
        let sub = Subscription {
            closed: shared.closed.subscribe(),
            shared,
            sid,
            tx,
            live,
            last: after,
            floor,
            lagged_from,
            gap_allowed: after == Some(0),
            budget,
        };
        spawn(sub.run())?;
        Ok(EventStream {
            rx,
            resume_point: Some(resume_point),
        })
    }
}

/// Where a map subscription is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading stored events after `from`, a page at a time, until a page comes back empty.
    Replay { from: u64 },
    /// Forwarding live events; a lag sends it back to `Replay` (what it missed is stored).
    Live,
    /// Over: the node closed, the consumer left, or an error was delivered.
    Done,
}

/// A map subscription's task: replay, then live, then replay again after a lag.
struct Subscription {
    shared: Arc<Shared>,
    sid: MapSid,
    tx: QueueTx,
    live: broadcast::Receiver<Arc<crate::engine::Published>>,
    closed: tokio::sync::watch::Receiver<bool>,
    /// The id of the last event delivered; `None`: live only, nothing replayed yet.
    last: Option<u64>,
    /// Live events up to this id were issued before a live-only subscription began.
    floor: u64,
    /// Where a live-only subscriber that lags resumes from storage.
    lagged_from: u64,
    /// Only a subscription from 0 may start wherever retention starts.
    gap_allowed: bool,
    /// Bytes of events a replayed page may hold.
    budget: usize,
}

impl Subscription {
    async fn run(mut self) {
        let mut phase = match self.last {
            Some(from) => Phase::Replay { from },
            None => Phase::Live,
        };
        loop {
            phase = match phase {
                Phase::Replay { from } => self.replay_page(from).await,
                Phase::Live => self.live().await,
                Phase::Done => return,
            };
        }
    }

    /// Delivers one page of stored events after `from`.
    async fn replay_page(&mut self, from: u64) -> Phase {
        // Fetched per page: a subscriber must not keep a closed node's file open.
        let Ok(store) = self.shared.store() else {
            return Phase::Done;
        };
        let (sid, budget) = (self.sid.clone(), self.budget);
        // A page costs at most about one buffer of memory, however large the events.
        let page = tokio::task::spawn_blocking(move || {
            store.events_after_within(&sid, from, REPLAY_PAGE, budget)
        })
        .await;
        let page = match page {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                let _ = self.tx.send(Err(e.into()), 0).await;
                return Phase::Done;
            }
            Err(_) => return Phase::Done,
        };
        // Cut by count or by bytes: read on until a page comes back empty.
        let Some(first) = page.first().map(|(e, _)| e.id) else {
            return Phase::Live;
        };
        if first > from.saturating_add(1) && !self.gap_allowed {
            // Pruned while this subscriber was behind: say so and stop, rather than skip.
            let pruned = Error::EventsPruned {
                map: self.sid.to_string(),
                from: from.saturating_add(1),
                to: first,
            };
            let _ = self.tx.send(Err(pruned), 0).await;
            return Phase::Done;
        }
        self.gap_allowed = false;
        let mut from = from;
        for (ev, bytes) in page {
            from = ev.id;
            self.last = Some(from);
            if self.tx.send(Ok(ev), bytes).await.is_err() {
                return Phase::Done;
            }
        }
        Phase::Replay { from }
    }

    /// Forwards live events, skipping what replay already delivered, until a lag or the end.
    async fn live(&mut self) -> Phase {
        loop {
            let r = tokio::select! {
                r = self.live.recv() => r,
                _ = self.closed.wait_for(|c| *c) => return Phase::Done,
                _ = self.tx.closed() => return Phase::Done,
            };
            match r {
                Ok(p) if p.event.map == self.sid => {
                    let id = p.event.id;
                    if self.last.is_some_and(|l| id <= l) || id <= self.floor {
                        continue;
                    }
                    self.last = Some(id);
                    // Waits while the consumer's buffer is full; the live feed moves on
                    // meanwhile, and a lag sends this subscription to storage.
                    if self.tx.send(Ok(p.event.clone()), p.bytes).await.is_err() {
                        return Phase::Done;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind the live feed: what it missed is in storage.
                    let from = self.last.unwrap_or(self.lagged_from.max(self.floor));
                    self.last = Some(from);
                    return Phase::Replay { from };
                }
                Err(broadcast::error::RecvError::Closed) => return Phase::Done,
            }
        }
    }
}

/// An event in a subscription's buffer, with its share of the buffer's byte budget.
type Queued = (Result<Event>, Option<OwnedSemaphorePermit>);

/// The sending half of a subscription's buffer: bounded in events and in bytes (each event
/// holds its share of the byte budget until its consumer takes it).
struct QueueTx {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    max: usize,
}

impl QueueTx {
    /// Queues `item`, charged `bytes` (capped at the whole budget, so any event fits);
    /// waits while the buffer is full. `Err` once the consumer is gone.
    async fn send(&self, item: Result<Event>, bytes: usize) -> std::result::Result<(), ()> {
        let cost = u32::try_from(bytes.clamp(1, self.max)).unwrap_or(u32::MAX);
        let permit = tokio::select! {
            p = self.budget.clone().acquire_many_owned(cost) => p.ok(),
            _ = self.tx.closed() => return Err(()),
        };
        self.tx.send((item, permit)).await.map_err(|_| ())
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A subscription's buffer of at most [`SUBSCRIBER_QUEUE`] events and `bytes` bytes.
fn queue(bytes: usize) -> (QueueTx, mpsc::Receiver<Queued>) {
    let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
    let max = bytes.clamp(1, u32::MAX as usize);
    (
        QueueTx {
            tx,
            budget: Arc::new(Semaphore::new(max)),
            max,
        },
        rx,
    )
}

/// A stream of events (`futures_core::Stream`), ending when the node closes.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<Queued>,
    resume_point: Option<u64>,
}

impl EventStream {
    /// For a map's stream, the event id it starts after: every event with a larger id is
    /// delivered. For a live-only stream it is the map's newest event when it was created, so
    /// a consumer that has not seen an event yet can still resume ([`Map::subscribe_from`])
    /// without a gap. `None` for the node-wide stream (event ids are per map).
    pub fn resume_point(&self) -> Option<u64> {
        self.resume_point
    }

    /// The next event, or `None` once the node is closed.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        // The permit goes here: the event's bytes leave the buffer's budget.
        self.rx.recv().await.map(|(e, _)| e)
    }
}

impl futures_core::Stream for EventStream {
    type Item = Result<Event>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|o| o.map(|(e, _)| e))
    }
}
