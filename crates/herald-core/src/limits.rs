//! Size limits on everything a publisher can send. One struct, with its relations asserted.

/// Limits on messages and batches. Every overflow is rejected with a named error code.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Limits {
    /// Data + name + header keys and values, per message.
    pub message_bytes_max: usize,
    /// Messages per publish batch.
    pub batch_messages_max: usize,
    /// Sum of message sizes in one batch.
    pub batch_bytes_max: usize,
    pub name_bytes_max: usize,
    pub headers_max: usize,
    /// Messages one sync/history read returns at most.
    pub read_limit_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            message_bytes_max: 64 * 1024,
            batch_messages_max: 100,
            batch_bytes_max: 1024 * 1024,
            name_bytes_max: 128,
            headers_max: 32,
            read_limit_max: 1000,
        }
    }
}

impl Limits {
    /// Checks that the limits are usable together; returns a description of the first problem.
    pub fn check(&self) -> Result<(), String> {
        if self.message_bytes_max == 0 || self.message_bytes_max > 16 * 1024 * 1024 {
            return Err("message_bytes_max must be between 1 and 16 MiB".into());
        }
        if self.batch_messages_max == 0 || self.batch_messages_max > 10_000 {
            return Err("batch_messages_max must be between 1 and 10000".into());
        }
        if self.batch_bytes_max < self.message_bytes_max {
            return Err("batch_bytes_max must be at least message_bytes_max".into());
        }
        if self.batch_bytes_max > 64 * 1024 * 1024 {
            return Err("batch_bytes_max must be at most 64 MiB".into());
        }
        if self.read_limit_max == 0 || self.read_limit_max > 100_000 {
            return Err("read_limit_max must be between 1 and 100000".into());
        }
        Ok(())
    }
}
