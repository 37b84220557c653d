//! The simulated network: one [`Link`] per direction of a connection.
//!
//! A link is a FIFO with a delivery time per frame, like TCP: within a connection frames keep
//! their order (a frame is never due before the one ahead of it), while separate connections
//! have their own delays, so frames of different connections are reordered against each
//! other. Loss is modelled as a cut connection: both links are dropped with whatever they
//! carried.
//!
//! # Invariants
//! - Delivery times along a link never decrease.
//! - A link holds at most `window` frames in flight (the socket buffers); the sender keeps
//!   the rest, which is how a reader that stops reading pushes back on the server.

use std::collections::VecDeque;

/// One direction of a connection.
#[derive(Debug, Default)]
pub struct Link {
    frames: VecDeque<(u64, String)>,
    last_due_ms: u64,
}

impl Link {
    /// Queues `frame` to arrive `delay_ms` from `now_ms`, but never before the frame ahead.
    pub fn push(&mut self, now_ms: u64, delay_ms: u64, frame: String) {
        let due_ms = (now_ms + delay_ms).max(self.last_due_ms);
        self.last_due_ms = due_ms;
        self.frames.push_back((due_ms, frame));
    }

    /// The next frame, if it has arrived by `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<String> {
        if self.frames.front()?.0 > now_ms {
            return None;
        }
        self.frames.pop_front().map(|(_, frame)| frame)
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_keeps_order_even_when_a_later_frame_has_a_shorter_delay() {
        let mut link = Link::default();
        link.push(0, 50, "a".into());
        link.push(10, 1, "b".into());
        assert_eq!(link.pop_due(11), None, "b must wait behind a");
        assert_eq!(link.pop_due(50).as_deref(), Some("a"));
        assert_eq!(link.pop_due(50).as_deref(), Some("b"));
        assert!(link.is_empty());
    }
}
