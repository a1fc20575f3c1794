mod store;
mod topology;
