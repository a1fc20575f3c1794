//! The `jetcall` binary against a real gateway in front of a real nats-server.

mod cost;
mod harness;
mod jobs;
mod submit;
mod topology;
