use anyhow::Context as _;

#[global_allocator]
static ALLOCATOR: jetcall::allocator::Jemalloc = jetcall::allocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = jetcall::Config::load()?;
    jetcall::telemetry::init(&config.log);
    let listener = tokio::net::TcpListener::bind(config.gateway.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (gateway.listen)",
                config.gateway.listen
            )
        })?;
    let stopped = gateway::run(config, listener, jetcall::shutdown::on_signal()).await;
    // The last spans, if they are exported over OTLP.
    jetcall::telemetry::shutdown().await;
    stopped?;
    Ok(())
}
