//! The store's schema and its upgrades: an older store is brought to [`SCHEMA_VERSION`] in
//! the transaction that opens it (all or nothing), a newer or unknown one is refused.

use redb::{ReadableTable, WriteTransaction};

use crate::{
    Result, Store, StoreError, CHANGES, DIGESTS, EVENTS, INVITES, ITEMS, MAPS, META, POLICIES,
    SCHEMA_VERSION, SIGS, SNAPSHOTS, TRUST,
};

/// The oldest schema this build upgrades in place. The history: 3 added the `digests` table,
/// 4 the `trust`, `invites` and `policies` tables, 5 the `sigs` table; 6 changed no table (its
/// documents hold items written whole, which older builds would read as empty, so they must
/// refuse it).
const OLDEST_UPGRADABLE: u32 = 2;

/// Checks the schema version recorded in the store, upgrades an older one, and makes sure
/// every table exists (upgrades so far only add tables).
pub(crate) fn upgrade(store: &Store, tx: &WriteTransaction) -> Result<()> {
    let mut meta = tx.open_table(META).map_err(|e| store.err(e))?;
    let found = meta
        .get("schema_version")
        .map_err(|e| store.err(e))?
        .map(|v| v.value().to_vec());
    let record = match found {
        None => true,
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
            found != SCHEMA_VERSION
        }
    };
    if record {
        meta.insert("schema_version", SCHEMA_VERSION.to_le_bytes().as_slice())
            .map_err(|e| store.err(e))?;
    }
    for t in [
        MAPS, SNAPSHOTS, CHANGES, ITEMS, EVENTS, INVITES, POLICIES, SIGS,
    ] {
        tx.open_table(t).map_err(|e| store.err(e))?;
    }
    tx.open_table(DIGESTS).map_err(|e| store.err(e))?;
    tx.open_table(TRUST).map_err(|e| store.err(e))?;
    Ok(())
}
