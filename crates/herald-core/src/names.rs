//! Validated identifiers: channel names, namespaces, message ids and epochs.
//!
//! Each newtype can only be built through its `parse` constructor, so holding one is proof
//! that the value passed validation. They hold `Arc<str>`: the same name or id is copied into
//! messages, index entries and replies many times, and a clone is then a reference count.

use std::fmt;
use std::sync::Arc;

use crate::error::InvalidInput;

/// Maximum length of a channel name in bytes.
pub const CHANNEL_NAME_BYTES_MAX: usize = 255;
/// Maximum length of a message id in bytes.
pub const MESSAGE_ID_BYTES_MAX: usize = 128;
/// Maximum length of an epoch in bytes.
pub const EPOCH_BYTES_MAX: usize = 32;

/// Characters reserved for subscription patterns (ours and MQTT's) or for URL paths.
const CHANNEL_RESERVED_CHARS: &[char] = &['*', '>', '#', '+', '/', '?'];

/// A channel name: `namespace:rest` or a bare name (which uses the default namespace).
///
/// UTF-8, 1..=255 bytes, no whitespace or control characters, none of `* > # + / ?`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    pub fn parse(name: &str) -> Result<Self, InvalidInput> {
        if name.is_empty() {
            return Err(InvalidInput::channel("channel name is empty"));
        }
        if name.len() > CHANNEL_NAME_BYTES_MAX {
            return Err(InvalidInput::channel(format!(
                "channel name is {} bytes, the limit is {CHANNEL_NAME_BYTES_MAX}",
                name.len()
            )));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| c.is_control() || c.is_whitespace() || CHANNEL_RESERVED_CHARS.contains(c))
        {
            return Err(InvalidInput::channel(format!(
                "channel name contains the character {bad:?}, which is not allowed"
            )));
        }
        if let Some((namespace, rest)) = name.split_once(':')
            && (namespace.is_empty() || rest.is_empty())
        {
            return Err(InvalidInput::channel(
                "channel name has an empty namespace or an empty part after ':'",
            ));
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The namespace: the part before the first `:`, or `None` for a bare name.
    pub fn namespace(&self) -> Option<&str> {
        self.0.split_once(':').map(|(namespace, _)| namespace)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelName({:?})", self.0)
    }
}

/// A message id (idempotency key): 1..=128 printable ASCII bytes (`!`..=`~`, no spaces).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(Arc<str>);

impl MessageId {
    pub fn parse(id: &str) -> Result<Self, InvalidInput> {
        if id.is_empty() {
            return Err(InvalidInput::id("message id is empty"));
        }
        if id.len() > MESSAGE_ID_BYTES_MAX {
            return Err(InvalidInput::id(format!(
                "message id is {} bytes, the limit is {MESSAGE_ID_BYTES_MAX}",
                id.len()
            )));
        }
        if !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidInput::id(
                "message id must be printable ASCII without spaces",
            ));
        }
        Ok(Self(Arc::from(id)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({:?})", self.0)
    }
}

/// One incarnation of a channel's stream: `[A-Za-z0-9_-]{1,32}`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(Arc<str>);

impl Epoch {
    pub fn parse(epoch: &str) -> Result<Self, InvalidInput> {
        let valid = !epoch.is_empty()
            && epoch.len() <= EPOCH_BYTES_MAX
            && epoch
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(Arc::from(epoch)))
        } else {
            Err(InvalidInput::position(format!(
                "epoch {epoch:?} must match [A-Za-z0-9_-]{{1,32}}"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        assert!(ChannelName::parse("chat:room-42").is_ok());
        assert_eq!(
            ChannelName::parse("chat:room:42").unwrap().namespace(),
            Some("chat")
        );
        assert_eq!(ChannelName::parse("plain").unwrap().namespace(), None);
        assert_eq!(ChannelName::parse("héllo").unwrap().as_str(), "héllo");
        for bad in ["", "a b", "a*", "chat:", ":x", "a/b", "a\n", "x#", "x>"] {
            assert!(
                ChannelName::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        assert!(ChannelName::parse(&"a".repeat(255)).is_ok());
        assert!(ChannelName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn message_ids() {
        assert!(MessageId::parse("order-1:abc").is_ok());
        assert!(MessageId::parse(&"x".repeat(128)).is_ok());
        assert!(MessageId::parse(&"x".repeat(129)).is_err());
        assert!(MessageId::parse("").is_err());
        assert!(MessageId::parse("a b").is_err());
        assert!(MessageId::parse("é").is_err());
    }

    #[test]
    fn epochs() {
        assert!(Epoch::parse("Ab_9-z").is_ok());
        assert!(Epoch::parse(&"e".repeat(32)).is_ok());
        assert!(Epoch::parse(&"e".repeat(33)).is_err());
        assert!(Epoch::parse("").is_err());
        assert!(Epoch::parse("a:b").is_err());
    }
}
