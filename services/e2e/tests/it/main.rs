mod delivery;
mod pipeline;
mod scenarios;
