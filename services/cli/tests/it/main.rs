//! The `jetcall` binary against a real gateway in front of a real nats-server.

mod harness;
mod jobs;
mod submit;
mod topology;
