//! [`Driver`]: a replication machine driven one call per input, for protocol tests that
//! script exchanges message by message (the simulator drives it the same way).

use std::collections::{BTreeMap, HashMap};

use crate::replication::{
    Grant, Input, Outgoing, Output, Refusal, Replicator, Shelf, Timer, Violation,
};
use crate::{Catalog, ChangeHash, DocAddr, MapSid, Signature, Timestamp};

/// A [`Replicator`] over a catalog of loaded maps: each call is one [`Replicator::handle`],
/// its messages returned, everything else it says kept for the test to look at.
pub struct Driver {
    /// The machine.
    pub machine: Replicator<String>,
    refusals: Vec<Refusal<String>>,
    poisoned: Vec<MapSid>,
    /// Timers the machine asked for.
    pub timers: BTreeMap<Timer, Timestamp>,
    /// No maps: for inputs that touch none.
    none: Catalog,
}

impl Driver {
    /// A machine; `hold_all` as in [`Replicator::new`].
    pub fn new(hold_all: bool) -> Driver {
        Driver {
            machine: Replicator::new(hold_all),
            refusals: Vec::new(),
            poisoned: Vec::new(),
            timers: BTreeMap::new(),
            none: Catalog::new(crate::Identity::new(crate::NodeId([0; 16]), b"driver")),
        }
    }

    /// Handles one input; the messages to send, or the violation the machine punished.
    pub fn handle(
        &mut self,
        input: Input<String>,
        host: &mut Catalog,
        now: Timestamp,
    ) -> Result<Vec<Outgoing<String>>, Violation> {
        let outs = self.machine.handle(Shelf::loaded(host), input, now);
        self.absorb(outs)
    }

    fn absorb(&mut self, outs: Vec<Output<String>>) -> Result<Vec<Outgoing<String>>, Violation> {
        let mut sent = Vec::new();
        let mut punished = None;
        for o in outs {
            match o {
                Output::Send(o) => sent.push(o),
                Output::Punish { violation, .. } => punished = Some(violation),
                Output::Refused(r) => self.refusals.push(r),
                Output::Reload(sid) => self.poisoned.push(sid),
                Output::Schedule { timer, at } => {
                    self.timers.insert(timer, at);
                }
                Output::Load(sids) => panic!("every map is loaded, yet {sids:?} were asked for"),
                Output::Changed(_) | Output::Fetched { .. } => {}
            }
        }
        match punished {
            Some(v) => Err(v),
            None => Ok(sent),
        }
    }

    fn sent(
        &mut self,
        input: Input<String>,
        host: &mut Catalog,
        now: Timestamp,
    ) -> Vec<Outgoing<String>> {
        self.handle(input, host, now).unwrap_or_default()
    }

    fn without_maps(&mut self, input: Input<String>) {
        let outs = self
            .machine
            .handle(Shelf::loaded(&mut self.none), input, super::sim_epoch());
        let _ = self.absorb(outs);
    }

    /// A direct message from `peer`.
    pub fn receive(
        &mut self,
        peer: &str,
        bytes: &[u8],
        host: &mut Catalog,
        now: Timestamp,
    ) -> Result<Vec<Outgoing<String>>, Violation> {
        let input = Input::Message {
            peer: peer.to_string(),
            bytes: bytes.to_vec(),
        };
        self.handle(input, host, now)
    }

    /// `peer` came up, with the grant set for it (every map unless set).
    pub fn peer_up(&mut self, peer: &str, host: &mut Catalog) -> Vec<Outgoing<String>> {
        let grant = self.machine.grant(&peer.to_string());
        let input = Input::PeerUp {
            peer: peer.to_string(),
            grant,
        };
        self.sent(input, host, super::sim_epoch())
    }

    /// `peer` went down.
    pub fn peer_down(&mut self, peer: &str) {
        self.without_maps(Input::PeerDown(peer.to_string()));
    }

    /// Sets what `peer` may do.
    pub fn set_grant(&mut self, peer: &str, grant: Grant) {
        self.without_maps(Input::SetGrant {
            peer: peer.to_string(),
            grant,
        });
    }

    /// Anti-entropy now.
    pub fn tick(&mut self, host: &mut Catalog) -> Vec<Outgoing<String>> {
        self.sent(Input::Timer(Timer::AntiEntropy), host, super::sim_epoch())
    }

    /// Maps this node started holding.
    pub fn announce(&mut self, sids: &[MapSid], host: &mut Catalog) -> Vec<Outgoing<String>> {
        self.sent(Input::Announce(sids.to_vec()), host, super::sim_epoch())
    }

    /// Asks peers for signatures of the map's unsigned changes.
    pub fn ask_signatures(&mut self, sid: &MapSid, host: &mut Catalog) -> Vec<Outgoing<String>> {
        self.sent(Input::AskSignatures(sid.clone()), host, super::sim_epoch())
    }

    /// Local changes of one map committed.
    pub fn committed(
        &mut self,
        sid: &MapSid,
        changes: Vec<(DocAddr, Vec<u8>)>,
        sigs: HashMap<ChangeHash, Signature>,
        host: &mut Catalog,
    ) -> Vec<Outgoing<String>> {
        let input = Input::Committed {
            sid: sid.clone(),
            changes,
            sigs,
        };
        self.sent(input, host, super::sim_epoch())
    }

    /// Fires the nudge timer if the machine asked for it.
    pub fn take_nudges(&mut self, host: &mut Catalog) -> Vec<Outgoing<String>> {
        if self.timers.remove(&Timer::Nudge).is_none() {
            return Vec::new();
        }
        self.sent(Input::Timer(Timer::Nudge), host, super::sim_epoch())
    }

    /// Refusals reported since the last call.
    pub fn take_refusals(&mut self) -> Vec<Refusal<String>> {
        std::mem::take(&mut self.refusals)
    }

    /// Maps reported damaged since the last call.
    pub fn take_poisoned(&mut self) -> Vec<MapSid> {
        std::mem::take(&mut self.poisoned)
    }

    /// [`Replicator::nobody_has`].
    pub fn nobody_has(&self, sid: &MapSid) -> bool {
        self.machine.nobody_has(sid)
    }
}
