//! The error body: `{"error": {"code", "message", "retryable", ...details}}`.
//!
//! `code` is one of `herald_core::ErrorCode`'s stable strings (listed in `docs/errors.md`).
//! Details are optional fields that only some codes carry; `continuity_lost` carries
//! `reason`, `requested`, `first_available` and `top`; `id_conflict` carries `id` and `position`.

use herald_core::{ContinuityLost, ErrorCode};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    pub retryable: bool,
    /// `continuity_lost`: `retention`, `epoch_changed` or `ahead_of_top`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `continuity_lost`: the position the reader asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<String>,
    /// `continuity_lost`: the first position still readable (absent when nothing is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_available: Option<String>,
    /// `continuity_lost`: the channel's top (absent for a channel without messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top: Option<String>,
    /// `id_conflict`: the id that was reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `id_conflict`: where the original message with that id is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
}

impl ErrorBody {
    /// A body with just the code's standard fields.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.as_str().to_owned(),
                message: message.into(),
                retryable: code.retryable(),
                reason: None,
                requested: None,
                first_available: None,
                top: None,
                id: None,
                position: None,
            },
        }
    }

    /// The `410 continuity_lost` body: what was asked and where reading can resume.
    pub fn continuity_lost(lost: &ContinuityLost) -> Self {
        let message = match lost.reason {
            herald_core::ContinuityReason::Retention => format!(
                "messages after {} are no longer retained; resume from first_available",
                lost.requested
            ),
            herald_core::ContinuityReason::EpochChanged => format!(
                "position {} belongs to another epoch of this channel; its history was reset",
                lost.requested
            ),
            herald_core::ContinuityReason::AheadOfTop => {
                format!("position {} is ahead of the channel's top", lost.requested)
            }
        };
        let mut body = Self::new(ErrorCode::ContinuityLost, message);
        body.error.reason = Some(lost.reason.as_str().to_owned());
        body.error.requested = Some(lost.requested.to_string());
        body.error.first_available = lost.first_available.as_ref().map(ToString::to_string);
        body.error.top = lost.top.as_ref().map(ToString::to_string);
        body
    }
}
