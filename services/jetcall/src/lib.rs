//! The Jetcall contract shared by every service: configuration, names, events, the job status
//! document and its store, the JetStream topology, callback URL rules and webhook signing.
//!
//! Only this crate spells NATS subjects and payload shapes; services depend on it for both.

pub mod admin;
pub mod allocator;
pub mod allowlist;
pub mod batches;
pub mod budget;
pub mod config;
pub mod connect;
pub mod consume;
pub mod cost;
pub mod durations;
pub mod events;
pub mod gate;
pub mod job;
pub mod kinds;
pub mod lanes;
pub mod metrics;
pub mod publish;
pub mod retry;
pub mod scan;
pub mod sealing;
pub mod secret;
pub mod shutdown;
pub mod signing;
pub mod ssrf;
pub mod status;
pub mod store;
pub mod subjects;
pub mod telemetry;
pub mod topology;
pub mod trace;
pub mod view;
pub mod webhook;

pub use config::Config;
pub use job::{JobId, Kind};
