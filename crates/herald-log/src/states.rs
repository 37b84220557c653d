//! [`StateTable`]: the durable state records a store holds (an opaque value under a string
//! key, e.g. one MQTT persistent session), newest per key, shared by every store.
//!
//! A store changes the table only once a change is durable (after the sync that covers its
//! record), so readers never see a value a crash could take back. On open, a store rebuilds
//! the table by replaying its records in log order through [`StateTable::apply`]: the newest
//! value of a key wins, a removal (tombstone) drops it.
//!
//! # Invariants
//! - Every key in the table passed [`check_state_key`] and every value
//!   [`check_state_value`]; stores check both before queueing a change, recovery checks them
//!   again when decoding.
//! - At most one entry per key: the newest durable value, with where it lives (`L`: the
//!   segment number for the embedded log, `()` for the memory store).
//! - Iteration is in key (byte) order, never a hash order.

use std::collections::BTreeMap;

use bytes::Bytes;
use herald_core::InvalidInput;

/// Longest state key, in bytes.
pub const STATE_KEY_BYTES_MAX: usize = 256;

/// Largest state value, in bytes.
///
/// 1 MiB: far above an MQTT session (client id, subscriptions, in-flight packet ids) and small
/// enough that a record of it (value plus at most [`STATE_RECORD_OVERHEAD_BYTES_MAX`]) fits one
/// group write of the embedded log's default `group_bytes_max` (8 MiB) with room for a full
/// publish batch beside it, and therefore one segment (a segment always holds a full group).
/// The embedded log refuses a record larger than its configured `group_bytes_max` (which may be
/// set as low as 4 KiB) with `batch_too_large`, as it does an oversized subscriber snapshot.
pub const STATE_VALUE_BYTES_MAX: usize = 1024 * 1024;

/// Bytes a state record takes beyond its key and value in the embedded log (frame header,
/// kind, batch count, `synced_through`, key length, value length); see docs/log-format.md.
pub const STATE_RECORD_OVERHEAD_BYTES: usize = 8 + 1 + 4 + 8 + 2 + 4;

/// Largest overhead of a state record beyond its value (the overhead plus the longest key).
pub const STATE_RECORD_OVERHEAD_BYTES_MAX: usize =
    STATE_RECORD_OVERHEAD_BYTES + STATE_KEY_BYTES_MAX;

/// Checks a state key: 1..=[`STATE_KEY_BYTES_MAX`] bytes of printable ASCII without spaces
/// (`!` to `~`), so keys print, sort and compare as plain bytes. Errors are `invalid_request`.
pub fn check_state_key(key: &str) -> Result<(), InvalidInput> {
    if key.is_empty() {
        return Err(InvalidInput::request("a state key must not be empty"));
    }
    if key.len() > STATE_KEY_BYTES_MAX {
        return Err(InvalidInput::request(format!(
            "a state key is at most {STATE_KEY_BYTES_MAX} bytes, this one has {}",
            key.len()
        )));
    }
    if let Some(position) = key.bytes().position(|byte| !byte.is_ascii_graphic()) {
        return Err(InvalidInput::request(format!(
            "a state key is printable ASCII without spaces; byte {position} is not"
        )));
    }
    Ok(())
}

/// Checks a state value's size (at most [`STATE_VALUE_BYTES_MAX`]). Errors are
/// `invalid_request`.
pub fn check_state_value(value: &[u8]) -> Result<(), InvalidInput> {
    if value.len() > STATE_VALUE_BYTES_MAX {
        return Err(InvalidInput::request(format!(
            "a state value is at most {STATE_VALUE_BYTES_MAX} bytes, this one has {}",
            value.len()
        )));
    }
    Ok(())
}

/// A change to one state record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateChange {
    /// The new value, replacing any earlier one of the key.
    Save { key: String, value: Bytes },
    /// The record is gone (a tombstone).
    Remove { key: String },
}

impl StateChange {
    pub fn key(&self) -> &str {
        match self {
            StateChange::Save { key, .. } | StateChange::Remove { key } => key,
        }
    }

    /// Checks the key and value (see [`check_state_key`], [`check_state_value`]).
    pub fn check(&self) -> Result<(), InvalidInput> {
        check_state_key(self.key())?;
        match self {
            StateChange::Save { value, .. } => check_state_value(value),
            StateChange::Remove { .. } => Ok(()),
        }
    }
}

/// A live value and where it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredState<L> {
    pub value: Bytes,
    pub locator: L,
}

/// The newest durable value of every key. See the module docs.
#[derive(Clone, Debug)]
pub struct StateTable<L> {
    entries: BTreeMap<String, StoredState<L>>,
}

impl<L> Default for StateTable<L> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<L> StateTable<L> {
    /// Applies a durable change (or, on recovery, a record in log order): a save replaces, a
    /// removal drops.
    pub fn apply(&mut self, change: StateChange, locator: L) {
        match change {
            StateChange::Save { key, value } => {
                self.entries.insert(key, StoredState { value, locator });
            }
            StateChange::Remove { key } => {
                self.entries.remove(&key);
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&StoredState<L>> {
        self.entries.get(key)
    }

    /// Moves a record to a new location (reclaim rewrote it there).
    pub fn relocate(&mut self, key: &str, locator: L) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.locator = locator;
        }
    }

    /// Every live record, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &StoredState<L>)> {
        self.entries.iter()
    }

    /// Every live record whose key starts with `prefix`, in key order.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, Bytes)> {
        // Keys sharing a prefix are one contiguous run in byte order, starting at the prefix.
        self.entries
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, stored)| (key.clone(), stored.value.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_printable_ascii_without_spaces() {
        assert!(check_state_key("mqtt/session:client-1").is_ok());
        assert!(check_state_key(&"k".repeat(STATE_KEY_BYTES_MAX)).is_ok());
        for bad in [
            String::new(),
            "k".repeat(STATE_KEY_BYTES_MAX + 1),
            "a b".into(),
            "tab\t".into(),
            "caf\u{e9}".into(),
            "del\u{7f}".into(),
        ] {
            let error = check_state_key(&bad).expect_err(&bad);
            assert_eq!(error.code, herald_core::ErrorCode::InvalidRequest);
        }
    }

    #[test]
    fn prefix_listing_is_contiguous_and_ordered() {
        let mut table = StateTable::default();
        for key in ["b/2", "a/1", "b/10", "b", "c/1", "b/1"] {
            table.apply(
                StateChange::Save {
                    key: key.into(),
                    value: Bytes::from(key.to_owned()),
                },
                (),
            );
        }
        let keys: Vec<String> = table
            .with_prefix("b/")
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(keys, ["b/1", "b/10", "b/2"]);
        assert_eq!(table.with_prefix("").len(), 6);
        assert!(table.with_prefix("d").is_empty());
        table.apply(StateChange::Remove { key: "b/10".into() }, ());
        assert_eq!(table.with_prefix("b/").len(), 2);
    }
}
