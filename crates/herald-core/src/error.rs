//! Stable, client-visible error codes (listed in `docs/errors.md`) and input validation errors.

use std::fmt;

/// Every error a client can see. The snake_case string of a code never changes once released.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request body is not valid JSON, or a field has the wrong type or is missing.
    InvalidJson,
    /// A query parameter or other request part is malformed.
    InvalidRequest,
    InvalidChannel,
    InvalidMessageId,
    InvalidPosition,
    InvalidTtl,
    /// `name`, `headers` or `data` is malformed or over its own limit.
    InvalidMessage,
    MessageTooLarge,
    BatchTooLarge,
    /// The HTTP body is over the request size limit.
    RequestTooLarge,
    /// The same message id was published before on this channel with different content.
    IdConflict,
    /// The requested position is older than retention, from another epoch, or ahead of the stream.
    ContinuityLost,
    MessageNotFound,
    /// The channel has never had a message.
    ChannelNotFound,
    NotFound,
    MethodNotAllowed,
    Unauthorized,
    Forbidden,
    /// The store hit an I/O error and refuses writes until a restart recovers it.
    StorageFailed,
    /// The store is shutting down or overloaded; nothing was accepted.
    Unavailable,
    Internal,
    /// The request did not complete in time; a publish may or may not have been stored
    /// (retry it with the same id).
    Timeout,
    /// A WebSocket frame is not valid JSON or does not match its frame type.
    InvalidFrame,
    /// A WebSocket frame has a `type` this protocol version does not know.
    UnknownFrame,
    /// The client asked for a protocol version the server does not speak.
    UnsupportedProtocol,
    /// The connection already has a subscription on this channel.
    AlreadySubscribed,
    /// The connection has no subscription on this channel.
    NotSubscribed,
    /// The connection is at its subscription limit.
    TooManySubscriptions,
    /// A subscription filter does not compile, or is not a boolean expression.
    InvalidFilter,
    /// An `ack` names a serial that was not delivered to this durable subscriber, or another
    /// epoch than its position.
    InvalidAck,
    /// No durable subscriber with this id on this channel.
    SubscriberNotFound,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidJson,
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidChannel,
        ErrorCode::InvalidMessageId,
        ErrorCode::InvalidPosition,
        ErrorCode::InvalidTtl,
        ErrorCode::InvalidMessage,
        ErrorCode::MessageTooLarge,
        ErrorCode::BatchTooLarge,
        ErrorCode::RequestTooLarge,
        ErrorCode::IdConflict,
        ErrorCode::ContinuityLost,
        ErrorCode::MessageNotFound,
        ErrorCode::ChannelNotFound,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::StorageFailed,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Timeout,
        ErrorCode::InvalidFrame,
        ErrorCode::UnknownFrame,
        ErrorCode::UnsupportedProtocol,
        ErrorCode::AlreadySubscribed,
        ErrorCode::NotSubscribed,
        ErrorCode::TooManySubscriptions,
        ErrorCode::InvalidFilter,
        ErrorCode::InvalidAck,
        ErrorCode::SubscriberNotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::InvalidMessageId => "invalid_message_id",
            ErrorCode::InvalidPosition => "invalid_position",
            ErrorCode::InvalidTtl => "invalid_ttl",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::BatchTooLarge => "batch_too_large",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::IdConflict => "id_conflict",
            ErrorCode::ContinuityLost => "continuity_lost",
            ErrorCode::MessageNotFound => "message_not_found",
            ErrorCode::ChannelNotFound => "channel_not_found",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::StorageFailed => "storage_failed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Timeout => "timeout",
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::UnknownFrame => "unknown_frame",
            ErrorCode::UnsupportedProtocol => "unsupported_protocol",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::InvalidFilter => "invalid_filter",
            ErrorCode::InvalidAck => "invalid_ack",
            ErrorCode::SubscriberNotFound => "subscriber_not_found",
        }
    }

    /// The HTTP status that carries this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::InvalidRequest
            | ErrorCode::InvalidChannel
            | ErrorCode::InvalidMessageId
            | ErrorCode::InvalidPosition
            | ErrorCode::InvalidTtl
            | ErrorCode::InvalidMessage
            | ErrorCode::InvalidFrame
            | ErrorCode::UnknownFrame
            | ErrorCode::UnsupportedProtocol
            | ErrorCode::InvalidFilter
            | ErrorCode::InvalidAck => 400,
            ErrorCode::AlreadySubscribed => 409,
            ErrorCode::NotSubscribed => 404,
            ErrorCode::TooManySubscriptions => 429,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::MessageNotFound
            | ErrorCode::ChannelNotFound
            | ErrorCode::NotFound
            | ErrorCode::SubscriberNotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::IdConflict => 409,
            ErrorCode::ContinuityLost => 410,
            ErrorCode::MessageTooLarge | ErrorCode::BatchTooLarge | ErrorCode::RequestTooLarge => {
                413
            }
            ErrorCode::Internal => 500,
            ErrorCode::StorageFailed | ErrorCode::Unavailable | ErrorCode::Timeout => 503,
        }
    }

    /// Whether sending the same request again may succeed. Publishes carry ids, so a retry
    /// after a retryable error never stores a message twice.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::StorageFailed
                | ErrorCode::Unavailable
                | ErrorCode::Internal
                | ErrorCode::Timeout
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Input that failed validation: a stable code plus a human message.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("{message}")]
pub struct InvalidInput {
    pub code: ErrorCode,
    pub message: String,
}

impl InvalidInput {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn channel(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidChannel, message)
    }
    pub fn id(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidMessageId, message)
    }
    pub fn request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }
    pub fn position(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidPosition, message)
    }
    pub fn ttl(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidTtl, message)
    }
    pub fn message(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidMessage, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            let text = code.as_str();
            assert!(text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(seen.insert(text), "duplicate code {text}");
            assert!((400..600).contains(&code.http_status()));
        }
    }

    /// docs/errors.md is the published list: every code must be there with its status and
    /// retryability, and nothing may be listed that the code does not know.
    #[test]
    fn docs_list_every_code() {
        let docs = include_str!("../../../docs/errors.md");
        let mut listed = std::collections::BTreeSet::new();
        for line in docs.lines().filter(|line| line.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            listed.insert(cells[1].trim_matches('`').to_owned());
            let code = ErrorCode::ALL
                .iter()
                .find(|code| code.as_str() == cells[1].trim_matches('`'))
                .unwrap_or_else(|| panic!("docs/errors.md lists unknown code {}", cells[1]));
            assert_eq!(cells[2], code.http_status().to_string(), "status of {code}");
            assert_eq!(cells[3] == "yes", code.retryable(), "retryable of {code}");
        }
        for code in ErrorCode::ALL {
            assert!(
                listed.contains(code.as_str()),
                "docs/errors.md misses {code}"
            );
        }
    }
}
