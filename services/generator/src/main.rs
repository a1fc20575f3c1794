#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = jetcall::Config::load()?;
    jetcall::telemetry::init(&config.log);
    let listener = tokio::net::TcpListener::bind(config.generator.listen)
        .await
        .map_err(|err| anyhow::anyhow!("binding {}: {err}", config.generator.listen))?;
    generator::run(config, listener, jetcall::shutdown::on_signal()).await?;
    Ok(())
}
