//! tandem: a high-availability cluster manager.
//!
//! This crate is the node daemon and the CLI. It owns the imperative shell
//! (the agent's sockets, processes, timers) and the pure policies that the
//! shell consults (`autopilot`). Consensus lives in `tandem-raft`, the REST
//! layer in `tandem-http-api`.

pub mod agent;
pub mod alerts;
pub mod arbitrator;
pub mod autopilot;
pub mod cli;
pub mod clidocs;
pub mod clock;
pub mod config;
pub mod demo;
pub mod drill;
pub mod executor;
pub mod failover;
pub mod lease;
pub mod liveness;
pub mod metrics;
pub mod promotion;
pub mod reconcile;
pub mod recovery;
pub mod rundir;
pub mod scheduler;
pub mod security;
pub mod sites;
pub mod ticket;
pub mod ticket_link;
pub mod volume;
pub mod volume_events;
pub mod volume_views;
pub mod watchdog;
