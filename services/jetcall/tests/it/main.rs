mod config;
mod topology;
