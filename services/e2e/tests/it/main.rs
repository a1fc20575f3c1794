mod cancellation;
mod console;
mod delivery;
mod observability;
mod pipeline;
mod scenarios;
mod subscriber;
mod terminal;
