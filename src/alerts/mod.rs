//! Alerts: telling people and tools what the event log records.
//!
//! `render` (pure) turns an event or a status report into what each kind of
//! target takes; `send` makes one bounded attempt to deliver it. Which
//! events go out, in what order, the retries and the replicated cursor are
//! the leader's sender's (`agent::alerts`). Nothing here decides anything
//! about the cluster, and nothing here may log a secret.

pub mod render;
pub mod send;
