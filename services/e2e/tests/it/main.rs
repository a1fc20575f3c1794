mod pipeline;
mod scenarios;
