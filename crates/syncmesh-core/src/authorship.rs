//! Who made a change: Automerge actor ids bound to node identities, and signatures.
//!
//! A node with a key (its libp2p ed25519 identity) writes as an actor whose first 16 bytes are
//! derived from its peer id ([`actor_prefix`]), and signs each change it makes to a map that
//! has permission entries: the signature covers the change hash, which covers the actor, the
//! sequence number, the dependencies and every operation. A peer id holds its ed25519 public
//! key, so anyone can check a [`Signature`] without asking for keys.
//!
//! With this, a node checks a change of a map with entries against the rights of its *author*
//! (see [`crate::replication`]), not of the peer that passed it on: a reader's change relayed
//! by a writer is refused, and so is a change forged in a writer's name.

use std::sync::Arc;

use automerge::{Change, ChangeHash};
use libp2p_identity::{Keypair, PeerId, PublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Domain separation of change signatures (a signature made for anything else never passes).
const DOMAIN: &[u8] = b"syncmesh-change/1";
/// Longest author (a peer id) accepted from a peer.
const MAX_AUTHOR: usize = 128;
/// Longest signature accepted from a peer (ed25519: 64 bytes).
const MAX_SIG: usize = 128;

/// A node's signing key (cheap to clone).
#[derive(Clone)]
pub struct Signer {
    key: Arc<Keypair>,
    peer_id: String,
}

impl Signer {
    /// A signer with this key.
    pub fn new(key: Keypair) -> Signer {
        let peer_id = key.public().to_peer_id().to_string();
        Signer {
            key: Arc::new(key),
            peer_id,
        }
    }

    /// The key's peer id, the identity permissions name.
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// Signs a change.
    pub fn sign(&self, hash: &ChangeHash) -> Option<Signature> {
        // Only RSA keys can fail to sign; a node's key is ed25519.
        let sig = self.key.sign(&message(hash)).ok()?;
        Some(Signature {
            author: self.peer_id.clone(),
            sig,
        })
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.peer_id)
    }
}

impl PartialEq for Signer {
    fn eq(&self, other: &Self) -> bool {
        self.peer_id == other.peer_id
    }
}

impl Eq for Signer {}

/// A change's author and its signature of the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// The author's peer id.
    pub author: String,
    /// The ed25519 signature of `DOMAIN` followed by the change hash.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

impl Signature {
    /// The signature as bytes (for storage).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads [`Self::encode`]d bytes.
    pub fn decode(b: &[u8]) -> Option<Signature> {
        postcard::from_bytes(b).ok()
    }

    /// Whether this is the author's signature of `hash` (the change it names is not looked
    /// at: [`Self::signs`] also checks that its actor is the author's).
    pub fn signs_hash(&self, hash: &ChangeHash) -> bool {
        self.author.len() <= MAX_AUTHOR
            && self.sig.len() <= MAX_SIG
            && public_key(&self.author).is_some_and(|k| k.verify(&message(hash), &self.sig))
    }

    /// Whether this signs `change`: the signature is the author's, of this change, and the
    /// change's actor is one of the author's ([`actor_prefix`]).
    pub fn signs(&self, change: &Change) -> bool {
        if self.author.len() > MAX_AUTHOR || self.sig.len() > MAX_SIG {
            return false;
        }
        let Some(prefix) = actor_prefix(&self.author) else {
            return false;
        };
        if !change.actor_id().to_bytes().starts_with(&prefix) {
            return false;
        }
        public_key(&self.author).is_some_and(|k| k.verify(&message(&change.hash()), &self.sig))
    }
}

fn message(hash: &ChangeHash) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 32);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(&hash.0);
    m
}

/// The public key a peer id holds (ed25519 peer ids inline their key); `None` for anything
/// else.
fn public_key(peer_id: &str) -> Option<PublicKey> {
    let id: PeerId = peer_id.parse().ok()?;
    let mh = id.as_ref();
    if mh.code() != 0 {
        return None; // a hashed (non-inline) key: not ours
    }
    PublicKey::try_decode_protobuf(mh.digest()).ok()
}

/// The first 16 bytes of every actor id of the node with this peer id; `None` if it is not a
/// peer id.
pub fn actor_prefix(peer_id: &str) -> Option<[u8; 16]> {
    let id: PeerId = peer_id.parse().ok()?;
    let d = Sha256::new()
        .chain_update(b"syncmesh-actor/1")
        .chain_update(id.to_bytes())
        .finalize();
    let mut p = [0u8; 16];
    p.copy_from_slice(&d[..16]);
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, AutoCommit, ROOT};

    fn change_by(actor: Vec<u8>) -> Change {
        let mut d = AutoCommit::new();
        d.set_actor(ActorId::from(actor));
        d.put(ROOT, "k", 1).unwrap();
        d.commit();
        d.get_last_local_change().unwrap().clone()
    }

    #[test]
    fn a_signature_binds_the_change_and_its_actor_to_the_author() {
        let alice = Signer::new(Keypair::ed25519_from_bytes([1; 32]).unwrap());
        let bob = Signer::new(Keypair::ed25519_from_bytes([2; 32]).unwrap());
        let mut actor = actor_prefix(alice.peer_id()).unwrap().to_vec();
        actor.extend_from_slice(b"session1");
        let c = change_by(actor);
        let s = alice.sign(&c.hash()).unwrap();
        assert!(s.signs(&c));
        assert_eq!(Signature::decode(&s.encode()), Some(s.clone()));
        // Another change, another author's name, a damaged signature: refused.
        let mut other = actor_prefix(alice.peer_id()).unwrap().to_vec();
        other.extend_from_slice(b"session2");
        assert!(!s.signs(&change_by(other)));
        let claimed = Signature {
            author: bob.peer_id().to_string(),
            ..s.clone()
        };
        assert!(!claimed.signs(&c));
        let mut bad = s.clone();
        bad.sig[0] ^= 1;
        assert!(!bad.signs(&c));
        // Bob signing a change made under Alice's actor: the actor is not his.
        assert!(!bob.sign(&c.hash()).unwrap().signs(&c));
        for junk in ["", "not a peer id", &"1".repeat(500)] {
            let j = Signature {
                author: junk.to_string(),
                ..s.clone()
            };
            assert!(!j.signs(&c), "{junk:?}");
        }
    }
}
