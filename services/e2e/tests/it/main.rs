mod delivery;
mod observability;
mod pipeline;
mod scenarios;
