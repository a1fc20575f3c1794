mod pipeline;
mod delivery;
mod scenarios;
