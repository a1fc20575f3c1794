mod logs;
mod metrics;
mod restart;
mod ssrf;
mod otlp;
