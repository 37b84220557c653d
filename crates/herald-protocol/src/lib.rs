//! # herald-protocol
//!
//! The JSON bodies of Herald's HTTP API, shared by the server and clients (the CLI, SDKs).
//! Wire types are separate from the domain types of `herald-core` and are converted at the
//! boundary: [`publish`] turns a request into validated `NewMessage`s, [`message`] turns stored
//! `Message`s and read pages into their JSON form.
//!
//! # Layout
//! - [`publish`]: publish requests (single or batch) and their acknowledgements.
//! - [`message`]: the message JSON, read pages and channel status.
//! - [`ws`]: the native WebSocket protocol's frames (docs/protocol.md).
//! - [`error`]: the error body every non-2xx response carries.
//!
//! # Invariants
//! - Every request type rejects unknown fields, so a typo in a field name is an error, not a
//!   silently ignored option.
//! - JSON `data` is stored as the publisher's JSON text with insignificant whitespace removed:
//!   key order and number spelling are kept exactly (no float or big-integer rounding).

pub mod error;
pub mod message;
pub mod publish;
pub mod ws;

pub use error::{ErrorBody, ErrorDetail};
pub use message::{ChannelStatusBody, MessageBody, PageBody, SkippedBody};
pub use publish::{
    Encoding, PublishAck, PublishBatchAck, PublishMessage, PublishRequest, PublishResponse, Ttl,
};
