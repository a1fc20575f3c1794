//! Issue 6's fault-injection suite: the gateway, generator and callback binaries as real
//! processes on real nats-servers, a fake Claude and a recording webhook receiver; a few
//! hundred jobs per scenario, a fault injected part-way (kill -9 of a service or of
//! nats-server, a receiver that goes away, a flaky model, a cluster losing its stream
//! leader, two instances of everything), and the same checks after each: nothing lost, every
//! status final, duplicates counted and within what was in flight.
//!
//! The service binaries must be built first (`cargo build --workspace --bins`, which
//! `cargo xtask test` does). Each scenario prints one line of results, also when it passes.

mod run;
mod scenarios;
mod stack;
