//! Serials and positions: where a receiver stands in a channel's stream.

use std::fmt;
use std::str::FromStr;

use crate::error::InvalidInput;
use crate::names::Epoch;

/// A per-channel message number. Messages are numbered 1, 2, 3, ... with no gaps;
/// serial 0 is the position before the first message.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Serial(pub u64);

impl Serial {
    pub const BEFORE_FIRST: Serial = Serial(0);

    pub fn next(self) -> Serial {
        Serial(self.0 + 1)
    }

    /// The serial before this one (`prev` of a message). `Serial(0)` has none.
    pub fn prev(self) -> Option<Serial> {
        self.0.checked_sub(1).map(Serial)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `(epoch, serial)`: the one cursor accepted everywhere. String form `EPOCH:SERIAL`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Position {
    pub epoch: Epoch,
    pub serial: Serial,
}

impl Position {
    pub fn new(epoch: Epoch, serial: Serial) -> Self {
        Self { epoch, serial }
    }

    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        let (epoch, serial) = text.rsplit_once(':').ok_or_else(|| {
            InvalidInput::position(format!("position {text:?} must look like EPOCH:SERIAL"))
        })?;
        let epoch = Epoch::parse(epoch)?;
        if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidInput::position(format!(
                "position {text:?}: serial must be a decimal number"
            )));
        }
        let serial = serial.parse::<u64>().map_err(|_| {
            InvalidInput::position(format!("position {text:?}: serial is out of range"))
        })?;
        Ok(Self::new(epoch, Serial(serial)))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.serial)
    }
}

impl FromStr for Position {
    type Err = InvalidInput;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let position = Position::parse("Ab3_x-9:42").unwrap();
        assert_eq!(position.epoch.as_str(), "Ab3_x-9");
        assert_eq!(position.serial, Serial(42));
        assert_eq!(position.to_string(), "Ab3_x-9:42");
        assert_eq!(Position::parse("e:0").unwrap().serial, Serial(0));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "42",
            ":42",
            "e:",
            "e:-1",
            "e:+1",
            "e:1.5",
            "e:99999999999999999999",
            "a b:1",
            "e:1:2",
        ] {
            assert!(Position::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
