mod breaker;
mod logs;
mod metrics;
mod otlp;
mod restart;
mod running;
mod ssrf;
mod tenants;
