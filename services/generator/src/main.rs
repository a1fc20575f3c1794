#[global_allocator]
static ALLOCATOR: jetcall::allocator::Jemalloc = jetcall::allocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = jetcall::Config::load()?;
    jetcall::telemetry::init(&config.log);
    let listener = tokio::net::TcpListener::bind(config.generator.listen)
        .await
        .map_err(|err| anyhow::anyhow!("binding {}: {err}", config.generator.listen))?;
    let stopped = generator::run(config, listener, jetcall::shutdown::on_signal()).await;
    // The last spans, if they are exported over OTLP.
    jetcall::telemetry::shutdown().await;
    stopped?;
    Ok(())
}
