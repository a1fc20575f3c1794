mod config;
mod store;
mod topology;
