//! Recovery in a new process: the [`RecoveryKey`] (a position per channel, as JSON) and the
//! [`PositionStore`] trait an application implements over its own storage.
//!
//! For exactly-once *processing*, the application saves a message's position in the same
//! transaction as the message's effect (examples/sqlite_exactly_once.rs); on start, the client
//! loads the position back and subscribes from it. The SDK never saves positions by itself:
//! only the application knows when an effect is durable.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use herald_core::Position;

/// A position per channel. Its string form is a JSON object `{"channel":"EPOCH:SERIAL"}`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryKey {
    positions: BTreeMap<String, Position>,
}

/// A recovery key that is not a JSON object of channel to `EPOCH:SERIAL`.
#[derive(Debug, thiserror::Error)]
#[error("invalid recovery key: {0}")]
pub struct InvalidRecoveryKey(String);

impl RecoveryKey {
    pub fn new(positions: BTreeMap<String, Position>) -> Self {
        Self { positions }
    }

    pub fn position(&self, channel: &str) -> Option<&Position> {
        self.positions.get(channel)
    }

    pub fn positions(&self) -> &BTreeMap<String, Position> {
        &self.positions
    }

    pub fn parse(text: &str) -> Result<Self, InvalidRecoveryKey> {
        let raw: BTreeMap<String, String> =
            serde_json::from_str(text).map_err(|error| InvalidRecoveryKey(error.to_string()))?;
        let mut positions = BTreeMap::new();
        for (channel, position) in raw {
            let position = Position::parse(&position)
                .map_err(|error| InvalidRecoveryKey(format!("channel {channel:?}: {error}")))?;
            positions.insert(channel, position);
        }
        Ok(Self { positions })
    }
}

impl fmt::Display for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raw: BTreeMap<&str, String> = self
            .positions
            .iter()
            .map(|(channel, position)| (channel.as_str(), position.to_string()))
            .collect();
        let text = serde_json::to_string(&raw).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// Error type of position stores: whatever the application's storage returns.
pub type StoreError = Box<dyn std::error::Error + Send + Sync>;

/// Where the application keeps the position of each channel it has processed.
///
/// The client calls [`PositionStore::load`] when a subscription starts without an explicit
/// `from`. It is not called again on reconnects: the session's own position is then at least
/// as far as anything the application saved, and the session drops what it already handed out.
/// `load` runs on the client's task, so it should be quick (a point read).
pub trait PositionStore: Send + Sync + 'static {
    fn load(&self, channel: &str) -> Result<Option<Position>, StoreError>;

    /// For stores without their own transactions. An application that keeps its state in a
    /// database saves the position in the same transaction as the effect instead.
    fn save(&self, channel: &str, position: &Position) -> Result<(), StoreError>;
}

/// A store in memory, for tests and for at-most-once consumers that only resume within one
/// process.
#[derive(Debug, Default)]
pub struct MemoryPositionStore {
    positions: Mutex<BTreeMap<String, Position>>,
}

impl PositionStore for MemoryPositionStore {
    fn load(&self, channel: &str) -> Result<Option<Position>, StoreError> {
        let positions = self.positions.lock().expect("position store lock");
        Ok(positions.get(channel).cloned())
    }

    fn save(&self, channel: &str, position: &Position) -> Result<(), StoreError> {
        let mut positions = self.positions.lock().expect("position store lock");
        positions.insert(channel.to_owned(), position.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_key_round_trips_and_rejects_garbage() {
        let mut positions = BTreeMap::new();
        positions.insert("chat:a".to_owned(), Position::parse("E1:42").unwrap());
        positions.insert("b".to_owned(), Position::parse("E2:0").unwrap());
        let key = RecoveryKey::new(positions);
        let text = key.to_string();
        assert_eq!(text, r#"{"b":"E2:0","chat:a":"E1:42"}"#);
        let back = RecoveryKey::parse(&text).unwrap();
        assert_eq!(back, key);
        assert_eq!(back.position("chat:a").unwrap().serial.0, 42);
        for bad in ["", "[]", r#"{"a":"nocolon"}"#, r#"{"a":1}"#] {
            assert!(RecoveryKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn memory_store_keeps_the_last_saved_position() {
        let store = MemoryPositionStore::default();
        assert_eq!(store.load("a").unwrap(), None);
        store.save("a", &Position::parse("E:3").unwrap()).unwrap();
        store.save("a", &Position::parse("E:4").unwrap()).unwrap();
        assert_eq!(store.load("a").unwrap().unwrap().to_string(), "E:4");
    }
}
