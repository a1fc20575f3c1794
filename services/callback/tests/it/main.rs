mod logs;
mod metrics;
mod otlp;
mod restart;
mod ssrf;
mod tenants;
